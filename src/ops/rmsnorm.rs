//! RMSNorm as Llama and Qwen define it: y = w ⊙ x / sqrt(mean(x²) + eps), over the last dimension, or
//! as Gemma does, with (1 + w) (`offset` 1). The norm weights are frozen in LoRA training, so the
//! backward produces dx only.

use crate::exec::gpu::Recorder;
use crate::gpu::{GpuBuffer, groups_1d};
use bytemuck::{Pod, Zeroable};
use rayon::prelude::*;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct RmsNormParams {
    pub rows: u32,
    pub dim: u32,
    pub eps: f32,
    /// Added to each weight: 1 for Gemma's (1 + w), else 0.
    pub offset: f32,
}

impl RmsNormParams {
    pub fn new(rows: usize, dim: usize, eps: f64, offset: f32) -> Self {
        RmsNormParams {
            rows: rows as u32,
            dim: dim as u32,
            eps: eps as f32,
            offset,
        }
    }

    fn check(&self, x: &[f32], weight: &[f32]) {
        assert_eq!(
            x.len(),
            self.rows as usize * self.dim as usize,
            "rmsnorm: x is rows x dim"
        );
        assert_eq!(
            weight.len(),
            self.dim as usize,
            "rmsnorm: weight has dim entries"
        );
    }
}

/// y = (offset + w) ⊙ x · r per row (the sum first, in f32, as Gemma's `1.0 + weight.float()`), with
/// r = 1/sqrt(mean(x²) + eps) saved in `inv_rms` for the backward.
pub fn forward(p: &RmsNormParams, x: &[f32], weight: &[f32], y: &mut [f32], inv_rms: &mut [f32]) {
    p.check(x, weight);
    let d = p.dim as usize;
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .zip(inv_rms.par_iter_mut())
        .for_each(|((y, x), r)| {
            let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / d as f32;
            *r = 1.0 / (mean_sq + p.eps).sqrt();
            for ((y, x), w) in y.iter_mut().zip(x).zip(weight) {
                *y = (p.offset + w) * (x * *r);
            }
        });
}

/// dx_i = r·w_i·dy_i − (r³/n)·x_i·Σ_j w_j·dy_j·x_j, w being offset + weight.
pub fn backward(
    p: &RmsNormParams,
    x: &[f32],
    weight: &[f32],
    inv_rms: &[f32],
    dy: &[f32],
    dx: &mut [f32],
) {
    p.check(x, weight);
    let d = p.dim as usize;
    dx.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .zip(dy.par_chunks(d))
        .zip(inv_rms.par_iter())
        .for_each(|(((dx, x), dy), &r)| {
            let dot: f32 = x
                .iter()
                .zip(dy)
                .zip(weight)
                .map(|((x, g), w)| (p.offset + w) * g * x)
                .sum();
            let coef = r * r * r * dot / d as f32;
            for (((dx, x), g), w) in dx.iter_mut().zip(x).zip(dy).zip(weight) {
                *dx = r * (p.offset + w) * g - coef * x;
            }
        });
}

/// The GPU lowering of `forward` (shaders/rmsnorm.wgsl): one workgroup per row.
pub(crate) fn record_forward(
    r: &mut Recorder,
    p: &RmsNormParams,
    x: &GpuBuffer,
    weight: &GpuBuffer,
    y: &GpuBuffer,
    inv_rms: &GpuBuffer,
) {
    let b = [(1, x), (2, weight), (3, y), (4, inv_rms)];
    r.dispatch("rmsnorm_forward", p, &b, groups_1d(p.rows as usize, 1));
}

/// The GPU lowering of `backward`.
pub(crate) fn record_backward(
    r: &mut Recorder,
    p: &RmsNormParams,
    [x, weight, inv_rms, dy]: [&GpuBuffer; 4],
    dx: &GpuBuffer,
) {
    let b = [(1, x), (2, weight), (3, dx), (4, inv_rms), (5, dy)];
    r.dispatch("rmsnorm_backward", p, &b, groups_1d(p.rows as usize, 1));
}
