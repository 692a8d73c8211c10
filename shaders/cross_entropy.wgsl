// Cross-entropy through the output projection, one vocabulary chunk at a time: logits of the chunk, an
// online log-sum-exp per position, then (backward) softmax − onehot and its product with the chunk's rows.

struct CrossEntropyParams {
    positions: u32,
    dim: u32,
    fmt: u32,
    // First vocabulary row of the chunk, within the bound block of the table, and the block's first row.
    chunk_start: u32,
    chunk_len: u32,
    block_start: u32,
    grad_scale: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: CrossEntropyParams;
@group(0) @binding(1) var<storage, read> table: array<u32>;
@group(0) @binding(2) var<storage, read> hidden: array<f32>;
@group(0) @binding(3) var<storage, read_write> logits: array<f32>;
// Per position: running max, running sum, label logit.
@group(0) @binding(4) var<storage, read_write> state: array<f32>;
@group(0) @binding(5) var<storage, read> labels: array<u32>;
@group(0) @binding(6) var<storage, read_write> d_hidden: array<f32>;
// Per position: loss, log-sum-exp.
@group(0) @binding(7) var<storage, read_write> result: array<f32>;

fn table_at(row: u32, c: u32) -> f32 {
    let index = row * p.dim + c;
    return dense_word_value(table[dense_word_index(p.fmt, index)], p.fmt, index);
}

// logits[pos, v] for v in the chunk; one thread per (v, pos).
@compute @workgroup_size(64)
fn ce_logits(@builtin(global_invocation_id) id: vec3<u32>) {
    let v = id.x;
    let pos = id.y;
    if (v >= p.chunk_len || pos >= p.positions) {
        return;
    }
    let row = p.chunk_start + v;
    var acc = 0.0;
    for (var c = 0u; c < p.dim; c++) {
        acc += hidden[pos * p.dim + c] * table_at(row, c);
    }
    logits[pos * p.chunk_len + v] = acc;
}

const WG: u32 = 64u;
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

// Folds the chunk's logits into each position's running log-sum-exp; one workgroup per position.
@compute @workgroup_size(64)
fn ce_reduce(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let pos = wg.x;
    if (pos >= p.positions) {
        return;
    }
    let base = pos * p.chunk_len;
    var m = -3.0e38;
    for (var v = lid.x; v < p.chunk_len; v += WG) {
        m = max(m, logits[base + v]);
    }
    let chunk_max = reduce(lid.x, m, true);
    let old_max = state[pos * 3u];
    let new_max = max(old_max, chunk_max);
    var s = 0.0;
    for (var v = lid.x; v < p.chunk_len; v += WG) {
        s += exp(logits[base + v] - new_max);
    }
    let chunk_sum = reduce(lid.x, s, false);
    if (lid.x == 0u) {
        state[pos * 3u + 1u] = state[pos * 3u + 1u] * exp(old_max - new_max) + chunk_sum;
        state[pos * 3u] = new_max;
        let label = labels[pos];
        let first = p.block_start + p.chunk_start;
        if (label >= first && label < first + p.chunk_len) {
            state[pos * 3u + 2u] = logits[base + label - first];
        }
    }
}

// result = (loss, lse) per position.
@compute @workgroup_size(64)
fn ce_finalize(@builtin(global_invocation_id) id: vec3<u32>) {
    let pos = id.x;
    if (pos >= p.positions) {
        return;
    }
    let lse = state[pos * 3u] + log(state[pos * 3u + 1u]);
    result[pos * 2u] = lse - state[pos * 3u + 2u];
    result[pos * 2u + 1u] = lse;
}

// In place: logits → (softmax − onehot(label)) · grad_scale.
@compute @workgroup_size(64)
fn ce_grad_logits(@builtin(global_invocation_id) id: vec3<u32>) {
    let v = id.x;
    let pos = id.y;
    if (v >= p.chunk_len || pos >= p.positions) {
        return;
    }
    let i = pos * p.chunk_len + v;
    var g = exp(logits[i] - result[pos * 2u + 1u]) * p.grad_scale;
    if (labels[pos] == p.block_start + p.chunk_start + v) {
        g -= p.grad_scale;
    }
    logits[i] = g;
}

// d_hidden[pos, c] += Σ_v dlogits[pos, v] · table[v, c]; one thread per (c, pos).
@compute @workgroup_size(64)
fn ce_grad_hidden(@builtin(global_invocation_id) id: vec3<u32>) {
    let c = id.x;
    let pos = id.y;
    if (c >= p.dim || pos >= p.positions) {
        return;
    }
    var acc = 0.0;
    for (var v = 0u; v < p.chunk_len; v++) {
        acc += logits[pos * p.chunk_len + v] * table_at(p.chunk_start + v, c);
    }
    d_hidden[pos * p.dim + c] += acc;
}
