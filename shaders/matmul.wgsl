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
    // LoRA dropout on one side (`Op::DropoutMatmul`): 0 none, 1 A, 2 B, 3 the product (added into C).
    mask_side: u32,
    mask_key: u32,
    mask_p: f32,
    mask_scale: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: MatmulParams;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

// `value`, element `index` of the matrix on `side`, through dropout where the mask is on that side.
fn masked(side: u32, index: u32, value: f32) -> f32 {
    if (p.mask_side != side) {
        return value;
    }
    if (dropout_keeps(p.mask_key, p.mask_p, index)) {
        return value * p.mask_scale;
    }
    return 0.0;
}

// 16 x 16 tiles of C per workgroup, 16 inner steps of A and B staged in workgroup memory: each value of A
// is read once per 16 columns and each of B once per 16 rows. The LoRA products have one side of rank r
// (8 or 16): one thread per output in rows of 64 left most threads of a workgroup idle. The sum runs in
// the same order as one thread per output would run it.
var<workgroup> a_tile: array<f32, 256>; // [16 rows of C][16 inner]
var<workgroup> b_tile: array<f32, 256>; // [16 inner][16 columns of C]

@compute @workgroup_size(16, 16)
fn matmul(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let i = wg.y * 16u + lid.y;
    let j = wg.x * 16u + lid.x;
    var acc = 0.0;
    for (var q0 = 0u; q0 < p.k; q0 += 16u) {
        var av = 0.0;
        if (i < p.m && q0 + lid.x < p.k) {
            let ia = i * p.a_row_stride + (q0 + lid.x) * p.a_col_stride;
            av = masked(1u, ia, a[ia]);
        }
        a_tile[lid.y * 16u + lid.x] = av;
        var bv = 0.0;
        if (q0 + lid.y < p.k && j < p.n) {
            let ib = (q0 + lid.y) * p.b_row_stride + j * p.b_col_stride;
            bv = masked(2u, ib, b[ib]);
        }
        b_tile[lid.y * 16u + lid.x] = bv;
        workgroupBarrier();
        for (var qq = 0u; qq < 16u; qq++) {
            acc += a_tile[lid.y * 16u + qq] * b_tile[qq * 16u + lid.x];
        }
        workgroupBarrier();
    }
    if (i >= p.m || j >= p.n) {
        return;
    }
    let o = i * p.ldc + p.c_col + j;
    if (p.mask_side == 3u) {
        c[o] += masked(3u, i * p.n + j, p.alpha * acc);
    } else if (p.accumulate == 1u) {
        c[o] += p.alpha * acc;
    } else {
        c[o] = p.alpha * acc;
    }
}
