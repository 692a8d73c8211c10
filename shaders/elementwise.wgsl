// Elementwise ops: residual add and the SwiGLU gate with its backward.

struct ElementwiseParams {
    n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: ElementwiseParams;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out0: array<f32>;
@group(0) @binding(4) var<storage, read_write> out1: array<f32>;
@group(0) @binding(5) var<storage, read> c: array<f32>;


fn sigmoid(v: f32) -> f32 {
    return 1.0 / (1.0 + exp(-v));
}

// out0 = a + b
@compute @workgroup_size(256)
fn add(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = flat_index(id);
    if (i < p.n) {
        out0[i] = a[i] + b[i];
    }
}

// out0 += a
@compute @workgroup_size(256)
fn add_assign(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = flat_index(id);
    if (i < p.n) {
        out0[i] = out0[i] + a[i];
    }
}

// out0 = silu(a) · b  (a = gate, b = up)
@compute @workgroup_size(256)
fn swiglu_forward(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = flat_index(id);
    if (i < p.n) {
        out0[i] = a[i] * sigmoid(a[i]) * b[i];
    }
}

// c = dh: out0 = d gate, out1 = d up
@compute @workgroup_size(256)
fn swiglu_backward(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = flat_index(id);
    if (i < p.n) {
        let g = a[i];
        let s = sigmoid(g);
        out0[i] = c[i] * b[i] * s * (1.0 + g * (1.0 - s));
        out1[i] = c[i] * g * s;
    }
}
