// Cross-entropy through the output projection, one vocabulary chunk at a time: an online log-sum-exp per
// position over the chunk's logits, then (backward) softmax − onehot in place. The logits and the product
// of their gradient with the chunk's rows are the frozen-linear kernels of shaders/linear.wgsl.

struct CrossEntropyParams {
    positions: u32,
    // First vocabulary row of the chunk, within the bound block of the table, and the block's first row.
    chunk_start: u32,
    chunk_len: u32,
    block_start: u32,
    grad_scale: f32,
    // Logit soft cap (Gemma 2 and 4): z = softcap · tanh(logit / softcap); 0 for none.
    softcap: f32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: CrossEntropyParams;
// The chunk's logits [positions, chunk_len], made by linear_forward (shaders/linear.wgsl).
@group(0) @binding(3) var<storage, read_write> logits: array<f32>;
// Per position: running max, running sum, label logit.
@group(0) @binding(4) var<storage, read_write> state: array<f32>;
@group(0) @binding(5) var<storage, read> labels: array<u32>;
// Per position: loss, log-sum-exp.
@group(0) @binding(7) var<storage, read_write> result: array<f32>;

const WG: u32 = 64u;

// The logit as the loss sees it. tanh's argument is clamped where tanh is ±1 in f32 anyway, as some
// drivers' tanh gives NaN for large arguments.
fn capped(logit: f32) -> f32 {
    if (p.softcap > 0.0) {
        return p.softcap * tanh(clamp(logit / p.softcap, -10.0, 10.0));
    }
    return logit;
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
        m = max(m, capped(logits[base + v]));
    }
    let chunk_max = reduce(lid.x, m, true);
    let old_max = state[pos * 3u];
    let new_max = max(old_max, chunk_max);
    var s = 0.0;
    for (var v = lid.x; v < p.chunk_len; v += WG) {
        s += exp(capped(logits[base + v]) - new_max);
    }
    let chunk_sum = reduce(lid.x, s, false);
    if (lid.x == 0u) {
        state[pos * 3u + 1u] = state[pos * 3u + 1u] * exp(old_max - new_max) + chunk_sum;
        state[pos * 3u] = new_max;
        let label = labels[pos];
        let first = p.block_start + p.chunk_start;
        if (label >= first && label < first + p.chunk_len) {
            state[pos * 3u + 2u] = capped(logits[base + label - first]);
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

// In place: logits → (softmax − onehot(label)) · grad_scale, times the cap's slope where capped.
@compute @workgroup_size(64)
fn ce_grad_logits(@builtin(global_invocation_id) id: vec3<u32>) {
    let v = id.x;
    let pos = id.y;
    if (v >= p.chunk_len || pos >= p.positions) {
        return;
    }
    let i = pos * p.chunk_len + v;
    let z = capped(logits[i]);
    var g = exp(z - result[pos * 2u + 1u]) * p.grad_scale;
    if (labels[pos] == p.block_start + p.chunk_start + v) {
        g -= p.grad_scale;
    }
    if (p.softcap > 0.0) {
        let t = z / p.softcap;
        g *= 1.0 - t * t;
    }
    logits[i] = g;
}
