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

fn mix(v: u32) -> u32 {
    var x = v;
    x ^= x >> 16u;
    x *= 0x7feb352du;
    x ^= x >> 15u;
    x *= 0x846ca68bu;
    x ^= x >> 16u;
    return x;
}

// The element's 24-bit uniform draw's hash.
fn draw(index: u32) -> u32 {
    let key = mix(p.stream ^ mix(p.seed_lo ^ mix(p.seed_hi)));
    return mix(index ^ mix(key));
}

fn keeps(index: u32) -> bool {
    let u = f32(draw(index) >> 8u) * (1.0 / 16777216.0);
    return u >= p.p;
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
