//! LoRA dropout with counter-based masks: whether element `i` of a LoRA branch's input is kept is a pure
//! function of (step seed, stream, i). Nothing is stored between the forward and the backward, which
//! recompute the same mask; gradient checkpointing needs no generator bookkeeping; and the GPU kernel
//! (shaders/dropout.wgsl) draws exactly the masks the CPU draws, in 32-bit integer arithmetic that WGSL
//! has everywhere. NEFTune's noise on the embeddings is drawn from the same hash (`add_uniform_noise`).

use crate::exec::gpu::Recorder;
use crate::gpu::{GpuBuffer, groups_1d};
use crate::ops::fastmath;
use crate::ops::matmul::{self, View, in_parallel_task};
use bytemuck::{Pod, Zeroable};
use rayon::prelude::*;

/// The uniform layout of shaders/dropout.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct DropoutParams {
    pub n: u32,
    pub seed_lo: u32,
    pub seed_hi: u32,
    pub stream: u32,
    /// Probability of dropping an element.
    pub p: f32,
    /// 1 / (1 − p), what kept elements are multiplied by.
    pub keep_scale: f32,
    pub _pad: [u32; 2],
}

impl DropoutParams {
    pub fn new(n: usize, seed: u64, stream: u32, p: f32) -> Self {
        DropoutParams {
            n: n as u32,
            seed_lo: seed as u32,
            seed_hi: (seed >> 32) as u32,
            stream,
            p,
            keep_scale: 1.0 / (1.0 - p),
            _pad: [0; 2],
        }
    }
}

/// The stream of NEFTune's noise, apart from every LoRA linear's.
pub const NOISE_STREAM: u32 = u32::MAX;

impl DropoutParams {
    /// The parameters of `add_uniform_noise` over `n` values: the noise lies in [−magnitude,
    /// magnitude), held where dropout holds its probability.
    pub fn noise(n: usize, seed: u64, magnitude: f32) -> Self {
        DropoutParams {
            keep_scale: 0.0,
            ..DropoutParams::new(n, seed, NOISE_STREAM, magnitude)
        }
    }
}

/// The stream of one LoRA linear (`LinearKind as usize`): every (layer, linear) pair of a model draws
/// independent masks. A layer's first nine kinds (separate or fused projections: a model has one set
/// or the other, seven at most) keep the numbering runs have trained with; the later kinds (Gemma 4's
/// per-layer inputs, Qwen2-MoE's shared expert), which at seven a layer would take the next layer's
/// streams, count from 0x8000, below the bits a chunk adds (`<< 16`).
pub fn stream(layer: usize, linear: usize) -> u32 {
    const PER_LAYER: usize = 7;
    const FIRST_LATER: usize = 9;
    const LATER_PER_LAYER: usize = 8;
    match linear < FIRST_LATER {
        true => (layer * PER_LAYER + linear) as u32,
        false => (0x8000 + layer * LATER_PER_LAYER + (linear - FIRST_LATER)) as u32,
    }
}

/// A 32-bit integer hash with good avalanche (Wellons' "lowbias32").
fn mix(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

impl DropoutParams {
    /// The per-mask part of the hash, the same for every element.
    pub(crate) fn mask_key(&self) -> u32 {
        mix(mix(self.stream ^ mix(self.seed_lo ^ mix(self.seed_hi))))
    }
}

/// Whether the element with hash input `index ^ mask_key` survives: a uniform draw in [0, 1) with 24
/// bits, kept when ≥ p. 24 bits convert to f32 exactly, so the GPU compares the same number.
#[inline]
fn kept(mask_key: u32, p: f32, index: u32) -> bool {
    let h = mix(index ^ mask_key);
    (h >> 8) as f32 * (1.0 / 16_777_216.0) >= p
}

/// Element `index`'s noise for `add_uniform_noise` with half-width `magnitude`: the element's 24-bit
/// uniform draw u as magnitude · (2u − 1), exact in f32 but for the final product.
#[inline]
fn noise(mask_key: u32, magnitude: f32, index: u32) -> f32 {
    let h = mix(index ^ mask_key);
    magnitude * ((h >> 8) as f32 * (2.0 / 16_777_216.0) - 1.0)
}

/// x += noise uniform in [−magnitude, magnitude) (`params` from `DropoutParams::noise`), each element's
/// a pure function of (seed, its index), as NEFTune adds to the embeddings in training.
pub fn add_uniform_noise(params: &DropoutParams, x: &mut [f32]) {
    assert_eq!(x.len(), params.n as usize, "noise: n differs");
    let (key, magnitude) = (params.mask_key(), params.p);
    x.par_chunks_mut(TASK).enumerate().for_each(|(task, x)| {
        let first = (task * TASK) as u32;
        fastmath::wide(
            #[inline(always)]
            || {
                for (v, i) in x.iter_mut().zip(first..) {
                    *v += noise(key, magnitude, i);
                }
            },
        );
    });
}

/// The GPU lowering of `add_uniform_noise`.
pub(crate) fn record_uniform_noise(r: &mut Recorder, params: &DropoutParams, x: &GpuBuffer) {
    let groups = groups_1d(params.n as usize, 256);
    r.dispatch("uniform_noise", params, &[(2, x)], groups);
}

/// Whether element `index` survives.
pub fn keeps(params: &DropoutParams, index: u32) -> bool {
    kept(params.mask_key(), params.p, index)
}

/// Elements per parallel task: the masks are cheap to draw, so tasks must be long to pay for themselves.
const TASK: usize = 1 << 14;

/// out[i] = x[i]·scale where element first + i is kept, else (with `add`) out[i] is left as it is or
/// (without) set to zero.
#[inline(always)]
fn masked(key: u32, p: f32, scale: f32, first: u32, x: &[f32], out: &mut [f32], add: bool) {
    for ((o, &v), i) in out.iter_mut().zip(x).zip(first..) {
        let kept_value = if kept(key, p, i) { v * scale } else { 0.0 };
        *o = if add { *o + kept_value } else { kept_value };
    }
}

/// `masked` over parallel tasks, on the widest instructions this CPU has.
fn masked_par(params: &DropoutParams, x: &[f32], out: &mut [f32], add: bool) {
    assert_eq!(x.len(), out.len(), "dropout: lengths differ");
    assert_eq!(x.len(), params.n as usize, "dropout: n differs");
    let (key, p, scale) = (params.mask_key(), params.p, params.keep_scale);
    out.par_chunks_mut(TASK)
        .zip(x.par_chunks(TASK))
        .enumerate()
        .for_each(|(task, (out, x))| {
            let first = (task * TASK) as u32;
            // Baseline x86-64 has no packed 32-bit multiply, so the hash vectorises only with AVX2 or
            // AVX-512.
            fastmath::wide(
                #[inline(always)]
                || masked(key, p, scale, first, x, out, add),
            );
        });
}

/// out = dropout(x): kept elements scaled by 1/(1−p), dropped ones zero.
pub fn forward(params: &DropoutParams, x: &[f32], out: &mut [f32]) {
    masked_par(params, x, out, false);
}

/// dropout(x) as a new vector.
pub fn apply(params: &DropoutParams, x: &[f32]) -> Vec<f32> {
    let mut out = super::zeros(x.len());
    forward(params, x, &mut out);
    out
}

/// dx += the gradient through dropout of `dy` (the gradient of dropout(x)).
pub fn backward_accumulate(params: &DropoutParams, dy: &[f32], dx: &mut [f32]) {
    masked_par(params, dy, dx, true);
}

/// The GPU lowering of `forward` (shaders/dropout.wgsl).
pub(crate) fn record_forward(
    r: &mut Recorder,
    params: &DropoutParams,
    x: &GpuBuffer,
    y: &GpuBuffer,
) {
    let groups = groups_1d(params.n as usize, 256);
    r.dispatch("dropout_forward", params, &[(1, x), (2, y)], groups);
}

/// The GPU lowering of `backward_accumulate`: the kernel adds the masked gradient into `dx`.
pub(crate) fn record_backward_accumulate(
    r: &mut Recorder,
    params: &DropoutParams,
    dy: &GpuBuffer,
    dx: &GpuBuffer,
) {
    let groups = groups_1d(params.n as usize, 256);
    r.dispatch("dropout_backward", params, &[(1, dy), (2, dx)], groups);
}

/// Which matrix of a product LoRA dropout applies to (`Op::DropoutMatmul`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropoutSide {
    /// C (+)= alpha · dropout(A)·B: the branch's x′·Aᵀ.
    A,
    /// C (+)= alpha · A·dropout(B): the gradient of LoRA's A, d(xa)ᵀ·x′.
    B,
    /// C += dropout(alpha · A·B): the gradient through dropout into the branch's input.
    Product,
}

impl DropoutSide {
    /// The length of the masked matrix in a product of A [m, k] and B [k, n].
    pub fn masked_len(self, (m, n, k): (usize, usize, usize)) -> usize {
        match self {
            DropoutSide::A => m * k,
            DropoutSide::B => k * n,
            DropoutSide::Product => m * n,
        }
    }
}

/// Rows and columns of the tiles the masked matrix is drawn into: small enough to stay in a core's
/// L2 between drawing and multiplying, which is all the fusion saves (the dropped matrix never goes
/// to memory and back). Fixed, not derived from the thread count, so the sums' order is too.
const TILE_ROWS: usize = 16;
const TILE_COLS: usize = 512;
/// A's gradient (d(xa)ᵀ·x′, [r, width]) splits the width into blocks this wide and the tokens into
/// spans this long, each pair one task summed apart: tasks for every core at the rank's few rows.
const GRAD_COLS: usize = 128;
const GRAD_SPAN: usize = 256;
/// Tokens of x′ drawn per tile within a span: the whole span (a 256 x 128 tile stays in L2), one
/// product per task (tiles of 64 tokens took a fifth longer in the recipe).
const GRAD_ROWS: usize = 256;

/// `Op::DropoutMatmul` on the CPU: C (+)= alpha · A·B with `params`' mask on the `side` matrix,
/// which is row-major (`col_stride` 1; the product's C is [m, n] with `ldc` n). The masks are those
/// `forward` draws over that matrix's buffer, so this equals dropout into a buffer of its own
/// followed by `matmul_into`, up to the order of the sums.
pub fn matmul_into(
    params: &DropoutParams,
    side: DropoutSide,
    a: View,
    b: View,
    alpha: f32,
    c: &mut [f32],
    accumulate: bool,
) {
    assert_eq!(a.cols, b.rows, "dropout matmul: inner dimensions differ");
    let (m, n, k) = (a.rows, b.cols, a.cols);
    if m == 0 || n == 0 {
        return;
    }
    assert_eq!(c.len(), m * n, "dropout matmul: C is not [m, n]");
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    let (masked, cols) = match side {
        DropoutSide::A => (a, k),
        DropoutSide::B => (b, n),
        DropoutSide::Product => (View::new(c, m, n), n),
    };
    assert!(
        masked.col_stride == 1
            && masked.row_stride == cols
            && masked.data.len() == params.n as usize,
        "dropout matmul: the masked matrix must be row-major, all of its buffer"
    );
    let mask = Mask {
        key: params.mask_key(),
        p: params.p,
        scale: params.keep_scale,
    };
    match side {
        DropoutSide::A => {
            c.par_chunks_mut(TILE_ROWS * n)
                .enumerate()
                .for_each(|(block, c)| {
                    let rows = c.len() / n;
                    let first = block * TILE_ROWS;
                    let mut tile = vec![0f32; rows * TILE_COLS.min(k)];
                    for q0 in (0..k).step_by(TILE_COLS) {
                        let cols = TILE_COLS.min(k - q0);
                        let tile = &mut tile[..rows * cols];
                        for (i, out) in tile.chunks_mut(cols).enumerate() {
                            let start = (first + i) * a.row_stride + q0;
                            mask.draw(start, &a.data[start..start + cols], out, false);
                        }
                        let lhs = View::new(tile, rows, cols);
                        let rhs = b.rows_from(q0, cols);
                        in_parallel_task(|| {
                            matmul::matmul_into(lhs, rhs, alpha, c, n, 0, accumulate || q0 > 0)
                        });
                    }
                });
        }
        DropoutSide::B => {
            // Column blocks of C are not contiguous: each (block, token span) is summed apart, and
            // the spans' sums are added in their order (C is [m, n] with m the LoRA rank, small).
            let tasks: Vec<(usize, usize)> = (0..n)
                .step_by(GRAD_COLS)
                .flat_map(|j0| (0..k).step_by(GRAD_SPAN).map(move |s0| (j0, s0)))
                .collect();
            let sums: Vec<Vec<f32>> = tasks
                .par_iter()
                .map(|&(j0, s0)| {
                    let cols = GRAD_COLS.min(n - j0);
                    let span = GRAD_SPAN.min(k - s0);
                    let mut sum = vec![0f32; m * cols];
                    let mut tile = vec![0f32; GRAD_ROWS.min(span) * cols];
                    for q0 in (s0..s0 + span).step_by(GRAD_ROWS) {
                        let rows = GRAD_ROWS.min(s0 + span - q0);
                        let tile = &mut tile[..rows * cols];
                        for (q, out) in tile.chunks_mut(cols).enumerate() {
                            let start = (q0 + q) * b.row_stride + j0;
                            mask.draw(start, &b.data[start..start + cols], out, false);
                        }
                        let lhs = a.cols_from(q0, rows);
                        let rhs = View::new(tile, rows, cols);
                        in_parallel_task(|| {
                            matmul::matmul_into(lhs, rhs, alpha, &mut sum, cols, 0, true)
                        });
                    }
                    sum
                })
                .collect();
            for (&(j0, s0), sum) in tasks.iter().zip(&sums) {
                let cols = sum.len() / m;
                for (row, part) in c.chunks_mut(n).zip(sum.chunks(cols)) {
                    let dst = &mut row[j0..j0 + cols];
                    if accumulate || s0 > 0 {
                        dst.iter_mut().zip(part).for_each(|(d, s)| *d += s);
                    } else {
                        dst.copy_from_slice(part);
                    }
                }
            }
        }
        DropoutSide::Product => {
            assert!(
                accumulate,
                "dropout matmul: the product's mask accumulates into C"
            );
            c.par_chunks_mut(TILE_ROWS * n)
                .enumerate()
                .for_each(|(block, c)| {
                    let rows = c.len() / n;
                    let first = block * TILE_ROWS;
                    let lhs = a.rows_from(first, rows);
                    let mut tile = vec![0f32; rows * TILE_COLS.min(n)];
                    for j0 in (0..n).step_by(TILE_COLS) {
                        let cols = TILE_COLS.min(n - j0);
                        let tile = &mut tile[..rows * cols];
                        let rhs = b.cols_from(j0, cols);
                        in_parallel_task(|| {
                            matmul::matmul_into(lhs, rhs, alpha, tile, cols, 0, false)
                        });
                        for (i, part) in tile.chunks(cols).enumerate() {
                            let row = &mut c[i * n + j0..i * n + j0 + cols];
                            mask.draw((first + i) * n + j0, part, row, true);
                        }
                    }
                });
        }
    }
}

/// A mask's parameters as the kernels read them.
struct Mask {
    key: u32,
    p: f32,
    scale: f32,
}

impl Mask {
    /// `masked` over elements `first..first + x.len()` of the masked matrix, on the widest
    /// instructions this CPU has.
    fn draw(&self, first: usize, x: &[f32], out: &mut [f32], add: bool) {
        let (key, p, scale) = (self.key, self.p, self.scale);
        fastmath::wide(
            #[inline(always)]
            || masked(key, p, scale, first as u32, x, out, add),
        );
    }
}

#[cfg(test)]
mod stream_tests {
    use super::stream;
    use crate::config::LinearKind;

    /// No two linears of a model share a stream, in any layer of models up to 4,000 layers deep, with
    /// separate or fused projections and every later kind; all stay below the chunk bits.
    #[test]
    fn every_linear_of_a_model_has_a_stream_of_its_own() {
        let later = [
            LinearKind::PerLayerGate,
            LinearKind::PerLayerProjection,
            LinearKind::SharedGate,
            LinearKind::SharedUp,
            LinearKind::SharedDown,
            LinearKind::SharedExpertGate,
            LinearKind::Router,
        ];
        for projections in [&LinearKind::SEPARATE[..], &LinearKind::FUSED[..]] {
            let mut seen = std::collections::HashSet::new();
            for layer in 0..4000 {
                for &kind in projections.iter().chain(&later) {
                    let s = stream(layer, kind as usize);
                    assert!(s < 1 << 16, "layer {layer} {kind:?}: stream {s}");
                    assert!(seen.insert(s), "layer {layer} {kind:?}: stream {s} taken");
                }
            }
        }
    }
}
