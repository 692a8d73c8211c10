// Causal grouped-query attention. Query head h reads kv head h / (heads / kv_heads). No scores matrix is
// stored: the forward keeps each row's log-sum-exp, the backward recomputes probabilities from it.
//
// A workgroup takes 64 consecutive query rows of one head (dkdv: 64 keys of one kv head), one thread per
// row, and walks the other side in tiles staged in workgroup memory: each key (query) row is read from
// global memory once per 64 rows instead of once per row. A tile holds TILE_FLOATS values per operand:
// TILE_FLOATS / head_dim rows (at most 64), so that two operands stay within WebGPU's default 16 KiB.
// Every row's sums run in the same order as the CPU kernels' (keys ascending, head dimensions ascending).

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
const ROWS: u32 = 64u;
const TILE_FLOATS: u32 = 1024u;

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
// Per query token, the first key it may attend to: 0, or the start of its example in a packed sequence
// (non-decreasing along the sequence).
@group(0) @binding(10) var<storage, read> first_key: array<u32>;

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

// The keys the workgroup's queries t0..t0 + 64 see, as [first, end).
fn key_range(li: u32, t0: u32) -> vec2<u32> {
    let last = min(t0 + ROWS, p.tokens) - 1u;
    return vec2<u32>(broadcast(li, first_key[min(t0, last)]), last + 1u);
}

// One thread per (query t, head h), online softmax over keys first_key[t]..=t.
@compute @workgroup_size(64)
fn attention_forward(
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
    var acc: array<f32, MAX_HEAD_DIM>;
    var first = 0u;
    if (live) {
        first = first_key[t];
        load_query(t, h, &qv);
    }
    var m = -3.0e38;
    var l = 0.0;
    let keys = key_range(li, t0);
    let rows = tile_rows();
    for (var j0 = keys.x; j0 < keys.y; j0 += rows) {
        stage_keys(li, j0, rows, kvh);
        workgroupBarrier();
        for (var jj = 0u; jj < rows; jj++) {
            let j = j0 + jj;
            if (!live || j < first || j > t) {
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
    for (var x = 0u; x < d; x++) {
        o[q_index(t, h, x)] = acc[x] / l;
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
    var s = 0.0;
    for (var x = 0u; x < p.head_dim; x++) {
        s += d_out[q_index(t, h, x)] * o[q_index(t, h, x)];
    }
    delta[h * p.tokens + t] = s;
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
        row_lse_t = lse[h * p.tokens + t];
        delta_t = delta[h * p.tokens + t];
        load_query(t, h, &qv);
        for (var x = 0u; x < d; x++) {
            dov[x] = d_out[q_index(t, h, x)];
        }
    }
    let keys = key_range(li, t0);
    let rows = tile_rows();
    for (var j0 = keys.x; j0 < keys.y; j0 += rows) {
        stage_keys(li, j0, rows, kvh);
        workgroupBarrier();
        for (var jj = 0u; jj < rows; jj++) {
            let j = j0 + jj;
            if (!live || j < first || j > t) {
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

// dk (into `grad`) and dv (into `grad2`): one thread per (key j, kv head), the queries of each head of
// its group staged in tiles (tile_a: q, tile_b: d_out).
@compute @workgroup_size(64)
fn attention_backward_dkdv(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let j0 = wg.x * ROWS;
    let kvh = wg.y;
    let j = j0 + li;
    let live = j < p.tokens;
    let d = p.head_dim;
    let group = p.heads / p.kv_heads;
    var kv: array<f32, MAX_HEAD_DIM>;
    var vv: array<f32, MAX_HEAD_DIM>;
    var dk: array<f32, MAX_HEAD_DIM>;
    var dv: array<f32, MAX_HEAD_DIM>;
    if (live) {
        for (var x = 0u; x < d; x++) {
            kv[x] = k[kv_index(j, kvh, x)];
            vv[x] = v[kv_index(j, kvh, x)];
        }
    }
    // The queries that see a key of this block: from its first key to the end of its last key's
    // example.
    let last_key = min(j0 + ROWS, p.tokens) - 1u;
    var end = last_key + 1u;
    if (li == 0u) {
        while (end < p.tokens && first_key[end] <= last_key) {
            end++;
        }
    }
    let query_end = broadcast(li, end);
    let rows = tile_rows();
    for (var g = 0u; g < group; g++) {
        let h = kvh * group + g;
        for (var t0 = j0; t0 < query_end; t0 += rows) {
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
                row_lse[li] = lse[h * p.tokens + t0 + li];
                row_delta[li] = delta[h * p.tokens + t0 + li];
            }
            workgroupBarrier();
            for (var tt = 0u; tt < rows; tt++) {
                let t = t0 + tt;
                if (!live || t < j || t >= p.tokens || first_key[t] > j) {
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
    }
    if (!live) {
        return;
    }
    for (var x = 0u; x < d; x++) {
        grad[kv_index(j, kvh, x)] = dk[x];
        grad2[kv_index(j, kvh, x)] = dv[x];
    }
}
