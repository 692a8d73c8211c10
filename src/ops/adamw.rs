//! AdamW as torch.optim.AdamW computes it (decoupled weight decay, bias correction, eps added to the
//! corrected √v), and global-norm gradient clipping as torch.nn.utils.clip_grad_norm_.

use crate::exec::gpu::Recorder;
use crate::gpu::{GpuBuffer, groups_1d};
use bytemuck::{Pod, Zeroable};

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct AdamWParams {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1 − β1^t
    pub bias_correction1: f32,
    /// √(1 − β2^t)
    pub bias_correction2_sqrt: f32,
    /// Multiplies every gradient before use (the clipping coefficient).
    pub grad_scale: f32,
}

impl AdamWParams {
    /// Parameters for optimizer step `t` (1-based).
    pub fn new(
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
        t: u64,
        grad_scale: f64,
    ) -> Self {
        AdamWParams {
            lr: lr as f32,
            beta1: beta1 as f32,
            beta2: beta2 as f32,
            eps: eps as f32,
            weight_decay: weight_decay as f32,
            bias_correction1: (1.0 - beta1.powf(t as f64)) as f32,
            bias_correction2_sqrt: (1.0 - beta2.powf(t as f64)).sqrt() as f32,
            grad_scale: grad_scale as f32,
        }
    }
}

/// The uniform layout of shaders/adamw.wgsl: the step's parameters, the tensor length, where its partial
/// sums of squares go, and the clipping threshold.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct AdamWKernelParams {
    pub step: AdamWParams,
    pub n: u32,
    pub sums_offset: u32,
    /// Global-norm clipping threshold; ≤ 0 turns clipping off.
    pub max_norm: f32,
    pub _pad: u32,
}

/// Elements one workgroup of the GPU's sum-of-squares kernel reduces into one partial sum.
pub const SUM_SQUARES_BLOCK: usize = 4096;

/// Words of the GPU's partial sums of squares over gradients of these lengths: one per block.
pub(crate) fn sum_squares_len(lens: impl Iterator<Item = usize>) -> usize {
    lens.map(|n| n.div_ceil(SUM_SQUARES_BLOCK))
        .sum::<usize>()
        .max(1)
}

pub fn step(p: &AdamWParams, param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32]) {
    assert!(
        param.len() == grad.len() && grad.len() == m.len() && m.len() == v.len(),
        "adamw: lengths differ"
    );
    let step_size = p.lr / p.bias_correction1;
    for (((w, &g), m), v) in param
        .iter_mut()
        .zip(grad)
        .zip(m.iter_mut())
        .zip(v.iter_mut())
    {
        let g = g * p.grad_scale;
        *w *= 1.0 - p.lr * p.weight_decay;
        *m = p.beta1 * *m + (1.0 - p.beta1) * g;
        *v = p.beta2 * *v + (1.0 - p.beta2) * g * g;
        let denom = v.sqrt() / p.bias_correction2_sqrt + p.eps;
        *w -= step_size * *m / denom;
    }
}

/// torch's clip coefficient for a total gradient norm: min(1, max_norm / (norm + 1e-6)).
pub fn clip_coefficient(total_norm: f64, max_norm: f64) -> f64 {
    (max_norm / (total_norm + 1e-6)).min(1.0)
}

/// Σ g² in f64 (the global norm is its square root over all parameter tensors).
pub fn sum_of_squares(grad: &[f32]) -> f64 {
    grad.iter().map(|&g| g as f64 * g as f64).sum()
}

/// The GPU lowering of the global norm and clipping coefficient (shaders/adamw.wgsl): each gradient's
/// partial sums of squares (one per 4096 elements), then their total, into `clip` [norm, coefficient].
pub(crate) fn record_grad_norm(
    r: &mut Recorder,
    grads: &[&GpuBuffer],
    max_norm: f64,
    clip: &GpuBuffer,
) {
    let kernel = |n: usize, sums_offset: usize| AdamWKernelParams {
        step: AdamWParams::new(0.0, 0.0, 0.0, 0.0, 0.0, 1, 1.0),
        n: n as u32,
        sums_offset: sums_offset as u32,
        max_norm: max_norm as f32,
        _pad: 0,
    };
    let sums = r.scratch(sum_squares_len(grads.iter().map(|g| g.len)));
    let mut offset = 0;
    for g in grads {
        let groups = [g.len.div_ceil(SUM_SQUARES_BLOCK) as u32, 1, 1];
        r.dispatch(
            "sum_squares",
            &kernel(g.len, offset),
            &[(2, g), (5, &sums)],
            groups,
        );
        offset += g.len.div_ceil(SUM_SQUARES_BLOCK);
    }
    r.dispatch(
        "grad_clip",
        &kernel(offset, 0),
        &[(5, &sums), (6, clip)],
        [1, 1, 1],
    );
}

/// The GPU lowering of `step`, the gradient multiplied by `params.grad_scale` and the clipping
/// coefficient in `clip`.
pub(crate) fn record_step(
    r: &mut Recorder,
    params: AdamWParams,
    [param, m, v]: [&GpuBuffer; 3],
    grad: &GpuBuffer,
    clip: &GpuBuffer,
) {
    let p = AdamWKernelParams {
        step: params,
        n: param.len as u32,
        sums_offset: 0,
        max_norm: 0.0,
        _pad: 0,
    };
    let b = [(1, param), (2, grad), (3, m), (4, v), (6, clip)];
    r.dispatch("adamw_step", &p, &b, groups_1d(param.len, 256));
}
