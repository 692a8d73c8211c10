// Row gather and scatter: the loss runs only on positions that carry a label; a mixture's routes
// pick their experts' factors. Rows run over y, and on over z past 65,535 (a dispatch's limit).

struct RowsParams {
    rows: u32,
    dim: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: RowsParams;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read> index: array<u32>;
@group(0) @binding(3) var<storage, read_write> dst: array<f32>;

// dst[i] = src[index[i]]
@compute @workgroup_size(64)
fn gather_rows(@builtin(global_invocation_id) id: vec3<u32>) {
    let c = id.x;
    let i = id.y + id.z * 65535u;
    if (c >= p.dim || i >= p.rows) {
        return;
    }
    dst[i * p.dim + c] = src[index[i] * p.dim + c];
}

// dst[index[i]] = src[i]
@compute @workgroup_size(64)
fn scatter_rows(@builtin(global_invocation_id) id: vec3<u32>) {
    let c = id.x;
    let i = id.y + id.z * 65535u;
    if (c >= p.dim || i >= p.rows) {
        return;
    }
    dst[index[i] * p.dim + c] = src[i * p.dim + c];
}
