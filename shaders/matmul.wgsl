// C (+)= alpha · A·B on f32 views with explicit strides (the LoRA products and their gradients).

struct MatmulParams {
    m: u32,
    n: u32,
    k: u32,
    a_row_stride: u32,
    a_col_stride: u32,
    b_row_stride: u32,
    b_col_stride: u32,
    ldc: u32,
    c_col: u32,
    accumulate: u32,
    alpha: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: MatmulParams;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

@compute @workgroup_size(64)
fn matmul(@builtin(global_invocation_id) id: vec3<u32>) {
    let j = id.x;
    let i = id.y;
    if (i >= p.m || j >= p.n) {
        return;
    }
    var acc = 0.0;
    for (var q = 0u; q < p.k; q++) {
        acc += a[i * p.a_row_stride + q * p.a_col_stride] * b[q * p.b_row_stride + j * p.b_col_stride];
    }
    let o = i * p.ldc + p.c_col + j;
    if (p.accumulate == 1u) {
        c[o] += p.alpha * acc;
    } else {
        c[o] = p.alpha * acc;
    }
}
