// The ops of adaptive-norm transformers (FLUX.2), as ops/modulate.rs computes them on the CPU:
// LayerNorm without affine parameters followed by (1 + scale) and + shift, its backward, a gate, SiLU,
// column slices and the mean squared error. A modulation buffer holds vectors of `dim` channels back to
// back; ops name theirs by index.

struct ModulateParams {
    rows: u32,
    dim: u32,
    eps: f32,
    // layernorm: the shift vector; gate: the gate vector; columns: the matrix's width.
    first: u32,
    // layernorm: the scale vector; columns: the first column.
    second: u32,
    // columns: how many columns.
    len: u32,
    // 1: add into the output instead of overwriting it.
    accumulate: u32,
    // Elements of the elementwise ops.
    n: u32,
}

@group(0) @binding(0) var<uniform> p: ModulateParams;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out0: array<f32>;
@group(0) @binding(4) var<storage, read_write> out1: array<f32>;
@group(0) @binding(5) var<storage, read> c: array<f32>;



fn store(i: u32, value: f32) {
    if (p.accumulate != 0u) {
        out0[i] = out0[i] + value;
    } else {
        out0[i] = value;
    }
}

// a = x, b = mods -> out0 = y, out1 = (mean, 1/std) per row. One workgroup per row.
@compute @workgroup_size(128)
fn layernorm_modulate_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row = wg.x + wg.y * 65535u;
    if (row >= p.rows) {
        return;
    }
    let base = row * p.dim;
    var s = 0.0;
    for (var i = lid.x; i < p.dim; i += ROW_WG) {
        s += a[base + i];
    }
    let mean = row_sum(lid.x, s) / f32(p.dim);
    var sq = 0.0;
    for (var i = lid.x; i < p.dim; i += ROW_WG) {
        let centred = a[base + i] - mean;
        sq += centred * centred;
    }
    let rstd = 1.0 / sqrt(row_sum(lid.x, sq) / f32(p.dim) + p.eps);
    for (var i = lid.x; i < p.dim; i += ROW_WG) {
        let n = (a[base + i] - mean) * rstd;
        out0[base + i] = (1.0 + b[p.second * p.dim + i]) * n + b[p.first * p.dim + i];
    }
    if (lid.x == 0u) {
        out1[2u * row] = mean;
        out1[2u * row + 1u] = rstd;
    }
}

// a = x, b = mods, c = dy, out1 = the forward's stats (read) -> out0 (+)= dx:
// g = dy ⊙ (1 + scale), dx = rstd · (g − mean(g) − n · mean(g ⊙ n)).
@compute @workgroup_size(128)
fn layernorm_modulate_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row = wg.x + wg.y * 65535u;
    if (row >= p.rows) {
        return;
    }
    let base = row * p.dim;
    let mean = out1[2u * row];
    let rstd = out1[2u * row + 1u];
    var sg = 0.0;
    var sgn = 0.0;
    for (var i = lid.x; i < p.dim; i += ROW_WG) {
        let g = c[base + i] * (1.0 + b[p.second * p.dim + i]);
        sg += g;
        sgn += g * ((a[base + i] - mean) * rstd);
    }
    let mean_g = row_sum(lid.x, sg) / f32(p.dim);
    let mean_gn = row_sum(lid.x, sgn) / f32(p.dim);
    for (var i = lid.x; i < p.dim; i += ROW_WG) {
        let g = c[base + i] * (1.0 + b[p.second * p.dim + i]);
        let n = (a[base + i] - mean) * rstd;
        store(base + i, rstd * (g - mean_g - n * mean_gn));
    }
}

// a = mods, b = y -> out0 (+)= gate ⊙ y, the gate vector `first` broadcast over rows of dim.
@compute @workgroup_size(256)
fn gate(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = flat_index(id);
    if (i < p.n) {
        store(i, a[p.first * p.dim + i % p.dim] * b[i]);
    }
}

// a = x -> out0 = x · sigmoid(x).
@compute @workgroup_size(256)
fn silu(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = flat_index(id);
    if (i < p.n) {
        let x = a[i];
        out0[i] = x / (1.0 + exp(-x));
    }
}

// a = x [rows, first] -> out0 [rows, len] (+)= its columns second..second + len. One thread per output.
@compute @workgroup_size(256)
fn columns(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = flat_index(id);
    if (i < p.n) {
        store(i, a[(i / p.len) * p.first + p.second + i % p.len]);
    }
}

// a = y [rows, len] -> columns second..second + len of out0 [rows, first] (+)= y. One thread per input.
@compute @workgroup_size(256)
fn place_columns(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = flat_index(id);
    if (i < p.n) {
        store((i / p.len) * p.first + p.second + i % p.len, a[i]);
    }
}

// a = pred, b = target -> out1[0] = mean((pred − target)²). One workgroup.
@compute @workgroup_size(128)
fn mse_loss(@builtin(local_invocation_id) lid: vec3<u32>) {
    var s = 0.0;
    for (var i = lid.x; i < p.n; i += ROW_WG) {
        let d = a[i] - b[i];
        s += d * d;
    }
    let total = row_sum(lid.x, s);
    if (lid.x == 0u) {
        out1[0] = total / f32(p.n);
    }
}

// a = pred, b = target, c = [grad_scale] -> out0 = grad_scale · 2 (pred − target) / n.
@compute @workgroup_size(256)
fn mse_grad(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = flat_index(id);
    if (i < p.n) {
        out0[i] = 2.0 * c[0] / f32(p.n) * (a[i] - b[i]);
    }
}

// a = dy, b = h, c = DoRA's factors -> out0[o] (+)= c[2·dim + o] · Σ_rows dy[·, o] · h[·, o]: the
// magnitude's gradient, one thread per output o.
@compute @workgroup_size(64)
fn dora_magnitude_grad(@builtin(global_invocation_id) id: vec3<u32>) {
    let o = id.x + id.y * 65535u * 64u;
    if (o < p.dim) {
        var sum = 0.0;
        for (var t = 0u; t < p.rows; t++) {
            sum += a[t * p.dim + o] * b[t * p.dim + o];
        }
        store(o, sum * c[2u * p.dim + o]);
    }
}
