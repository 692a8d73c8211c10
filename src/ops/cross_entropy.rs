//! Token cross-entropy through the output projection, computed a chunk of the vocabulary at a time so that
//! the [positions, vocab] logits never exist at once (151,936 columns for Qwen), and only at positions
//! that carry a label.

use crate::exec::gpu::Recorder;
use crate::gpu::weights::GpuDense;
use crate::gpu::{GpuBuffer, groups_1d};
use crate::model::{DenseData, DenseTensor};
use crate::ops::bf16_gemm;
use crate::ops::fastmath;
use crate::ops::int16_gemm::{self, Frozen};
use crate::ops::linear::{self, LinearParams, linear_groups};
use crate::ops::{Dims4, Precision};
use crate::ops::{isa, packed, packed_gemm};
use bytemuck::Zeroable;
use rayon::prelude::*;

/// Vocabulary rows per chunk: the logits of one chunk exist at a time.
pub const VOCAB_CHUNK: usize = 4096;

/// The hidden states in the form each precision multiplies them in.
enum Hidden<'a> {
    /// With the current vocabulary chunk of a 16-bit head converted to f32 once, for both products.
    F32 {
        hidden: &'a [f32],
        chunk: DenseTensor,
    },
    Bf16(bf16_gemm::PackedRows),
    /// The head's rows quantized to 16-bit integers a block at a time as the products read them.
    Int16 {
        hidden: &'a [f32],
        kernel: int16_gemm::Kernel,
    },
}

impl<'a> Hidden<'a> {
    fn new(hidden: &'a [f32], positions: usize, dim: usize, precision: Precision) -> Self {
        let kernel = int16_gemm::Kernel::for_path(isa::active());
        match precision {
            // One threshold for the loss alone and for the loss with its gradient (the input
            // gradient's, the higher; measured on 4-bit rows), so that both give the same losses;
            // and only where the width is whole groups.
            Precision::Int16
                if positions >= kernel.input_gradient_min_tokens()
                    && int16_gemm::dense_group(dim).is_some() =>
            {
                Hidden::Int16 { hidden, kernel }
            }
            Precision::F32 | Precision::Int16 => Hidden::F32 {
                hidden,
                chunk: DenseTensor {
                    rows: 0,
                    cols: dim,
                    data: DenseData::F32(Vec::new()),
                },
            },
            Precision::Bf16 => Hidden::Bf16(bf16_gemm::PackedRows::for_xwt(hidden, positions, dim)),
        }
    }

    /// logits[positions, n] = hidden · head[start..start + n]ᵀ
    fn chunk_logits(&mut self, head: &DenseTensor, start: usize, n: usize, logits: &mut [f32]) {
        match self {
            Hidden::F32 { hidden, chunk } => {
                if !matches!(head.data, DenseData::F32(_)) {
                    convert_rows(head, start, n, chunk);
                }
                let (rows, first) = f32_chunk(head, chunk, start);
                packed_gemm::xwt(isa::active(), hidden, rows, first, n, logits, n, 0, false);
            }
            Hidden::Bf16(packed) => {
                bf16_gemm::matmul_xwt(packed, head, start, n, logits, n, 0, false)
            }
            Hidden::Int16 { hidden, kernel } => {
                int16_gemm::xwt(*kernel, hidden, chunk_rows(head, start, n), logits)
            }
        }
    }
}

/// Rows start..start + n of the head for the integer products.
fn chunk_rows(head: &DenseTensor, start: usize, n: usize) -> Frozen<'_> {
    Frozen::Dense {
        table: head,
        first: start,
        rows: n,
    }
}

/// Rows start..start + n of a 16-bit head into `chunk` as f32, on every thread.
fn convert_rows(head: &DenseTensor, start: usize, n: usize, chunk: &mut DenseTensor) {
    let DenseData::F32(values) = &mut chunk.data else {
        unreachable!("the chunk is f32")
    };
    values.resize(n * head.cols, 0.0);
    values
        .par_chunks_mut(head.cols)
        .enumerate()
        .for_each(|(i, row)| head.row_f32(start + i, row));
    chunk.rows = n;
}

/// The f32 rows of the chunk that starts at `start`, and the first one's index in them: the head
/// itself when it is f32, else the chunk `convert_rows` made.
fn f32_chunk<'h>(
    head: &'h DenseTensor,
    chunk: &'h DenseTensor,
    start: usize,
) -> (packed::Rows<'h>, usize) {
    match head.data {
        DenseData::F32(_) => (packed::Rows::Dense(head), start),
        _ => (packed::Rows::Dense(chunk), 0),
    }
}

/// Logit soft-capping (Gemma 2, Gemma 4: `final_logit_softcapping`): z = cap · tanh(logit / cap),
/// in place. The argument is clamped where tanh is ±1 in f32 anyway, as the GPU kernel must.
pub fn soft_cap(logits: &mut [f32], cap: f32) {
    logits.par_chunks_mut(4096).for_each(|row| {
        row.iter_mut()
            .for_each(|z| *z = cap * (*z / cap).clamp(-10.0, 10.0).tanh())
    });
}

/// dz/dlogit of `soft_cap` from its output z: 1 − (z / cap)².
#[inline(always)]
pub(crate) fn soft_cap_slope(z: f32, cap: f32) -> f32 {
    let t = z / cap;
    1.0 - t * t
}

/// Calls `f(chunk_start, chunk_len, logits [positions, chunk_len])` for each vocabulary chunk, the
/// logits soft-capped where `softcap` is given.
fn for_each_chunk(
    hidden: &[f32],
    head: &DenseTensor,
    precision: Precision,
    softcap: Option<f32>,
    mut f: impl FnMut(usize, usize, &mut [f32]),
) {
    let positions = hidden.len() / head.cols;
    let mut h = Hidden::new(hidden, positions, head.cols, precision);
    let mut logits = Vec::new();
    for start in (0..head.rows).step_by(VOCAB_CHUNK) {
        let n = VOCAB_CHUNK.min(head.rows - start);
        logits.resize(positions * n, 0.0);
        h.chunk_logits(head, start, n, &mut logits);
        if let Some(cap) = softcap {
            soft_cap(&mut logits, cap);
        }
        f(start, n, &mut logits);
    }
}

/// How each labelled token's cross-entropy counts in the loss (TRL's `loss_type`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LossType {
    /// The negative log-likelihood of each label.
    #[default]
    Nll,
    /// Dynamic fine-tuning (arXiv 2508.05629): each token's negative log-likelihood weighted by the
    /// probability the model gives the label, that weight held constant in the backward.
    Dft,
}

serde_as_value_enum!(LossType);

impl LossType {
    /// The loss type `Input::LossType` holds (1: DFT).
    pub fn of_input(value: f32) -> Self {
        match value > 0.5 {
            true => LossType::Dft,
            false => LossType::Nll,
        }
    }

    /// The weight of a token whose cross-entropy is `loss` (its label's probability is exp(−loss)).
    pub fn weight(self, loss: f64) -> f64 {
        match self {
            LossType::Nll => 1.0,
            LossType::Dft => (-loss).exp(),
        }
    }
}

/// What cross-entropy gives one labelled position: the loss −log softmax[label], the log-sum-exp the
/// backward needs, and what TRL logs beside the loss: the entropy of the predicted distribution (in
/// nats) and whether the label is the most likely token (the first of the largest logits, as torch's
/// argmax picks it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenLoss {
    pub loss: f32,
    pub lse: f32,
    pub entropy: f32,
    pub top1: bool,
}

impl TokenLoss {
    /// The values per position in a step's `losses` output.
    pub const WIDTH: usize = 4;

    pub fn to_row(self) -> [f32; Self::WIDTH] {
        [
            self.loss,
            self.lse,
            self.entropy,
            f32::from(u8::from(self.top1)),
        ]
    }

    pub fn from_row(row: &[f32]) -> Self {
        TokenLoss {
            loss: row[0],
            lse: row[1],
            entropy: row[2],
            top1: row[3] > 0.5,
        }
    }
}

/// One position's online walk over the vocabulary chunks: the running maximum m, Σ exp(z − m) and
/// Σ exp(z − m)·z (rescaled whenever m grows), the label's logit, and the largest logit before the
/// label's index.
#[derive(Clone, Copy, Debug)]
struct Running {
    max: f32,
    sum: f32,
    weighted: f32,
    label_logit: f32,
    max_before_label: f32,
}

impl Running {
    const START: Running = Running {
        max: f32::NEG_INFINITY,
        sum: 0.0,
        weighted: 0.0,
        label_logit: 0.0,
        max_before_label: f32::NEG_INFINITY,
    };

    /// Folds the logits `row` of vocabulary rows start.. in, replacing each with exp(logit − new
    /// max). Returns the factor by which everything summed against the old maximum must be rescaled.
    fn absorb(&mut self, row: &mut [f32], start: usize, label: usize) -> f32 {
        let end = start + row.len();
        if (start..end).contains(&label) {
            self.label_logit = row[label - start];
            self.max_before_label = self
                .max_before_label
                .max(fastmath::max(&row[..label - start]));
        }
        let chunk_max = fastmath::max(row);
        if end <= label {
            self.max_before_label = self.max_before_label.max(chunk_max);
        }
        let new_max = chunk_max.max(self.max);
        let rescale = fastmath::exp(self.max - new_max);
        let (sum, weighted) = fastmath::exp_shifted_sums(row, new_max);
        self.sum = self.sum * rescale + sum;
        self.weighted = self.weighted * rescale + weighted;
        self.max = new_max;
        rescale
    }

    fn token(&self) -> TokenLoss {
        let lse = self.max + self.sum.ln();
        TokenLoss {
            loss: lse - self.label_logit,
            lse,
            entropy: lse - self.weighted / self.sum,
            top1: self.label_logit >= self.max && self.label_logit > self.max_before_label,
        }
    }
}

/// Per labelled position, the loss −log softmax(h·Wᵀ)[label] and what goes with it (`TokenLoss`).
pub fn forward(
    hidden: &[f32],
    head: &DenseTensor,
    labels: &[u32],
    precision: Precision,
    softcap: Option<f32>,
) -> Vec<TokenLoss> {
    let positions = labels.len();
    assert_eq!(
        hidden.len(),
        positions * head.cols,
        "cross_entropy: hidden is positions x dim"
    );
    let mut state = vec![Running::START; positions];
    for_each_chunk(hidden, head, precision, softcap, |start, n, logits| {
        logits
            .par_chunks_mut(n)
            .zip(state.par_iter_mut())
            .zip(labels.par_iter())
            .for_each(|((row, running), &label)| {
                running.absorb(row, start, label as usize);
            });
    });
    state.iter().map(Running::token).collect()
}

/// The loss and log-sum-exp (as `forward`) and the loss's gradient d hidden = grad_scale · weight ·
/// (softmax · W − W[label]) (the weight `loss_type`'s, 1 for the plain loss) in one pass
/// over the vocabulary: per position a running maximum m, sum s = Σ exp(logit − m) and accumulator
/// acc = Σ exp(logit − m) · W_v, rescaled whenever m grows (as online softmax does), so each chunk's
/// logits are computed once and d hidden = grad_scale · (acc / s − W[label]) at the end. With a soft
/// cap, each term carries the cap's slope at its logit.
pub fn forward_backward(
    hidden: &[f32],
    head: &DenseTensor,
    labels: &[u32],
    grad_scale: f32,
    loss_type: LossType,
    precision: Precision,
    softcap: Option<f32>,
) -> (Vec<TokenLoss>, Vec<f32>) {
    let positions = labels.len();
    let dim = head.cols;
    assert_eq!(
        hidden.len(),
        positions * dim,
        "cross_entropy: hidden is positions x dim"
    );
    let mut h = Hidden::new(hidden, positions, dim, precision);
    let mut state = vec![Running::START; positions];
    let mut acc = vec![0f32; positions * dim];
    let mut probs = Vec::new();
    for start in (0..head.rows).step_by(VOCAB_CHUNK) {
        let n = VOCAB_CHUNK.min(head.rows - start);
        probs.resize(positions * n, 0.0);
        h.chunk_logits(head, start, n, &mut probs);
        if let Some(cap) = softcap {
            soft_cap(&mut probs, cap);
        }
        // The cap's slopes of a row are taken before `absorb` turns its logits into exponentials,
        // into a row of scratch per worker rather than a second copy of the chunk.
        probs
            .par_chunks_mut(n)
            .zip(acc.par_chunks_mut(dim))
            .zip(state.par_iter_mut())
            .zip(labels.par_iter())
            .for_each_init(Vec::new, |slope, (((row, acc_row), running), &label)| {
                if let Some(cap) = softcap {
                    slope.clear();
                    slope.extend(row.iter().map(|&z| soft_cap_slope(z, cap)));
                }
                let rescale = running.absorb(row, start, label as usize);
                if rescale != 1.0 {
                    acc_row.iter_mut().for_each(|a| *a *= rescale);
                }
                if softcap.is_some() {
                    row.iter_mut().zip(slope.iter()).for_each(|(e, s)| *e *= s);
                }
            });
        match &h {
            Hidden::F32 { chunk, .. } => {
                let (rows, first) = f32_chunk(head, chunk, start);
                packed_gemm::aw(isa::active(), &probs, n, 0, rows, first, n, &mut acc, true);
            }
            Hidden::Bf16(_) => {
                let a = bf16_gemm::PackedRows::for_aw(&probs, positions, n);
                bf16_gemm::matmul_aw(&a, head, start, &mut acc, dim, 0, true);
            }
            Hidden::Int16 { kernel, .. } => {
                int16_gemm::aw(*kernel, &probs, chunk_rows(head, start, n), &mut acc, true)
            }
        }
    }
    let mut d_hidden = acc;
    d_hidden
        .par_chunks_mut(dim)
        .zip(state.par_iter())
        .zip(labels.par_iter())
        .for_each(|((d, running), &label)| {
            let mut label_row = vec![0f32; dim];
            head.row_f32(label as usize, &mut label_row);
            let label_slope = softcap.map_or(1.0, |cap| soft_cap_slope(running.label_logit, cap));
            let scale = grad_scale * loss_type.weight(running.token().loss as f64) as f32;
            for (g, w) in d.iter_mut().zip(&label_row) {
                *g = scale * (*g / running.sum - label_slope * w);
            }
        });
    (state.iter().map(Running::token).collect(), d_hidden)
}

/// Full logits [positions, vocab] (for evaluation of small models and tests), soft-capped where
/// `softcap` is given.
pub fn logits(
    hidden: &[f32],
    head: &DenseTensor,
    precision: Precision,
    softcap: Option<f32>,
) -> Vec<f32> {
    let positions = hidden.len() / head.cols;
    let mut out = vec![0f32; positions * head.rows];
    let vocab = head.rows;
    let route = linear::route(positions, precision);
    if route == linear::Route::Stream {
        // Decoding: the rows stream as stored, with no f32 copy of each chunk.
        let rows = packed::Rows::Dense(head);
        packed::xwt_few(
            isa::active(),
            hidden,
            rows,
            0,
            vocab,
            &mut out,
            vocab,
            0,
            false,
        );
        if let Some(cap) = softcap {
            soft_cap(&mut out, cap);
        }
        return out;
    }
    let precision = match route {
        linear::Route::Bf16 => Precision::Bf16,
        linear::Route::Int16 => Precision::Int16,
        _ => Precision::F32,
    };
    for_each_chunk(hidden, head, precision, softcap, |start, n, chunk| {
        for p in 0..positions {
            out[p * vocab + start..p * vocab + start + n]
                .copy_from_slice(&chunk[p * n..(p + 1) * n]);
        }
    });
    out
}

/// The uniform of shaders/cross_entropy.wgsl: one vocabulary chunk of one output-projection block. The
/// chunk's logits and the product of their gradient with its rows are shaders/linear.wgsl's.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct CeParams {
    pub positions: u32,
    pub chunk_start: u32,
    pub chunk_len: u32,
    pub block_start: u32,
    pub grad_scale: f32,
    /// The soft cap of the logits; 0 for none.
    pub softcap: f32,
    /// The hidden width (the head's columns).
    pub dim: u32,
    /// The head's storage format (`FMT_*`), for the label rows `ce_grad_finish` reads.
    pub fmt: u32,
    /// 1 where each position's gradient is weighted by its label's probability (`LossType::Dft`).
    pub dft: u32,
    pub _pad: [u32; 3],
}

/// One vocabulary chunk of the output projection as a frozen linear layer (shaders/linear.wgsl):
/// positions x chunk rows.
fn chunk_linear_params(head: &GpuDense, p: &CeParams, accumulate: bool) -> LinearParams {
    LinearParams {
        tokens: p.positions,
        rows: p.chunk_len,
        cols: head.cols as u32,
        fmt: head.fmt,
        // Dense formats have no groups.
        group_size: 1,
        has_bias: 0,
        accumulate: accumulate as u32,
        row_offset: 0,
        out_stride: p.chunk_len,
        weight_row: p.chunk_start,
        y_row: 0,
        scale: 0.0,
        ..LinearParams::zeroed()
    }
}

fn record_chunk_logits(
    r: &mut Recorder,
    block: &GpuBuffer,
    lp: &LinearParams,
    hidden: &GpuBuffer,
    logits: &GpuBuffer,
) {
    let d = r.dummy;
    let groups = linear_groups(lp.rows as usize, lp.tokens as usize);
    let b = [(1, block), (2, d), (3, d), (4, d), (5, hidden), (6, logits)];
    r.dispatch("linear_forward", lp, &b, groups);
}

/// The parameters of `rows` rows of the head's block that starts at `block_start`, from its row
/// `chunk_start`.
fn ce_params(
    head: &GpuDense,
    positions: usize,
    grad_scale: f32,
    softcap: Option<f32>,
    (block_start, chunk_start, rows): (usize, usize, usize),
) -> CeParams {
    CeParams {
        positions: positions as u32,
        chunk_start: chunk_start as u32,
        chunk_len: rows as u32,
        block_start: block_start as u32,
        grad_scale,
        softcap: softcap.unwrap_or(0.0),
        dim: head.cols as u32,
        fmt: head.fmt,
        dft: 0,
        _pad: [0; 3],
    }
}

/// Calls `f` for each vocabulary chunk of `head` with its block buffer and parameters.
fn for_each_gpu_chunk(
    r: &mut Recorder,
    head: &GpuDense,
    positions: usize,
    grad_scale: f32,
    softcap: Option<f32>,
    mut f: impl FnMut(&mut Recorder, &GpuBuffer, CeParams),
) {
    for (block_start, rows, block) in &head.blocks {
        let (block_start, rows) = (*block_start, *rows);
        for chunk_start in (0..rows).step_by(VOCAB_CHUNK) {
            let n = VOCAB_CHUNK.min(rows - chunk_start);
            let chunk = (block_start, chunk_start, n);
            f(
                r,
                block,
                ce_params(head, positions, grad_scale, softcap, chunk),
            );
        }
    }
}

/// The GPU lowering of `forward` and (with `d_hidden`) `forward_backward` (shaders/cross_entropy.wgsl):
/// per-position `TokenLoss` rows into `result`, and grad_scale times the loss's gradient with respect
/// to `hidden`, in one walk over the vocabulary as `forward_backward` does: each chunk's logits are
/// computed once, folded into the running sums, turned into their softmax weights against the running
/// max, and multiplied by the chunk's rows into d_hidden (rescaled when the max grows).
pub(crate) fn record(
    r: &mut Recorder,
    head: &GpuDense,
    hidden: &GpuBuffer,
    labels: &GpuBuffer,
    result: &GpuBuffer,
    d_hidden: Option<&GpuBuffer>,
    softcap: Option<f32>,
) {
    let np = labels.len;
    let grad_scale = r.inputs.grad_scale;
    // shaders/cross_entropy.wgsl's STATE values per position, as `Running::START`.
    let running: Vec<f32> = (0..np)
        .flat_map(|_| [-3.0e38f32, 0.0, 0.0, 0.0, -3.0e38])
        .collect();
    let state = r.gpu.upload_f32(&running);
    let logits = r.scratch(np * VOCAB_CHUNK);
    let mut first_chunk = true;
    for_each_gpu_chunk(r, head, np, grad_scale, softcap, |r, block, p| {
        let lp = chunk_linear_params(head, &p, false);
        record_chunk_logits(r, block, &lp, hidden, &logits);
        let b = [(3, &logits), (4, &state), (5, labels)];
        let Some(d_hidden) = d_hidden else {
            r.dispatch("ce_reduce", &p, &b, [np as u32, 1, 1]);
            return;
        };
        r.dispatch(
            "ce_absorb",
            &p,
            &[b[0], b[1], b[2], (6, d_hidden)],
            [np as u32, 1, 1],
        );
        // d_hidden (+)= weights · chunk rows; the first chunk's product is the sum so far.
        let lp = chunk_linear_params(head, &p, !first_chunk);
        first_chunk = false;
        let d = r.dummy;
        let groups = linear_groups(lp.cols as usize, np);
        let b = [(1, block), (2, d), (3, d), (5, &logits), (6, d_hidden)];
        r.dispatch("linear_backward_input", &lp, &b, groups);
    });
    let p = ce_params(head, np, grad_scale, None, (0, 0, 0));
    r.dispatch(
        "ce_finalize",
        &p,
        &[(4, &state), (7, result)],
        groups_1d(np, 64),
    );
    let Some(d_hidden) = d_hidden else {
        return;
    };
    let dft = u32::from(r.inputs.loss_type == LossType::Dft);
    for (block_start, rows, block) in &head.blocks {
        let p = CeParams {
            dft,
            ..ce_params(head, np, grad_scale, softcap, (*block_start, 0, *rows))
        };
        let b = [(1, block), (4, &state), (5, labels), (6, d_hidden)];
        let groups = [(head.cols as u32).div_ceil(64), np as u32, 1];
        r.dispatch("ce_grad_finish", &p, &b, groups);
    }
}

/// The GPU lowering of `logits`: each chunk's logits land in their columns of `out` [positions, vocab].
pub(crate) fn record_logits(
    r: &mut Recorder,
    head: &GpuDense,
    hidden: &GpuBuffer,
    out: &GpuBuffer,
    softcap: Option<f32>,
) {
    let positions = hidden.len / head.cols;
    let vocab = out.len / positions.max(1);
    for_each_gpu_chunk(r, head, positions, 0.0, None, |r, block, p| {
        let lp = LinearParams {
            out_stride: vocab as u32,
            row_offset: p.block_start + p.chunk_start,
            ..chunk_linear_params(head, &p, false)
        };
        record_chunk_logits(r, block, &lp, hidden, out);
    });
    if let Some(cap) = softcap {
        let p = Dims4 {
            b: cap.to_bits(),
            ..Dims4::n(out.len)
        };
        r.dispatch("soft_cap", &p, &[(3, out)], groups_1d(out.len, 256));
    }
}
