//! The SwiGLU gate of the Llama/Qwen MLP: h = silu(gate) ⊙ up, elementwise.

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

pub fn forward(gate: &[f32], up: &[f32], h: &mut [f32]) {
    assert!(
        gate.len() == up.len() && up.len() == h.len(),
        "swiglu: operands differ in length"
    );
    h.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .for_each(|(h, (g, u))| {
            fastmath::wide(
                #[inline(always)]
                || {
                    for ((h, &g), &u) in h.iter_mut().zip(g).zip(u) {
                        *h = g * sigmoid(g) * u;
                    }
                },
            )
        });
}

/// d gate = dh·u·σ(g)·(1 + g·(1 − σ(g))), d up = dh·silu(g).
pub fn backward(gate: &[f32], up: &[f32], dh: &[f32], dgate: &mut [f32], dup: &mut [f32]) {
    assert!(
        gate.len() == up.len()
            && up.len() == dh.len()
            && dh.len() == dgate.len()
            && dgate.len() == dup.len(),
        "swiglu: operands differ in length"
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
            fastmath::wide(
                #[inline(always)]
                || {
                    for ((((dg, du), &g), &u), &dh) in
                        dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dh)
                    {
                        let s = sigmoid(g);
                        *dg = dh * u * s * (1.0 + g * (1.0 - s));
                        *du = dh * g * s;
                    }
                },
            )
        });
}

/// The GPU lowering of `forward` (shaders/elementwise.wgsl).
pub(crate) fn record_forward(r: &mut Recorder, gate: &GpuBuffer, up: &GpuBuffer, h: &GpuBuffer) {
    let n = h.len;
    let b = [(1, gate), (2, up), (3, h)];
    r.dispatch("swiglu_forward", &Dims4::n(n), &b, groups_1d(n, 256));
}

/// The GPU lowering of `backward`.
pub(crate) fn record_backward(
    r: &mut Recorder,
    [gate, up, dh]: [&GpuBuffer; 3],
    dgate: &GpuBuffer,
    dup: &GpuBuffer,
) {
    let n = dh.len;
    let b = [(1, gate), (2, up), (3, dgate), (4, dup), (5, dh)];
    r.dispatch("swiglu_backward", &Dims4::n(n), &b, groups_1d(n, 256));
}
