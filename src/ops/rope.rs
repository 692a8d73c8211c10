//! Rotary position embedding in the Hugging Face layout: within each head of size d, element i pairs
//! with element i + d/2 (`rotate_half`). Frequencies follow transformers' rope initialisers, computed in
//! f32 as transformers computes them, so that angles agree with a PyTorch reference.

use crate::config::RopeScaling;
use crate::exec::gpu::Recorder;
use crate::gpu::GpuBuffer;

/// transformers' `inv_freq` for a head of size `head_dim`.
pub fn inv_freq(head_dim: usize, theta: f64, scaling: RopeScaling) -> Vec<f32> {
    let half = head_dim / 2;
    let base = theta as f32;
    let plain: Vec<f32> = (0..half)
        .map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32))
        .collect();
    match scaling {
        RopeScaling::None => plain,
        RopeScaling::Linear { factor } => plain.iter().map(|f| f / factor as f32).collect(),
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

/// What transformers multiplies cos and sin by (YaRN's attention factor; 1 otherwise).
pub fn attention_factor(scaling: RopeScaling) -> f32 {
    match scaling {
        RopeScaling::Yarn {
            attention_factor, ..
        } => attention_factor as f32,
        _ => 1.0,
    }
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
    tables(
        positions,
        &inv_freq(c.head_dim, c.rope_theta, c.rope_scaling),
        attention_factor(c.rope_scaling),
    )
}

/// Rotates x [tokens, heads * head_dim] in place; `inverse` applies the transpose (the backward). Pair i
/// is (i, i + head_dim/2) (the LLMs' half-split rotation), or with `adjacent` (2i, 2i + 1) (FLUX).
pub fn apply(
    x: &mut [f32],
    (heads, head_dim): (usize, usize),
    cos: &[f32],
    sin: &[f32],
    inverse: bool,
    adjacent: bool,
) {
    let half = head_dim / 2;
    let sign = if inverse { -1.0 } else { 1.0 };
    let (first, second) = if adjacent { (2, 1) } else { (1, half) };
    for (t, row) in x.chunks_mut(heads * head_dim).enumerate() {
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
    }
}

/// The uniform of shaders/rope.wgsl; `sign` −1 applies the inverse rotation (the backward).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct RopeParams {
    pub tokens: u32,
    pub heads: u32,
    pub head_dim: u32,
    pub sign: f32,
    /// 1: pairs (2i, 2i + 1); 0: (i, i + head_dim/2).
    pub adjacent: u32,
    pub _pad: [u32; 3],
}

/// The GPU lowering of `apply` (shaders/rope.wgsl): rotates `x` [tokens, heads · head_dim] in place.
pub(crate) fn record_apply(
    r: &mut Recorder,
    x: &GpuBuffer,
    (heads, head_dim): (usize, usize),
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
        _pad: [0; 3],
    };
    let groups = [
        (head_dim / 2).div_ceil(64) as u32,
        heads as u32,
        tokens as u32,
    ];
    r.dispatch("rope_apply", &p, &[(1, cos), (2, sin), (3, x)], groups);
}
