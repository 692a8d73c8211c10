//! Causal grouped-query attention, softmax(q·kᵀ/√d)·v with query head h reading kv head h / (heads/kv_heads).
//! One query row of scores exists at a time (never the tokens x tokens matrix); the forward saves each
//! row's log-sum-exp so that the backward recomputes probabilities instead of storing them.

use rayon::prelude::*;

#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub tokens: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
}

/// `segments[t]` is the first position token t may attend to (0 for one sequence; the start of its own
/// example when several examples are packed into one sequence).
fn first_key(segments: Option<&[u32]>, t: usize) -> usize {
    segments.map_or(0, |s| s[t] as usize)
}

/// Σ a·b with eight running sums, which the compiler turns into SIMD (a single running sum must keep
/// its order and stays scalar).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a8.zip(b8) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// q [T, heads·d], k and v [T, kv_heads·d] → out [T, heads·d], lse [heads, T].
pub fn forward(
    s: AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    segments: Option<&[u32]>,
    out: &mut [f32],
    lse: &mut [f32],
) {
    forward_after(s, 0, q, k, v, segments, out, lse);
}

/// Decoding with a KV cache: the T queries sit at positions past..past+T and k, v hold all past + T
/// positions' keys and values ([past + T, kv_heads·d]).
pub fn forward_cached(
    s: AttentionShape,
    past: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
) {
    let mut lse = vec![0f32; s.heads * s.tokens];
    forward_after(s, past, q, k, v, None, out, &mut lse);
}

#[allow(clippy::too_many_arguments)]
fn forward_after(
    s: AttentionShape,
    past: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    segments: Option<&[u32]>,
    out: &mut [f32],
    lse: &mut [f32],
) {
    let (d, qw, kw) = (s.head_dim, s.heads * s.head_dim, s.kv_heads * s.head_dim);
    // Parallel over (head, query) rows; each writes its own slice of `out` and one lse entry.
    let rows: Vec<(usize, usize)> = (0..s.heads)
        .flat_map(|h| (0..s.tokens).map(move |t| (h, t)))
        .collect();
    let results: Vec<(Vec<f32>, f32)> = rows
        .par_iter()
        .map_init(Vec::new, |scores, &(h, t)| {
            let kvh = h / s.group();
            let qi = &q[t * qw + h * d..t * qw + (h + 1) * d];
            let start = first_key(segments, t);
            let position = past + t;
            scores.clear();
            let mut max = f32::NEG_INFINITY;
            for j in start..=position {
                let sc = dot(qi, &k[j * kw + kvh * d..j * kw + (kvh + 1) * d]) * s.scale();
                max = max.max(sc);
                scores.push(sc);
            }
            let mut sum = 0f32;
            for sc in scores.iter_mut() {
                *sc = (*sc - max).exp();
                sum += *sc;
            }
            let mut o = vec![0f32; d];
            for (p, j) in scores.iter().zip(start..=position) {
                let w = p / sum;
                for (o, vv) in o
                    .iter_mut()
                    .zip(&v[j * kw + kvh * d..j * kw + (kvh + 1) * d])
                {
                    *o += w * vv;
                }
            }
            (o, max + sum.ln())
        })
        .collect();
    for ((h, t), (o, l)) in rows.into_iter().zip(results) {
        out[t * qw + h * d..t * qw + (h + 1) * d].copy_from_slice(&o);
        lse[h * s.tokens + t] = l;
    }
}

/// Gradients of q, k, v given d_out; `out` and `lse` are the forward's. dq, dk, dv are overwritten.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    s: AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    d_out: &[f32],
    segments: Option<&[u32]>,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let (d, qw, kw, scale) = (
        s.head_dim,
        s.heads * s.head_dim,
        s.kv_heads * s.head_dim,
        s.scale(),
    );
    // Parallel over kv heads: each owns its columns of dk and dv, and the query heads of its group own
    // their columns of dq, so no two tasks write the same element.
    let per_kv: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..s.kv_heads)
        .into_par_iter()
        .map(|kvh| {
            let mut dq_g = vec![0f32; s.group() * s.tokens * d];
            let mut dk_h = vec![0f32; s.tokens * d];
            let mut dv_h = vec![0f32; s.tokens * d];
            for g in 0..s.group() {
                let h = kvh * s.group() + g;
                for t in 0..s.tokens {
                    let qi = &q[t * qw + h * d..t * qw + (h + 1) * d];
                    let doi = &d_out[t * qw + h * d..t * qw + (h + 1) * d];
                    let oi = &out[t * qw + h * d..t * qw + (h + 1) * d];
                    let delta = dot(doi, oi);
                    let l = lse[h * s.tokens + t];
                    let dqi = &mut dq_g[(g * s.tokens + t) * d..(g * s.tokens + t + 1) * d];
                    for j in first_key(segments, t)..=t {
                        let kj = &k[j * kw + kvh * d..j * kw + (kvh + 1) * d];
                        let vj = &v[j * kw + kvh * d..j * kw + (kvh + 1) * d];
                        let p = (dot(qi, kj) * scale - l).exp();
                        let ds = p * (dot(doi, vj) - delta) * scale;
                        dqi.iter_mut().zip(kj).for_each(|(g, k)| *g += ds * k);
                        let dk_j = &mut dk_h[j * d..(j + 1) * d];
                        dk_j.iter_mut().zip(qi).for_each(|(g, q)| *g += ds * q);
                        let dv_j = &mut dv_h[j * d..(j + 1) * d];
                        dv_j.iter_mut().zip(doi).for_each(|(g, o)| *g += p * o);
                    }
                }
            }
            (dq_g, dk_h, dv_h)
        })
        .collect();
    for (kvh, (dq_g, dk_h, dv_h)) in per_kv.into_iter().enumerate() {
        for t in 0..s.tokens {
            dk[t * kw + kvh * d..t * kw + (kvh + 1) * d].copy_from_slice(&dk_h[t * d..(t + 1) * d]);
            dv[t * kw + kvh * d..t * kw + (kvh + 1) * d].copy_from_slice(&dv_h[t * d..(t + 1) * d]);
            for g in 0..s.group() {
                let h = kvh * s.group() + g;
                dq[t * qw + h * d..t * qw + (h + 1) * d]
                    .copy_from_slice(&dq_g[(g * s.tokens + t) * d..(g * s.tokens + t + 1) * d]);
            }
        }
    }
}

/// The uniform of shaders/attention.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AttentionParams {
    pub tokens: u32,
    pub heads: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub scale: f32,
    pub _pad: [u32; 3],
}
