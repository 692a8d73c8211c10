// LoRA dropout with counter-based masks (src/ops/dropout.rs defines them; this file must agree bit for
// bit): whether element i is kept is a hash of (seed, stream, i), so the backward regenerates the mask.

struct DropoutParams {
    n: u32,
    seed_lo: u32,
    seed_hi: u32,
    stream: u32,
    p: f32,
    keep_scale: f32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: DropoutParams;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

// The mask's key (`DropoutParams::mask_key`).
fn mask_key() -> u32 {
    return dropout_hash(dropout_hash(p.stream ^ dropout_hash(p.seed_lo ^ dropout_hash(p.seed_hi))));
}

// The element's 24-bit uniform draw's hash.
fn draw(index: u32) -> u32 {
    return dropout_hash(index ^ mask_key());
}

fn keeps(index: u32) -> bool {
    return dropout_keeps(mask_key(), p.p, index);
}

// dst += noise uniform in [−p.p, p.p): NEFTune's on the embeddings (DropoutParams::noise).
@compute @workgroup_size(256)
fn uniform_noise(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x + id.y * 65535u * 256u;
    if (i < p.n) {
        dst[i] += p.p * (f32(draw(i) >> 8u) * (2.0 / 16777216.0) - 1.0);
    }
}

// dst = dropout(src)
@compute @workgroup_size(256)
fn dropout_forward(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x + id.y * 65535u * 256u;
    if (i < p.n) {
        if (keeps(i)) {
            dst[i] = src[i] * p.keep_scale;
        } else {
            dst[i] = 0.0;
        }
    }
}

// dst += the gradient through dropout of src
@compute @workgroup_size(256)
fn dropout_backward(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x + id.y * 65535u * 256u;
    if (i < p.n && keeps(i)) {
        dst[i] += src[i] * p.keep_scale;
    }
}
