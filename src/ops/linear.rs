//! y = x·Wᵀ (+ bias) with W frozen, packed 4-bit or dense, and its input gradient dx = dy·W. `route`
//! picks the kernel: the stored rows streamed once for a few tokens (packed.rs), blocks of decoded rows
//! that every token reuses (packed_gemm.rs), or the bf16 kernels (bf16_gemm.rs).

use crate::exec::gpu::Recorder;
use crate::gpu::GpuBuffer;
use crate::gpu::weights::{GpuLinear, LinearBlock};
use crate::model::LinearWeight;
use crate::ops::Precision;
use crate::ops::bf16_gemm;
use crate::ops::{int16_gemm, isa, packed, packed_gemm};
use bytemuck::Zeroable;
use rayon::prelude::*;

impl LinearWeight {
    /// (out_features, in_features).
    pub fn shape(&self) -> (usize, usize) {
        match self {
            LinearWeight::Dense(d) => (d.rows, d.cols),
            LinearWeight::Quant(q) => (q.rows, q.cols),
        }
    }
}

pub fn forward(
    x: &[f32],
    w: &LinearWeight,
    bias: Option<&[f32]>,
    y: &mut [f32],
    precision: Precision,
) {
    let packed = pack_input(x, w.shape().1, precision);
    forward_packed(x, packed.as_ref(), w, bias, y, precision);
}

/// How a frozen product of some tokens runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Route {
    /// Streams the stored rows once (decoding): packed::xwt_few, f32.
    Stream,
    /// Blocks of decoded rows that every token reuses: packed_gemm, f32.
    Blocks,
    /// The bf16 kernels (`--precision default` where the CPU has BF16 dot products).
    Bf16,
    /// The 16-bit integer kernels (`--precision default` on other x86 CPUs with AVX2 where
    /// `int16_gemm::preferred`; `--precision int16` anywhere): 4-bit rows, and
    /// the output projection's dense table (cross_entropy.rs); other dense rows stay f32.
    Int16,
}

/// The one place that routes a frozen product of `tokens` tokens at `precision`: the bf16 kernels only
/// from `BF16_MIN_TOKENS` on (below, their packing outweighs the arithmetic and the f32 ways are
/// faster), and among the f32 ways streaming up to `packed::STREAM_MAX_TOKENS`.
pub fn route(tokens: usize, precision: Precision) -> Route {
    if precision == Precision::Bf16 && tokens >= BF16_MIN_TOKENS {
        Route::Bf16
    } else if precision == Precision::Int16 && tokens >= BF16_MIN_TOKENS {
        Route::Int16
    } else if tokens <= packed::STREAM_MAX_TOKENS {
        Route::Stream
    } else {
        Route::Blocks
    }
}

/// Products of fewer tokens than this run in f32 even at bf16 precision (session 7 streamed up to 32
/// tokens in f32 on every CPU; the bf16 kernels' cost at few rows is their per-call packing).
pub const BF16_MIN_TOKENS: usize = 33;

/// x [tokens, in] as the products of `precision` read it, when they need it repacked (bf16): several
/// linears with one input (q/k/v, gate/up) pack it once.
pub fn pack_input(x: &[f32], inp: usize, precision: Precision) -> Option<bf16_gemm::PackedRows> {
    let tokens = x.len() / inp;
    (route(tokens, precision) == Route::Bf16)
        .then(|| bf16_gemm::PackedRows::for_xwt(x, tokens, inp))
}

/// `forward` with x already packed by `pack_input`.
pub fn forward_packed(
    x: &[f32],
    packed: Option<&bf16_gemm::PackedRows>,
    w: &LinearWeight,
    bias: Option<&[f32]>,
    y: &mut [f32],
    precision: Precision,
) {
    let out = w.shape().0;
    forward_rows_packed(x, packed, w, (0, out), y, precision);
    if let Some(b) = bias {
        y.par_chunks_mut(out)
            .for_each(|row| row.iter_mut().zip(b).for_each(|(y, b)| *y += b));
    }
}

/// y = x·W[start..start + n]ᵀ: the product with a run of W's rows (one expert's of a weight that
/// stacks several), y [tokens, n]; x packed by `pack_input` for the bf16 products.
pub fn forward_rows_packed(
    x: &[f32],
    packed: Option<&bf16_gemm::PackedRows>,
    w: &LinearWeight,
    (start, n): (usize, usize),
    y: &mut [f32],
    precision: Precision,
) {
    let (rows, inp) = w.shape();
    let tokens = x.len() / inp;
    assert_eq!(x.len(), tokens * inp, "linear: x is tokens x in");
    assert_eq!(y.len(), tokens * n, "linear: y is tokens x rows");
    assert!(start + n <= rows, "linear: rows {start}+{n} of {rows}");
    let path = isa::active();
    match (route(tokens, precision), w) {
        (Route::Stream, _) => packed::xwt_few(path, x, w.into(), start, n, y, n, 0, false),
        (Route::Int16, LinearWeight::Quant(q)) => {
            let rows = int16_gemm::Frozen::Packed {
                q,
                first: start,
                rows: n,
            };
            int16_gemm::xwt(int16_gemm::Kernel::for_path(path), x, rows, y)
        }
        (Route::Blocks | Route::Int16, _) => {
            packed_gemm::xwt(path, x, w.into(), start, n, y, n, 0, false)
        }
        (Route::Bf16, _) => {
            let px = packed.expect("bf16 products need the input packed by pack_input");
            bf16_gemm::matmul_xwt(px, w, start, n, y, n, 0, false);
        }
    }
}

/// dx (+)= dy·W.
pub fn backward_input(
    dy: &[f32],
    w: &LinearWeight,
    dx: &mut [f32],
    accumulate: bool,
    precision: Precision,
) {
    backward_input_rows(dy, w, (0, w.shape().0), dx, accumulate, precision)
}

/// dx (+)= dy·W[start..start + n], dy [tokens, n]: `forward_rows_packed`'s input gradient.
pub fn backward_input_rows(
    dy: &[f32],
    w: &LinearWeight,
    (start, n): (usize, usize),
    dx: &mut [f32],
    accumulate: bool,
    precision: Precision,
) {
    let (rows, inp) = w.shape();
    let tokens = dy.len() / n.max(1);
    assert_eq!(dx.len(), tokens * inp, "linear: dx is tokens x in");
    assert!(start + n <= rows, "linear: rows {start}+{n} of {rows}");
    let path = isa::active();
    match (precision, w) {
        (Precision::Bf16, _) => {
            let packed = bf16_gemm::PackedRows::for_aw(dy, tokens, n);
            bf16_gemm::matmul_aw(&packed, w, start, dx, inp, 0, accumulate);
        }
        (Precision::Int16, LinearWeight::Quant(q))
            if tokens >= int16_gemm::Kernel::for_path(path).input_gradient_min_tokens() =>
        {
            let rows = int16_gemm::Frozen::Packed {
                q,
                first: start,
                rows: n,
            };
            int16_gemm::aw(int16_gemm::Kernel::for_path(path), dy, rows, dx, accumulate)
        }
        _ => packed_gemm::aw(path, dy, n, 0, w.into(), start, n, dx, accumulate),
    }
}

/// The uniform of shaders/linear.wgsl: x [tokens, cols] against W [rows, cols] stored in format `fmt`
/// (shaders/common.wgsl numbers them), with groups of `group_size` for the 4-bit formats. W may be one
/// block of a weight split across storage bindings: its rows are the weight's rows
/// `row_offset..row_offset + rows`, which are columns of y (forward) or dy (backward), rows
/// `out_stride` long. Row 0 of W is row `weight_row` of the bound buffer: a vocabulary chunk of the
/// output projection is a run of rows inside its block.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct LinearParams {
    pub tokens: u32,
    pub rows: u32,
    pub cols: u32,
    pub fmt: u32,
    pub group_size: u32,
    pub has_bias: u32,
    pub accumulate: u32,
    pub row_offset: u32,
    pub out_stride: u32,
    pub weight_row: u32,
    /// Forward: row 0 of x is this row of y (a convolution's tile of output pixels).
    pub y_row: u32,
    /// dora_factors: the LoRA update's scale.
    pub scale: f32,
    /// The grouped products of a mixture's stacked experts (`record_expert_forward`): their count,
    /// the rows between two experts' weights, the block's first expert, and the routes per token
    /// where the input rows are the tokens' (0: the input is in sorted rows).
    pub experts: u32,
    pub expert_stride: u32,
    pub first_expert: u32,
    pub gather_k: u32,
}

/// Workgroups of shaders/linear.wgsl for `outputs` columns of y (dx) and `tokens` rows: 64 x 64 each.
pub(crate) fn linear_groups(outputs: usize, tokens: usize) -> [u32; 3] {
    [outputs.div_ceil(64) as u32, tokens.div_ceil(64) as u32, 1]
}

/// A frozen weight block's words, group scales and minimums (the dummy where a format has none).
fn weight_bindings<'b>(dummy: &'b GpuBuffer, block: &'b LinearBlock) -> [(u32, &'b GpuBuffer); 3] {
    [
        (1, &block.words),
        (2, block.scales.as_ref().unwrap_or(dummy)),
        (3, block.mins.as_ref().unwrap_or(dummy)),
    ]
}

fn block_params(
    lin: &GpuLinear,
    block: &LinearBlock,
    tokens: usize,
    accumulate: bool,
    with_bias: bool,
) -> LinearParams {
    LinearParams {
        tokens: tokens as u32,
        rows: block.rows as u32,
        cols: lin.cols as u32,
        fmt: lin.fmt,
        group_size: lin.group as u32,
        has_bias: with_bias as u32,
        accumulate: accumulate as u32,
        row_offset: block.start as u32,
        out_stride: lin.rows as u32,
        weight_row: 0,
        y_row: 0,
        scale: 0.0,
        ..LinearParams::zeroed()
    }
}

/// The GPU lowering of `forward`: each row block of W writes its columns of y.
pub(crate) fn record_forward(
    r: &mut Recorder,
    lin: &GpuLinear,
    bias: Option<&GpuBuffer>,
    x: &GpuBuffer,
    y: &GpuBuffer,
) {
    record_forward_rows(r, lin, bias, (x, x.len / lin.cols), (y, 0));
}

/// `record_forward` of the first `tokens` rows of x into y from row `y_row` on.
pub(crate) fn record_forward_rows(
    r: &mut Recorder,
    lin: &GpuLinear,
    bias: Option<&GpuBuffer>,
    (x, t): (&GpuBuffer, usize),
    (y, y_row): (&GpuBuffer, usize),
) {
    let dummy = r.dummy;
    for block in &lin.blocks {
        let p = LinearParams {
            y_row: y_row as u32,
            ..block_params(lin, block, t, false, bias.is_some())
        };
        let mut bindings = weight_bindings(dummy, block).to_vec();
        bindings.extend([(4, bias.unwrap_or(dummy)), (5, x), (6, y)]);
        r.dispatch(
            "linear_forward",
            &p,
            &bindings,
            linear_groups(block.rows, t),
        );
    }
}

/// The GPU lowering of `ops::dora::factors`: each row block of W its rows' factors, A its "tokens".
pub(crate) fn record_dora_factors(
    r: &mut Recorder,
    lin: &GpuLinear,
    (a, b, magnitude): (&GpuBuffer, &GpuBuffer, &GpuBuffer),
    (rank, scale): (usize, f32),
    factors: &GpuBuffer,
) {
    let dummy = r.dummy;
    for block in &lin.blocks {
        let p = LinearParams {
            scale,
            ..block_params(lin, block, rank, false, false)
        };
        let mut bindings = weight_bindings(dummy, block).to_vec();
        bindings.extend([(5, a), (6, factors), (7, b), (8, magnitude)]);
        let groups = [
            block.rows.min(65535) as u32,
            block.rows.div_ceil(65535) as u32,
            1,
        ];
        r.dispatch("dora_factors", &p, &bindings, groups);
    }
}

/// Which rows of a mixture's stacked expert weight a grouped product reads: each expert's `rows`
/// rows from `offset` within its `stride` (its gate or its up projection in the stacked gate/up).
#[derive(Clone, Copy)]
pub(crate) struct ExpertRows {
    pub stride: usize,
    pub offset: usize,
    pub rows: usize,
}

/// The sorted rows of a mixture's slots (`ops::moe`'s `sorted` buffer) and its shape.
#[derive(Clone, Copy)]
pub(crate) struct SortedRows<'a> {
    pub sorted: &'a GpuBuffer,
    pub experts: usize,
    pub tokens: usize,
}

/// Each block's experts of a stacked weight split on whole experts (`GpuLinear::upload`): (the
/// block, its first expert, how many).
fn expert_blocks(
    lin: &GpuLinear,
    stride: usize,
) -> impl Iterator<Item = (&LinearBlock, usize, usize)> {
    lin.blocks.iter().map(move |block| {
        assert!(
            block.start % stride == 0 && block.rows % stride == 0,
            "a stacked expert weight is split on whole experts"
        );
        (block, block.start / stride, block.rows / stride)
    })
}

fn expert_params(
    lin: &GpuLinear,
    (block, first, rows): (&LinearBlock, usize, ExpertRows),
    (sorted, gather_k): (&SortedRows, usize),
    accumulate: bool,
) -> LinearParams {
    LinearParams {
        rows: rows.rows as u32,
        // Sorted rows of the projection alone, whichever block holds their expert.
        row_offset: 0,
        out_stride: rows.rows as u32,
        weight_row: rows.offset as u32,
        experts: sorted.experts as u32,
        expert_stride: rows.stride as u32,
        first_expert: first as u32,
        gather_k: gather_k as u32,
        ..block_params(lin, block, sorted.tokens, accumulate, false)
    }
}

/// y [sorted rows, rows.rows] = each sorted row of the experts' input times its expert's rows of
/// the stacked weight: x's rows are the tokens' (read through the sorted rows' slots, `gather_k`
/// routes per token) where `gather_k` > 0, else sorted rows themselves.
pub(crate) fn record_expert_forward(
    r: &mut Recorder,
    lin: &GpuLinear,
    (x, gather_k): (&GpuBuffer, usize),
    sorted: &SortedRows,
    rows: ExpertRows,
    y: &GpuBuffer,
) {
    let dummy = r.dummy;
    for (block, first, count) in expert_blocks(lin, rows.stride) {
        let p = expert_params(lin, (block, first, rows), (sorted, gather_k), false);
        let mut bindings = weight_bindings(dummy, block).to_vec();
        bindings.extend([(4, dummy), (5, x), (6, y), (9, sorted.sorted)]);
        let [gx, gy, _] = linear_groups(rows.rows, sorted.tokens);
        r.dispatch("moe_linear_forward", &p, &bindings, [gx, gy, count as u32]);
    }
}

/// dx [sorted rows, cols] (+)= each sorted row of dy [sorted rows, rows.rows] times its expert's
/// rows of the stacked weight.
pub(crate) fn record_expert_backward_input(
    r: &mut Recorder,
    lin: &GpuLinear,
    dy: &GpuBuffer,
    sorted: &SortedRows,
    rows: ExpertRows,
    (dx, accumulate): (&GpuBuffer, bool),
) {
    let dummy = r.dummy;
    for (block, first, count) in expert_blocks(lin, rows.stride) {
        let p = expert_params(lin, (block, first, rows), (sorted, 0), accumulate);
        let mut bindings = weight_bindings(dummy, block).to_vec();
        bindings.extend([(5, dy), (6, dx), (9, sorted.sorted)]);
        let [gx, gy, _] = linear_groups(lin.cols, sorted.tokens);
        let entry = "moe_linear_backward_input";
        r.dispatch(entry, &p, &bindings, [gx, gy, count as u32]);
    }
}

/// The GPU lowering of `backward_input`: every row block adds its share of dy·W.
pub(crate) fn record_backward_input(
    r: &mut Recorder,
    lin: &GpuLinear,
    dy: &GpuBuffer,
    dx: &GpuBuffer,
    accumulate: bool,
) {
    let t = dy.len / lin.rows;
    assert!(
        accumulate || lin.blocks.len() == 1,
        "a weight split in blocks adds each block's share"
    );
    let dummy = r.dummy;
    for block in &lin.blocks {
        let p = block_params(lin, block, t, accumulate, false);
        let mut bindings = weight_bindings(dummy, block).to_vec();
        bindings.extend([(5, dy), (6, dx)]);
        r.dispatch(
            "linear_backward_input",
            &p,
            &bindings,
            linear_groups(lin.cols, t),
        );
    }
}
