//! The gated MLP activations, elementwise: h = act(gate) ⊙ up, with act silu (SwiGLU: Llama, Qwen,
//! FLUX.2), PyTorch's tanh-approximated GELU (GeGLU: Gemma) or gpt-oss's clamped SwiGLU. Also `scale`, the in-place
//! multiplication by a constant (Gemma's embedding scale and query scale), `scale_rows`, by a factor
//! per row (Ministral 3's query scale at each position), and `sigmoid_gated_rows`, by the sigmoid of
//! one per row (Qwen2-MoE's shared expert).

use crate::config::GateActivation;
use crate::exec::gpu::Recorder;
use crate::gpu::{GpuBuffer, groups_1d};
use crate::ops::Dims4;
use crate::ops::fastmath;
use rayon::prelude::*;

const CHUNK: usize = 4096;

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + fastmath::exp(-x))
}

/// √(2/π), as PyTorch's GELU kernel spells it (`M_SQRT2 * M_2_SQRTPI * 0.5`).
const GELU_BETA: f32 = (std::f64::consts::SQRT_2 * std::f64::consts::FRAC_2_SQRT_PI * 0.5) as f32;
const GELU_KAPPA: f32 = 0.044715;

/// PyTorch's `gelu(x, approximate="tanh")` in its operation order.
#[inline(always)]
fn gelu_tanh(x: f32) -> f32 {
    let inner = GELU_BETA * (x + GELU_KAPPA * (x * x * x));
    0.5 * x * (1.0 + inner.tanh())
}

/// (gelu_tanh(x), its derivative), as PyTorch's `GeluBackward` computes the latter.
#[inline(always)]
fn gelu_tanh_with_slope(x: f32) -> (f32, f32) {
    let x_sq = x * x;
    let inner = GELU_BETA * (x + GELU_KAPPA * x_sq * x);
    let t = inner.tanh();
    let left = 0.5 * x;
    let right = 1.0 + t;
    let slope = 0.5 * right + left * (1.0 - t * t) * GELU_BETA * (1.0 + 3.0 * GELU_KAPPA * x_sq);
    (left * right, slope)
}

/// gpt-oss's gate and up, clamped: (min(g, limit), up within ±limit).
#[inline(always)]
fn clamped(g: f32, u: f32, limit: f32) -> (f32, f32) {
    (g.min(limit), u.clamp(-limit, limit))
}

/// h = act(gate) ⊙ up.
pub fn forward(act: GateActivation, gate: &[f32], up: &[f32], h: &mut [f32]) {
    assert!(
        gate.len() == up.len() && up.len() == h.len(),
        "gated activation: operands differ in length"
    );
    h.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .for_each(|(h, (g, u))| match act {
            GateActivation::Silu => fastmath::wide(
                #[inline(always)]
                || {
                    for ((h, &g), &u) in h.iter_mut().zip(g).zip(u) {
                        *h = g * sigmoid(g) * u;
                    }
                },
            ),
            GateActivation::GeluTanh => {
                for ((h, &g), &u) in h.iter_mut().zip(g).zip(u) {
                    *h = gelu_tanh(g) * u;
                }
            }
            GateActivation::ClampedSwiglu { alpha, limit } => {
                for ((h, &g), &u) in h.iter_mut().zip(g).zip(u) {
                    let (g, u) = clamped(g, u, limit);
                    *h = (u + 1.0) * (g * sigmoid(alpha * g));
                }
            }
        });
}

/// d gate = dh·u·act'(g), d up = dh·act(g); silu'(g) = σ(g)·(1 + g·(1 − σ(g))). The clamps pass
/// the gradient where the input lies within them, bounds included, as PyTorch's `clamp` does.
pub fn backward(
    act: GateActivation,
    gate: &[f32],
    up: &[f32],
    dh: &[f32],
    dgate: &mut [f32],
    dup: &mut [f32],
) {
    assert!(
        gate.len() == up.len()
            && up.len() == dh.len()
            && dh.len() == dgate.len()
            && dgate.len() == dup.len(),
        "gated activation: operands differ in length"
    );
    dgate
        .par_chunks_mut(CHUNK)
        .zip(dup.par_chunks_mut(CHUNK))
        .zip(
            gate.par_chunks(CHUNK)
                .zip(up.par_chunks(CHUNK))
                .zip(dh.par_chunks(CHUNK)),
        )
        .for_each(|((dg, du), ((g, u), dh))| {
            let each = dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dh);
            match act {
                GateActivation::Silu => fastmath::wide(
                    #[inline(always)]
                    || {
                        for ((((dg, du), &g), &u), &dh) in each {
                            let s = sigmoid(g);
                            *dg = dh * u * s * (1.0 + g * (1.0 - s));
                            *du = dh * g * s;
                        }
                    },
                ),
                GateActivation::GeluTanh => {
                    for ((((dg, du), &g), &u), &dh) in each {
                        let (value, slope) = gelu_tanh_with_slope(g);
                        *dg = dh * u * slope;
                        *du = dh * value;
                    }
                }
                GateActivation::ClampedSwiglu { alpha, limit } => {
                    for ((((dg, du), &g), &u), &dh) in each {
                        let (gc, uc) = clamped(g, u, limit);
                        let s = sigmoid(alpha * gc);
                        let slope = s * (1.0 + alpha * gc * (1.0 - s));
                        *dg = if g <= limit {
                            dh * (uc + 1.0) * slope
                        } else {
                            0.0
                        };
                        *du = if u.abs() <= limit { dh * gc * s } else { 0.0 };
                    }
                }
            }
        });
}

fn entry(act: GateActivation, backward: bool) -> &'static str {
    match (act, backward) {
        (GateActivation::Silu, false) => "swiglu_forward",
        (GateActivation::Silu, true) => "swiglu_backward",
        (GateActivation::GeluTanh, false) => "geglu_forward",
        (GateActivation::GeluTanh, true) => "geglu_backward",
        (GateActivation::ClampedSwiglu { .. }, false) => "clamped_swiglu_forward",
        (GateActivation::ClampedSwiglu { .. }, true) => "clamped_swiglu_backward",
    }
}

/// The elementwise kernels' uniform for `act` over n elements: gpt-oss's alpha and limit as bits.
fn params(act: GateActivation, n: usize) -> Dims4 {
    match act {
        GateActivation::ClampedSwiglu { alpha, limit } => Dims4 {
            a: n as u32,
            b: alpha.to_bits(),
            c: 0,
            d: limit.to_bits(),
        },
        _ => Dims4::n(n),
    }
}

/// The GPU lowering of `forward` (shaders/elementwise.wgsl).
pub(crate) fn record_forward(
    r: &mut Recorder,
    act: GateActivation,
    gate: &GpuBuffer,
    up: &GpuBuffer,
    h: &GpuBuffer,
) {
    let n = h.len;
    let b = [(1, gate), (2, up), (3, h)];
    r.dispatch(entry(act, false), &params(act, n), &b, groups_1d(n, 256));
}

/// The GPU lowering of `backward`.
pub(crate) fn record_backward(
    r: &mut Recorder,
    act: GateActivation,
    [gate, up, dh]: [&GpuBuffer; 3],
    dgate: &GpuBuffer,
    dup: &GpuBuffer,
) {
    let n = dh.len;
    let b = [(1, gate), (2, up), (3, dgate), (4, dup), (5, dh)];
    r.dispatch(entry(act, true), &params(act, n), &b, groups_1d(n, 256));
}

/// y = σ(g[r]) · s[r, ·] for each row r of s [rows, dim] (added into y with `accumulate`):
/// Qwen2-MoE's shared expert scaled by its gate.
pub fn sigmoid_gated_rows(g: &[f32], s: &[f32], dim: usize, y: &mut [f32], accumulate: bool) {
    assert!(
        s.len() == g.len() * dim && y.len() == s.len(),
        "sigmoid_gated_rows: s and y are rows x dim, g one per row"
    );
    y.par_chunks_mut(dim)
        .zip(s.par_chunks(dim).zip(g.par_iter()))
        .for_each(|(y, (s, &g))| {
            let gate = sigmoid(g);
            for (y, &s) in y.iter_mut().zip(s) {
                *y = if accumulate { *y + gate * s } else { gate * s };
            }
        });
}

/// `sigmoid_gated_rows`' backward: ds = σ(g)·dy, dg[r] = σ(g)(1 − σ(g))·Σ_j dy[r, j]·s[r, j]
/// (both written).
pub fn sigmoid_gated_rows_backward(
    g: &[f32],
    s: &[f32],
    dy: &[f32],
    dim: usize,
    ds: &mut [f32],
    dg: &mut [f32],
) {
    assert!(
        s.len() == g.len() * dim
            && dy.len() == s.len()
            && ds.len() == s.len()
            && dg.len() == g.len(),
        "sigmoid_gated_rows_backward: s, dy and ds are rows x dim, g and dg one per row"
    );
    ds.par_chunks_mut(dim)
        .zip(dg.par_iter_mut())
        .zip(s.par_chunks(dim).zip(dy.par_chunks(dim)).zip(g.par_iter()))
        .for_each(|((ds, dg), ((s, dy), &g))| {
            let gate = sigmoid(g);
            let mut dot = 0f32;
            for ((ds, &s), &dy) in ds.iter_mut().zip(s).zip(dy) {
                *ds = gate * dy;
                dot += dy * s;
            }
            *dg = gate * (1.0 - gate) * dot;
        });
}

/// The GPU lowering of `sigmoid_gated_rows`.
pub(crate) fn record_sigmoid_gated_rows(
    r: &mut Recorder,
    [g, s]: [&GpuBuffer; 2],
    y: &GpuBuffer,
    dim: usize,
    accumulate: bool,
) {
    let n = y.len;
    let p = Dims4 {
        b: dim as u32,
        c: accumulate.into(),
        ..Dims4::n(n)
    };
    let b = [(1, g), (2, s), (3, y)];
    r.dispatch("sigmoid_gated_rows", &p, &b, groups_1d(n, 256));
}

/// The GPU lowering of `sigmoid_gated_rows_backward`: a workgroup per row.
pub(crate) fn record_sigmoid_gated_rows_backward(
    r: &mut Recorder,
    [g, s, dy]: [&GpuBuffer; 3],
    [ds, dg]: [&GpuBuffer; 2],
    dim: usize,
) {
    let rows = g.len;
    let p = Dims4 {
        b: dim as u32,
        ..Dims4::n(rows)
    };
    let b = [(1, g), (2, s), (3, ds), (4, dg), (5, dy)];
    r.dispatch(
        "sigmoid_gated_rows_backward",
        &p,
        &b,
        groups_1d(rows * 256, 256),
    );
}

/// x *= factor, in place.
pub fn scale(x: &mut [f32], factor: f32) {
    x.par_chunks_mut(CHUNK)
        .for_each(|x| x.iter_mut().for_each(|v| *v *= factor));
}

/// Row r of x [*, dim] *= factors[r], in place.
pub fn scale_rows(x: &mut [f32], factors: &[f32], dim: usize) {
    assert_eq!(x.len(), factors.len() * dim, "scale_rows: x is rows x dim");
    x.par_chunks_mut(dim)
        .zip(factors.par_iter())
        .for_each(|(row, &f)| row.iter_mut().for_each(|v| *v *= f));
}

/// The GPU lowering of `scale_rows`.
pub(crate) fn record_scale_rows(r: &mut Recorder, factors: &GpuBuffer, x: &GpuBuffer, dim: usize) {
    let n = x.len;
    let p = Dims4 {
        b: dim as u32,
        ..Dims4::n(n)
    };
    r.dispatch("scale_rows", &p, &[(1, factors), (3, x)], groups_1d(n, 256));
}

/// The GPU lowering of `scale`: the factor travels as the uniform's second word, its bits.
pub(crate) fn record_scale(r: &mut Recorder, x: &GpuBuffer, factor: f32) {
    let n = x.len;
    let p = Dims4 {
        b: factor.to_bits(),
        ..Dims4::n(n)
    };
    r.dispatch("scale", &p, &[(3, x)], groups_1d(n, 256));
}
