// y = x·Wᵀ (+ bias) and dx = dy·W for a frozen weight W [rows = out, cols = in] in any storage format.

struct LinearParams {
    tokens: u32,
    rows: u32,
    cols: u32,
    fmt: u32,
    group_size: u32,
    has_bias: u32,
    accumulate: u32,
    // W is rows row_offset.. of a weight split across bindings: those columns of y (dy), rows out_stride long.
    row_offset: u32,
    out_stride: u32,
    // Row 0 of W is this row of the bound buffer (a vocabulary chunk inside a block of the output projection).
    weight_row: u32,
    // Forward: row 0 of x is this row of y (a convolution's tile of output pixels).
    y_row: u32,
    // dora_factors: the LoRA update's scale.
    scale: f32,
    // The grouped products of a mixture's stacked experts (moe_linear_*): each workgroup one expert's
    // sorted rows (shaders/moe.wgsl's `sorted`, of `experts` experts), its weight rows
    // expert_stride apart, from weight_row within each; the block's first expert; and, where the
    // input's rows are its tokens' (the experts' input), the routes per token (0: rows in sorted order).
    experts: u32,
    expert_stride: u32,
    first_expert: u32,
    gather_k: u32,
}

@group(0) @binding(0) var<uniform> p: LinearParams;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read> scales: array<f32>;
@group(0) @binding(3) var<storage, read> mins: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read> x: array<f32>;
@group(0) @binding(6) var<storage, read_write> y: array<f32>;
// dora_factors: B [out_stride, tokens] and the magnitude [out_stride].
@group(0) @binding(7) var<storage, read> lora_b: array<f32>;
@group(0) @binding(8) var<storage, read> magnitude: array<f32>;
// The grouped products: shaders/moe.wgsl's `sorted`.
@group(0) @binding(9) var<storage, read> sorted: array<u32>;

fn weight_at(w_row: u32, col: u32) -> f32 {
    return weight_value(p.weight_row + w_row, col);
}

// The weight at a row of the bound buffer.
fn weight_value(row: u32, col: u32) -> f32 {
    if (p.fmt == FMT_NF4 || p.fmt == FMT_INT4) {
        let word = w[(row * p.cols + col) >> 3u];
        let g = row * (p.cols / p.group_size) + col / p.group_size;
        var minimum = 0.0;
        if (p.fmt == FMT_INT4) {
            minimum = mins[g];
        }
        return dequant(nibble(word, col), p.fmt, scales[g], minimum);
    }
    let index = row * p.cols + col;
    return dense_word_value(w[dense_word_index(p.fmt, index)], p.fmt, index);
}

// Both products are tiled: a workgroup of 256 threads computes 64 tokens x 64 outputs, staging 16 steps
// of the inner dimension at a time in workgroup memory, so that each weight is dequantized once per 64
// tokens and each input value read once per 64 outputs. Thread (tx, ty) owns tokens ty + 16·i and outputs
// tx + 16·j (i, j < 4) in registers: each step reads 8 staged values for 16 multiply-adds. Neighbouring
// threads read neighbouring words of the weight tile.
const TILE_T: u32 = 64u;
const TILE_N: u32 = 64u;
const TILE_K: u32 = 16u;

var<workgroup> input_tile: array<f32, 1024>;  // [TILE_T][TILE_K]
var<workgroup> weight_tile: array<f32, 1024>; // [TILE_K][TILE_N]

// W[row, col..col + 8] (col a multiple of 8), zero past W's edges: one packed word for the 4-bit formats.
// W's row 0 is row `first_row` of the bound buffer.
fn weights8(first_row: u32, row: u32, col: u32) -> array<f32, 8> {
    var out = array<f32, 8>(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    if (row >= p.rows || col >= p.cols) {
        return out;
    }
    let bound_row = first_row + row;
    if (p.fmt == FMT_NF4 || p.fmt == FMT_INT4) {
        // The input dimension is a multiple of the group size (>= 32), so the word lies in W and in
        // one group.
        let word = w[(bound_row * p.cols + col) >> 3u];
        let g = bound_row * (p.cols / p.group_size) + col / p.group_size;
        var minimum = 0.0;
        if (p.fmt == FMT_INT4) {
            minimum = mins[g];
        }
        let scale = scales[g];
        for (var j = 0u; j < 8u; j++) {
            out[j] = dequant((word >> (4u * j)) & 0xfu, p.fmt, scale, minimum);
        }
        return out;
    }
    for (var j = 0u; j < 8u; j++) {
        if (col + j < p.cols) {
            out[j] = weight_value(bound_row, col + j);
        }
    }
    return out;
}

// The rows a workgroup multiplies: (the first, how many) of x's rows in order, or of a mixture's sorted
// rows (one expert's).
var<workgroup> expert_span: vec2<u32>;

fn all_rows() -> vec2<u32> {
    return vec2<u32>(0u, p.tokens);
}

// Expert e's sorted rows, the same value in every thread of the workgroup.
fn rows_of_expert(e: u32, li: u32) -> vec2<u32> {
    if (li == 0u) {
        expert_span = vec2<u32>(sorted[e], sorted[e + 1u] - sorted[e]);
    }
    return workgroupUniformLoad(&expert_span);
}

const NO_ROW: u32 = 0xffffffffu;

// The rows of x that thread li stages for the workgroup's rows t0.. of `rows` (rows t0 + li / 16 +
// 16·j): NO_ROW past them.
fn staged_rows(li: u32, rows: vec2<u32>, t0: u32) -> array<u32, 4> {
    var out = array<u32, 4>(NO_ROW, NO_ROW, NO_ROW, NO_ROW);
    for (var j = 0u; j < 4u; j++) {
        let t = t0 + li / TILE_K + 16u * j;
        if (t < rows.y) {
            out[j] = rows.x + t;
        }
    }
    return out;
}

// `staged_rows` of an expert's sorted rows: each read from its token's row of x where the product
// gathers (the experts' input).
fn staged_expert_rows(li: u32, rows: vec2<u32>, t0: u32) -> array<u32, 4> {
    var out = staged_rows(li, rows, t0);
    for (var j = 0u; j < 4u; j++) {
        if (out[j] != NO_ROW && p.gather_k > 0u) {
            out[j] = sorted[p.experts + 1u + out[j]] / p.gather_k;
        }
    }
    return out;
}

// input_tile[tt][kk] = x[staged row, offset + k0 + kk] for rows `row_len` long, zero past the rows or
// past `k_len`: four values per thread.
fn stage_input(li: u32, staged: array<u32, 4>, k0: u32, k_len: u32, row_len: u32, offset: u32) {
    for (var j = 0u; j < 4u; j++) {
        let e = li + 256u * j;
        let k = k0 + e % TILE_K;
        var v = 0.0;
        if (staged[j] != NO_ROW && k < k_len) {
            v = x[staged[j] * row_len + offset + k];
        }
        input_tile[e] = v;
    }
}

// The staged step of thread (tx, ty): its four tokens' inputs against its four outputs' weights.
fn accumulate_tile(tx: u32, ty: u32, acc: ptr<function, array<vec4<f32>, 4>>) {
    for (var kk = 0u; kk < TILE_K; kk++) {
        let row = kk * TILE_N + tx;
        let w4 = vec4<f32>(
            weight_tile[row],
            weight_tile[row + 16u],
            weight_tile[row + 32u],
            weight_tile[row + 48u],
        );
        for (var i = 0u; i < 4u; i++) {
            (*acc)[i] += input_tile[(ty + 16u * i) * TILE_K + kk] * w4;
        }
    }
}

// y[o] = value, or y[o] += value when the product accumulates.
fn store(o: u32, value: f32) {
    if (p.accumulate == 1u) {
        y[o] += value;
    } else {
        y[o] = value;
    }
}

// y[t, row_offset + row] (+)= Σ_c x[t, c]·W[row, c] (+ bias). Workgroups: (rows / 64, tokens / 64).
@compute @workgroup_size(256)
fn linear_forward(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let staged = staged_rows(li, all_rows(), wg.y * TILE_T);
    forward_tile(li, staged, all_rows(), wg.xy, p.weight_row);
}

// A mixture's experts: y [sorted rows, rows] = each expert's rows of x times its rows of W. Workgroups:
// (rows / 64, tokens / 64, the block's experts); those past their expert's rows return at once.
@compute @workgroup_size(256)
fn moe_linear_forward(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let rows = rows_of_expert(p.first_expert + wg.z, li);
    if (wg.y * TILE_T >= rows.y) {
        return;
    }
    let staged = staged_expert_rows(li, rows, wg.y * TILE_T);
    forward_tile(li, staged, rows, wg.xy, wg.z * p.expert_stride + p.weight_row);
}

// Workgroup `tile`'s outputs (64 of W's rows) for 64 of `rows` (x's `staged` rows), W's row 0 at
// `first_row` of the block.
fn forward_tile(li: u32, staged: array<u32, 4>, rows: vec2<u32>, tile: vec2<u32>, first_row: u32) {
    let row0 = tile.x * TILE_N;
    let t0 = tile.y * TILE_T;
    let tx = li % 16u;
    let ty = li / 16u;
    var acc: array<vec4<f32>, 4>;
    for (var k0 = 0u; k0 < p.cols; k0 += TILE_K) {
        stage_input(li, staged, k0, p.cols, p.cols, 0u);
        // Weight rows row0 + li / 2, columns k0 + 8·(li % 2).., stored k-major: one word per thread of
        // the first 128.
        if (li < 128u) {
            let wr = li / 2u;
            let wc = 8u * (li % 2u);
            let values = weights8(first_row, row0 + wr, k0 + wc);
            for (var j = 0u; j < 8u; j++) {
                weight_tile[(wc + j) * TILE_N + wr] = values[j];
            }
        }
        workgroupBarrier();
        accumulate_tile(tx, ty, &acc);
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let t = t0 + ty + 16u * i;
        if (t >= rows.y) {
            break;
        }
        for (var j = 0u; j < 4u; j++) {
            let row = row0 + tx + 16u * j;
            if (row < p.rows) {
                var value = acc[i][j];
                if (p.has_bias == 1u) {
                    value += bias[p.row_offset + row];
                }
                store((p.y_row + rows.x + t) * p.out_stride + p.row_offset + row, value);
            }
        }
    }
}

// dx = dy·W: here `x` is dy [tokens, out_stride] (this block's rows at row_offset) and `y` is dx
// [tokens, cols]. Workgroups: (cols / 64, tokens / 64).
@compute @workgroup_size(256)
fn linear_backward_input(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let staged = staged_rows(li, all_rows(), wg.y * TILE_T);
    backward_input_tile(li, staged, all_rows(), wg.xy, p.weight_row);
}

// A mixture's experts: dx [sorted rows, cols] = each expert's rows of dy [sorted rows, rows] times its
// rows of W. Workgroups: (cols / 64, tokens / 64, the block's experts).
@compute @workgroup_size(256)
fn moe_linear_backward_input(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let rows = rows_of_expert(p.first_expert + wg.z, li);
    if (wg.y * TILE_T >= rows.y) {
        return;
    }
    let staged = staged_expert_rows(li, rows, wg.y * TILE_T);
    backward_input_tile(li, staged, rows, wg.xy, wg.z * p.expert_stride + p.weight_row);
}

// Workgroup `tile`'s 64 columns of dx for 64 of `rows` (dy's `staged` rows), W's row 0 at `first_row`
// of the block.
fn backward_input_tile(li: u32, staged: array<u32, 4>, rows: vec2<u32>, tile: vec2<u32>, first_row: u32) {
    let col0 = tile.x * TILE_N;
    let t0 = tile.y * TILE_T;
    let tx = li % 16u;
    let ty = li / 16u;
    var acc: array<vec4<f32>, 4>;
    for (var r0 = 0u; r0 < p.rows; r0 += TILE_K) {
        stage_input(li, staged, r0, p.rows, p.out_stride, p.row_offset);
        // Weight rows r0 + li / 8, columns col0 + 8·(li % 8)..: one word per thread of the first 128.
        if (li < 128u) {
            let wr = li / 8u;
            let wc = 8u * (li % 8u);
            let values = weights8(first_row, r0 + wr, col0 + wc);
            for (var j = 0u; j < 8u; j++) {
                weight_tile[wr * TILE_N + wc + j] = values[j];
            }
        }
        workgroupBarrier();
        accumulate_tile(tx, ty, &acc);
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let t = t0 + ty + 16u * i;
        if (t >= rows.y) {
            break;
        }
        for (var j = 0u; j < 4u; j++) {
            let col = col0 + tx + 16u * j;
            if (col < p.cols) {
                store((rows.x + t) * p.cols + col, acc[i][j]);
            }
        }
    }
}

// DoRA's factors of this block's rows: with x = A [tokens = rank, cols] and n = ‖W[row] + scale·B·A[row]‖,
// y[o] = m/n, y[out + o] = m/n − 1, y[2·out + o] = 1/n for o = row_offset + row, out = out_stride.
// One workgroup of 256 per row (workgroups: rows, as (x, y) past 65535), each thread a stride of the
// columns.
var<workgroup> partial_sums: array<f32, 256>;

@compute @workgroup_size(256)
fn dora_factors(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let row = wg.x + wg.y * 65535u;
    if (row >= p.rows) {
        return;
    }
    let o = p.row_offset + row;
    var sum = 0.0;
    for (var c = li; c < p.cols; c += 256u) {
        var update = 0.0;
        for (var k = 0u; k < p.tokens; k++) {
            update += lora_b[o * p.tokens + k] * x[k * p.cols + c];
        }
        let v = weight_at(row, c) + p.scale * update;
        sum += v * v;
    }
    partial_sums[li] = sum;
    workgroupBarrier();
    for (var half = 128u; half > 0u; half >>= 1u) {
        if (li < half) {
            partial_sums[li] += partial_sums[li + half];
        }
        workgroupBarrier();
    }
    if (li == 0u) {
        let inverse = 1.0 / sqrt(partial_sums[0]);
        let ratio = magnitude[o] * inverse;
        y[o] = ratio;
        y[p.out_stride + o] = ratio - 1.0;
        y[2u * p.out_stride + o] = inverse;
    }
}
