//! Activations kept as bf16, two to a 32-bit word (the first in the low half): gradient checkpoints at
//! half the memory. Rounded to nearest, ties to even, as shaders/bf16.wgsl rounds, so both executors
//! keep the same values.

use crate::exec::gpu::Recorder;
use crate::gpu::GpuBuffer;

/// The bf16 bits of `v`: nearest, ties to even; any NaN becomes the quiet NaN.
fn bf16_bits(v: f32) -> u32 {
    let bits = v.to_bits();
    if bits & 0x7fff_ffff > 0x7f80_0000 {
        return 0x7fc0;
    }
    (bits + 0x7fff + ((bits >> 16) & 1)) >> 16
}

/// `x` as bf16 pairs: `x.len().div_ceil(2)` words.
pub fn pack(x: &[f32]) -> Vec<u32> {
    x.chunks(2)
        .map(|pair| bf16_bits(pair[0]) | pair.get(1).map_or(0, |v| bf16_bits(*v) << 16))
        .collect()
}

/// The `out.len()` values of `words` as f32.
pub fn unpack(words: &[u32], out: &mut [f32]) {
    for (i, v) in out.iter_mut().enumerate() {
        let half = (words[i / 2] >> (16 * (i & 1))) & 0xffff;
        *v = f32::from_bits(half << 16);
    }
}

/// The GPU lowering of `pack`: the `n` floats of `x` into `words`.
pub(crate) fn record_pack(r: &mut Recorder, x: &GpuBuffer, words: &GpuBuffer, n: usize) {
    let groups = crate::gpu::groups_1d(n.div_ceil(2), 256);
    let p = super::Dims4::n(n);
    r.dispatch("pack_bf16", &p, &[(1, x), (3, words)], groups);
}

/// The GPU lowering of `unpack`.
pub(crate) fn record_unpack(r: &mut Recorder, words: &GpuBuffer, out: &GpuBuffer) {
    let n = out.len;
    let p = super::Dims4::n(n);
    r.dispatch(
        "unpack_bf16",
        &p,
        &[(2, words), (4, out)],
        crate::gpu::groups_1d(n, 256),
    );
}
