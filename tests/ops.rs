//! Each op's CPU kernel against a plain f64 reference on random inputs, and its backward against central
//! finite differences of that reference. Tolerances are relative norms: ‖a − b‖ / ‖b‖.

mod common;

use nibble::config::GateActivation;
use nibble::ops::isa::CpuPath;
use nibble::ops::{glu, rmsnorm};
use nibble::rng::Rng;

fn random(n: usize, scale: f64, rng: &mut Rng) -> Vec<f32> {
    (0..n).map(|_| (rng.normal() * scale) as f32).collect()
}

fn rel_err(a: &[f32], b: &[f64]) -> f64 {
    let diff: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - y).powi(2)).sum();
    let norm: f64 = b.iter().map(|y| y * y).sum();
    (diff / norm).sqrt()
}

/// Gradient of L(x) = Σ dy·f(x) by central differences, in f64.
fn finite_diff(x: &[f32], dy: &[f32], f: impl Fn(&[f64]) -> Vec<f64>) -> Vec<f64> {
    let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let loss = |v: &[f64]| f(v).iter().zip(dy).map(|(y, g)| y * *g as f64).sum::<f64>();
    let h = 1e-6;
    (0..x.len())
        .map(|i| {
            let mut plus = x64.clone();
            let mut minus = x64.clone();
            plus[i] += h;
            minus[i] -= h;
            (loss(&plus) - loss(&minus)) / (2.0 * h)
        })
        .collect()
}

fn rmsnorm_reference(x: &[f64], w: &[f32], dim: usize, eps: f64, offset: f64) -> Vec<f64> {
    x.chunks(dim)
        .flat_map(|row| {
            let r = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / dim as f64 + eps).sqrt();
            row.iter()
                .zip(w)
                .map(move |(v, w)| (offset + *w as f64) * v * r)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn rmsnorm_forward_and_backward_match_references() {
    let mut rng = Rng::new(10);
    // Gemma's (1 + w) with its weights around 0, as trained ones sit.
    for (rows, dim, eps, offset) in [
        (3, 64, 1e-6, 0.0),
        (5, 96, 1e-5, 0.0),
        (1, 896, 1e-6, 0.0),
        (4, 64, 1e-6, 1.0),
    ] {
        let x = random(rows * dim, 1.3, &mut rng);
        let w: Vec<f32> = random(dim, 0.1, &mut rng)
            .iter()
            .map(|v| 1.0 - offset as f32 + v)
            .collect();
        let p = rmsnorm::RmsNormParams::new(rows, dim, eps, offset as f32);
        let mut y = vec![0f32; rows * dim];
        let mut inv_rms = vec![0f32; rows];
        rmsnorm::forward(&p, &x, &w, &mut y, &mut inv_rms);
        let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let e = rel_err(&y, &rmsnorm_reference(&x64, &w, dim, eps, offset));
        assert!(e < 1e-6, "rmsnorm forward {rows}x{dim}: {e:e}");

        let dy = random(rows * dim, 1.0, &mut rng);
        let mut dx = vec![0f32; rows * dim];
        rmsnorm::backward(&p, &x, &w, &inv_rms, &dy, &mut dx);
        let fd = finite_diff(&x, &dy, |v| rmsnorm_reference(v, &w, dim, eps, offset));
        let e = rel_err(&dx, &fd);
        assert!(e < 1e-5, "rmsnorm backward {rows}x{dim}: {e:e}");
    }
}

fn silu(v: f64) -> f64 {
    v / (1.0 + (-v).exp())
}

fn gelu_tanh(v: f64) -> f64 {
    0.5 * v * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v * v * v)).tanh())
}

/// gpt-oss's clamped SwiGLU, (clamp(u, ±7) + 1)·g·σ(1.702·g) with g = min(gate, 7), against an f64
/// reference, and its backward against central differences of both inputs; a third of the inputs lie
/// past the clamps (whose gradient is then zero).
#[test]
fn clamped_swiglu_forward_and_backward_match_references() {
    let (alpha, limit) = (1.702f32, 7.0f32);
    let act = GateActivation::ClampedSwiglu { alpha, limit };
    let reference = |g: f64, u: f64| {
        let (a, l) = (alpha as f64, limit as f64);
        let g = g.min(l);
        (u.clamp(-l, l) + 1.0) * g / (1.0 + (-a * g).exp())
    };
    let mut rng = Rng::new(17);
    let n = 5000;
    let g = random(n, 7.0, &mut rng);
    let u = random(n, 7.0, &mut rng);
    let clamped =
        g.iter().filter(|&&g| g > limit).count() + u.iter().filter(|u| u.abs() > limit).count();
    assert!(clamped > n / 4, "{clamped} of the inputs meet a clamp");
    let mut h = vec![0f32; n];
    glu::forward(act, &g, &u, &mut h);
    let expected: Vec<f64> = g
        .iter()
        .zip(&u)
        .map(|(&g, &u)| reference(g as f64, u as f64))
        .collect();
    let e = rel_err(&h, &expected);
    assert!(e < 1e-6, "clamped SwiGLU forward: {e:e}");

    let dh = random(n, 1.0, &mut rng);
    let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
    glu::backward(act, &g, &u, &dh, &mut dg, &mut du);
    let step = 1e-6;
    let central = |f: &dyn Fn(f64) -> f64, x: f64| (f(x + step) - f(x - step)) / (2.0 * step);
    let (mut fd_g, mut fd_u) = (Vec::new(), Vec::new());
    for i in 0..n {
        let (gi, ui, d) = (g[i] as f64, u[i] as f64, dh[i] as f64);
        fd_g.push(central(&|x| reference(x, ui), gi) * d);
        fd_u.push(central(&|x| reference(gi, x), ui) * d);
    }
    let (eg, eu) = (rel_err(&dg, &fd_g), rel_err(&du, &fd_u));
    assert!(
        eg < 1e-5 && eu < 1e-5,
        "clamped SwiGLU backward: d gate {eg:e}, d up {eu:e}"
    );
}

/// SwiGLU and GeGLU against f64 references, their backwards against finite differences; inputs
/// reach ±8, where GELU's tanh saturates.
#[test]
fn gated_activations_forward_and_backward_match_references() {
    for (act, reference) in [
        (GateActivation::Silu, silu as fn(f64) -> f64),
        (GateActivation::GeluTanh, gelu_tanh),
    ] {
        let mut rng = Rng::new(11);
        let n = 5000; // more than one parallel chunk
        let g = random(n, 2.0, &mut rng);
        let u = random(n, 1.0, &mut rng);
        let mut h = vec![0f32; n];
        glu::forward(act, &g, &u, &mut h);
        let expected: Vec<f64> = g
            .iter()
            .zip(&u)
            .map(|(&g, &u)| reference(g as f64) * u as f64)
            .collect();
        let e = rel_err(&h, &expected);
        assert!(e < 1e-6, "{act:?} forward: {e:e}");

        let dh = random(n, 1.0, &mut rng);
        let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
        glu::backward(act, &g, &u, &dh, &mut dg, &mut du);
        // Elementwise, so the finite differences of each input are independent.
        let fd_g: Vec<f64> = (0..n)
            .map(|i| {
                let (x, h) = (g[i] as f64, 1e-6);
                (reference(x + h) - reference(x - h)) / (2.0 * h) * u[i] as f64 * dh[i] as f64
            })
            .collect();
        let fd_u: Vec<f64> = (0..n)
            .map(|i| reference(g[i] as f64) * dh[i] as f64)
            .collect();
        let (eg, eu) = (rel_err(&dg, &fd_g), rel_err(&du, &fd_u));
        assert!(
            eg < 1e-5 && eu < 1e-6,
            "{act:?} backward: d gate {eg:e}, d up {eu:e}"
        );
    }
    let mut x = random(5000, 1.0, &mut Rng::new(12));
    let before = x.clone();
    glu::scale(&mut x, 0.375);
    assert!(x.iter().zip(&before).all(|(a, b)| *a == b * 0.375));
}

/// Rows scaled by the sigmoid of a gate each (Qwen2-MoE's shared expert), written and accumulated,
/// against f64; the backward against finite differences of Σ dy·y in the gates and in s.
#[test]
fn sigmoid_gated_rows_and_backward_match_references() {
    let mut rng = Rng::new(13);
    let (rows, dim) = (37, 300);
    let gates = random(rows, 4.0, &mut rng);
    let s = random(rows * dim, 1.0, &mut rng);
    let y0 = random(rows * dim, 1.0, &mut rng);
    let reference = |gates: &[f64], s: &[f64]| -> Vec<f64> {
        (0..rows * dim)
            .map(|i| s[i] / (1.0 + (-gates[i / dim]).exp()))
            .collect()
    };
    let wide = |v: &[f32]| -> Vec<f64> { v.iter().map(|&v| v as f64).collect() };
    let expected = reference(&wide(&gates), &wide(&s));
    let mut y = y0.clone();
    glu::sigmoid_gated_rows(&gates, &s, dim, &mut y, false);
    let e = rel_err(&y, &expected);
    assert!(e < 1e-6, "sigmoid-gated rows: {e:e}");
    let mut y = y0.clone();
    glu::sigmoid_gated_rows(&gates, &s, dim, &mut y, true);
    let sum: Vec<f64> = expected
        .iter()
        .zip(&y0)
        .map(|(e, &y)| e + y as f64)
        .collect();
    let e = rel_err(&y, &sum);
    assert!(e < 1e-6, "sigmoid-gated rows accumulated: {e:e}");

    let dy = random(rows * dim, 1.0, &mut rng);
    let (mut ds, mut dg) = (vec![0f32; rows * dim], vec![0f32; rows]);
    glu::sigmoid_gated_rows_backward(&gates, &s, &dy, dim, &mut ds, &mut dg);
    let s64 = wide(&s);
    let fd_g = finite_diff(&gates, &dy, |g| reference(g, &s64));
    let g64 = wide(&gates);
    let fd_s = finite_diff(&s, &dy, |s| reference(&g64, s));
    let (eg, es) = (rel_err(&dg, &fd_g), rel_err(&ds, &fd_s));
    assert!(
        eg < 1e-5 && es < 1e-5,
        "backward: d gates {eg:e}, d s {es:e}"
    );
}

use nibble::config::RopeScaling;
use nibble::model::{DenseData, DenseTensor, LinearWeight};
use nibble::ops::attention::{self, AttentionShape};
use nibble::ops::cross_entropy::LossType::{Dft, Nll};
use nibble::ops::{Precision, bf16_gemm, cross_entropy, linear, rope};
use nibble::quant::{QuantFormat, QuantSpec, QuantTensor};

fn attention_reference(s: AttentionShape, q: &[f64], k: &[f64], v: &[f64]) -> Vec<f64> {
    attention_reference_in_segments(s, q, k, v, None)
}

/// Query t attends to keys segments[t]..=t (0..=t without segments), or every key when not causal.
fn attention_reference_in_segments(
    s: AttentionShape,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    segments: Option<&[u32]>,
) -> Vec<f64> {
    attention_reference_masked(s, [q, k, v], (segments, None), None).0
}

/// `attention_reference_in_segments` where query t also sees no key at or past key_end[t], and
/// head h's rows have sinks[h] as one more logit in their softmax, with no value: the output and
/// each row's log-sum-exp ([heads, T]).
fn attention_reference_masked(
    s: AttentionShape,
    [q, k, v]: [&[f64]; 3],
    (segments, key_end): (Option<&[u32]>, Option<&[u32]>),
    sinks: Option<&[f64]>,
) -> (Vec<f64>, Vec<f64>) {
    let (d, qw, kw) = (s.head_dim, s.heads * s.head_dim, s.kv_heads * s.head_dim);
    let mut out = vec![0.0; s.tokens * qw];
    let mut lse = vec![0.0; s.heads * s.tokens];
    for h in 0..s.heads {
        let kvh = h / (s.heads / s.kv_heads);
        for t in 0..s.tokens {
            let first = segments.map_or(0, |seg| seg[t] as usize);
            let mut end = if s.causal { t + 1 } else { s.tokens };
            if let Some(key_end) = key_end {
                end = end.min(key_end[t] as usize);
            }
            let scores: Vec<f64> = (first..end.max(first))
                .map(|j| {
                    (0..d)
                        .map(|x| q[t * qw + h * d + x] * k[j * kw + kvh * d + x])
                        .sum::<f64>()
                        / (d as f64).sqrt()
                })
                .collect();
            let sink = sinks.map(|sinks| sinks[h]);
            let max = scores
                .iter()
                .chain(&sink)
                .cloned()
                .fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = scores.iter().chain(&sink).map(|s| (s - max).exp()).sum();
            for (j, sc) in (first..).zip(&scores) {
                for x in 0..d {
                    out[t * qw + h * d + x] += (sc - max).exp() / z * v[j * kw + kvh * d + x];
                }
            }
            lse[h * s.tokens + t] = max + z.ln();
        }
    }
    (out, lse)
}

/// Decoding: one query (then two) after a cache of `past` positions, against the f64 attention of the
/// whole sequence's last rows. The short cache runs the heads on one thread, the long one in parallel.
#[test]
fn cached_attention_of_the_newest_tokens_matches_the_reference() {
    let mut rng = Rng::new(13);
    for (past, new) in [(37, 1), (300, 1), (37, 2)] {
        let full = AttentionShape {
            tokens: past + new,
            heads: 14,
            kv_heads: 2,
            head_dim: 64,
            causal: true,
            sinks: false,
        };
        let (qw, kw) = (full.heads * full.head_dim, full.kv_heads * full.head_dim);
        let q = random(full.tokens * qw, 1.0, &mut rng);
        let (k, v) = (
            random(full.tokens * kw, 1.0, &mut rng),
            random(full.tokens * kw, 1.0, &mut rng),
        );
        let f64s = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<_>>();
        let want = attention_reference(full, &f64s(&q), &f64s(&k), &f64s(&v));
        let step = AttentionShape {
            tokens: new,
            ..full
        };
        let mut out = vec![0f32; new * qw];
        attention::forward_cached(step, past, &q[past * qw..], &k, &v, None, None, &mut out);
        let e = rel_err(&out, &want[past * qw..]);
        assert!(e < 1e-6, "cached attention, {new} after {past}: {e:e}");
    }
}

#[test]
fn attention_forward_and_backward_match_references() {
    for causal in [true, false] {
        attention_matches_references(causal);
    }
}

fn attention_matches_references(causal: bool) {
    let mut rng = Rng::new(12);
    let s = AttentionShape {
        tokens: 7,
        heads: 4,
        kv_heads: 2,
        head_dim: 8,
        causal,
        sinks: false,
    };
    let (qn, kn) = (
        s.tokens * s.heads * s.head_dim,
        s.tokens * s.kv_heads * s.head_dim,
    );
    let (q, k, v) = (
        random(qn, 1.0, &mut rng),
        random(kn, 1.0, &mut rng),
        random(kn, 1.0, &mut rng),
    );
    let mut out = vec![0f32; qn];
    let mut lse = vec![0f32; s.heads * s.tokens];
    attention::forward(s, &q, &k, &v, None, &mut out, &mut lse);
    let f64s = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<_>>();
    let e = rel_err(
        &out,
        &attention_reference(s, &f64s(&q), &f64s(&k), &f64s(&v)),
    );
    assert!(e < 1e-6, "attention forward (causal {causal}): {e:e}");

    let d_out = random(qn, 1.0, &mut rng);
    let (mut dq, mut dk, mut dv) = (vec![0f32; qn], vec![0f32; kn], vec![0f32; kn]);
    attention::backward(
        s, &q, &k, &v, &out, &lse, &d_out, None, &mut dq, &mut dk, &mut dv,
    );
    let fd_q = finite_diff(&q, &d_out, |x| {
        attention_reference(s, x, &f64s(&k), &f64s(&v))
    });
    let fd_k = finite_diff(&k, &d_out, |x| {
        attention_reference(s, &f64s(&q), x, &f64s(&v))
    });
    let fd_v = finite_diff(&v, &d_out, |x| {
        attention_reference(s, &f64s(&q), &f64s(&k), x)
    });
    for (name, ours, fd) in [("q", &dq, &fd_q), ("k", &dk, &fd_k), ("v", &dv, &fd_v)] {
        let e = rel_err(ours, fd);
        assert!(
            e < 1e-5,
            "attention backward d{name} (causal {causal}): {e:e}"
        );
    }
}

/// Long enough for several query blocks, with three packed examples whose boundaries fall inside
/// blocks: forward against the f64 reference, backward against central differences along random
/// directions (a full finite-difference gradient would take minutes at this size).
#[test]
fn attention_over_many_blocks_and_packed_examples_matches_references() {
    let mut rng = Rng::new(21);
    let s = AttentionShape {
        tokens: 150,
        heads: 4,
        kv_heads: 2,
        head_dim: 8,
        causal: true,
        sinks: false,
    };
    let segments: Vec<u32> = (0..150u32)
        .map(|t| match t {
            0..40 => 0,
            40..97 => 40,
            _ => 97,
        })
        .collect();
    let (qn, kn) = (
        s.tokens * s.heads * s.head_dim,
        s.tokens * s.kv_heads * s.head_dim,
    );
    let (q, k, v) = (
        random(qn, 1.0, &mut rng),
        random(kn, 1.0, &mut rng),
        random(kn, 1.0, &mut rng),
    );
    let f64s = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<_>>();
    let (q64, k64, v64) = (f64s(&q), f64s(&k), f64s(&v));
    let mut out = vec![0f32; qn];
    let mut lse = vec![0f32; s.heads * s.tokens];
    attention::forward(s, &q, &k, &v, Some(&segments), &mut out, &mut lse);
    let reference = |q: &[f64], k: &[f64], v: &[f64]| {
        attention_reference_in_segments(s, q, k, v, Some(&segments))
    };
    let e = rel_err(&out, &reference(&q64, &k64, &v64));
    assert!(e < 1e-6, "packed attention forward: {e:e}");

    let d_out = random(qn, 1.0, &mut rng);
    let (mut dq, mut dk, mut dv) = (vec![0f32; qn], vec![0f32; kn], vec![0f32; kn]);
    attention::backward(
        s,
        &q,
        &k,
        &v,
        &out,
        &lse,
        &d_out,
        Some(&segments),
        &mut dq,
        &mut dk,
        &mut dv,
    );
    let outputs = |[q, k, v]: [&[f64]; 3]| reference(q, k, v);
    let grads = [&dq[..], &dk[..], &dv[..]];
    check_along_random_directions(
        "packed attention",
        outputs,
        [&q64, &k64, &v64],
        (grads, &d_out),
        &mut rng,
    );
}

/// The gradients of q, k and v (`grads`) of Σ outputs(q, k, v)·d_out against central differences
/// along three random directions each (a full finite-difference gradient of a long sequence would
/// take minutes).
#[allow(clippy::type_complexity)]
fn check_along_random_directions(
    what: &str,
    outputs: impl Fn([&[f64]; 3]) -> Vec<f64>,
    inputs: [&[f64]; 3],
    (grads, d_out): ([&[f32]; 3], &[f32]),
    rng: &mut Rng,
) {
    let loss = |xs: [&[f64]; 3]| {
        outputs(xs)
            .iter()
            .zip(d_out)
            .map(|(y, g)| y * *g as f64)
            .sum::<f64>()
    };
    let h = 1e-5;
    for _ in 0..3 {
        for (which, (name, grad)) in ["q", "k", "v"].into_iter().zip(grads).enumerate() {
            let dir: Vec<f64> = random(grad.len(), 1.0, rng)
                .iter()
                .map(|&u| u as f64)
                .collect();
            let step = |sign: f64| {
                let mut xs = inputs.map(|x| x.to_vec());
                xs[which]
                    .iter_mut()
                    .zip(&dir)
                    .for_each(|(x, u)| *x += sign * h * u);
                loss([&xs[0], &xs[1], &xs[2]])
            };
            let numeric = (step(1.0) - step(-1.0)) / (2.0 * h);
            let analytic: f64 = grad.iter().zip(&dir).map(|(g, u)| *g as f64 * u).sum();
            assert!(
                (analytic - numeric).abs() < 1e-4 * numeric.abs().max(1.0),
                "{what}: d{name} along a random direction: {analytic} vs {numeric}"
            );
        }
    }
}

/// gpt-oss's attention sinks: a logit per head in each of its rows' softmax, with no value (one
/// head's far above its scores, one far below, so that both the sink's and the scores' maxima lead
/// the sum), over several query blocks and packed examples: the forward and its log-sum-exps against
/// the f64 reference, with padded queries that see no key at all (their output 0, their lse the
/// sink's); the backward, unchanged but for the forward's lse, against central differences along
/// random directions; decoding with a KV cache against the reference's last rows.
#[test]
fn attention_with_sinks_matches_references() {
    let mut rng = Rng::new(22);
    let s = AttentionShape {
        tokens: 150,
        heads: 4,
        kv_heads: 2,
        head_dim: 8,
        causal: true,
        sinks: true,
    };
    let segments: Vec<u32> = (0..150u32).map(|t| if t < 70 { 0 } else { 70 }).collect();
    // The last 6 queries see no key (their keys end where their example starts).
    let key_end: Vec<u32> = (0..150u32)
        .map(|t| if t < 144 { 150 } else { 70 })
        .collect();
    let sinks = [8.0f32, -9.0, 0.7, -0.4];
    let (qn, kn) = (
        s.tokens * s.heads * s.head_dim,
        s.tokens * s.kv_heads * s.head_dim,
    );
    let (q, k, v) = (
        random(qn, 1.0, &mut rng),
        random(kn, 1.0, &mut rng),
        random(kn, 1.0, &mut rng),
    );
    let f64s = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<_>>();
    let (q64, k64, v64, sinks64) = (f64s(&q), f64s(&k), f64s(&v), f64s(&sinks));
    let mut out = vec![0f32; qn];
    let mut lse = vec![0f32; s.heads * s.tokens];
    let masks = (Some(&segments[..]), Some(&key_end[..]));
    attention::forward_with(
        s,
        [&q, &k, &v],
        masks.0,
        masks.1,
        Some(&sinks),
        &mut out,
        &mut lse,
    );
    let (want, want_lse) = attention_reference_masked(s, [&q64, &k64, &v64], masks, Some(&sinks64));
    let (e, e_lse) = (rel_err(&out, &want), rel_err(&lse, &want_lse));
    assert!(
        e < 1e-6 && e_lse < 1e-6,
        "forward with sinks: {e:e}, lse {e_lse:e}"
    );
    let (dead_rows, dead_lse) = (&out[144 * 32..], &lse[144..150]);
    assert!(
        dead_rows.iter().all(|&x| x == 0.0) && dead_lse == [8.0; 6],
        "{dead_lse:?}"
    );
    let without = attention_reference_masked(s, [&q64, &k64, &v64], masks, None).0;
    assert!(
        rel_err(&out, &without) > 1e-2,
        "the sinks change the output"
    );

    // The backward over the sequence's unpadded rows.
    let mut lse = vec![0f32; s.heads * s.tokens];
    let segments = Some(&segments[..]);
    attention::forward_with(
        s,
        [&q, &k, &v],
        segments,
        None,
        Some(&sinks),
        &mut out,
        &mut lse,
    );
    let d_out = random(qn, 1.0, &mut rng);
    let (mut dq, mut dk, mut dv) = (vec![0f32; qn], vec![0f32; kn], vec![0f32; kn]);
    attention::backward(
        s, &q, &k, &v, &out, &lse, &d_out, segments, &mut dq, &mut dk, &mut dv,
    );
    let outputs =
        |qkv: [&[f64]; 3]| attention_reference_masked(s, qkv, (segments, None), Some(&sinks64)).0;
    let grads = [&dq[..], &dk[..], &dv[..]];
    check_along_random_directions(
        "attention with sinks",
        outputs,
        [&q64, &k64, &v64],
        (grads, &d_out),
        &mut rng,
    );

    // Decoding the last two tokens after the others, with the sinks.
    let (past, qw) = (148, s.heads * s.head_dim);
    let step = AttentionShape { tokens: 2, ..s };
    let mut decoded = vec![0f32; 2 * qw];
    let first_keys = segments.map(|s| &s[past..]);
    let (q_, sinks_) = (&q[past * qw..], Some(&sinks[..]));
    attention::forward_cached(step, past, q_, &k, &v, first_keys, sinks_, &mut decoded);
    let masks = (segments, None);
    let (want, _) = attention_reference_masked(s, [&q64, &k64, &v64], masks, Some(&sinks64));
    let e = rel_err(&decoded, &want[past * qw..]);
    assert!(e < 1e-6, "decoding with sinks: {e:e}");
}

#[test]
fn rope_rotates_half_split_and_adjacent_pairs_and_its_inverse_is_the_transpose() {
    for adjacent in [false, true] {
        rope_rotates_pairs(adjacent, 16);
    }
    // Phi-4-mini's partial rotary embedding: 3/4 of each head rotates.
    rope_rotates_pairs(false, 12);
}

/// Pairs (i, i + rotated/2), or (2i, 2i + 1) when `adjacent`, over the first `rotated` of 16
/// channels per head; the others pass through.
fn rope_rotates_pairs(adjacent: bool, rotated: usize) {
    let pair = |i: usize, r: usize| {
        if adjacent {
            (2 * i, 2 * i + 1)
        } else {
            (i, i + r / 2)
        }
    };
    let mut rng = Rng::new(13);
    let (tokens, heads, d) = (41, 3, 16); // more tokens than one of `apply`'s tasks takes
    let inv = rope::inv_freq(rotated, 10000.0, &RopeScaling::None);
    for (i, f) in inv.iter().enumerate() {
        let expected = 1.0 / 10000f64.powf(2.0 * i as f64 / rotated as f64);
        assert!(
            (*f as f64 - expected).abs() / expected < 1e-6,
            "inv_freq {i}"
        );
    }
    let positions: Vec<u32> = (0..tokens as u32).collect();
    let (cos, sin) = rope::tables(&positions, &inv, 1.0);
    let x = random(tokens * heads * d, 1.0, &mut rng);
    let mut y = x.clone();
    rope::apply(&mut y, (heads, d, rotated), &cos, &sin, false, adjacent);
    let mut reference: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    for t in 0..tokens {
        for h in 0..heads {
            for (i, &f) in inv.iter().enumerate() {
                let angle = t as f64 * f as f64;
                let (j1, j2) = pair(i, rotated);
                let row = (t * heads + h) * d;
                let (a, b) = (x[row + j1] as f64, x[row + j2] as f64);
                reference[row + j1] = a * angle.cos() - b * angle.sin();
                reference[row + j2] = b * angle.cos() + a * angle.sin();
            }
        }
    }
    let e = rel_err(&y, &reference);
    assert!(e < 1e-6, "rope forward: {e:e}");
    // The backward of a rotation is the inverse rotation: <R x, g> = <x, Rᵀ g>.
    let g = random(x.len(), 1.0, &mut rng);
    let mut rt_g = g.clone();
    rope::apply(&mut rt_g, (heads, d, rotated), &cos, &sin, true, adjacent);
    let lhs: f64 = y.iter().zip(&g).map(|(a, b)| *a as f64 * *b as f64).sum();
    let rhs: f64 = x
        .iter()
        .zip(&rt_g)
        .map(|(a, b)| *a as f64 * *b as f64)
        .sum();
    assert!(
        (lhs - rhs).abs() < 1e-5 * lhs.abs().max(1.0),
        "rope adjoint: {lhs} vs {rhs}"
    );
}

/// nibble's RoPE tables for scaled configs against the ones transformers' rotary embedding gives
/// (tests/fixtures/rope_scaling.json, from scripts/make_rope_fixture.py): YaRN with its default
/// attention factor, with an mscale pair, betas and no truncation, with a given attention factor and
/// the factor left to the ratio of lengths; llama3 whose original length falls back to
/// max_position_embeddings (the key removed as well as kept); Phi-4-mini's LongRoPE (its released
/// config.json and transformers 5's spelling of it) with every position below the original length
/// (short factors) and with some past it (long factors), 96 of 128 channels rotated. Positions up to
/// 131,071, where one last bit of a frequency moves an angle of 10^5 radians. Measured: within 2.1e-6
/// (absolute; 6e-7 or less but for Qwen3's yarn case at the largest positions); held to 2e-5.
#[test]
fn scaled_rope_tables_match_transformers() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rope_scaling.json");
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let positions_of = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_u64().unwrap() as u32)
            .collect()
    };
    let floats = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    let mut worst = 0f32;
    for (name, case) in fixture["cases"].as_object().unwrap() {
        let positions = positions_of(&case["positions"]);
        let mut configs = vec![case["config"].clone()];
        if let Some(legacy) = case.get("legacy_config") {
            configs.push(legacy.clone());
        }
        if name == "llama3_default_original" {
            let mut without = case["config"].clone();
            without["rope_parameters"]
                .as_object_mut()
                .unwrap()
                .remove("original_max_position_embeddings");
            configs.push(without);
        }
        for config in configs {
            let c = nibble::config::ModelConfig::from_json_str(
                &config.to_string(),
                std::path::Path::new("config.json"),
            )
            .unwrap();
            let (cos, sin) = rope::model_tables(&c, &positions);
            let end = positions.iter().max().unwrap() + 1;
            let freqs =
                rope::inv_freq_for(c.rotary_dim, c.rope_theta, &c.rope_scaling, end as usize);
            let scale = rope::attention_factor(&c.rope_scaling);
            // torch's vectorised powf is not correctly rounded: for Phi-4-mini's 96 rotated channels
            // its frequency 20 is one bit below Rust's, which moves that angle by position x one bit.
            // Measured: the rest within 2.1e-6.
            let bound = |i: usize| {
                let (p, f) = (positions[i / freqs.len()], freqs[i % freqs.len()]);
                2e-5 + scale * p as f32 * f * f32::EPSILON
            };
            for (ours, theirs) in [(&cos, floats(&case["cos"])), (&sin, floats(&case["sin"]))] {
                assert_eq!(ours.len(), theirs.len(), "{name}");
                for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                    let e = (a - b).abs();
                    assert!(e < bound(i), "{name}: entry {i} differs by {e:e}");
                    worst = worst.max(e);
                }
            }
            let scale = rope::attention_factor(&c.rope_scaling) as f64;
            let expected = case["attention_scaling"].as_f64().unwrap();
            assert!(
                (scale - expected).abs() < 1e-6,
                "{name}: {scale} vs {expected}"
            );
        }
    }
    eprintln!("scaled RoPE tables within {worst:e} of transformers'");
}

#[test]
fn llama3_frequencies_follow_the_three_bands() {
    let scaling = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 32.0,
    };
    let plain = rope::inv_freq(16, 10000.0, &RopeScaling::None);
    let scaled = rope::inv_freq(16, 10000.0, &scaling);
    for (p, s) in plain.iter().zip(&scaled) {
        let (p, s) = (*p as f64, *s as f64);
        let wavelen = 2.0 * std::f64::consts::PI / p;
        let expected = if wavelen < 32.0 / 4.0 {
            p
        } else if wavelen > 32.0 {
            p / 8.0
        } else {
            let smooth = (32.0 / wavelen - 1.0) / 3.0;
            (1.0 - smooth) * p / 8.0 + smooth * p
        };
        assert!((s - expected).abs() / expected < 1e-5, "{s} vs {expected}");
    }
    assert!(
        scaled.iter().zip(&plain).any(|(s, p)| s == p)
            && scaled.iter().zip(&plain).any(|(s, p)| s < p)
    );
}

/// −log softmax(cap(h·Wᵀ))[label] per position in f64, cap(z) = softcap · tanh(z / softcap).
fn cross_entropy_reference(
    hidden: &[f64],
    w: &[f32],
    vocab: usize,
    dim: usize,
    labels: &[u32],
    softcap: Option<f32>,
) -> Vec<f64> {
    cross_entropy64(hidden, |i| w[i] as f64, (vocab, dim), labels, softcap)
}

/// `cross_entropy_reference` with the output projection's values given by `w(index)`.
fn cross_entropy64(
    hidden: &[f64],
    w: impl Fn(usize) -> f64,
    (vocab, dim): (usize, usize),
    labels: &[u32],
    softcap: Option<f32>,
) -> Vec<f64> {
    labels
        .iter()
        .enumerate()
        .map(|(p, &label)| {
            let logits: Vec<f64> = (0..vocab)
                .map(|v| {
                    let z: f64 = (0..dim).map(|x| hidden[p * dim + x] * w(v * dim + x)).sum();
                    softcap.map_or(z, |c| c as f64 * (z / c as f64).tanh())
                })
                .collect();
            let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
            lse - logits[label as usize]
        })
        .collect()
}

/// A random f32 output projection [vocab, dim] (its values, and as a table), hidden states of
/// `positions`, and a random label for each.
fn random_head(
    vocab: usize,
    dim: usize,
    positions: usize,
    rng: &mut Rng,
) -> (Vec<f32>, DenseTensor, Vec<f32>, Vec<u32>) {
    let w = random(vocab * dim, 0.5, rng);
    let head = DenseTensor {
        rows: vocab,
        cols: dim,
        data: DenseData::F32(w.clone()),
    };
    let hidden = random(positions * dim, 1.0, rng);
    let labels = (0..positions)
        .map(|_| rng.below(vocab as u64) as u32)
        .collect();
    (w, head, hidden, labels)
}

/// The one-pass loss and gradient in f32, at grad_scale 0.5.
fn fused_f32(
    hidden: &[f32],
    head: &DenseTensor,
    labels: &[u32],
    loss_type: cross_entropy::LossType,
    softcap: Option<f32>,
) -> (Vec<cross_entropy::TokenLoss>, Vec<f32>) {
    cross_entropy::forward_backward(
        hidden,
        head,
        labels,
        0.5,
        loss_type,
        Precision::F32,
        softcap,
    )
}

/// Each position's loss and log-sum-exp.
fn split(tokens: &[cross_entropy::TokenLoss]) -> (Vec<f32>, Vec<f32>) {
    tokens.iter().map(|t| (t.loss, t.lse)).unzip()
}

fn split_with_gradient(
    (tokens, d_hidden): (Vec<cross_entropy::TokenLoss>, Vec<f32>),
) -> ((Vec<f32>, Vec<f32>), Vec<f32>) {
    (split(&tokens), d_hidden)
}

/// The entropy of each position's predicted distribution and whether its label is the first of the
/// largest logits (TRL's `entropy` and `mean_token_accuracy`), across vocabulary chunks and with a soft
/// cap, against f64 over the full logits; ties (two identical head rows) count for the first only, as
/// torch's argmax. Measured: entropy within 9e-6 relative (f32 sums over 5,000 logits, as TRL's kernel
/// sums them); held to 1e-4.
#[test]
fn cross_entropy_reports_entropy_and_whether_the_label_ranked_first() {
    let mut rng = Rng::new(15);
    let (vocab, dim, positions) = (cross_entropy::VOCAB_CHUNK + 905, 16, 12);
    let mut w = random(vocab * dim, 0.5, &mut rng);
    // Rows 100 and VOCAB_CHUNK + 7 (another chunk) are the same: their logits tie.
    let (first, second) = (100, cross_entropy::VOCAB_CHUNK + 7);
    // Three times as long as the other rows, so that along it they are the largest logits by far.
    let copy: Vec<f32> = w[first * dim..(first + 1) * dim]
        .iter()
        .map(|v| 3.0 * v)
        .collect();
    w[first * dim..(first + 1) * dim].copy_from_slice(&copy);
    w[second * dim..(second + 1) * dim].copy_from_slice(&copy);
    let head = DenseTensor {
        rows: vocab,
        cols: dim,
        data: DenseData::F32(w.clone()),
    };
    let mut hidden = random(positions * dim, 1.0, &mut rng);
    // Positions 0 and 1 point along the tied rows, so those are their largest logits.
    for p in 0..2 {
        for c in 0..dim {
            hidden[p * dim + c] = copy[c];
        }
    }
    let mut labels: Vec<u32> = (0..positions)
        .map(|_| rng.below(vocab as u64) as u32)
        .collect();
    labels[0] = first as u32;
    labels[1] = second as u32;
    for softcap in [None, Some(3.0f32)] {
        let logits = cross_entropy::logits(&hidden, &head, Precision::F32, softcap);
        let tokens = cross_entropy::forward(&hidden, &head, &labels, Precision::F32, softcap);
        let (fused, _) = fused_f32(&hidden, &head, &labels, Nll, softcap);
        let mut worst = 0f64;
        for p in 0..positions {
            let row: Vec<f64> = logits[p * vocab..(p + 1) * vocab]
                .iter()
                .map(|&z| z as f64)
                .collect();
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = row.iter().map(|z| (z - max).exp()).sum();
            let entropy: f64 = -row
                .iter()
                .map(|z| {
                    let logp = z - max - sum.ln();
                    logp.exp() * logp
                })
                .sum::<f64>();
            let argmax = row.iter().position(|&z| z == max).unwrap();
            for t in [tokens[p], fused[p]] {
                // Relative, and absolute (in nats) where the distribution is all but certain.
                let e = (t.entropy as f64 - entropy).abs() / entropy.max(1.0);
                worst = worst.max(e);
                assert!(e < 1e-4, "position {p}, cap {softcap:?}: entropy {e:e}");
                assert_eq!(t.top1, argmax == labels[p] as usize, "position {p}");
            }
        }
        eprintln!("entropy, cap {softcap:?}: worst relative error {worst:e}");
        if softcap.is_none() {
            assert!(
                tokens[0].top1 && !tokens[1].top1,
                "a tie counts for the first"
            );
        }
    }
}

/// Measured: forward 1e-7, gradient 2e-7 (3e-7 capped) against finite differences; held to 1e-6 and 1e-5.
#[test]
fn chunked_cross_entropy_matches_reference_across_chunks() {
    let mut rng = Rng::new(14);
    // More rows than one vocabulary chunk, so the online log-sum-exp crosses chunk boundaries.
    let (vocab, dim, positions) = (cross_entropy::VOCAB_CHUNK + 905, 24, 5);
    let (w, head, hidden, labels) = random_head(vocab, dim, positions, &mut rng);
    let h64: Vec<f64> = hidden.iter().map(|&v| v as f64).collect();
    // The logits here reach about ±8, so a cap of 3 bends most of them.
    let uncapped = split(&cross_entropy::forward(
        &hidden,
        &head,
        &labels,
        Precision::F32,
        None,
    ))
    .0;
    for softcap in [None, Some(3.0f32)] {
        let (losses, lse) = split(&cross_entropy::forward(
            &hidden,
            &head,
            &labels,
            Precision::F32,
            softcap,
        ));
        let reference = cross_entropy_reference(&h64, &w, vocab, dim, &labels, softcap);
        let e = rel_err(&losses, &reference);
        assert!(e < 1e-6, "cross-entropy forward, cap {softcap:?}: {e:e}");
        if softcap.is_some() {
            let moved = rel_err(&uncapped, &reference);
            assert!(moved > 1e-2, "the cap changes the losses: {moved:e}");
        }

        // The one-pass loss and gradient: the same losses, and the gradient against finite differences.
        let (fused_tokens, d_hidden) = fused_f32(&hidden, &head, &labels, Nll, softcap);
        let (fused, fused_lse) = split(&fused_tokens);
        let e = rel_err(
            &fused_lse,
            &lse.iter().map(|&l| l as f64).collect::<Vec<_>>(),
        );
        assert!(e < 1e-6, "fused cross-entropy log-sum-exp: {e:e}");
        let e = rel_err(
            &fused,
            &losses.iter().map(|&l| l as f64).collect::<Vec<_>>(),
        );
        assert!(e < 1e-6, "fused cross-entropy loss: {e:e}");
        assert!(lse.iter().all(|l| l.is_finite()));
        let weights = vec![0.5f32; positions];
        let fd = finite_diff(&hidden, &weights, |x| {
            cross_entropy_reference(x, &w, vocab, dim, &labels, softcap)
        });
        let e = rel_err(&d_hidden, &fd);
        assert!(e < 1e-5, "cross-entropy backward, cap {softcap:?}: {e:e}");

        // Dynamic fine-tuning (TRL's loss_type="dft"): the same losses, and the gradient of Σ w·loss
        // with each weight w = 0.5 · exp(−loss) (the label's probability) held fixed.
        let (dft_tokens, d_dft) = fused_f32(&hidden, &head, &labels, Dft, softcap);
        assert_eq!(split(&dft_tokens), split(&fused_tokens));
        let weights: Vec<f32> = reference
            .iter()
            .map(|l| (0.5 * (-l).exp()) as f32)
            .collect();
        let fd = finite_diff(&hidden, &weights, |x| {
            cross_entropy_reference(x, &w, vocab, dim, &labels, softcap)
        });
        let e = rel_err(&d_dft, &fd);
        assert!(
            e < 1e-5,
            "dft cross-entropy backward, cap {softcap:?}: {e:e}"
        );
        let moved = rel_err(
            &d_dft,
            &d_hidden.iter().map(|&g| g as f64).collect::<Vec<_>>(),
        );
        assert!(moved > 0.5, "the weights change the gradient: {moved:e}");

        // Every logit, capped alike: its log-sum-exp is the loss's.
        let logits = cross_entropy::logits(&hidden, &head, Precision::F32, softcap);
        for p in 0..positions {
            let row = &logits[p * vocab..(p + 1) * vocab];
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let row_lse = max
                + row
                    .iter()
                    .map(|&l| (l as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            let e = (row_lse - lse[p] as f64).abs() / lse[p].abs() as f64;
            assert!(e < 1e-6, "logits' log-sum-exp, cap {softcap:?}: {e:e}");
        }
    }
}

/// `--precision default`'s integer products through the output projection (a bf16 head, the width 64
/// and 96, enough positions for every kernel's threshold): the losses, log-sum-exps, gradient and
/// logits stay within their tolerances of the f32 path's (itself held to f64 and finite differences
/// above), and, where the CPU has BF16 dot products, closer to it than `--precision default`'s bf16
/// products there. The head has a weight 20 times the rest in every 97th row, which coarsens its
/// group's levels. Measured (relative norms): losses and log-sum-exps up to 5e-4, gradient 2.3e-3,
/// logits 4.5e-4 (bf16: losses 1.5e-3, gradient 4.7e-3); held to 5e-3, 2e-2 and 5e-3.
#[test]
fn cross_entropy_in_integer_products_stays_near_f32() {
    let mut rng = Rng::new(16);
    let positions = 70;
    for dim in [64, 96] {
        let vocab = cross_entropy::VOCAB_CHUNK + 905;
        let mut w = random(vocab * dim, 0.3, &mut rng);
        for v in (0..vocab).step_by(97) {
            w[v * dim + v % dim] *= 20.0;
        }
        let head = DenseTensor {
            rows: vocab,
            cols: dim,
            data: DenseData::BF16(w.iter().map(|&v| half::bf16::from_f32(v)).collect()),
        };
        let hidden = random(positions * dim, 1.0, &mut rng);
        let labels: Vec<u32> = (0..positions)
            .map(|_| rng.below(vocab as u64) as u32)
            .collect();
        let wide = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        for softcap in [None, Some(10.0f32)] {
            let ((l32, lse32), d32) =
                split_with_gradient(fused_f32(&hidden, &head, &labels, Nll, softcap));
            let ((l16, lse16), d16) = split_with_gradient(cross_entropy::forward_backward(
                &hidden,
                &head,
                &labels,
                0.5,
                Nll,
                Precision::Int16,
                softcap,
            ));
            let (losses, errs) = (rel_err(&l16, &wide(&l32)), rel_err(&lse16, &wide(&lse32)));
            let grads = rel_err(&d16, &wide(&d32));
            let (forward_only, _) = split(&cross_entropy::forward(
                &hidden,
                &head,
                &labels,
                Precision::Int16,
                softcap,
            ));
            let forward = rel_err(&forward_only, &wide(&l16));
            let logits = rel_err(
                &cross_entropy::logits(&hidden, &head, Precision::Int16, softcap),
                &wide(&cross_entropy::logits(
                    &hidden,
                    &head,
                    Precision::F32,
                    softcap,
                )),
            );
            eprintln!(
                "integer cross-entropy, dim {dim}, cap {softcap:?}: losses {losses:e}, lse {errs:e}, \
                 gradient {grads:e}, logits {logits:e}"
            );
            assert!(
                losses < 5e-3 && errs < 5e-3,
                "dim {dim}: losses {losses:e}, lse {errs:e}"
            );
            assert!(
                forward < 1e-6,
                "dim {dim}: forward-only losses differ by {forward:e}"
            );
            assert!(grads < 2e-2, "dim {dim}: gradient {grads:e}");
            assert!(logits < 5e-3, "dim {dim}: logits {logits:e}");
            // The integer products ran (their rounding moves every result a little).
            assert!(
                losses > 0.0 && grads > 0.0 && logits > 0.0,
                "dim {dim}: Int16 gave f32's results"
            );
            if nibble::ops::bf16_gemm::available() {
                let ((lb, _), db) = split_with_gradient(cross_entropy::forward_backward(
                    &hidden,
                    &head,
                    &labels,
                    0.5,
                    Nll,
                    Precision::Bf16,
                    softcap,
                ));
                let (losses_bf16, grads_bf16) =
                    (rel_err(&lb, &wide(&l32)), rel_err(&db, &wide(&d32)));
                eprintln!("  bf16: losses {losses_bf16:e}, gradient {grads_bf16:e}");
                assert!(
                    losses < losses_bf16 && grads < grads_bf16,
                    "dim {dim}: bf16 is closer to f32 ({losses_bf16:e}, {grads_bf16:e})"
                );
            }
        }
    }
}

#[test]
fn linear_on_packed_weights_matches_dequantized_f64_products() {
    let mut rng = Rng::new(15);
    // More output rows than one unpacked block, so the blocked loop is exercised.
    let (tokens, inp, out) = (6, 128, 300);
    let w = random(out * inp, 0.1, &mut rng);
    let x = random(tokens * inp, 1.0, &mut rng);
    let bias = random(out, 0.1, &mut rng);
    for format in [QuantFormat::Nf4, QuantFormat::Int4] {
        let q = QuantTensor::quantize(QuantSpec::new(format, 64).unwrap(), out, inp, &w).unwrap();
        let deq = q.dequantize();
        let weight = LinearWeight::Quant(q);
        let mut y = vec![0f32; tokens * out];
        linear::forward(&x, &weight, Some(&bias), &mut y, Precision::F32);
        let reference: Vec<f64> = (0..tokens * out)
            .map(|i| {
                let (t, o) = (i / out, i % out);
                bias[o] as f64
                    + (0..inp)
                        .map(|c| x[t * inp + c] as f64 * deq[o * inp + c] as f64)
                        .sum::<f64>()
            })
            .collect();
        let e = rel_err(&y, &reference);
        assert!(e < 1e-6, "{format} linear forward: {e:e}");

        let dy = random(tokens * out, 1.0, &mut rng);
        let mut dx = vec![0f32; tokens * inp];
        linear::backward_input(&dy, &weight, &mut dx, false, Precision::F32);
        let reference: Vec<f64> = (0..tokens * inp)
            .map(|i| {
                let (t, c) = (i / inp, i % inp);
                (0..out)
                    .map(|o| dy[t * out + o] as f64 * deq[o * inp + c] as f64)
                    .sum::<f64>()
            })
            .collect();
        let e = rel_err(&dx, &reference);
        assert!(e < 1e-6, "{format} linear backward: {e:e}");
    }
}

#[test]
fn adamw_follows_torch_algorithm_over_several_steps() {
    use nibble::ops::adamw::{self, AdamWParams};
    let mut rng = Rng::new(16);
    let n = 257;
    let mut w = random(n, 0.1, &mut rng);
    let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
    let mut w64: Vec<f64> = w.iter().map(|&x| x as f64).collect();
    let (mut m64, mut v64) = (vec![0f64; n], vec![0f64; n]);
    let (lr, b1, b2, eps, wd) = (2e-4, 0.9, 0.999, 1e-8, 0.01);
    for t in 1..=5u64 {
        let g = random(n, 0.5, &mut rng);
        let norm = adamw::sum_of_squares(&g).sqrt();
        let coef = adamw::clip_coefficient(norm, 1.0);
        adamw::step(
            &AdamWParams::new(lr, b1, b2, eps, wd, t, coef),
            &mut w,
            &g,
            &mut m,
            &mut v,
        );
        // torch.optim.AdamW, written out in f64.
        for i in 0..n {
            let gi = g[i] as f64 * coef;
            w64[i] *= 1.0 - lr * wd;
            m64[i] = b1 * m64[i] + (1.0 - b1) * gi;
            v64[i] = b2 * v64[i] + (1.0 - b2) * gi * gi;
            let denom = v64[i].sqrt() / (1.0 - b2.powi(t as i32)).sqrt() + eps;
            w64[i] -= lr / (1.0 - b1.powi(t as i32)) * m64[i] / denom;
        }
    }
    let e = rel_err(&w, &w64);
    assert!(e < 1e-6, "adamw: {e:e}");
    assert!(
        adamw::clip_coefficient(0.5, 1.0) == 1.0
            && (adamw::clip_coefficient(4.0, 1.0) - 0.25).abs() < 1e-6
    );
}

/// Whether the bf16 kernels run here (AVX512-BF16 or ARM BF16), printing which CPU paths the machine
/// has (they run on the active path, the fastest unless NIBBLE_CPU_FEATURES caps it).
fn has_bf16_kernels() -> bool {
    let paths = common::cpu_paths("bf16 kernels");
    let has = bf16_gemm::available();
    eprintln!(
        "bf16 kernels: {} on the active path {}",
        if has { "run" } else { "skipped" },
        nibble::ops::isa::active()
    );
    has && paths
        .iter()
        .any(|p| matches!(p, CpuPath::Avx512Bf16 | CpuPath::NeonBf16))
}

fn bf16_round(v: &[f32]) -> Vec<f64> {
    v.iter()
        .map(|&x| half::bf16::from_f32(x).to_f32() as f64)
        .collect()
}

/// Columns `written` of C [m, ldc] hold product(i, j), added to `before` when `accumulated`; every other
/// column still holds `before`.
#[allow(clippy::too_many_arguments)]
fn assert_block_matches(
    c: &[f32],
    before: &[f32],
    m: usize,
    ldc: usize,
    written: std::ops::Range<usize>,
    accumulated: bool,
    name: &str,
    product: impl Fn(usize, usize) -> f64,
) {
    for i in 0..m {
        for j in 0..ldc {
            let want = if written.contains(&j) {
                let base = if accumulated {
                    before[i * ldc + j] as f64
                } else {
                    0.0
                };
                base + product(i, j)
            } else {
                before[i * ldc + j] as f64
            };
            let got = c[i * ldc + j] as f64;
            assert!(
                (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                "{name} ({i}, {j}) of {m}x{ldc}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn bf16_kernels_compute_exact_products_of_rounded_operands() {
    if !has_bf16_kernels() {
        return;
    }
    let mut rng = Rng::new(17);
    let kernels = bf16_gemm::Bf16Kernel::available();
    eprintln!("bf16 kernels: {kernels:?} run");
    // Remainders everywhere (m not a multiple of 8 or 32, k odd, n not a multiple of 32), and shapes
    // large enough to cross the kernels' inner-dimension chunks (256 KiB of the packed rows: 672
    // pairs at m = 70, 192 at m = 300, so that B·W's 531-row k runs in two) and split into many tasks
    // (n = 1030: tasks of several 32-row blocks). A k of whole AMX tile steps (1536, 64, 512) takes
    // the tiles for A·Wᵀ too (other k's fall back to the dot kernel there). W stored in f32 is decoded to bf16 per product; W stored in bf16 (with an even
    // k) is read in place. Each product runs once overwriting C and once adding into it.
    for (kernel, (m, k, n)) in kernels.iter().flat_map(|&kernel| {
        [
            (13, 37, 45),
            (70, 1101, 203),
            (33, 600, 1030),
            (70, 1536, 203),
            (300, 64, 600),
            (33, 512, 1030),
        ]
        .map(|s| (kernel, s))
    }) {
        let a = random(m * k, 1.0, &mut rng);
        let wv = random((n + 7) * k, 1.0, &mut rng);
        let (a64, w64) = (bf16_round(&a), bf16_round(&wv));
        for stored_bf16 in [false, true] {
            let data = if stored_bf16 {
                DenseData::BF16(wv.iter().map(|&x| half::bf16::from_f32(x)).collect())
            } else {
                DenseData::F32(wv.clone())
            };
            let w = DenseTensor {
                rows: n + 7,
                cols: k,
                data,
            };
            // C = A·W[5..5+n]ᵀ written at column 3 of a wider C.
            let (ldc, accumulate) = (n + 5, !stored_bf16);
            let mut c = random(m * ldc, 1.0, &mut rng);
            let before = c.clone();
            bf16_gemm::matmul_xwt(
                &bf16_gemm::PackedRows::for_xwt_on(kernel, &a, m, k),
                &w,
                5,
                n,
                &mut c,
                ldc,
                3,
                accumulate,
            );
            assert_block_matches(
                &c,
                &before,
                m,
                ldc,
                3..3 + n,
                accumulate,
                &format!("{kernel:?} A·Wᵀ"),
                |i, j| {
                    (0..k)
                        .map(|q| a64[i * k + q] * w64[(j - 3 + 5) * k + q])
                        .sum::<f64>()
                },
            );
            // C = B·W[2..2+kb] with B [m, kb]: k runs along W's rows; written at column 2 of a wider C.
            let kb = n.min(531);
            let bmat = random(m * kb, 1.0, &mut rng);
            let b64 = bf16_round(&bmat);
            let (ldc, accumulate) = (k + 4, stored_bf16);
            let mut c = random(m * ldc, 1.0, &mut rng);
            let before = c.clone();
            bf16_gemm::matmul_aw(
                &bf16_gemm::PackedRows::for_aw_on(kernel, &bmat, m, kb),
                &w,
                2,
                &mut c,
                ldc,
                2,
                accumulate,
            );
            let name = format!("{kernel:?} B·W");
            assert_block_matches(&c, &before, m, ldc, 2..2 + k, accumulate, &name, |i, j| {
                (0..kb)
                    .map(|q| b64[i * kb + q] * w64[(2 + q) * k + j - 2])
                    .sum::<f64>()
            });
        }
    }
}

#[test]
fn bf16_linear_stays_close_to_f32() {
    if !has_bf16_kernels() {
        return;
    }
    let mut rng = Rng::new(18);
    // in and out both cross the kernels' 256-pair inner chunks.
    let (tokens, inp, out) = (70, 640, 600);
    let w = random(out * inp, 0.05, &mut rng);
    let q = LinearWeight::Quant(
        QuantTensor::quantize(QuantSpec::new(QuantFormat::Nf4, 64).unwrap(), out, inp, &w).unwrap(),
    );
    let x = random(tokens * inp, 1.0, &mut rng);
    let dy = random(tokens * out, 1.0, &mut rng);
    let (mut y32, mut y16) = (vec![0f32; tokens * out], vec![0f32; tokens * out]);
    linear::forward(&x, &q, None, &mut y32, Precision::F32);
    linear::forward(&x, &q, None, &mut y16, Precision::Bf16);
    let (mut d32, mut d16) = (vec![0f32; tokens * inp], vec![0f32; tokens * inp]);
    linear::backward_input(&dy, &q, &mut d32, false, Precision::F32);
    linear::backward_input(&dy, &q, &mut d16, false, Precision::Bf16);
    let to64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    // bf16 keeps 8 bits of mantissa: a relative rounding error of at most 2^-9 per operand.
    let (ef, eb) = (rel_err(&y16, &to64(&y32)), rel_err(&d16, &to64(&d32)));
    assert!(
        ef < 5e-3 && eb < 5e-3,
        "bf16 vs f32: forward {ef:e}, backward {eb:e}"
    );
}

/// NEFTune's noise: uniform in [−m, m) (each of 10 bins within 5 standard deviations of a tenth, mean
/// and variance m²/3 likewise), the same on every call, unrelated for another seed and to the dropout
/// masks of the same seed, added to what is there.
#[test]
fn embedding_noise_is_uniform_counter_based_and_added() {
    use nibble::ops::dropout::{self, DropoutParams};
    let mut rng = Rng::new(22);
    let (n, m) = (200_000, 0.3f32);
    let x = random(n, 1.0, &mut rng);
    let seed = 0x0fed_cba9_8765_4321;
    let params = DropoutParams::noise(n, seed, m);
    let mut y = x.clone();
    dropout::add_uniform_noise(&params, &mut y);
    let noise: Vec<f64> = y.iter().zip(&x).map(|(a, b)| (a - b) as f64).collect();
    assert!(noise.iter().all(|&e| e.abs() <= m as f64 * (1.0 + 1e-6)));
    let mut bins = [0usize; 10];
    for &e in &noise {
        bins[(((e / m as f64 + 1.0) * 5.0) as usize).min(9)] += 1;
    }
    let sigma = (n as f64 * 0.1 * 0.9).sqrt();
    for (i, &count) in bins.iter().enumerate() {
        assert!(
            (count as f64 - n as f64 / 10.0).abs() < 5.0 * sigma,
            "bin {i}: {count} of {n}"
        );
    }
    let mean = noise.iter().sum::<f64>() / n as f64;
    let variance = noise.iter().map(|e| e * e).sum::<f64>() / n as f64;
    let m2 = (m * m) as f64;
    // The mean's standard deviation is m/√(3n); the variance's about m²·0.3/√n.
    assert!(
        mean.abs() < 5.0 * (m2 / 3.0 / n as f64).sqrt(),
        "mean {mean}"
    );
    assert!(
        (variance - m2 / 3.0).abs() < 5.0 * m2 * 0.3 / (n as f64).sqrt(),
        "variance {variance} against {}",
        m2 / 3.0
    );
    let mut again = x.clone();
    dropout::add_uniform_noise(&params, &mut again);
    assert_eq!(again, y);
    let mut other = x.clone();
    dropout::add_uniform_noise(&DropoutParams::noise(n, seed + 1, m), &mut other);
    let correlation = |a: &[f32]| -> f64 {
        let e: Vec<f64> = a.iter().zip(&x).map(|(a, b)| (a - b) as f64).collect();
        e.iter().zip(&noise).map(|(a, b)| a * b).sum::<f64>() / (n as f64 * m2 / 3.0)
    };
    assert!(correlation(&other).abs() < 0.02, "another seed");
    // Against the dropout mask of the same seed (kept: 1, dropped: −1), which draws its own stream.
    let mask = DropoutParams::new(n, seed, dropout::stream(0, 0), 0.5);
    let agreement: f64 = (0..n)
        .map(|i| {
            noise[i].signum()
                * if dropout::keeps(&mask, i as u32) {
                    1.0
                } else {
                    -1.0
                }
        })
        .sum::<f64>()
        / n as f64;
    assert!(
        agreement.abs() < 0.02,
        "noise and dropout agree: {agreement}"
    );
}

#[test]
fn dropout_masks_are_counter_based_unbiased_and_independent_per_stream() {
    use nibble::ops::dropout::{self, DropoutParams};
    let mut rng = Rng::new(21);
    let n = 200_000;
    let x = random(n, 1.0, &mut rng);
    let p = 0.3f32;
    let params = DropoutParams::new(n, 0x1234_5678_9abc_def0, dropout::stream(3, 2), p);
    let mut y = vec![0f32; n];
    dropout::forward(&params, &x, &mut y);
    // The drop rate is a binomial proportion: 5 standard deviations of slack.
    let dropped = y.iter().filter(|&&v| v == 0.0).count() as f64 / n as f64;
    let sigma = (p as f64 * (1.0 - p as f64) / n as f64).sqrt();
    assert!(
        (dropped - p as f64).abs() < 5.0 * sigma,
        "drop rate {dropped}"
    );
    for (i, (&a, &b)) in x.iter().zip(&y).enumerate() {
        let expect = if dropout::keeps(&params, i as u32) {
            a / (1.0 - p)
        } else {
            0.0
        };
        assert!((b - expect).abs() <= 1e-6 * expect.abs(), "element {i}");
    }
    // Recomputing gives the same mask; another stream or seed gives an unrelated one (agreement of two
    // independent masks is p² + (1−p)² = 0.58).
    let mut again = vec![0f32; n];
    dropout::forward(&params, &x, &mut again);
    assert_eq!(y, again);
    for other in [
        DropoutParams::new(n, 0x1234_5678_9abc_def0, dropout::stream(3, 3), p),
        DropoutParams::new(n, 0x1234_5678_9abc_def1, dropout::stream(3, 2), p),
    ] {
        let agree = (0..n as u32)
            .filter(|&i| dropout::keeps(&params, i) == dropout::keeps(&other, i))
            .count() as f64
            / n as f64;
        assert!((agree - 0.58).abs() < 0.01, "masks agree on {agree}");
    }
    // The backward passes the gradient where the forward kept the element (a linear map: its transpose).
    let dy = random(n, 1.0, &mut rng);
    let mut dx = random(n, 1.0, &mut rng);
    let before = dx.clone();
    dropout::backward_accumulate(&params, &dy, &mut dx);
    let lhs: f64 = dy.iter().zip(&y).map(|(a, b)| *a as f64 * *b as f64).sum();
    let rhs: f64 = dx
        .iter()
        .zip(&before)
        .zip(&x)
        .map(|((a, b), c)| (*a - *b) as f64 * *c as f64)
        .sum();
    assert!(
        (lhs - rhs).abs() < 1e-3 * lhs.abs().max(1.0),
        "⟨dy, D x⟩ {lhs} vs ⟨Dᵀdy, x⟩ {rhs}"
    );
}

/// LoRA's products with dropout on one side, fused (`dropout::matmul_into`, the dropped matrix drawn
/// tile by tile) against an f64 product of the matrix dropped element by element (`dropout::keeps`):
/// each side as the LoRA branch uses it (x′·Aᵀ, d(xa)ᵀ·x′, dx += dropout′(d(xa)·A)), at shapes off
/// the kernel's tiles (and, for A's gradient, several spans of tokens), accumulating or not, with
/// random C beforehand. Measured: within 1.8e-7 of
/// the largest |C| (f32 sums of up to 1,100 terms); the bound is 2e-6.
#[test]
fn dropout_fused_into_products_matches_dropping_first() {
    use nibble::ops::dropout::{self, DropoutParams, DropoutSide};
    use nibble::ops::matmul::View;
    let mut rng = Rng::new(31);
    let p = 0.25f32;
    // (side, m, n, k, a transposed, b transposed)
    let cases = [
        (DropoutSide::A, 37, 8, 1100, false, true),
        (DropoutSide::A, 70, 16, 33, false, true),
        (DropoutSide::B, 8, 1100, 70, true, false),
        (DropoutSide::B, 4, 513, 31, true, false),
        (DropoutSide::B, 8, 300, 600, true, false),
        (DropoutSide::Product, 70, 1100, 8, false, false),
        (DropoutSide::Product, 33, 40, 16, false, false),
    ];
    let mut worst = 0f64;
    for (case, &(side, m, n, k, a_t, b_t)) in cases.iter().enumerate() {
        let a = random(m * k, 1.0, &mut rng);
        let b = random(k * n, 1.0, &mut rng);
        let masked_len = side.masked_len((m, n, k));
        let params = DropoutParams::new(masked_len, 0x9e37_79b9_7f4a_7c15 + case as u64, 7, p);
        let keep = |i: usize| {
            if dropout::keeps(&params, i as u32) {
                1.0 / (1.0 - p as f64)
            } else {
                0.0
            }
        };
        // Element (i, q) of A and (q, j) of B by their buffers' offsets.
        let a_at = |i: usize, q: usize| if a_t { q * m + i } else { i * k + q };
        let b_at = |q: usize, j: usize| if b_t { j * k + q } else { q * n + j };
        let alpha = 0.75f32;
        for accumulate in [false, true] {
            if side == DropoutSide::Product && !accumulate {
                continue;
            }
            let before = random(m * n, 1.0, &mut rng);
            let mut c = before.clone();
            let view_a = if a_t {
                View::transposed(&a, k, m)
            } else {
                View::new(&a, m, k)
            };
            let view_b = if b_t {
                View::transposed(&b, n, k)
            } else {
                View::new(&b, k, n)
            };
            dropout::matmul_into(&params, side, view_a, view_b, alpha, &mut c, accumulate);
            let mut scale = 0f64;
            let mut error = 0f64;
            for i in 0..m {
                for j in 0..n {
                    let mut sum = 0f64;
                    for q in 0..k {
                        let (ia, ib) = (a_at(i, q), b_at(q, j));
                        let mask = match side {
                            DropoutSide::A => keep(ia),
                            DropoutSide::B => keep(ib),
                            DropoutSide::Product => 1.0,
                        };
                        sum += a[ia] as f64 * b[ib] as f64 * mask;
                    }
                    sum *= alpha as f64;
                    if side == DropoutSide::Product {
                        sum *= keep(i * n + j);
                    }
                    let expect = sum
                        + if accumulate {
                            before[i * n + j] as f64
                        } else {
                            0.0
                        };
                    scale = scale.max(expect.abs());
                    error = error.max((c[i * n + j] as f64 - expect).abs());
                }
            }
            let relative = error / scale;
            worst = worst.max(relative);
            assert!(
                relative < 2e-6,
                "{side:?} {m}x{n}x{k} accumulate={accumulate}: {relative:.2e} of the largest |C|"
            );
        }
    }
    eprintln!("worst error {worst:.2e} of the largest |C|");
}

#[test]
fn packed_rows_decode_to_the_bf16_of_their_dequantized_values() {
    use nibble::model::LinearWeight;
    use nibble::ops::bf16_gemm::Bf16Rows;
    use nibble::quant::{QuantFormat, QuantSpec, QuantTensor};
    let mut rng = Rng::new(23);
    let (rows, cols) = (5, 384);
    let w = random(rows * cols, 0.5, &mut rng);
    for (format, group) in [
        (QuantFormat::Nf4, 64),
        (QuantFormat::Int4, 32),
        (QuantFormat::Nf4, 128),
    ] {
        let q =
            QuantTensor::quantize(QuantSpec::new(format, group).unwrap(), rows, cols, &w).unwrap();
        let deq = q.dequantize();
        let weight = LinearWeight::Quant(q);
        for r in 0..rows {
            let expected: Vec<u16> = deq[r * cols..(r + 1) * cols]
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_bits())
                .collect();
            // The whole row (the vectorised path), 32-aligned slices (one starting inside a group of
            // 64 or 128 and crossing into the next ones), and an unaligned one.
            for (c0, len) in [(0, cols), (64, 32), (96, 160), (7, 50)] {
                let mut got = vec![0u16; len];
                weight.row_bf16(r, c0, &mut got);
                assert_eq!(
                    got,
                    expected[c0..c0 + len],
                    "{format:?} g{group} row {r} cols {c0}.."
                );
            }
        }
    }
}

/// bf16 pairs (`ops::bf16`, what bf16 checkpoints keep) round to nearest, ties to even, as the `half`
/// crate does: random values, exact ties, both tie directions, an odd count, infinities and NaN.
#[test]
fn bf16_pairs_round_to_nearest_even() {
    use nibble::ops::bf16::{pack, unpack};
    let mut rng = nibble::rng::Rng::new(5);
    let mut x: Vec<f32> = (0..999).map(|_| (rng.normal() * 10.0) as f32).collect();
    // Halfway between two bf16 values, with an even and with an odd lower neighbour.
    x.extend([
        f32::from_bits(0x3f80_8000),
        f32::from_bits(0x3f81_8000),
        f32::from_bits(0xbf81_8000),
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
    ]);
    let words = pack(&x);
    assert_eq!(words.len(), x.len().div_ceil(2));
    let mut back = vec![0f32; x.len()];
    unpack(&words, &mut back);
    for (v, b) in x.iter().zip(&back) {
        assert_eq!(
            b.to_bits(),
            half::bf16::from_f32(*v).to_f32().to_bits(),
            "{v:e}"
        );
    }
    let mut nan = [0f32; 1];
    unpack(&pack(&[f32::NAN]), &mut nan);
    assert!(nan[0].is_nan());
}

/// Σ_p c_p · (cross-entropy of position p) with the output projection `w` in f64 (logits capped where
/// `softcap` is given).
fn weighted_cross_entropy64(
    hidden: &[f32],
    w: &[f64],
    dim: usize,
    labels: &[u32],
    c: &[f64],
    softcap: Option<f32>,
) -> f64 {
    let hidden: Vec<f64> = hidden.iter().map(|&v| v as f64).collect();
    let losses = cross_entropy64(&hidden, |i| w[i], (w.len() / dim, dim), labels, softcap);
    losses.iter().zip(c).map(|(l, c)| c * l).sum()
}

/// Trained token rows' gradients (`ops::token_rows`): the output projection's rows against central
/// differences of an f64 cross-entropy (plain and capped, the plain loss and DFT's with its weights
/// held), one row being a position's label; the embedding's rows against plain f64 sums, ids
/// repeating. Both add to what their output holds. Measured: 8.4e-8 and 4.6e-8; held to 1e-6.
#[test]
fn token_row_gradients_match_references() {
    use cross_entropy::LossType::{Dft, Nll};
    use nibble::ops::token_rows;
    let mut rng = Rng::new(21);
    let (vocab, dim, positions) = (300, 16, 6);
    let (w, head, hidden, labels) = random_head(vocab, dim, positions, &mut rng);
    let token_ids = [labels[2], 7, 150, 299];
    let mut worst = 0f64;
    for softcap in [None, Some(3.0f32)] {
        for loss_type in [Nll, Dft] {
            let (tokens, _) = fused_f32(&hidden, &head, &labels, loss_type, softcap);
            let losses: Vec<f32> = tokens.iter().flat_map(|t| t.to_row()).collect();
            // Small: DFT's gradients here are about 1e-5, which f32 would round away against more.
            let before = random(token_ids.len() * dim, 1e-6, &mut rng);
            let mut d_rows = before.clone();
            token_rows::output_rows_grad(
                &hidden,
                &head,
                (&labels, &losses),
                &token_ids,
                (0.5, loss_type, softcap),
                &mut d_rows,
            );
            let got: Vec<f32> = d_rows.iter().zip(&before).map(|(a, b)| a - b).collect();
            let c: Vec<f64> = tokens
                .iter()
                .map(|t| 0.5 * loss_type.weight(t.loss as f64))
                .collect();
            let w64: Vec<f64> = w.iter().map(|&v| v as f64).collect();
            let h = 1e-6;
            let fd: Vec<f64> = token_ids
                .iter()
                .flat_map(|&v| (0..dim).map(move |x| v as usize * dim + x))
                .map(|i| {
                    let (mut plus, mut minus) = (w64.clone(), w64.clone());
                    plus[i] += h;
                    minus[i] -= h;
                    let at =
                        |w: &[f64]| weighted_cross_entropy64(&hidden, w, dim, &labels, &c, softcap);
                    (at(&plus) - at(&minus)) / (2.0 * h)
                })
                .collect();
            let e = rel_err(&got, &fd);
            worst = worst.max(e);
            assert!(
                e < 1e-6,
                "output rows, cap {softcap:?}, {loss_type:?}: {e:e}"
            );
        }
    }
    eprintln!("output rows' gradient: worst relative error {worst:e}");

    let ids: Vec<u32> = [3, 7, 3, 9, 7, 3, 12, 3].to_vec();
    let dx = random(ids.len() * dim, 1.0, &mut rng);
    let trained = [3u32, 9, 11];
    let before = random(trained.len() * dim, 0.1, &mut rng);
    let mut d_rows = before.clone();
    token_rows::embedding_rows_grad(&dx, &ids, &trained, (dim, 2.5), &mut d_rows);
    let reference: Vec<f64> = trained
        .iter()
        .enumerate()
        .flat_map(|(j, &id)| {
            let (ids, dx, before) = (&ids, &dx, &before);
            (0..dim).map(move |x| {
                let sum: f64 = ids
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| **t == id)
                    .map(|(t, _)| dx[t * dim + x] as f64)
                    .sum();
                before[j * dim + x] as f64 + 2.5 * sum
            })
        })
        .collect();
    let e = rel_err(&d_rows, &reference);
    eprintln!("embedding rows' gradient: relative error {e:e}");
    assert!(e < 1e-6, "embedding rows: {e:e}");
}

/// f64 routing of one token's router logits: the softmax's `k` largest (held to `chosen` when
/// given, as autograd holds top-k's choices), divided by their sum when `normalize`.
fn moe_route64(
    logits: &[f64],
    k: usize,
    normalize: bool,
    chosen: Option<&[u32]>,
) -> (Vec<u32>, Vec<f64>) {
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exp: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    let p: Vec<f64> = exp.iter().map(|e| e / sum).collect();
    let chosen = chosen.map(<[u32]>::to_vec).unwrap_or_else(|| {
        let mut order: Vec<u32> = (0..p.len() as u32).collect();
        order.sort_by(|&a, &b| p[b as usize].total_cmp(&p[a as usize]));
        order[..k].to_vec()
    });
    let mut w: Vec<f64> = chosen.iter().map(|&c| p[c as usize]).collect();
    if normalize {
        let s: f64 = w.iter().sum();
        w.iter_mut().for_each(|w| *w /= s);
    }
    (chosen, w)
}

/// f64 experts: y[t] = Σ_j w[t, j] · down_e(silu(gate_e(x[t])) · up_e(x[t])), e = routes[t, j].
fn moe_experts64(
    x: &[f64],
    routes: &[u32],
    weights: &[f64],
    (gate_up, down): (&[f64], &[f64]),
    s: &nibble::ops::moe::MoeShape,
) -> Vec<f64> {
    let swiglu = |g: f64, u: f64| silu(g) * u;
    moe_experts64_with(x, routes, weights, (gate_up, down), (None, &swiglu), s)
}

/// `moe_experts64` with biases on each expert's projections (gate_up's [experts, 2·inter], down's
/// [experts, hidden]) and the gated activation `act(gate, up)`.
#[allow(clippy::type_complexity)]
fn moe_experts64_with(
    x: &[f64],
    routes: &[u32],
    weights: &[f64],
    (gate_up, down): (&[f64], &[f64]),
    (biases, act): (Option<(&[f64], &[f64])>, &dyn Fn(f64, f64) -> f64),
    s: &nibble::ops::moe::MoeShape,
) -> Vec<f64> {
    let (h, i, k) = (s.hidden, s.inter, s.top_k);
    let bias = |b: Option<&[f64]>, at: usize| b.map_or(0.0, |b| b[at]);
    let (gate_up_bias, down_bias) = (biases.map(|b| b.0), biases.map(|b| b.1));
    let dot = |row: &[f64], x: &[f64]| row.iter().zip(x).map(|(w, x)| w * x).sum::<f64>();
    let mut y = vec![0f64; x.len()];
    for (t, xt) in x.chunks(h).enumerate() {
        for j in 0..k {
            let e = routes[t * k + j] as usize;
            let gated: Vec<f64> = (0..i)
                .map(|c| {
                    let g = dot(&gate_up[(e * 2 * i + c) * h..][..h], xt)
                        + bias(gate_up_bias, e * 2 * i + c);
                    let u = dot(&gate_up[(e * 2 * i + i + c) * h..][..h], xt)
                        + bias(gate_up_bias, e * 2 * i + i + c);
                    act(g, u)
                })
                .collect();
            for o in 0..h {
                let out = dot(&down[(e * h + o) * i..][..i], &gated) + bias(down_bias, e * h + o);
                y[t * h + o] += weights[t * k + j] * out;
            }
        }
    }
    y
}

/// A layer's stacked experts, random (standard deviation `scale`) in NF4 groups of 32: gate_up and
/// down, each with its dequantized values in f64.
#[allow(clippy::type_complexity)]
fn random_nf4_experts(
    shape: &nibble::ops::moe::MoeShape,
    scale: f64,
    rng: &mut Rng,
) -> ((LinearWeight, Vec<f64>), (LinearWeight, Vec<f64>)) {
    let (e, h, i) = (shape.experts, shape.hidden, shape.inter);
    let spec = QuantSpec::new(QuantFormat::Nf4, 32).unwrap();
    [(e * 2 * i, h), (e * h, i)]
        .map(|(rows, cols)| {
            let q =
                QuantTensor::quantize(spec, rows, cols, &random(rows * cols, scale, rng)).unwrap();
            let values = q.dequantize().iter().map(|&v| v as f64).collect();
            (LinearWeight::Quant(q), values)
        })
        .into()
}

/// A mixture-of-experts layer's ops (`ops::moe`) on NF4 experts against f64 references: the routing
/// with and without renormalised weights, its backward against finite differences (the choices held
/// fixed), the experts' mixed output at few tokens (streamed rows) and many (decoded blocks), and
/// their gradients into the input and the routing weights against finite differences. Measured:
/// forward within 1.1e-7, gradients within 2.4e-7; held to 1e-6 and 3e-6.
#[test]
fn moe_routing_and_experts_match_references() {
    use nibble::ops::moe::{self, MoeShape};
    let mut rng = Rng::new(40);
    let shape = MoeShape {
        experts: 5,
        top_k: 2,
        hidden: 64,
        inter: 32,
        biased: false,
    };
    let (e, k, h) = (shape.experts, shape.top_k, shape.hidden);
    let to64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    let ((gate_up, gu64), (down, down64)) = random_nf4_experts(&shape, 0.15, &mut rng);
    // dx and d_weights of the unadapted experts.
    let backward = |(x, routes, weights, dy): (&[f32], &[u32], &[f32], &[f32]), p: Precision| {
        let tokens = x.len() / h;
        let (mut dx, mut dw) = (vec![0f32; tokens * h], vec![0f32; tokens * k]);
        let outs = (&mut dx[..], &mut dw[..]);
        let experts = &moe::Experts {
            gate_up: &gate_up,
            down: &down,
            biases: None,
            act: GateActivation::Silu,
            gate_up_lora: None,
            down_lora: None,
        };
        moe::backward(
            x,
            routes,
            weights,
            experts,
            &shape,
            dy,
            outs,
            [None, None],
            false,
            p,
        );
        (dx, dw)
    };
    let weights_of = &moe::Experts {
        gate_up: &gate_up,
        down: &down,
        biases: None,
        act: GateActivation::Silu,
        gate_up_lora: None,
        down_lora: None,
    };
    for (tokens, normalize) in [(5, true), (5, false), (40, true)] {
        let logits = random(tokens * e, 1.5, &mut rng);
        let mut routes = vec![0u32; tokens * k];
        let mut weights = vec![0f32; tokens * k];
        moe::route(&logits, &shape, normalize, &mut routes, &mut weights);
        let mut reference = Vec::new();
        for (t, row) in logits.chunks(e).enumerate() {
            let (chosen, w) = moe_route64(&to64(row), k, normalize, None);
            assert_eq!(routes[t * k..][..k], chosen[..], "token {t}'s experts");
            reference.extend(w);
        }
        let err = rel_err(&weights, &reference);
        assert!(err < 1e-6, "routing weights ({normalize}): {err:e}");

        let x = random(tokens * h, 1.0, &mut rng);
        let mut y = random(tokens * h, 1.0, &mut rng);
        let before = y.clone();
        moe::forward(
            &x,
            &routes,
            &weights,
            weights_of,
            &shape,
            &mut y,
            true,
            Precision::F32,
        );
        let mut reference = moe_experts64(
            &to64(&x),
            &routes,
            &to64(&weights),
            (&gu64, &down64),
            &shape,
        );
        reference
            .iter_mut()
            .zip(&before)
            .for_each(|(r, b)| *r += *b as f64);
        let err = rel_err(&y, &reference);
        assert!(err < 1e-6, "{tokens} tokens through the experts: {err:e}");
        if tokens > 5 {
            continue;
        }

        let dw = random(tokens * k, 1.0, &mut rng);
        let mut d_logits = vec![0f32; tokens * e];
        moe::route_backward(
            &logits,
            &routes,
            &dw,
            &shape,
            normalize,
            &mut d_logits,
            false,
        );
        let fd = finite_diff(&logits, &dw, |l| {
            l.chunks(e)
                .enumerate()
                .flat_map(|(t, row)| moe_route64(row, k, normalize, Some(&routes[t * k..][..k])).1)
                .collect()
        });
        let err = rel_err(&d_logits, &fd);
        assert!(err < 3e-6, "router logits' gradient ({normalize}): {err:e}");

        let dy = random(tokens * h, 1.0, &mut rng);
        let (dx, d_weights) = backward((&x, &routes, &weights, &dy), Precision::F32);
        let experts = |x: &[f64], w: &[f64]| moe_experts64(x, &routes, w, (&gu64, &down64), &shape);
        let fd = finite_diff(&x, &dy, |x| experts(x, &to64(&weights)));
        let err = rel_err(&dx, &fd);
        assert!(err < 3e-6, "the experts' input gradient: {err:e}");
        let fd = finite_diff(&weights, &dy, |w| experts(&to64(&x), w));
        let err = rel_err(&d_weights, &fd);
        assert!(err < 3e-6, "the routing weights' gradient: {err:e}");
    }

    // The 16-bit integer products (`--precision int16`), where an expert has enough tokens for
    // them, against f64 (forward) and against the f32 backward (itself held to finite differences).
    // Measured: within 6.7e-4 (forward) and 9.7e-4 (gradients); held to 1e-2.
    let tokens = 120;
    let logits = random(tokens * e, 1.5, &mut rng);
    let (mut routes, mut weights) = (vec![0u32; tokens * k], vec![0f32; tokens * k]);
    moe::route(&logits, &shape, true, &mut routes, &mut weights);
    let x = random(tokens * h, 1.0, &mut rng);
    let dy = random(tokens * h, 1.0, &mut rng);
    let mut y = vec![0f32; tokens * h];
    let p = Precision::Int16;
    moe::forward(&x, &routes, &weights, weights_of, &shape, &mut y, false, p);
    let reference = moe_experts64(
        &to64(&x),
        &routes,
        &to64(&weights),
        (&gu64, &down64),
        &shape,
    );
    let err = rel_err(&y, &reference);
    assert!(err < 1e-2, "the experts in 16-bit products: {err:e}");
    let inputs = (&x[..], &routes[..], &weights[..], &dy[..]);
    let ((dx16, dw16), (dx32, dw32)) = (
        backward(inputs, Precision::Int16),
        backward(inputs, Precision::F32),
    );
    for (what, a, b) in [("input", dx16, dx32), ("routing weights", dw16, dw32)] {
        let err = rel_err(&a, &to64(&b));
        assert!(
            err < 1e-2,
            "the {what}' gradient in 16-bit products: {err:e}"
        );
    }
}

/// Expert e's weight update s·B_e·A_e of a stack's LoRA pair in PEFT's layout (A [E·r, in], expert e
/// its rows e·r..; B [out, r·E], expert e its columns e, e + E, …, as PEFT's ParamWrapper reshapes
/// them), added to the stacked weight [E·out, in], in f64.
fn merged_experts64(
    base: &[f64],
    (a, b): (&[f64], &[f64]),
    (experts, rank, out, inp): (usize, usize, usize, usize),
    scale: f64,
) -> Vec<f64> {
    let mut w = base.to_vec();
    for e in 0..experts {
        for o in 0..out {
            for c in 0..inp {
                let delta: f64 = (0..rank)
                    .map(|k| b[o * rank * experts + k * experts + e] * a[(e * rank + k) * inp + c])
                    .sum();
                w[(e * out + o) * inp + c] += scale * delta;
            }
        }
    }
    w
}

/// gpt-oss's experts: biases on each expert's projections and the clamped SwiGLU, on NF4 experts
/// against the f64 reference (biases large enough that some gates and ups pass the clamps), and the
/// gradients into the input and the routing weights against finite differences of it.
#[test]
fn experts_with_biases_and_the_clamped_swiglu_match_references() {
    use nibble::ops::moe::{self, MoeShape};
    let mut rng = Rng::new(42);
    let shape = MoeShape {
        experts: 4,
        top_k: 2,
        hidden: 32,
        inter: 32,
        biased: true,
    };
    let (e, k, h, i) = (shape.experts, shape.top_k, shape.hidden, shape.inter);
    let (alpha, limit) = (1.702f32, 7.0f32);
    let act = GateActivation::ClampedSwiglu { alpha, limit };
    let act64 = |g: f64, u: f64| {
        let (a, l) = (alpha as f64, limit as f64);
        let g = g.min(l);
        (u.clamp(-l, l) + 1.0) * g / (1.0 + (-a * g).exp())
    };
    let to64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    let ((gate_up, gu64), (down, down64)) = random_nf4_experts(&shape, 0.5, &mut rng);
    let (gate_up_bias, down_bias) = (
        random(e * 2 * i, 4.0, &mut rng),
        random(e * h, 1.0, &mut rng),
    );
    let experts = moe::Experts {
        gate_up: &gate_up,
        down: &down,
        biases: Some([&gate_up_bias, &down_bias]),
        act,
        gate_up_lora: None,
        down_lora: None,
    };
    let tokens = 9;
    let logits = random(tokens * e, 1.5, &mut rng);
    let (mut routes, mut weights) = (vec![0u32; tokens * k], vec![0f32; tokens * k]);
    moe::route(&logits, &shape, true, &mut routes, &mut weights);
    let x = random(tokens * h, 1.0, &mut rng);
    let biases64 = (to64(&gate_up_bias), to64(&down_bias));
    let reference = |x: &[f64], w: &[f64]| {
        let biases = Some((&biases64.0[..], &biases64.1[..]));
        moe_experts64_with(x, &routes, w, (&gu64, &down64), (biases, &act64), &shape)
    };
    let mut y = vec![0f32; tokens * h];
    moe::forward(
        &x,
        &routes,
        &weights,
        &experts,
        &shape,
        &mut y,
        false,
        Precision::F32,
    );
    let want = reference(&to64(&x), &to64(&weights));
    let err = rel_err(&y, &want);
    assert!(err < 1e-6, "gpt-oss experts' output: {err:e}");
    let unbiased = moe_experts64(
        &to64(&x),
        &routes,
        &to64(&weights),
        (&gu64, &down64),
        &shape,
    );
    assert!(
        rel_err(&y, &unbiased) > 0.1,
        "the biases and the clamps count"
    );

    let dy = random(tokens * h, 1.0, &mut rng);
    let (mut dx, mut dw) = (vec![0f32; tokens * h], vec![0f32; tokens * k]);
    let outs = (&mut dx[..], &mut dw[..]);
    moe::backward(
        &x,
        &routes,
        &weights,
        &experts,
        &shape,
        &dy,
        outs,
        [None, None],
        false,
        Precision::F32,
    );
    let fd = finite_diff(&x, &dy, |x| reference(x, &to64(&weights)));
    let err = rel_err(&dx, &fd);
    assert!(err < 3e-6, "gpt-oss experts' input gradient: {err:e}");
    let fd = finite_diff(&weights, &dy, |w| reference(&to64(&x), w));
    let err = rel_err(&dw, &fd);
    assert!(
        err < 3e-6,
        "gpt-oss experts' routing weights' gradient: {err:e}"
    );
}

/// LoRA on a mixture of experts' stacked weights (PEFT's `target_parameters`), each stack its own
/// rank and scale: the output against the f64 experts with every expert's weight merged, and the
/// gradients of both pairs, the input and the routing weights against finite differences of that
/// reference. Measured: forward within 1.8e-7, gradients within 2.5e-7 (f32 products); held to 1e-6
/// and 3e-6.
#[test]
fn expert_lora_matches_the_merged_experts_and_finite_differences() {
    use nibble::ops::moe::{self, ExpertGrads, ExpertPairs, MoeShape};
    let mut rng = Rng::new(41);
    let shape = MoeShape {
        experts: 3,
        top_k: 2,
        hidden: 32,
        inter: 32,
        biased: false,
    };
    let (e, k, h, i) = (shape.experts, shape.top_k, shape.hidden, shape.inter);
    let to64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    let ((gate_up, gu64), (down, down64)) = random_nf4_experts(&shape, 0.3, &mut rng);
    let (r_gu, r_dn, s_gu, s_dn) = (2, 3, 1.5f32, 0.7f32);
    let a_gu = random(e * r_gu * h, 0.3, &mut rng);
    let b_gu = random(2 * i * r_gu * e, 0.3, &mut rng);
    let a_dn = random(e * r_dn * i, 0.3, &mut rng);
    let b_dn = random(h * r_dn * e, 0.3, &mut rng);
    let tokens = 7;
    let logits = random(tokens * e, 1.5, &mut rng);
    let (mut routes, mut weights) = (vec![0u32; tokens * k], vec![0f32; tokens * k]);
    moe::route(&logits, &shape, true, &mut routes, &mut weights);
    let x = random(tokens * h, 1.0, &mut rng);
    let dy = random(tokens * h, 1.0, &mut rng);
    let experts = moe::Experts {
        gate_up: &gate_up,
        down: &down,
        biases: None,
        act: GateActivation::Silu,
        gate_up_lora: Some(ExpertPairs {
            a: &a_gu,
            b: &b_gu,
            rank: r_gu,
            scale: s_gu,
            experts: e,
        }),
        down_lora: Some(ExpertPairs {
            a: &a_dn,
            b: &b_dn,
            rank: r_dn,
            scale: s_dn,
            experts: e,
        }),
    };
    // The reference from f64 copies of everything a gradient is taken of.
    let reference = |x: &[f64], w: &[f64], gu: (&[f64], &[f64]), dn: (&[f64], &[f64])| {
        let gu = merged_experts64(&gu64, gu, (e, r_gu, 2 * i, h), s_gu as f64);
        let dn = merged_experts64(&down64, dn, (e, r_dn, h, i), s_dn as f64);
        moe_experts64(x, &routes, w, (&gu, &dn), &shape)
    };
    let (x64, w64) = (to64(&x), to64(&weights));
    let (agu64, bgu64, adn64, bdn64) = (to64(&a_gu), to64(&b_gu), to64(&a_dn), to64(&b_dn));
    let mut y = vec![0f32; tokens * h];
    moe::forward(
        &x,
        &routes,
        &weights,
        &experts,
        &shape,
        &mut y,
        false,
        Precision::F32,
    );
    let expected = reference(&x64, &w64, (&agu64, &bgu64), (&adn64, &bdn64));
    let err = rel_err(&y, &expected);
    assert!(err < 1e-6, "the adapted experts' output: {err:e}");

    // The pairs' gradients are added to what the buffers hold.
    let held: Vec<Vec<f32>> = [a_gu.len(), b_gu.len(), a_dn.len(), b_dn.len()]
        .iter()
        .map(|&n| random(n, 1.0, &mut rng))
        .collect();
    let mut grads = held.clone();
    let (mut dx, mut dw) = (vec![0f32; tokens * h], vec![0f32; tokens * k]);
    {
        let [ga_gu, gb_gu, ga_dn, gb_dn] = &mut grads[..] else {
            unreachable!()
        };
        let grads = [
            Some(ExpertGrads { a: ga_gu, b: gb_gu }),
            Some(ExpertGrads { a: ga_dn, b: gb_dn }),
        ];
        let outs = (&mut dx[..], &mut dw[..]);
        moe::backward(
            &x,
            &routes,
            &weights,
            &experts,
            &shape,
            &dy,
            outs,
            grads,
            false,
            Precision::F32,
        );
    }
    let fds = [
        (
            "input",
            dx.clone(),
            finite_diff(&x, &dy, |x| {
                reference(x, &w64, (&agu64, &bgu64), (&adn64, &bdn64))
            }),
        ),
        (
            "routing weights",
            dw.clone(),
            finite_diff(&weights, &dy, |w| {
                reference(&x64, w, (&agu64, &bgu64), (&adn64, &bdn64))
            }),
        ),
        (
            "gate_up's A",
            grads[0].clone(),
            finite_diff(&a_gu, &dy, |a| {
                reference(&x64, &w64, (a, &bgu64), (&adn64, &bdn64))
            }),
        ),
        (
            "gate_up's B",
            grads[1].clone(),
            finite_diff(&b_gu, &dy, |b| {
                reference(&x64, &w64, (&agu64, b), (&adn64, &bdn64))
            }),
        ),
        (
            "down's A",
            grads[2].clone(),
            finite_diff(&a_dn, &dy, |a| {
                reference(&x64, &w64, (&agu64, &bgu64), (a, &bdn64))
            }),
        ),
        (
            "down's B",
            grads[3].clone(),
            finite_diff(&b_dn, &dy, |b| {
                reference(&x64, &w64, (&agu64, &bgu64), (&adn64, b))
            }),
        ),
    ];
    for (j, (what, got, fd)) in fds.into_iter().enumerate() {
        // The pairs' gradients, less what their buffers held before.
        let got: Vec<f32> = match j {
            0 | 1 => got,
            _ => got.iter().zip(&held[j - 2]).map(|(g, h)| g - h).collect(),
        };
        let err = rel_err(&got, &fd);
        assert!(err < 3e-6, "{what}'s gradient: {err:e}");
    }
}
