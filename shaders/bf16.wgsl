// f32 <-> bf16 for activations kept at half the memory (gradient checkpoints): two bf16 values per
// word, the first in the low half; rounded to nearest, ties to even; a NaN stays a (quiet) NaN.
// `bf16_bits` in src/ops/bf16.rs is the same rounding on the CPU.

struct Bf16Params {
    n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Bf16Params;
@group(0) @binding(1) var<storage, read> floats_in: array<f32>;
@group(0) @binding(2) var<storage, read> words_in: array<u32>;
@group(0) @binding(3) var<storage, read_write> words_out: array<u32>;
@group(0) @binding(4) var<storage, read_write> floats_out: array<f32>;

fn bf16_bits(v: f32) -> u32 {
    let bits = bitcast<u32>(v);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
        return 0x7fc0u;
    }
    return (bits + 0x7fffu + ((bits >> 16u) & 1u)) >> 16u;
}

// words_out[i] = bf16(floats_in[2i]) | bf16(floats_in[2i + 1]) << 16, for the n floats.
@compute @workgroup_size(256)
fn pack_bf16(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = flat_index(id);
    if (2u * i < p.n) {
        var word = bf16_bits(floats_in[2u * i]);
        if (2u * i + 1u < p.n) {
            word = word | (bf16_bits(floats_in[2u * i + 1u]) << 16u);
        }
        words_out[i] = word;
    }
}

// floats_out[i] = the bf16 value i of words_in, for the n floats.
@compute @workgroup_size(256)
fn unpack_bf16(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = flat_index(id);
    if (i < p.n) {
        let word = words_in[i / 2u];
        let half = select(word & 0xffffu, word >> 16u, (i & 1u) == 1u);
        floats_out[i] = bitcast<f32>(half << 16u);
    }
}
