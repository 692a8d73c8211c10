// Grouped-query attention, causal (decoders) or over every key (`causal` 0: FLUX's joint attention). Query head h reads kv head h / (heads / kv_heads). No scores matrix is
// stored: the forward keeps each row's log-sum-exp, the backward recomputes probabilities from it.
//
// A workgroup takes 64 consecutive query rows of one head (dkdv: 64 keys, for one query head), one thread per
// row, and walks the other side in tiles staged in workgroup memory: each key (query) row is read from
// global memory once per 64 rows instead of once per row. A tile holds TILE_FLOATS values per operand:
// TILE_FLOATS / head_dim rows (at most 64), so that two operands stay within WebGPU's default 16 KiB.
// Every row's sums run in the same order as the CPU kernels' (keys ascending, head dimensions ascending).
//
// The walk may be split into passes over ranges of keys (forward, dq) or queries (dkdv), each pass a
// dispatch that resumes the running sums the previous one stored: Mesa's llvmpipe ends any loop once an
// invocation has run 65,535 loop iterations in all, without an error, so on software devices the host
// bounds each pass's work (gpu::Gpu::loop_budget). Hardware runs one pass.

struct AttentionParams {
    tokens: u32,
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    scale: f32,
    // This pass walks keys (forward, dq) or queries (dkdv) pass_begin..pass_end.
    pass_begin: u32,
    pass_end: u32,
    // Bit 0: the first pass (the sums start from zero); bit 1: the last (the rows are finished).
    pass_flags: u32,
    // Decoding (forward only): the queries are the last tokens - query_offset positions, query row t at
    // position query_offset + t, against `tokens` keys. 0 otherwise.
    query_offset: u32,
    // 1: query t sees keys up to its own position; 0: every key.
    causal: u32,
    // 1 (forward only): query t sees no key at or past key_end[t] (padding at the end).
    padded: u32,
    // 1 (forward only): head h's rows have sinks[h] in their softmax's denominator.
    sinks: u32,
}

// Whether key j lies past what query t (at position t + query_offset) may see.
fn future(j: u32, t: u32) -> bool {
    return p.causal != 0u && j > t + p.query_offset;
}

fn lse_index(h: u32, t: u32) -> u32 {
    return h * p.tokens + t;
}

// Where row (h, t) keeps its running denominator (forward) or its delta (backward).
fn second_index(h: u32, t: u32) -> u32 {
    return (p.heads + h) * p.tokens + t;
}

fn first_pass() -> bool {
    return (p.pass_flags & 1u) != 0u;
}

fn last_pass() -> bool {
    return (p.pass_flags & 2u) != 0u;
}

const MAX_HEAD_DIM: u32 = 256u;
const ROWS: u32 = 64u;
const TILE_FLOATS: u32 = 1024u;

@group(0) @binding(0) var<uniform> p: AttentionParams;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read_write> o: array<f32>;
// Two numbers per row (h, t), in two halves of [heads, tokens]: its log-sum-exp (during the forward's
// passes, the running maximum) at h·tokens + t; the running softmax denominator during the forward's
// passes, then (backward) delta = d_out · o at heads·tokens + h·tokens + t. One buffer for both keeps
// every kernel within 8 storage bindings.
@group(0) @binding(5) var<storage, read_write> row_stats: array<f32>;
@group(0) @binding(6) var<storage, read> d_out: array<f32>;
// Per query head, a logit that joins each of its rows' softmax without a value (gpt-oss), where
// `sinks`.
@group(0) @binding(7) var<storage, read> sinks: array<f32>;
@group(0) @binding(8) var<storage, read_write> grad: array<f32>;
@group(0) @binding(9) var<storage, read_write> grad2: array<f32>;
// Per query token, the first key it may attend to: 0, or the start of its example in a packed sequence
// (non-decreasing along the sequence).
@group(0) @binding(10) var<storage, read> first_key: array<u32>;
// Per query token, the end of the keys it may attend to, where `padded`.
@group(0) @binding(11) var<storage, read> key_end: array<u32>;
@group(0) @binding(12) var<storage, read_write> k_grad: array<f32>;
@group(0) @binding(13) var<storage, read_write> v_grad: array<f32>;

var<workgroup> tile_a: array<f32, TILE_FLOATS>;
var<workgroup> tile_b: array<f32, TILE_FLOATS>;
// Per staged query row (dkdv): its log-sum-exp and delta.
var<workgroup> row_lse: array<f32, ROWS>;
var<workgroup> row_delta: array<f32, ROWS>;
var<workgroup> shared_word: u32;

fn q_index(t: u32, h: u32, x: u32) -> u32 {
    return (t * p.heads + h) * p.head_dim + x;
}

fn kv_index(t: u32, kvh: u32, x: u32) -> u32 {
    return (t * p.kv_heads + kvh) * p.head_dim + x;
}

// Rows per staged tile.
fn tile_rows() -> u32 {
    return min(TILE_FLOATS / p.head_dim, ROWS);
}

// Thread 0's `value`, as a value every thread of the workgroup knows to be the same (loop bounds around
// barriers must be).
fn broadcast(li: u32, value: u32) -> u32 {
    if (li == 0u) {
        shared_word = value;
    }
    let out = workgroupUniformLoad(&shared_word);
    workgroupBarrier();
    return out;
}

// tile_a = K rows j0.., tile_b = V rows j0.. of kv head kvh (zero past the last token).
fn stage_keys(li: u32, j0: u32, rows: u32, kvh: u32) {
    for (var e = li; e < rows * p.head_dim; e += ROWS) {
        let j = j0 + e / p.head_dim;
        let x = e % p.head_dim;
        var kv = vec2<f32>(0.0, 0.0);
        if (j < p.tokens) {
            kv = vec2<f32>(k[kv_index(j, kvh, x)], v[kv_index(j, kvh, x)]);
        }
        tile_a[e] = kv.x;
        tile_b[e] = kv.y;
    }
}

// Query row t of head h, into `row`.
fn load_query(t: u32, h: u32, row: ptr<function, array<f32, MAX_HEAD_DIM>>) {
    for (var x = 0u; x < p.head_dim; x++) {
        (*row)[x] = q[q_index(t, h, x)];
    }
}

// Σ_x row[x]·tile_a[r, x]: staged row r against one of the thread's own rows.
fn dot_staged(row: ptr<function, array<f32, MAX_HEAD_DIM>>, r: u32) -> f32 {
    var s = 0.0;
    for (var x = 0u; x < p.head_dim; x++) {
        s += (*row)[x] * tile_a[r * p.head_dim + x];
    }
    return s;
}

// acc[x] += factor·tile_a[r, x].
fn add_staged(acc: ptr<function, array<f32, MAX_HEAD_DIM>>, r: u32, factor: f32) {
    for (var x = 0u; x < p.head_dim; x++) {
        (*acc)[x] += factor * tile_a[r * p.head_dim + x];
    }
}

// The keys of this pass that the workgroup's queries t0..t0 + 64 see, as [first, end) (empty when
// first >= end).
fn key_range(li: u32, t0: u32) -> vec2<u32> {
    let last = min(t0 + ROWS, p.tokens - p.query_offset) - 1u;
    let first = broadcast(li, first_key[min(t0, last)]);
    var end = p.pass_end;
    if (p.causal != 0u) {
        end = min(last + p.query_offset + 1u, p.pass_end);
    }
    return vec2<u32>(max(first, p.pass_begin), end);
}

// One thread per (query t, head h), online softmax over keys first_key[t]..=query_offset + t.
@compute @workgroup_size(64)
fn attention_forward(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let t0 = wg.x * ROWS;
    let h = wg.y;
    let t = t0 + li;
    let live = t < p.tokens - p.query_offset;
    let kvh = h / (p.heads / p.kv_heads);
    let d = p.head_dim;
    var qv: array<f32, MAX_HEAD_DIM>;
    var acc: array<f32, MAX_HEAD_DIM>;
    var first = 0u;
    var end = 0xffffffffu;
    var m = -3.0e38;
    var l = 0.0;
    if (live) {
        first = first_key[t];
        if (p.padded != 0u) {
            end = key_end[t];
        }
        load_query(t, h, &qv);
        if (!first_pass()) {
            m = row_stats[lse_index(h, t)];
            l = row_stats[second_index(h, t)];
            for (var x = 0u; x < d; x++) {
                acc[x] = o[q_index(t, h, x)];
            }
        }
    }
    let keys = key_range(li, t0);
    let rows = tile_rows();
    for (var j0 = keys.x; j0 < keys.y; j0 += rows) {
        stage_keys(li, j0, rows, kvh);
        workgroupBarrier();
        for (var jj = 0u; jj < rows; jj++) {
            let j = j0 + jj;
            if (!live || j < first || future(j, t) || j >= keys.y || j >= end) {
                continue;
            }
            let s = dot_staged(&qv, jj) * p.scale;
            let new_m = max(m, s);
            let correction = exp(m - new_m);
            let weight = exp(s - new_m);
            l = l * correction + weight;
            for (var x = 0u; x < d; x++) {
                acc[x] = acc[x] * correction + weight * tile_b[jj * d + x];
            }
            m = new_m;
        }
        workgroupBarrier();
    }
    if (!live) {
        return;
    }
    if (last_pass()) {
        // The sink as one more key whose value is zero (a row that saw no key keeps only it).
        var rescale = 1.0;
        if (p.sinks != 0u) {
            let sink = sinks[h];
            let new_m = max(m, sink);
            rescale = exp(m - new_m);
            l = l * rescale + exp(sink - new_m);
            m = new_m;
        }
        for (var x = 0u; x < d; x++) {
            o[q_index(t, h, x)] = acc[x] * rescale / l;
        }
        row_stats[lse_index(h, t)] = m + log(l);
    } else {
        for (var x = 0u; x < d; x++) {
            o[q_index(t, h, x)] = acc[x];
        }
        row_stats[lse_index(h, t)] = m;
        row_stats[second_index(h, t)] = l;
    }
}

// delta[h, t] = d_out · o for that row.
@compute @workgroup_size(64)
fn attention_delta(@builtin(global_invocation_id) id: vec3<u32>) {
    let t = id.x;
    let h = id.y;
    if (t >= p.tokens || h >= p.heads) {
        return;
    }
    var s = 0.0;
    for (var x = 0u; x < p.head_dim; x++) {
        s += d_out[q_index(t, h, x)] * o[q_index(t, h, x)];
    }
    row_stats[second_index(h, t)] = s;
}

// dq (into `grad`): one thread per (query t, head h), keys staged as in the forward.
@compute @workgroup_size(64)
fn attention_backward_dq(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let t0 = wg.x * ROWS;
    let h = wg.y;
    let t = t0 + li;
    let live = t < p.tokens;
    let kvh = h / (p.heads / p.kv_heads);
    let d = p.head_dim;
    var qv: array<f32, MAX_HEAD_DIM>;
    var dov: array<f32, MAX_HEAD_DIM>;
    var acc: array<f32, MAX_HEAD_DIM>;
    var first = 0u;
    var row_lse_t = 0.0;
    var delta_t = 0.0;
    if (live) {
        first = first_key[t];
        row_lse_t = row_stats[lse_index(h, t)];
        delta_t = row_stats[second_index(h, t)];
        load_query(t, h, &qv);
        for (var x = 0u; x < d; x++) {
            dov[x] = d_out[q_index(t, h, x)];
        }
        if (!first_pass()) {
            for (var x = 0u; x < d; x++) {
                acc[x] = grad[q_index(t, h, x)];
            }
        }
    }
    let keys = key_range(li, t0);
    let rows = tile_rows();
    for (var j0 = keys.x; j0 < keys.y; j0 += rows) {
        stage_keys(li, j0, rows, kvh);
        workgroupBarrier();
        for (var jj = 0u; jj < rows; jj++) {
            let j = j0 + jj;
            if (!live || j < first || future(j, t) || j >= keys.y) {
                continue;
            }
            let prob = exp(dot_staged(&qv, jj) * p.scale - row_lse_t);
            var dp = 0.0;
            for (var x = 0u; x < d; x++) {
                dp += dov[x] * tile_b[jj * d + x];
            }
            add_staged(&acc, jj, prob * (dp - delta_t) * p.scale);
        }
        workgroupBarrier();
    }
    if (!live) {
        return;
    }
    for (var x = 0u; x < d; x++) {
        grad[q_index(t, h, x)] = acc[x];
    }
}

// Query head h's share of dk and dv (into `grad` and `grad2`, laid out like q: [tokens, heads, head_dim]):
// one thread per (key j, head h), the head's queries staged in tiles (tile_a: q, tile_b: d_out).
// attention_reduce_kv sums the shares of each kv head's group.
@compute @workgroup_size(64)
fn attention_backward_dkdv(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let j0 = wg.x * ROWS;
    let h = wg.y;
    let kvh = h / (p.heads / p.kv_heads);
    let j = j0 + li;
    let live = j < p.tokens;
    let d = p.head_dim;
    var kv: array<f32, MAX_HEAD_DIM>;
    var vv: array<f32, MAX_HEAD_DIM>;
    var dk: array<f32, MAX_HEAD_DIM>;
    var dv: array<f32, MAX_HEAD_DIM>;
    if (live) {
        for (var x = 0u; x < d; x++) {
            kv[x] = k[kv_index(j, kvh, x)];
            vv[x] = v[kv_index(j, kvh, x)];
        }
        if (!first_pass()) {
            for (var x = 0u; x < d; x++) {
                dk[x] = grad[q_index(j, h, x)];
                dv[x] = grad2[q_index(j, h, x)];
            }
        }
    }
    // The queries that see a key of this block: from its first key to the end of its last key's
    // example, the first query past it whose example starts later (first_key is non-decreasing, so
    // bisection finds it); this pass takes those within pass_begin..pass_end.
    let last_key = min(j0 + ROWS, p.tokens) - 1u;
    var end = last_key + 1u;
    if (li == 0u) {
        var past = p.tokens;
        while (end < past) {
            let middle = (end + past) / 2u;
            if (first_key[middle] <= last_key) {
                end = middle + 1u;
            } else {
                past = middle;
            }
        }
    }
    let query_end = min(broadcast(li, end), p.pass_end);
    let rows = tile_rows();
    var queries_from = p.pass_begin;
    if (p.causal != 0u) {
        queries_from = max(j0, p.pass_begin);
    }
    for (var t0 = queries_from; t0 < query_end; t0 += rows) {
        for (var e = li; e < rows * d; e += ROWS) {
            let t = t0 + e / d;
            var qd = vec2<f32>(0.0, 0.0);
            if (t < p.tokens) {
                qd = vec2<f32>(q[q_index(t, h, e % d)], d_out[q_index(t, h, e % d)]);
            }
            tile_a[e] = qd.x;
            tile_b[e] = qd.y;
        }
        if (li < rows && t0 + li < p.tokens) {
            row_lse[li] = row_stats[lse_index(h, t0 + li)];
            row_delta[li] = row_stats[second_index(h, t0 + li)];
        }
        workgroupBarrier();
        for (var tt = 0u; tt < rows; tt++) {
            let t = t0 + tt;
            if (!live || future(j, t) || t >= query_end || first_key[t] > j) {
                continue;
            }
            let prob = exp(dot_staged(&kv, tt) * p.scale - row_lse[tt]);
            var dp = 0.0;
            for (var x = 0u; x < d; x++) {
                let dox = tile_b[tt * d + x];
                dp += dox * vv[x];
                dv[x] += prob * dox;
            }
            add_staged(&dk, tt, prob * (dp - row_delta[tt]) * p.scale);
        }
        workgroupBarrier();
    }
    if (!live) {
        return;
    }
    for (var x = 0u; x < d; x++) {
        grad[q_index(j, h, x)] = dk[x];
        grad2[q_index(j, h, x)] = dv[x];
    }
}

// dk (into `k_grad`) and dv (into `v_grad`): the sums of the group's shares, heads ascending. One thread
// per element.
@compute @workgroup_size(64)
fn attention_reduce_kv(@builtin(global_invocation_id) id: vec3<u32>) {
    let x = id.x;
    let kvh = id.y;
    let j = id.z;
    if (x >= p.head_dim || kvh >= p.kv_heads || j >= p.tokens) {
        return;
    }
    let group = p.heads / p.kv_heads;
    var sk = 0.0;
    var sv = 0.0;
    for (var g = 0u; g < group; g++) {
        sk += grad[q_index(j, kvh * group + g, x)];
        sv += grad2[q_index(j, kvh * group + g, x)];
    }
    k_grad[kv_index(j, kvh, x)] = sk;
    v_grad[kv_index(j, kvh, x)] = sv;
}
