// Rotary embedding, Hugging Face layout: element i of a head pairs with element i + d/2.

struct RopeParams {
    tokens: u32,
    heads: u32,
    head_dim: u32,
    // 1.0 rotates forward; -1.0 applies the inverse rotation (the backward).
    sign: f32,
}

@group(0) @binding(0) var<uniform> p: RopeParams;
@group(0) @binding(1) var<storage, read> cos_table: array<f32>;
@group(0) @binding(2) var<storage, read> sin_table: array<f32>;
@group(0) @binding(3) var<storage, read_write> x: array<f32>;

// One thread per (pair i, head, token).
@compute @workgroup_size(64)
fn rope_apply(@builtin(global_invocation_id) id: vec3<u32>) {
    let half = p.head_dim / 2u;
    let i = id.x;
    let h = id.y;
    let t = id.z;
    if (i >= half || h >= p.heads || t >= p.tokens) {
        return;
    }
    let base = (t * p.heads + h) * p.head_dim;
    let c = cos_table[t * half + i];
    let s = p.sign * sin_table[t * half + i];
    let x1 = x[base + i];
    let x2 = x[base + i + half];
    x[base + i] = x1 * c - x2 * s;
    x[base + i + half] = x2 * c + x1 * s;
}
