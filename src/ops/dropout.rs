//! LoRA dropout with counter-based masks: whether element `i` of a LoRA branch's input is kept is a pure
//! function of (step seed, stream, i). Nothing is stored between the forward and the backward, which
//! recompute the same mask; gradient checkpointing needs no generator bookkeeping; and the GPU kernel
//! (shaders/dropout.wgsl) draws exactly the masks the CPU draws, in 32-bit integer arithmetic that WGSL
//! has everywhere. NEFTune's noise on the embeddings is drawn from the same hash (`add_uniform_noise`).

use crate::exec::gpu::Recorder;
use crate::gpu::{GpuBuffer, groups_1d};
use crate::ops::fastmath;
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

/// The stream of one LoRA linear: every (layer, linear) pair draws independent masks.
pub fn stream(layer: usize, linear: usize) -> u32 {
    (layer * 7 + linear) as u32
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
    fn mask_key(&self) -> u32 {
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
