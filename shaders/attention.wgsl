// Causal grouped-query attention. Query head h reads kv head h / (heads / kv_heads). No scores matrix is
// stored: the forward keeps each row's log-sum-exp, the backward recomputes probabilities from it.

struct AttentionParams {
    tokens: u32,
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    scale: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

const MAX_HEAD_DIM: u32 = 256u;

@group(0) @binding(0) var<uniform> p: AttentionParams;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read_write> o: array<f32>;
@group(0) @binding(5) var<storage, read_write> lse: array<f32>;
@group(0) @binding(6) var<storage, read> d_out: array<f32>;
@group(0) @binding(7) var<storage, read_write> delta: array<f32>;
@group(0) @binding(8) var<storage, read_write> grad: array<f32>;
@group(0) @binding(9) var<storage, read_write> grad2: array<f32>;
// Per query token, the first key it may attend to: 0, or the start of its example in a packed sequence.
@group(0) @binding(10) var<storage, read> first_key: array<u32>;

fn q_at(t: u32, h: u32, x: u32) -> f32 {
    return q[(t * p.heads + h) * p.head_dim + x];
}

fn kv_index(t: u32, kvh: u32, x: u32) -> u32 {
    return (t * p.kv_heads + kvh) * p.head_dim + x;
}

fn score(t: u32, h: u32, j: u32) -> f32 {
    let kvh = h / (p.heads / p.kv_heads);
    var s = 0.0;
    for (var x = 0u; x < p.head_dim; x++) {
        s += q_at(t, h, x) * k[kv_index(j, kvh, x)];
    }
    return s * p.scale;
}

// One thread per (query t, head h), online softmax over keys first_key[t]..=t.
@compute @workgroup_size(64)
fn attention_forward(@builtin(global_invocation_id) id: vec3<u32>) {
    let t = id.x;
    let h = id.y;
    if (t >= p.tokens || h >= p.heads) {
        return;
    }
    let kvh = h / (p.heads / p.kv_heads);
    var acc: array<f32, MAX_HEAD_DIM>;
    var m = -3.0e38;
    var l = 0.0;
    for (var j = first_key[t]; j <= t; j++) {
        let s = score(t, h, j);
        let new_m = max(m, s);
        let correction = exp(m - new_m);
        let weight = exp(s - new_m);
        l = l * correction + weight;
        for (var x = 0u; x < p.head_dim; x++) {
            acc[x] = acc[x] * correction + weight * v[kv_index(j, kvh, x)];
        }
        m = new_m;
    }
    let base = (t * p.heads + h) * p.head_dim;
    for (var x = 0u; x < p.head_dim; x++) {
        o[base + x] = acc[x] / l;
    }
    lse[h * p.tokens + t] = m + log(l);
}

// delta[h, t] = d_out · o for that row.
@compute @workgroup_size(64)
fn attention_delta(@builtin(global_invocation_id) id: vec3<u32>) {
    let t = id.x;
    let h = id.y;
    if (t >= p.tokens || h >= p.heads) {
        return;
    }
    let base = (t * p.heads + h) * p.head_dim;
    var s = 0.0;
    for (var x = 0u; x < p.head_dim; x++) {
        s += d_out[base + x] * o[base + x];
    }
    delta[h * p.tokens + t] = s;
}

// dq (into `grad`): one thread per (query t, head h).
@compute @workgroup_size(64)
fn attention_backward_dq(@builtin(global_invocation_id) id: vec3<u32>) {
    let t = id.x;
    let h = id.y;
    if (t >= p.tokens || h >= p.heads) {
        return;
    }
    let kvh = h / (p.heads / p.kv_heads);
    let base = (t * p.heads + h) * p.head_dim;
    let row = h * p.tokens + t;
    var acc: array<f32, MAX_HEAD_DIM>;
    for (var j = first_key[t]; j <= t; j++) {
        let prob = exp(score(t, h, j) - lse[row]);
        var dp = 0.0;
        for (var x = 0u; x < p.head_dim; x++) {
            dp += d_out[base + x] * v[kv_index(j, kvh, x)];
        }
        let ds = prob * (dp - delta[row]) * p.scale;
        for (var x = 0u; x < p.head_dim; x++) {
            acc[x] += ds * k[kv_index(j, kvh, x)];
        }
    }
    for (var x = 0u; x < p.head_dim; x++) {
        grad[base + x] = acc[x];
    }
}

// dk (into `grad`) and dv (into `grad2`): one thread per (key j, kv head).
@compute @workgroup_size(64)
fn attention_backward_dkdv(@builtin(global_invocation_id) id: vec3<u32>) {
    let j = id.x;
    let kvh = id.y;
    if (j >= p.tokens || kvh >= p.kv_heads) {
        return;
    }
    let group = p.heads / p.kv_heads;
    var dk: array<f32, MAX_HEAD_DIM>;
    var dv: array<f32, MAX_HEAD_DIM>;
    for (var g = 0u; g < group; g++) {
        let h = kvh * group + g;
        // The queries that see key j: from j to the end of j's example.
        for (var t = j; t < p.tokens && first_key[t] <= j; t++) {
            let row = h * p.tokens + t;
            let base = (t * p.heads + h) * p.head_dim;
            let prob = exp(score(t, h, j) - lse[row]);
            var dp = 0.0;
            for (var x = 0u; x < p.head_dim; x++) {
                dp += d_out[base + x] * v[kv_index(j, kvh, x)];
                dv[x] += prob * d_out[base + x];
            }
            let ds = prob * (dp - delta[row]) * p.scale;
            for (var x = 0u; x < p.head_dim; x++) {
                dk[x] += ds * q[base + x];
            }
        }
    }
    for (var x = 0u; x < p.head_dim; x++) {
        grad[kv_index(j, kvh, x)] = dk[x];
        grad2[kv_index(j, kvh, x)] = dv[x];
    }
}
