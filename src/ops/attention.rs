//! Causal grouped-query attention, softmax(q·kᵀ/√d)·v with query head h reading kv head h / (heads/kv_heads).
//! One query row of scores exists at a time (never the tokens x tokens matrix); the forward saves each
//! row's log-sum-exp so that the backward recomputes probabilities instead of storing them.

use crate::exec::gpu::Recorder;
use crate::gpu::GpuBuffer;
use crate::ops::fastmath::{self, dot};
use crate::ops::matmul::{View, in_parallel_task, matmul_into};
use rayon::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AttentionShape {
    pub tokens: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Each token sees the keys up to its own (decoders); otherwise every key (FLUX's joint attention).
    pub causal: bool,
    /// A learned logit per query head that joins each row's softmax without a value (gpt-oss's
    /// `sinks`): the forward's inputs hold them after v.
    pub sinks: bool,
}

impl AttentionShape {
    /// Where the forward's optional masks (first key, key end) start among its inputs.
    pub fn masks_at(&self) -> usize {
        3 + usize::from(self.sinks)
    }

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

/// Query rows per block: a block's scores (QUERY_BLOCK x the keys it sees) are the only score matrix
/// that exists, and its products run as small GEMMs.
const QUERY_BLOCK: usize = 64;

/// One head's columns `head·d..(head + 1)·d` of rows `first..first + rows` of a [_, width] matrix.
fn head_rows(
    data: &[f32],
    width: usize,
    head: usize,
    d: usize,
    first: usize,
    rows: usize,
) -> View<'_> {
    View::columns(&data[first * width..], rows, width, head * d, d)
}

/// The transpose of `head_rows`: d x rows.
fn head_rows_t(
    data: &[f32],
    width: usize,
    head: usize,
    d: usize,
    first: usize,
    rows: usize,
) -> View<'_> {
    View {
        data: &data[first * width + head * d..],
        rows: d,
        cols: rows,
        row_stride: 1,
        col_stride: width,
    }
}

/// The rows of one query block and the keys they see: queries `t0..t1` (at positions past + t) attend
/// to keys `k0..k1`, each query t to `first_key(t)..=past + t` of them.
struct Block {
    t0: usize,
    t1: usize,
    k0: usize,
    k1: usize,
}

impl Block {
    fn all(
        s: AttentionShape,
        past: usize,
        segments: Option<&[u32]>,
    ) -> impl Iterator<Item = Block> + '_ {
        let (tokens, causal) = (s.tokens, s.causal);
        (0..tokens).step_by(QUERY_BLOCK).map(move |t0| {
            let t1 = (t0 + QUERY_BLOCK).min(tokens);
            let k0 = (t0..t1).map(|t| first_key(segments, t)).min().unwrap_or(0);
            Block {
                t0,
                t1,
                k0,
                k1: past + if causal { t1 } else { tokens },
            }
        })
    }

    fn rows(&self) -> usize {
        self.t1 - self.t0
    }

    fn keys(&self) -> usize {
        self.k1 - self.k0
    }

    /// The columns of row i's scores that its query may see.
    fn visible(
        &self,
        i: usize,
        (past, causal): (usize, bool),
        (segments, key_end): (Option<&[u32]>, Option<&[u32]>),
    ) -> std::ops::Range<usize> {
        let t = self.t0 + i;
        let mut end = if causal { past + t + 1 } else { self.k1 };
        if let Some(limit) = key_end {
            end = end.min(limit[t] as usize);
        }
        let start = first_key(segments, t) - self.k0;
        // A padded query past a sliding window's reach sees no key: end may lie before k0.
        start..end.saturating_sub(self.k0).max(start)
    }
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
    forward_after(s, 0, [q, k, v], (segments, None), None, out, lse);
}

/// `forward` where query t sees no key at or past `key_end[t]` (padding at the end of a sequence),
/// and with `sinks` ([heads], where `s.sinks`) in each of a head's rows' softmax.
#[allow(clippy::too_many_arguments)]
pub fn forward_with(
    s: AttentionShape,
    [q, k, v]: [&[f32]; 3],
    segments: Option<&[u32]>,
    key_end: Option<&[u32]>,
    sinks: Option<&[f32]>,
    out: &mut [f32],
    lse: &mut [f32],
) {
    forward_after(s, 0, [q, k, v], (segments, key_end), sinks, out, lse);
}

/// Decoding with a KV cache: the T queries sit at positions past..past+T and k, v hold all past + T
/// positions' keys and values ([past + T, kv_heads·d]). With `first_key`, query t sees no key before
/// position first_key[t] (a sliding window).
#[allow(clippy::too_many_arguments)]
pub fn forward_cached(
    s: AttentionShape,
    past: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    first_key: Option<&[u32]>,
    sinks: Option<&[f32]>,
    out: &mut [f32],
) {
    let mut lse = vec![0f32; s.heads * s.tokens];
    forward_after(s, past, [q, k, v], (first_key, None), sinks, out, &mut lse);
}

fn forward_after(
    s: AttentionShape,
    past: usize,
    [q, k, v]: [&[f32]; 3],
    (segments, key_end): (Option<&[u32]>, Option<&[u32]>),
    sinks: Option<&[f32]>,
    out: &mut [f32],
    lse: &mut [f32],
) {
    let (d, qw, kw, t_len) = (
        s.head_dim,
        s.heads * s.head_dim,
        s.kv_heads * s.head_dim,
        s.tokens,
    );
    // Each head computes its [T, d] output and T log-sum-exps.
    let head = |h: usize| {
        in_parallel_task(|| {
            let kvh = h / s.group();
            let mut o = vec![0f32; t_len * d];
            let mut l = vec![0f32; t_len];
            let mut scores = Vec::new();
            for b in Block::all(s, past, segments) {
                let (rows, keys) = (b.rows(), b.keys());
                scores.clear();
                scores.resize(rows * keys, 0.0);
                // One query row (decoding): plain dot products; a GEMM call's setup costs more
                // than the row's arithmetic.
                if rows == 1 {
                    let query = &q[b.t0 * qw + h * d..][..d];
                    for (j, score) in scores.iter_mut().enumerate() {
                        *score = s.scale() * dot(query, &k[(b.k0 + j) * kw + kvh * d..][..d]);
                    }
                } else {
                    matmul_into(
                        head_rows(q, qw, h, d, b.t0, rows),
                        head_rows_t(k, kw, kvh, d, b.k0, keys),
                        s.scale(),
                        &mut scores,
                        keys,
                        0,
                        false,
                    );
                }
                for (i, row) in scores.chunks_mut(keys).enumerate() {
                    let seen = b.visible(i, (past, s.causal), (segments, key_end));
                    let max = fastmath::max(&row[seen.clone()]);
                    let sum = fastmath::exp_shifted_sum(&mut row[seen.clone()], max);
                    let (max, sum) = match sinks {
                        // The sink joins the denominator: exp(sink) beside the scores' exps, in
                        // terms of the larger of the two maxima (a row that sees no key has only it).
                        Some(sinks) => {
                            let top = max.max(sinks[h]);
                            let rescale = fastmath::exp(max - top);
                            row[seen.clone()].iter_mut().for_each(|x| *x *= rescale);
                            (top, sum * rescale + fastmath::exp(sinks[h] - top))
                        }
                        None => (max, sum),
                    };
                    row[seen.clone()].iter_mut().for_each(|x| *x /= sum);
                    row[..seen.start].fill(0.0);
                    row[seen.end..].fill(0.0);
                    l[b.t0 + i] = max + sum.ln();
                }
                if rows == 1 {
                    let out = &mut o[b.t0 * d..][..d];
                    out.fill(0.0);
                    for (j, &p) in scores.iter().enumerate() {
                        let value = &v[(b.k0 + j) * kw + kvh * d..][..d];
                        out.iter_mut().zip(value).for_each(|(o, &x)| *o += p * x);
                    }
                } else {
                    matmul_into(
                        View::new(&scores, rows, keys),
                        head_rows(v, kw, kvh, d, b.k0, keys),
                        1.0,
                        &mut o[b.t0 * d..],
                        d,
                        0,
                        false,
                    );
                }
            }
            (o, l)
        })
    };
    // Parallel over heads, unless the whole product is too small to pay for waking the other threads
    // (a decoding step's query against a short cache: 14 heads x 100 keys x 64 is 90k multiply-adds,
    // tens of microseconds).
    let work = t_len * (past + t_len) * qw;
    let per_head: Vec<(Vec<f32>, Vec<f32>)> = if work < 1 << 18 {
        (0..s.heads).map(head).collect()
    } else {
        (0..s.heads).into_par_iter().map(head).collect()
    };
    if t_len == 0 {
        return;
    }
    // Tokens on every thread (on one, this copy was about a twentieth of the op with a core idle).
    out.par_chunks_mut(qw)
        .with_min_len(16)
        .enumerate()
        .for_each(|(t, row)| {
            for (head, (o, _)) in row.chunks_mut(d).zip(&per_head) {
                head.copy_from_slice(&o[t * d..(t + 1) * d]);
            }
        });
    for (lse, (_, l)) in lse.chunks_mut(t_len).zip(&per_head) {
        lse.copy_from_slice(l);
    }
}

/// Gradients of q, k, v given d_out; `out` and `lse` are the forward's. dq, dk, dv are overwritten.
/// Sinks need nothing here: the forward's lse counts them, and they carry no value, so each row's
/// Σ_j p_j·dp_j is still d_out·out. (They are frozen: no gradient of their own.)
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
    let (d, qw, kw, t_len, scale) = (
        s.head_dim,
        s.heads * s.head_dim,
        s.kv_heads * s.head_dim,
        s.tokens,
        s.scale(),
    );
    // Parallel over query heads: each recomputes its probabilities block by block from the saved
    // log-sum-exps and returns its dq and its share of its kv head's dk and dv.
    let per_head: Vec<[Vec<f32>; 3]> = (0..s.heads)
        .into_par_iter()
        .map(|h| {
            in_parallel_task(|| {
                let kvh = h / s.group();
                let (mut dq_h, mut dk_h, mut dv_h) = (
                    vec![0f32; t_len * d],
                    vec![0f32; t_len * d],
                    vec![0f32; t_len * d],
                );
                let (mut probs, mut dscores) = (Vec::new(), Vec::new());
                for b in Block::all(s, 0, segments) {
                    let (rows, keys) = (b.rows(), b.keys());
                    probs.clear();
                    probs.resize(rows * keys, 0.0);
                    dscores.clear();
                    dscores.resize(rows * keys, 0.0);
                    let q_b = head_rows(q, qw, h, d, b.t0, rows);
                    let do_b = head_rows(d_out, qw, h, d, b.t0, rows);
                    matmul_into(
                        q_b,
                        head_rows_t(k, kw, kvh, d, b.k0, keys),
                        scale,
                        &mut probs,
                        keys,
                        0,
                        false,
                    );
                    matmul_into(
                        do_b,
                        head_rows_t(v, kw, kvh, d, b.k0, keys),
                        1.0,
                        &mut dscores,
                        keys,
                        0,
                        false,
                    );
                    // p = exp(score − lse); d score = p · (dp − Σ_j p_j dp_j) · scale, where the sum equals
                    // d_out · out for the row.
                    for (i, (p_row, ds_row)) in probs
                        .chunks_mut(keys)
                        .zip(dscores.chunks_mut(keys))
                        .enumerate()
                    {
                        let t = b.t0 + i;
                        let seen = b.visible(i, (0, s.causal), (segments, None));
                        let l = lse[h * t_len + t];
                        let delta = dot(
                            &d_out[t * qw + h * d..t * qw + (h + 1) * d],
                            &out[t * qw + h * d..t * qw + (h + 1) * d],
                        );
                        for (p, ds) in p_row[seen.clone()]
                            .iter_mut()
                            .zip(&mut ds_row[seen.clone()])
                        {
                            *p = fastmath::exp(*p - l);
                            *ds = *p * (*ds - delta) * scale;
                        }
                        for range in [0..seen.start, seen.end..keys] {
                            p_row[range.clone()].fill(0.0);
                            ds_row[range].fill(0.0);
                        }
                    }
                    matmul_into(
                        View::new(&dscores, rows, keys),
                        head_rows(k, kw, kvh, d, b.k0, keys),
                        1.0,
                        &mut dq_h[b.t0 * d..],
                        d,
                        0,
                        false,
                    );
                    matmul_into(
                        View::transposed(&dscores, rows, keys),
                        q_b,
                        1.0,
                        &mut dk_h[b.k0 * d..],
                        d,
                        0,
                        true,
                    );
                    matmul_into(
                        View::transposed(&probs, rows, keys),
                        do_b,
                        1.0,
                        &mut dv_h[b.k0 * d..],
                        d,
                        0,
                        true,
                    );
                }
                [dq_h, dk_h, dv_h]
            })
        })
        .collect();
    // Tokens on every thread (on one, this gather was about a twentieth of the op with a core idle);
    // each kv head's shares are added in the heads' order.
    dq.par_chunks_mut(qw)
        .zip(dk.par_chunks_mut(kw))
        .zip(dv.par_chunks_mut(kw))
        .with_min_len(16)
        .enumerate()
        .for_each(|(t, ((dq_t, dk_t), dv_t))| {
            dk_t.fill(0.0);
            dv_t.fill(0.0);
            let token = t * d..(t + 1) * d;
            for (h, [dq_h, dk_h, dv_h]) in per_head.iter().enumerate() {
                let kvh = h / s.group();
                dq_t[h * d..(h + 1) * d].copy_from_slice(&dq_h[token.clone()]);
                let add = |to: &mut [f32], from: &[f32]| {
                    to.iter_mut().zip(from).for_each(|(a, b)| *a += b)
                };
                add(&mut dk_t[kvh * d..(kvh + 1) * d], &dk_h[token.clone()]);
                add(&mut dv_t[kvh * d..(kvh + 1) * d], &dv_h[token.clone()]);
            }
        });
}

/// The widest head each build of shaders/attention.wgsl holds (its `MAX_HEAD_DIM`: each invocation
/// keeps a head's rows in registers): the file as written, and its `attention_wide` variant, which
/// wider heads use.
pub const GPU_HEAD_DIMS: [usize; 2] = [256, 512];
pub const GPU_MAX_HEAD_DIM: usize = GPU_HEAD_DIMS[1];

/// The entry point for `shape`'s heads: `narrow`, or its `_wide` twin past the narrow build's width.
fn kernel(shape: &AttentionShape, narrow: &'static str, wide: &'static str) -> &'static str {
    match shape.head_dim > GPU_HEAD_DIMS[0] {
        true => wide,
        false => narrow,
    }
}

/// Whether the GPU's attention kernels can run decoder `c`: an error naming the layer and its head size
/// where one is wider than they hold (Gemma 4's full layers: 512).
pub fn check_gpu_heads(c: &crate::config::ModelConfig) -> crate::error::Result<()> {
    match c
        .layers
        .iter()
        .enumerate()
        .find(|(_, l)| l.head_dim > GPU_MAX_HEAD_DIM)
    {
        Some((l, layer)) => Err(crate::error::Error::Invalid(format!(
            "layer {l} has heads of {} channels; the GPU attention kernels hold at most {GPU_MAX_HEAD_DIM}: run this model with --device cpu",
            layer.head_dim
        ))),
        None => Ok(()),
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
    /// The keys (forward, dq) or queries (dk/dv) this dispatch walks: a pass of a walk split to bound
    /// each invocation's loop iterations (see shaders/attention.wgsl).
    pub pass_begin: u32,
    pub pass_end: u32,
    /// Bit 0: the first pass; bit 1: the last.
    pub pass_flags: u32,
    /// Decoding (forward only): the queries are the last `tokens - query_offset` positions, query row t
    /// at position query_offset + t; `tokens` counts the keys. 0 otherwise.
    pub query_offset: u32,
    /// 1: causal; 0: every query sees every key.
    pub causal: u32,
    /// 1 (forward only): query t sees no key at or past key_end[t].
    pub padded: u32,
    /// 1 (forward only): each row's softmax has its head's sink.
    pub sinks: u32,
}

fn gpu_params(shape: &AttentionShape) -> AttentionParams {
    AttentionParams {
        tokens: shape.tokens as u32,
        heads: shape.heads as u32,
        kv_heads: shape.kv_heads as u32,
        head_dim: shape.head_dim as u32,
        scale: shape.scale(),
        pass_begin: 0,
        pass_end: shape.tokens as u32,
        pass_flags: 3,
        query_offset: 0,
        causal: shape.causal.into(),
        padded: 0,
        sinks: 0,
    }
}

/// An attention kernel's walk over all tokens (keys or queries) as passes whose loop iterations per
/// invocation stay within the device's budget: each row walked costs a thread `loops_per_row` loops
/// over the head dimension. One pass where the device has no budget.
fn passes(r: &Recorder, shape: &AttentionShape, loops_per_row: usize) -> Vec<AttentionParams> {
    let base = gpu_params(shape);
    let t = shape.tokens.max(1);
    // A few more iterations per row for the walk's own loops (tile rows, staging).
    let per_pass = r.gpu.loop_budget.map_or(t, |budget| {
        (budget / (loops_per_row * shape.head_dim + 8)).max(1)
    });
    let count = t.div_ceil(per_pass);
    (0..count)
        .map(|i| AttentionParams {
            pass_begin: (i * per_pass) as u32,
            pass_end: ((i + 1) * per_pass).min(t) as u32,
            pass_flags: (i == 0) as u32 | ((i + 1 == count) as u32) << 1,
            ..base
        })
        .collect()
}

/// The first-key table: the step's (packed examples), or zeros for a sequence of one example.
fn first_key_table(r: &mut Recorder, given: Option<&GpuBuffer>, queries: usize) -> GpuBuffer {
    match given {
        Some(b) => b.share(),
        None => r.scratch(queries),
    }
}

/// The GPU lowering of `forward` (shaders/attention.wgsl): `stats` is [2, heads, tokens], each row's
/// log-sum-exp and the forward's running denominator (which the backward replaces by delta).
/// With `key_end`, query t sees no key at or past key_end[t]; with `sinks`, each row's softmax has
/// its head's.
pub(crate) fn record_forward(
    r: &mut Recorder,
    shape: &AttentionShape,
    [q, k, v]: [&GpuBuffer; 3],
    (first_key, key_end, sinks): (Option<&GpuBuffer>, Option<&GpuBuffer>, Option<&GpuBuffer>),
    out: &GpuBuffer,
    stats: &GpuBuffer,
) {
    let first_key = first_key_table(r, first_key, shape.tokens);
    let groups = [shape.tokens.div_ceil(64) as u32, shape.heads as u32, 1];
    let dummy = r.dummy;
    // Per key: the score's dot product and the running sum's update.
    for p in passes(r, shape, 2) {
        let p = AttentionParams {
            padded: key_end.is_some().into(),
            sinks: sinks.is_some().into(),
            ..p
        };
        let b = [
            (1, q),
            (2, k),
            (3, v),
            (4, out),
            (5, stats),
            (7, sinks.unwrap_or(dummy)),
            (10, &first_key),
            (11, key_end.unwrap_or(dummy)),
        ];
        let entry = kernel(shape, "attention_forward", "attention_forward_wide");
        r.dispatch(entry, &p, &b, groups);
    }
}

/// The GPU lowering of `forward_cached`: the new tokens' keys and values are copied into the caches at
/// position `past`, and their queries attend over all `past + tokens` cached positions.
#[allow(clippy::too_many_arguments)]
pub(crate) fn record_forward_cached(
    r: &mut Recorder,
    shape: &AttentionShape,
    past: usize,
    [q, k, v]: [&GpuBuffer; 3],
    (first_key, sinks): (Option<&GpuBuffer>, Option<&GpuBuffer>),
    out: &GpuBuffer,
    [keys, values]: [&GpuBuffer; 2],
) {
    let kv = shape.kv_heads * shape.head_dim;
    let (offset, bytes) = ((past * kv * 4) as u64, (shape.tokens * kv * 4) as u64);
    r.enc
        .copy_buffer_to_buffer(&k.buffer, 0, &keys.buffer, offset, bytes);
    r.enc
        .copy_buffer_to_buffer(&v.buffer, 0, &values.buffer, offset, bytes);
    let all = AttentionShape {
        tokens: past + shape.tokens,
        ..*shape
    };
    let first_key = first_key_table(r, first_key, shape.tokens);
    let stats = r.scratch(2 * shape.heads * all.tokens);
    let groups = [shape.tokens.div_ceil(64) as u32, shape.heads as u32, 1];
    for p in passes(r, &all, 2) {
        let p = AttentionParams {
            query_offset: past as u32,
            sinks: sinks.is_some().into(),
            ..p
        };
        let b = [
            (1, q),
            (2, keys),
            (3, values),
            (4, out),
            (5, &stats),
            (7, sinks.unwrap_or(r.dummy)),
            (10, &first_key),
            (11, r.dummy),
        ];
        let entry = kernel(shape, "attention_forward", "attention_forward_wide");
        r.dispatch(entry, &p, &b, groups);
    }
}

/// The GPU lowering of `backward`. `ins`: q, k, v, out, stats (as the forward left them), d_out.
pub(crate) fn record_backward(
    r: &mut Recorder,
    shape: &AttentionShape,
    ins: [&GpuBuffer; 6],
    first_key: Option<&GpuBuffer>,
    [dq, dk, dv]: [&GpuBuffer; 3],
) {
    let [q, k, v, attn, stats, d_attn] = ins;
    let first_key = first_key_table(r, first_key, shape.tokens);
    let p = gpu_params(shape);
    let heads_groups = [shape.tokens.div_ceil(64) as u32, shape.heads as u32, 1];
    let b = [(4, attn), (5, stats), (6, d_attn)];
    r.dispatch("attention_delta", &p, &b, heads_groups);
    // Each query head's share of dk and dv, summed over each kv head's group at the end.
    let (dk_shares, dv_shares) = (r.scratch(q.len), r.scratch(q.len));
    let common = [
        (1, q),
        (2, k),
        (3, v),
        (5, stats),
        (6, d_attn),
        (10, &first_key),
    ];
    let mut b = common.to_vec();
    b.push((8, dq));
    // Per key: the score, d_out·v and the update of dq.
    let entry = kernel(shape, "attention_backward_dq", "attention_backward_dq_wide");
    for pass in passes(r, shape, 3) {
        r.dispatch(entry, &pass, &b, heads_groups);
    }
    let mut b = common.to_vec();
    b.extend([(8, &dk_shares), (9, &dv_shares)]);
    // Per query: the score, d_out·v with the update of dv, and the update of dk.
    let entry = kernel(
        shape,
        "attention_backward_dkdv",
        "attention_backward_dkdv_wide",
    );
    for pass in passes(r, shape, 3) {
        r.dispatch(entry, &pass, &b, heads_groups);
    }
    let b = [(8, &dk_shares), (9, &dv_shares), (12, dk), (13, dv)];
    let groups = [
        shape.head_dim.div_ceil(64) as u32,
        shape.kv_heads as u32,
        shape.tokens as u32,
    ];
    r.dispatch("attention_reduce_kv", &p, &b, groups);
}

#[cfg(test)]
mod tests {
    /// Heads up to the wide build's width pass; a wider one is refused naming the layer and the width.
    #[test]
    fn the_gpu_refuses_heads_wider_than_its_widest_build() {
        let config = |head_dim: usize| {
            let json = format!(
                r#"{{"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                "head_dim": {head_dim}, "vocab_size": 256}}"#
            );
            crate::config::ModelConfig::from_json_str(&json, std::path::Path::new("config.json"))
                .unwrap()
        };
        assert!(super::check_gpu_heads(&config(512)).is_ok());
        let e = super::check_gpu_heads(&config(640))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("layer 0 has heads of 640 channels") && e.contains("at most 512"),
            "{e}"
        );
    }
}
