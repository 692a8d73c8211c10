// Cross-entropy through the output projection, one vocabulary chunk at a time: an online log-sum-exp per
// position over the chunk's logits. With the gradient, the same single walk over the vocabulary also
// accumulates d_hidden = Σ exp(logit − running max) · W_v (rescaled whenever the max grows, as online
// softmax does), so each chunk's logits are computed once; ce_grad_finish then divides by the sum and
// subtracts the label's row. The logits and the product of their weights with the chunk's rows are the
// frozen-linear kernels of shaders/linear.wgsl.

struct CrossEntropyParams {
    positions: u32,
    // First vocabulary row of the chunk, within the bound block of the table, and the block's first row.
    chunk_start: u32,
    chunk_len: u32,
    block_start: u32,
    grad_scale: f32,
    // Logit soft cap (Gemma 2 and 4): z = softcap · tanh(logit / softcap); 0 for none.
    softcap: f32,
    // The hidden width (the table's columns), and the table's storage format (common.wgsl's FMT_*).
    dim: u32,
    fmt: u32,
    // 1: each position's gradient weighted by its label's probability (dynamic fine-tuning).
    dft: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: CrossEntropyParams;
// The bound block of the output projection's rows (ce_grad_finish reads the labels' rows).
@group(0) @binding(1) var<storage, read> table: array<u32>;
// The chunk's logits [positions, chunk_len], made by linear_forward (shaders/linear.wgsl).
@group(0) @binding(3) var<storage, read_write> logits: array<f32>;
// Per position (STATE values): running max, running sum, label logit, running Σ exp(z − max)·z (the
// entropy's), the largest logit before the label's index (whether the label is the first argmax).
@group(0) @binding(4) var<storage, read_write> state: array<f32>;
@group(0) @binding(5) var<storage, read> labels: array<u32>;
// Per position (RESULT values, ops::cross_entropy::TokenLoss): loss, log-sum-exp, entropy, 1 where the
// label is the first argmax (else 0).
// grad_scale times the loss's gradient with respect to the hidden states [positions, dim]; while the
// vocabulary is walked, the running Σ exp(logit − max) · W_v.
@group(0) @binding(6) var<storage, read_write> d_hidden: array<f32>;
@group(0) @binding(7) var<storage, read_write> result: array<f32>;

const WG: u32 = 64u;
const STATE: u32 = 5u;
const RESULT: u32 = 4u;

// The logit as the loss sees it. tanh's argument is clamped where tanh is ±1 in f32 anyway, as some
// drivers' tanh gives NaN for large arguments.
fn capped(logit: f32) -> f32 {
    if (p.softcap > 0.0) {
        return p.softcap * tanh(clamp(logit / p.softcap, -10.0, 10.0));
    }
    return logit;
}

// d capped / d logit, from the capped value z: 1 − (z / softcap)².
fn cap_slope(z: f32) -> f32 {
    if (p.softcap > 0.0) {
        let t = z / p.softcap;
        return 1.0 - t * t;
    }
    return 1.0;
}
var<workgroup> scratch: array<f32, 64>;

fn reduce(lid: u32, value: f32, is_max: bool) -> f32 {
    scratch[lid] = value;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if (lid < s) {
            if (is_max) {
                scratch[lid] = max(scratch[lid], scratch[lid + s]);
            } else {
                scratch[lid] += scratch[lid + s];
            }
        }
        workgroupBarrier();
    }
    let r = scratch[0];
    workgroupBarrier();
    return r;
}

// Folds the chunk's logits into position `pos`'s running max, sum and label logit (all of the
// workgroup calls it). With `keep_weights`, each logit is replaced by its weight exp(z − new max) times
// the cap's slope. Returns the old max and the factor by which sums against it must be rescaled.
fn absorb_chunk(pos: u32, lid: u32, keep_weights: bool) -> vec2<f32> {
    let base = pos * p.chunk_len;
    let label = labels[pos];
    let first = p.block_start + p.chunk_start;
    var m = -3.0e38;
    var before = -3.0e38;
    let s0 = pos * STATE;
    for (var v = lid; v < p.chunk_len; v += WG) {
        let z = capped(logits[base + v]);
        m = max(m, z);
        if (first + v < label) {
            before = max(before, z);
        }
        // The label's logit from the same evaluation as the maxima it is compared with.
        if (label == first + v) {
            state[s0 + 2u] = z;
        }
    }
    let chunk_max = reduce(lid, m, true);
    let chunk_before = reduce(lid, before, true);
    let old_max = state[s0];
    let new_max = max(old_max, chunk_max);
    var s = 0.0;
    var w = 0.0;
    for (var v = lid; v < p.chunk_len; v += WG) {
        let z = capped(logits[base + v]);
        let e = exp(z - new_max);
        s += e;
        w += e * z;
        if (keep_weights) {
            logits[base + v] = e * cap_slope(z);
        }
    }
    let chunk_sum = reduce(lid, s, false);
    let chunk_weighted = reduce(lid, w, false);
    let rescale = exp(old_max - new_max);
    // Every thread has read the old state before it is replaced.
    storageBarrier();
    if (lid == 0u) {
        state[s0 + 1u] = state[s0 + 1u] * rescale + chunk_sum;
        state[s0 + 3u] = state[s0 + 3u] * rescale + chunk_weighted;
        state[s0 + 4u] = max(state[s0 + 4u], chunk_before);
        state[s0] = new_max;
    }
    return vec2<f32>(old_max, rescale);
}

// The loss alone: folds the chunk's logits into each position's running log-sum-exp; one workgroup
// per position.
@compute @workgroup_size(64)
fn ce_reduce(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    if (wg.x >= p.positions) {
        return;
    }
    _ = absorb_chunk(wg.x, lid.x, false);
}

// With the gradient: as ce_reduce, the chunk's logits become their weights for the product
// d_hidden += weights · chunk rows that follows, and the position's d_hidden row (all earlier chunks'
// sum) is rescaled to the new max. The first chunk's product overwrites d_hidden, so it is not read.
@compute @workgroup_size(64)
fn ce_absorb(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let pos = wg.x;
    if (pos >= p.positions) {
        return;
    }
    let absorbed = absorb_chunk(pos, lid.x, true);
    let first_chunk = absorbed.x <= -3.0e38;
    let rescale = absorbed.y;
    if (!first_chunk && rescale != 1.0) {
        for (var c = lid.x; c < p.dim; c += WG) {
            d_hidden[pos * p.dim + c] *= rescale;
        }
    }
}

// result = (loss, lse, entropy, top1) per position.
@compute @workgroup_size(64)
fn ce_finalize(@builtin(global_invocation_id) id: vec3<u32>) {
    let pos = id.x;
    if (pos >= p.positions) {
        return;
    }
    let s0 = pos * STATE;
    let max_logit = state[s0];
    let sum = state[s0 + 1u];
    let label_logit = state[s0 + 2u];
    let lse = max_logit + log(sum);
    let r = pos * RESULT;
    result[r] = lse - label_logit;
    result[r + 1u] = lse;
    result[r + 2u] = lse - state[s0 + 3u] / sum;
    result[r + 3u] = select(0.0, 1.0, label_logit >= max_logit && label_logit > state[s0 + 4u]);
}

// After the walk, for the positions whose label lies in the bound block:
// d_hidden = grad_scale · weight · (d_hidden / sum − slope(label logit) · W[label]), the weight 1 or,
// with dft, the label's probability exp(label logit − max) / sum. Each position's label lies in one
// block, so each row is finished exactly once.
@compute @workgroup_size(64)
fn ce_grad_finish(@builtin(global_invocation_id) id: vec3<u32>) {
    let c = id.x;
    let pos = id.y;
    if (c >= p.dim || pos >= p.positions) {
        return;
    }
    let label = labels[pos];
    if (label < p.block_start || label >= p.block_start + p.chunk_len) {
        return;
    }
    let index = (label - p.block_start) * p.dim + c;
    let w = dense_word_value(table[dense_word_index(p.fmt, index)], p.fmt, index);
    let s0 = pos * STATE;
    let slope = cap_slope(state[s0 + 2u]);
    var scale = p.grad_scale;
    if (p.dft != 0u) {
        scale *= exp(state[s0 + 2u] - state[s0]) / state[s0 + 1u];
    }
    let i = pos * p.dim + c;
    d_hidden[i] = scale * (d_hidden[i] / state[s0 + 1u] - slope * w);
}
