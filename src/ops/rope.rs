//! Rotary position embedding in the Hugging Face layout: within each head of size d, element i pairs
//! with element i + d/2 (`rotate_half`). Frequencies follow transformers' rope initialisers, computed in
//! f32 as transformers computes them, so that angles agree with a PyTorch reference.

use crate::config::RopeScaling;
use crate::exec::gpu::Recorder;
use crate::gpu::GpuBuffer;
use rayon::prelude::*;

/// transformers' `inv_freq` for `head_dim` rotated channels (LongRoPE's short factors).
pub fn inv_freq(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Vec<f32> {
    inv_freq_for(head_dim, theta, scaling, 0)
}

/// `inv_freq` for a step whose positions reach `end` - 1: LongRoPE switches to its long factors once
/// `end` passes the original length, as transformers' `longrope_frequency_update` does per forward.
pub fn inv_freq_for(head_dim: usize, theta: f64, scaling: &RopeScaling, end: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let base = theta as f32;
    let plain: Vec<f32> = (0..half)
        .map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32))
        .collect();
    match *scaling {
        RopeScaling::None => plain,
        RopeScaling::Linear { factor } => plain.iter().map(|f| f / factor as f32).collect(),
        RopeScaling::Proportional {
            factor,
            partial_rotary_factor,
        } => {
            // transformers' `int(rope_proportion * head_dim // 2)` rotated frequencies.
            let rotated = (partial_rotary_factor * head_dim as f64 / 2.0).floor() as usize;
            plain
                .iter()
                .enumerate()
                .map(|(i, &f)| if i < rotated { f } else { 0.0 } / factor as f32)
                .collect()
        }
        RopeScaling::LongRope {
            ref short_factor,
            ref long_factor,
            original_max_position_embeddings,
            ..
        } => {
            let factors = match end as f64 > original_max_position_embeddings {
                true => long_factor,
                false => short_factor,
            };
            // 1 / (factor · base^(2i/d)), the product and quotient in f32 as torch computes them.
            (0..half)
                .map(|i| 1.0 / (factors[i] as f32 * base.powf((2 * i) as f32 / head_dim as f32)))
                .collect()
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let (factor, low, high, old) = (
                factor as f32,
                low_freq_factor as f32,
                high_freq_factor as f32,
                original_max_position_embeddings as f32,
            );
            let low_freq_wavelen = old / low;
            let high_freq_wavelen = old / high;
            plain
                .iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen > low_freq_wavelen {
                        f / factor
                    } else if wavelen < high_freq_wavelen {
                        f
                    } else {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings: original,
            beta_fast,
            beta_slow,
            truncate,
            ..
        } => {
            // The correction range in f64 (Python floats), the blend in f32 (torch tensors).
            let dim = head_dim as f64;
            let correction_dim = |rotations: f64| {
                dim * (original / (rotations * 2.0 * std::f64::consts::PI)).ln()
                    / (2.0 * theta.ln())
            };
            let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
            if truncate {
                (low, high) = (low.floor(), high.ceil());
            }
            let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
            if low == high {
                high += 0.001;
            }
            let span = (high - low) as f32;
            (0..half)
                .map(|i| {
                    let pos_freq = base.powf((2 * i) as f32 / head_dim as f32);
                    let extrapolation = 1.0 / pos_freq;
                    let interpolation = 1.0 / (factor as f32 * pos_freq);
                    let ramp = ((i as f32 - low as f32) / span).clamp(0.0, 1.0);
                    let keep = 1.0 - ramp;
                    interpolation * (1.0 - keep) + extrapolation * keep
                })
                .collect()
        }
    }
}

/// What transformers multiplies cos and sin by (YaRN's and LongRoPE's attention factor; 1 otherwise).
pub fn attention_factor(scaling: &RopeScaling) -> f32 {
    match *scaling {
        RopeScaling::Yarn {
            attention_factor, ..
        }
        | RopeScaling::LongRope {
            attention_factor, ..
        } => attention_factor as f32,
        _ => 1.0,
    }
}

/// The tables of a decoder's sliding layers that rotate whole heads with a base of their own (Gemma),
/// at `positions`: empty where there is none.
pub fn local_tables(c: &crate::config::ModelConfig, positions: &[u32]) -> (Vec<f32>, Vec<f32>) {
    match (c.local_rope_theta, c.layers.iter().find(|l| l.local_rope)) {
        (Some(theta), Some(layer)) => tables(
            positions,
            &inv_freq(layer.head_dim, theta, &RopeScaling::None),
            1.0,
        ),
        _ => (Vec::new(), Vec::new()),
    }
}

/// Whether a LongRoPE model rotates a step whose positions end at `end` with its long factors.
pub fn uses_long_factors(c: &crate::config::ModelConfig, end: usize) -> bool {
    match c.rope_scaling {
        RopeScaling::LongRope {
            original_max_position_embeddings: original,
            ..
        } => end as f64 > original,
        _ => false,
    }
}

/// Whether feeding `new` positions after `past` ones moves a LongRoPE model from its short factors
/// to its long ones (transformers' Phi-3 recomputes its cache there).
pub fn switches_factors(c: &crate::config::ModelConfig, past: usize, new: usize) -> bool {
    !uses_long_factors(c, past) && uses_long_factors(c, past + new)
}

/// cos and sin of position · inv_freq, times `scale`, [positions.len(), head_dim/2] each.
pub fn tables(positions: &[u32], inv_freq: &[f32], scale: f32) -> (Vec<f32>, Vec<f32>) {
    let mut cos = Vec::with_capacity(positions.len() * inv_freq.len());
    let mut sin = Vec::with_capacity(positions.len() * inv_freq.len());
    for &p in positions {
        for &f in inv_freq {
            let angle = p as f32 * f;
            cos.push(angle.cos() * scale);
            sin.push(angle.sin() * scale);
        }
    }
    (cos, sin)
}

/// The RoPE tables of a decoder `c` at `positions`: its frequencies and scaling.
pub fn model_tables(c: &crate::config::ModelConfig, positions: &[u32]) -> (Vec<f32>, Vec<f32>) {
    let end = positions.iter().max().map_or(0, |&p| p as usize + 1);
    tables(
        positions,
        &inv_freq_for(c.rotary_dim, c.rope_theta, &c.rope_scaling, end),
        attention_factor(&c.rope_scaling),
    )
}

/// Rotates the first `rotated` channels of each head of x [tokens, heads * head_dim] in place (the
/// others pass through: Phi-3's partial rotary embedding); `inverse` applies the transpose (the
/// backward). Pair i is (i, i + rotated/2) (the LLMs' half-split rotation), or with `adjacent`
/// (2i, 2i + 1) (FLUX). The tables hold rotated/2 entries per token.
pub fn apply(
    x: &mut [f32],
    (heads, head_dim, rotated): (usize, usize, usize),
    cos: &[f32],
    sin: &[f32],
    inverse: bool,
    adjacent: bool,
) {
    let half = rotated / 2;
    let sign = if inverse { -1.0 } else { 1.0 };
    let (first, second) = if adjacent { (2, 1) } else { (1, half) };
    // Tokens on every thread, a few dozen per task: on one thread this left a core idle.
    x.par_chunks_mut(heads * head_dim)
        .with_min_len(32)
        .enumerate()
        .for_each(|(t, row)| {
            let (c, s) = (
                &cos[t * half..(t + 1) * half],
                &sin[t * half..(t + 1) * half],
            );
            for head in row.chunks_mut(head_dim) {
                for i in 0..half {
                    let (j1, j2) = (i * first, i * first + second);
                    let (x1, x2) = (head[j1], head[j2]);
                    let si = sign * s[i];
                    head[j1] = x1 * c[i] - x2 * si;
                    head[j2] = x2 * c[i] + x1 * si;
                }
            }
        });
}

/// The uniform of shaders/rope.wgsl; `sign` −1 applies the inverse rotation (the backward).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct RopeParams {
    pub tokens: u32,
    pub heads: u32,
    pub head_dim: u32,
    pub sign: f32,
    /// 1: pairs (2i, 2i + 1); 0: (i, i + rotated/2).
    pub adjacent: u32,
    /// Channels rotated at the start of each head.
    pub rotated: u32,
    pub _pad: [u32; 2],
}

/// The GPU lowering of `apply` (shaders/rope.wgsl): rotates `x` [tokens, heads · head_dim] in place.
pub(crate) fn record_apply(
    r: &mut Recorder,
    x: &GpuBuffer,
    (heads, head_dim, rotated): (usize, usize, usize),
    [cos, sin]: [&GpuBuffer; 2],
    inverse: bool,
    adjacent: bool,
) {
    let tokens = x.len / (heads * head_dim);
    let p = RopeParams {
        tokens: tokens as u32,
        heads: heads as u32,
        head_dim: head_dim as u32,
        sign: if inverse { -1.0 } else { 1.0 },
        adjacent: adjacent.into(),
        rotated: rotated as u32,
        _pad: [0; 2],
    };
    let groups = [
        (rotated / 2).div_ceil(64) as u32,
        heads as u32,
        tokens as u32,
    ];
    r.dispatch("rope_apply", &p, &[(1, cos), (2, sin), (3, x)], groups);
}
