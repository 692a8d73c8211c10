// RMSNorm over rows: y = (offset + w) ⊙ x · r, r = 1/sqrt(mean(x²) + eps) (offset 1: Gemma's norms);
// backward dx only (norm weights frozen).

struct RmsNormParams {
    rows: u32,
    dim: u32,
    eps: f32,
    offset: f32,
}

@group(0) @binding(0) var<uniform> p: RmsNormParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read_write> inv_rms: array<f32>;
@group(0) @binding(5) var<storage, read> dy: array<f32>;


// One workgroup per row.
@compute @workgroup_size(128)
fn rmsnorm_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row = wg.x + wg.y * 65535u;
    if (row >= p.rows) {
        return;
    }
    let base = row * p.dim;
    var sq = 0.0;
    for (var i = lid.x; i < p.dim; i += ROW_WG) {
        sq += x[base + i] * x[base + i];
    }
    let r = 1.0 / sqrt(row_sum(lid.x, sq) / f32(p.dim) + p.eps);
    for (var i = lid.x; i < p.dim; i += ROW_WG) {
        y[base + i] = (p.offset + weight[i]) * (x[base + i] * r);
    }
    if (lid.x == 0u) {
        inv_rms[row] = r;
    }
}

// dx_i = r·w_i·dy_i − (r³/n)·x_i·Σ_j w_j·dy_j·x_j, written to `y`.
@compute @workgroup_size(128)
fn rmsnorm_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row = wg.x + wg.y * 65535u;
    if (row >= p.rows) {
        return;
    }
    let base = row * p.dim;
    let r = inv_rms[row];
    var d = 0.0;
    for (var i = lid.x; i < p.dim; i += ROW_WG) {
        d += (p.offset + weight[i]) * dy[base + i] * x[base + i];
    }
    let coef = r * r * r * row_sum(lid.x, d) / f32(p.dim);
    for (var i = lid.x; i < p.dim; i += ROW_WG) {
        y[base + i] = r * (p.offset + weight[i]) * dy[base + i] - coef * x[base + i];
    }
}
