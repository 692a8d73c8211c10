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
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: LinearParams;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read> scales: array<f32>;
@group(0) @binding(3) var<storage, read> mins: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read> x: array<f32>;
@group(0) @binding(6) var<storage, read_write> y: array<f32>;

fn weight_at(row: u32, col: u32) -> f32 {
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

// One thread per (token, output row).
@compute @workgroup_size(64)
fn linear_forward(@builtin(global_invocation_id) id: vec3<u32>) {
    let row = id.x;
    let t = id.y;
    if (row >= p.rows || t >= p.tokens) {
        return;
    }
    var acc = 0.0;
    let xb = t * p.cols;
    if (p.fmt == FMT_NF4 || p.fmt == FMT_INT4) {
        // Whole words of eight codes, one scale per group.
        let groups = p.cols / p.group_size;
        for (var g = 0u; g < groups; g++) {
            let gi = row * groups + g;
            let scale = scales[gi];
            var minimum = 0.0;
            if (p.fmt == FMT_INT4) {
                minimum = mins[gi];
            }
            var partial = 0.0;
            for (var c = g * p.group_size; c < (g + 1u) * p.group_size; c += 8u) {
                let word = w[(row * p.cols + c) >> 3u];
                for (var j = 0u; j < 8u; j++) {
                    partial += x[xb + c + j] * dequant((word >> (4u * j)) & 0xfu, p.fmt, scale, minimum);
                }
            }
            acc += partial;
        }
    } else {
        for (var c = 0u; c < p.cols; c++) {
            acc += x[xb + c] * weight_at(row, c);
        }
    }
    if (p.has_bias == 1u) {
        acc += bias[p.row_offset + row];
    }
    let o = t * p.out_stride + p.row_offset + row;
    if (p.accumulate == 1u) {
        y[o] += acc;
    } else {
        y[o] = acc;
    }
}

// dx = dy·W: here `x` is dy [tokens, rows] and `y` is dx [tokens, cols]. One thread per (token, column).
@compute @workgroup_size(64)
fn linear_backward_input(@builtin(global_invocation_id) id: vec3<u32>) {
    let col = id.x;
    let t = id.y;
    if (col >= p.cols || t >= p.tokens) {
        return;
    }
    var acc = 0.0;
    for (var r = 0u; r < p.rows; r++) {
        acc += x[t * p.out_stride + p.row_offset + r] * weight_at(r, col);
    }
    let o = t * p.cols + col;
    if (p.accumulate == 1u) {
        y[o] += acc;
    } else {
        y[o] = acc;
    }
}
