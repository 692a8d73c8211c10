// Rotary embedding over the first `rotated` channels of each head: element i pairs with element
// i + rotated/2 (the LLMs' Hugging Face layout), or with `adjacent`, element 2i with 2i + 1 (FLUX).

struct RopeParams {
    tokens: u32,
    heads: u32,
    head_dim: u32,
    // 1.0 rotates forward; -1.0 applies the inverse rotation (the backward).
    sign: f32,
    adjacent: u32,
    // Channels rotated at the start of each head (Phi-3's partial rotary embedding); the rest pass.
    rotated: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: RopeParams;
@group(0) @binding(1) var<storage, read> cos_table: array<f32>;
@group(0) @binding(2) var<storage, read> sin_table: array<f32>;
@group(0) @binding(3) var<storage, read_write> x: array<f32>;

// One thread per (pair i, head, token).
@compute @workgroup_size(64)
fn rope_apply(@builtin(global_invocation_id) id: vec3<u32>) {
    let half = p.rotated / 2u;
    let i = id.x;
    let h = id.y;
    let t = id.z;
    if (i >= half || h >= p.heads || t >= p.tokens) {
        return;
    }
    let base = (t * p.heads + h) * p.head_dim;
    let c = cos_table[t * half + i];
    let s = p.sign * sin_table[t * half + i];
    var j1 = base + i;
    var j2 = base + i + half;
    if (p.adjacent != 0u) {
        j1 = base + 2u * i;
        j2 = j1 + 1u;
    }
    let x1 = x[j1];
    let x2 = x[j2];
    x[j1] = x1 * c - x2 * s;
    x[j2] = x2 * c + x1 * s;
}
