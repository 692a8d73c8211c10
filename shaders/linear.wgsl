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

fn weight_at(w_row: u32, col: u32) -> f32 {
    let row = p.weight_row + w_row;
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
fn weights8(row: u32, col: u32) -> array<f32, 8> {
    var out = array<f32, 8>(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    if (row >= p.rows || col >= p.cols) {
        return out;
    }
    if (p.fmt == FMT_NF4 || p.fmt == FMT_INT4) {
        // The input dimension is a multiple of the group size (>= 32), so the word lies in W and in
        // one group.
        let bound_row = p.weight_row + row;
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
            out[j] = weight_at(row, col + j);
        }
    }
    return out;
}

// input_tile[tt][kk] = x[t0 + tt, offset + k0 + kk] for rows `row_len` long, zero past the tokens or
// past `k_len`: four values per thread.
fn stage_input(li: u32, t0: u32, k0: u32, k_len: u32, row_len: u32, offset: u32) {
    for (var j = 0u; j < 4u; j++) {
        let e = li + 256u * j;
        let t = t0 + e / TILE_K;
        let k = k0 + e % TILE_K;
        var v = 0.0;
        if (t < p.tokens && k < k_len) {
            v = x[t * row_len + offset + k];
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
    let row0 = wg.x * TILE_N;
    let t0 = wg.y * TILE_T;
    let tx = li % 16u;
    let ty = li / 16u;
    var acc: array<vec4<f32>, 4>;
    for (var k0 = 0u; k0 < p.cols; k0 += TILE_K) {
        stage_input(li, t0, k0, p.cols, p.cols, 0u);
        // Weight rows row0 + li / 2, columns k0 + 8·(li % 2).., stored k-major: one word per thread of
        // the first 128.
        if (li < 128u) {
            let wr = li / 2u;
            let wc = 8u * (li % 2u);
            let values = weights8(row0 + wr, k0 + wc);
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
        if (t >= p.tokens) {
            break;
        }
        for (var j = 0u; j < 4u; j++) {
            let row = row0 + tx + 16u * j;
            if (row < p.rows) {
                var value = acc[i][j];
                if (p.has_bias == 1u) {
                    value += bias[p.row_offset + row];
                }
                store((p.y_row + t) * p.out_stride + p.row_offset + row, value);
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
    let col0 = wg.x * TILE_N;
    let t0 = wg.y * TILE_T;
    let tx = li % 16u;
    let ty = li / 16u;
    var acc: array<vec4<f32>, 4>;
    for (var r0 = 0u; r0 < p.rows; r0 += TILE_K) {
        stage_input(li, t0, r0, p.rows, p.out_stride, p.row_offset);
        // Weight rows r0 + li / 8, columns col0 + 8·(li % 8)..: one word per thread of the first 128.
        if (li < 128u) {
            let wr = li / 8u;
            let wc = 8u * (li % 8u);
            let values = weights8(r0 + wr, col0 + wc);
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
        if (t >= p.tokens) {
            break;
        }
        for (var j = 0u; j < 4u; j++) {
            let col = col0 + tx + 16u * j;
            if (col < p.cols) {
                store(t * p.cols + col, acc[i][j]);
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
