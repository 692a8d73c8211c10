// A mixture of experts' routing, and the parts of its experts that are not products with the frozen
// stacked weights (those are linear.wgsl's grouped products): src/ops/moe.rs, where each has its CPU
// twin. The experts run over "sorted" rows: every (token, choice) slot, grouped by the expert it chose
// and in token order within an expert, so that an expert's rows are one contiguous run.
//
// `sorted` (u32) holds, for S = tokens · top_k slots and E experts:
//   [0, E]                 each expert's first sorted row (the last entry is S);
//   [E + 1, E + 1 + S)     the slot of each sorted row;
//   [E + 1 + S, + S)       the sorted row of each slot;
//   [E + 1 + 2S, + S)      the expert of each sorted row.

struct MoeParams {
    tokens: u32,
    experts: u32,
    top_k: u32,
    // The row length of the operand the kernel reads by sorted row (src), or of A's rows.
    width: u32,
    // The row length of the output (or of the gradient read), and of the rows of B it touches.
    out: u32,
    rank: u32,
    // Where the rows of B the kernel touches start (an expert's up rows follow its gate rows).
    row_offset: u32,
    // 1: the sorted rows are read from the tokens' rows of src (the experts' input x).
    gather: u32,
    scale: f32,
    accumulate: u32,
    normalize: u32,
    // moe_combine: 1 where each choice counts by its routing weight.
    weighted: u32,
}

@group(0) @binding(0) var<uniform> p: MoeParams;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> sorted: array<u32>;
@group(0) @binding(3) var<storage, read_write> routes: array<u32>;
@group(0) @binding(4) var<storage, read_write> weights: array<f32>;
@group(0) @binding(5) var<storage, read> lhs: array<f32>;
@group(0) @binding(6) var<storage, read> rhs: array<f32>;
@group(0) @binding(7) var<storage, read_write> dst: array<f32>;
@group(0) @binding(8) var<storage, read_write> dst2: array<f32>;

fn slots() -> u32 {
    return p.tokens * p.top_k;
}

fn slot_of(row: u32) -> u32 {
    return sorted[p.experts + 1u + row];
}

fn row_of(slot: u32) -> u32 {
    return sorted[p.experts + 1u + slots() + slot];
}

fn expert_of(row: u32) -> u32 {
    return sorted[p.experts + 1u + 2u * slots() + row];
}

// dst [slots, out] += each sorted row's expert's bias, entries row_offset.. of its row of src
// [experts, width] (gpt-oss's experts).
@compute @workgroup_size(256)
fn moe_add_bias(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = flat_index(id);
    if (i >= slots() * p.out) {
        return;
    }
    let row = i / p.out;
    dst[i] += src[expert_of(row) * p.width + p.row_offset + i % p.out];
}

// Where sorted row `row` of the operand lies in src: its token's row when gathering from x.
fn input_row(row: u32) -> u32 {
    if (p.gather == 1u) {
        return slot_of(row) / p.top_k;
    }
    return row;
}

// Element (o, j) of expert e's B: PEFT's [out, rank · experts] with expert e's columns j · E + e.
fn b_index(o: u32, j: u32, e: u32) -> u32 {
    return (p.row_offset + o) * p.rank * p.experts + j * p.experts + e;
}

fn put(i: u32, value: f32) {
    if (p.accumulate == 1u) {
        dst[i] += value;
    } else {
        dst[i] = value;
    }
}

// Expert e's probability under the router: the softmax of a token's logits at `row`, its max and sum
// of exponentials given.
fn probability(row: u32, e: u32, largest: f32, total: f32) -> f32 {
    return exp(src[row + e] - largest) / total;
}

// A token's largest logit and its softmax's denominator.
fn softmax_stats(row: u32) -> vec2<f32> {
    var largest = src[row];
    for (var e = 1u; e < p.experts; e++) {
        largest = max(largest, src[row + e]);
    }
    var total = 0.0;
    for (var e = 0u; e < p.experts; e++) {
        total += exp(src[row + e] - largest);
    }
    return vec2<f32>(largest, total);
}

// Each token's top_k experts by probability (largest first; of equal ones the lower index first) and
// their weights, renormalised over the chosen when `normalize`. src: logits [tokens, experts]. One
// thread per token.
@compute @workgroup_size(256)
fn moe_route(@builtin(global_invocation_id) id: vec3<u32>) {
    let t = flat_index(id);
    if (t >= p.tokens) {
        return;
    }
    let row = t * p.experts;
    let stats = softmax_stats(row);
    var previous = 0.0;
    var previous_index = 0u;
    var chosen_total = 0.0;
    for (var j = 0u; j < p.top_k; j++) {
        var best = -1.0;
        var best_index = 0u;
        for (var e = 0u; e < p.experts; e++) {
            let pe = probability(row, e, stats.x, stats.y);
            let after = j == 0u || pe < previous || (pe == previous && e > previous_index);
            if (after && pe > best) {
                best = pe;
                best_index = e;
            }
        }
        routes[t * p.top_k + j] = best_index;
        weights[t * p.top_k + j] = best;
        chosen_total += best;
        previous = best;
        previous_index = best_index;
    }
    if (p.normalize == 1u) {
        for (var j = 0u; j < p.top_k; j++) {
            weights[t * p.top_k + j] /= chosen_total;
        }
    }
}

// The router logits' gradient (dst) from the routing weights' (weights), the choices held fixed:
// `ops::moe::route_backward`. One thread per token.
@compute @workgroup_size(256)
fn moe_route_backward(@builtin(global_invocation_id) id: vec3<u32>) {
    let t = flat_index(id);
    if (t >= p.tokens) {
        return;
    }
    let row = t * p.experts;
    let stats = softmax_stats(row);
    let first = t * p.top_k;
    var chosen_total = 0.0;
    for (var j = 0u; j < p.top_k; j++) {
        chosen_total += probability(row, routes[first + j], stats.x, stats.y);
    }
    var mean = 0.0;
    for (var j = 0u; j < p.top_k; j++) {
        var w = probability(row, routes[first + j], stats.x, stats.y);
        if (p.normalize == 1u) {
            w /= chosen_total;
        }
        mean += w * weights[first + j];
    }
    for (var e = 0u; e < p.experts; e++) {
        let pe = probability(row, e, stats.x, stats.y);
        var grad = 0.0;
        if (p.normalize == 0u) {
            grad = -pe * mean;
        }
        for (var j = 0u; j < p.top_k; j++) {
            if (routes[first + j] == e) {
                if (p.normalize == 1u) {
                    let w = pe / chosen_total;
                    grad = w * (weights[first + j] - mean);
                } else {
                    grad += pe * weights[first + j];
                }
            }
        }
        put(row + e, grad);
    }
}

// `sorted` from the routes: one workgroup; each thread counts and then places a stride of the experts,
// walking the slots in order so that each expert's rows keep their tokens' order.
@compute @workgroup_size(256)
fn moe_sort(@builtin(local_invocation_index) li: u32) {
    let n = slots();
    for (var e = li; e < p.experts; e += 256u) {
        var count = 0u;
        for (var s = 0u; s < n; s++) {
            if (routes[s] == e) {
                count++;
            }
        }
        sorted[e + 1u] = count;
    }
    storageBarrier();
    if (li == 0u) {
        sorted[0] = 0u;
        for (var e = 0u; e < p.experts; e++) {
            sorted[e + 1u] += sorted[e];
        }
    }
    storageBarrier();
    for (var e = li; e < p.experts; e += 256u) {
        var row = sorted[e];
        for (var s = 0u; s < n; s++) {
            if (routes[s] == e) {
                sorted[p.experts + 1u + row] = s;
                sorted[p.experts + 1u + n + s] = row;
                sorted[p.experts + 1u + 2u * n + row] = e;
                row++;
            }
        }
    }
}

// dst [S, rank] = each sorted row of src times its expert's Aᵀ (lhs: A [experts · rank, width]).
@compute @workgroup_size(256)
fn moe_lora_project(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = flat_index(id);
    if (i >= slots() * p.rank) {
        return;
    }
    let row = i / p.rank;
    let j = i % p.rank;
    let x = input_row(row) * p.width;
    let a = (expert_of(row) * p.rank + j) * p.width;
    var acc = 0.0;
    for (var c = 0u; c < p.width; c++) {
        acc += src[x + c] * lhs[a + c];
    }
    dst[i] = acc;
}

// dst [S, out] += scale · src·B_eᵀ over B's rows row_offset.. (src: x·A_eᵀ [S, rank]; lhs: B).
@compute @workgroup_size(256)
fn moe_lora_expand(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = flat_index(id);
    if (i >= slots() * p.out) {
        return;
    }
    let row = i / p.out;
    let o = i % p.out;
    let e = expert_of(row);
    var acc = 0.0;
    for (var j = 0u; j < p.rank; j++) {
        acc += src[row * p.rank + j] * lhs[b_index(o, j, e)];
    }
    dst[i] += p.scale * acc;
}

// dst [S, rank] (+)= scale · src·B_e over B's rows row_offset.. (src: the output's gradient [S, out]).
@compute @workgroup_size(256)
fn moe_lora_back_xa(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = flat_index(id);
    if (i >= slots() * p.rank) {
        return;
    }
    let row = i / p.rank;
    let j = i % p.rank;
    let e = expert_of(row);
    var acc = 0.0;
    for (var o = 0u; o < p.out; o++) {
        acc += src[row * p.out + o] * lhs[b_index(o, j, e)];
    }
    put(i, p.scale * acc);
}

// B's gradient (dst) += scale · Σ over each expert's rows of srcᵀ·(x·A_eᵀ) (src: the output's gradient
// [S, out]; lhs: x·A_eᵀ [S, rank]). One thread per element of B's rows row_offset.. .
@compute @workgroup_size(256)
fn moe_lora_grad_b(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = flat_index(id);
    if (i >= p.experts * p.out * p.rank) {
        return;
    }
    let e = i / (p.out * p.rank);
    let o = (i / p.rank) % p.out;
    let j = i % p.rank;
    var acc = 0.0;
    for (var row = sorted[e]; row < sorted[e + 1u]; row++) {
        acc += src[row * p.out + o] * lhs[row * p.rank + j];
    }
    let b = b_index(o, j, e);
    dst[b] += p.scale * acc;
}

// A's gradient (dst) += Σ over each expert's rows of d(x·A_eᵀ)ᵀ·x (src: the operand, gathered as
// `input_row` says; lhs: d(x·A_eᵀ) [S, rank]). One thread per element of A.
@compute @workgroup_size(256)
fn moe_lora_grad_a(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = flat_index(id);
    if (i >= p.experts * p.rank * p.width) {
        return;
    }
    let e = i / (p.rank * p.width);
    let j = (i / p.width) % p.rank;
    let c = i % p.width;
    var acc = 0.0;
    for (var row = sorted[e]; row < sorted[e + 1u]; row++) {
        acc += lhs[row * p.rank + j] * src[input_row(row) * p.width + c];
    }
    dst[i] += acc;
}

// dst [S, width] += src·A_e (src: d(x·A_eᵀ) [S, rank]; lhs: A).
@compute @workgroup_size(256)
fn moe_lora_input(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = flat_index(id);
    if (i >= slots() * p.width) {
        return;
    }
    let row = i / p.width;
    let c = i % p.width;
    let a = expert_of(row) * p.rank * p.width + c;
    var acc = 0.0;
    for (var j = 0u; j < p.rank; j++) {
        acc += src[row * p.rank + j] * lhs[a + j * p.width];
    }
    dst[i] += acc;
}

// dst [tokens, width] (+)= Σ_j weights[t, j] · src[the sorted row of slot (t, j)], the choices
// summed in the router's order: the experts' outputs mixed, or (unweighted) the input's gradient from
// each choice's.
@compute @workgroup_size(256)
fn moe_combine(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = flat_index(id);
    if (i >= p.tokens * p.width) {
        return;
    }
    let t = i / p.width;
    let h = i % p.width;
    var acc = 0.0;
    if (p.accumulate == 1u) {
        acc = dst[i];
    }
    for (var j = 0u; j < p.top_k; j++) {
        let s = t * p.top_k + j;
        var w = 1.0;
        if (p.weighted == 1u) {
            w = weights[s];
        }
        acc += w * src[row_of(s) * p.width + h];
    }
    dst[i] = acc;
}

// Per slot: its routing weight's gradient (dst2) = dy of its token · its expert's output (lhs, sorted
// rows), and the gradient at that output (dst, sorted rows) = weight · dy (src: dy [tokens, width]).
@compute @workgroup_size(256)
fn moe_output_grad(@builtin(global_invocation_id) id: vec3<u32>) {
    let s = flat_index(id);
    if (s >= slots()) {
        return;
    }
    let dy = s / p.top_k * p.width;
    let row = row_of(s) * p.width;
    var dot = 0.0;
    for (var h = 0u; h < p.width; h++) {
        dot += src[dy + h] * lhs[row + h];
    }
    dst2[s] = dot;
    let w = weights[s];
    for (var h = 0u; h < p.width; h++) {
        dst[row + h] = w * src[dy + h];
    }
}
