//! Op definitions shared by every executor: for each op, its parameter struct (`#[repr(C)]`, `Pod`, the
//! same layout as the WGSL uniform struct the GPU kernel will read), its shape rule, its backward rule,
//! and the CPU kernel. GPU kernels live in shaders/ and must agree with these CPU kernels.

pub mod adamw;
pub mod amx;
pub mod attention;
pub mod bf16;
pub mod bf16_gemm;
pub mod conv;
pub mod cross_entropy;
pub mod dora;
pub mod dropout;
pub mod fastmath;
pub mod glu;
pub mod int16_gemm;
pub mod isa;
pub mod linear;
pub mod matmul;
pub mod modulate;
pub mod moe;
pub mod packed;
pub mod packed_gemm;
pub mod rmsnorm;
pub mod rope;
pub mod token_rows;

use crate::exec::gpu::Recorder;
use crate::gpu::weights::GpuDense;
use crate::gpu::{GpuBuffer, groups_1d};
use rayon::prelude::*;

/// Below this many floats, one thread zeroes or adds faster than a split of the work costs.
const PARALLEL_MIN: usize = 1 << 16;

/// A vector of `n` zeros (`T::default()`), written by every thread when large. A step allocates hundreds of megabytes of
/// activations and gradients; `vec![0.0; n]` zeroed them on one thread while the others waited (8% of
/// a 0.5B model's step, measured).
pub fn zeros<T: Copy + Default + Send + Sync>(n: usize) -> Vec<T> {
    if n < PARALLEL_MIN {
        return vec![T::default(); n];
    }
    let mut v = Vec::with_capacity(n);
    v.par_extend(rayon::iter::repeat_n(T::default(), n));
    v
}

/// a += b, element by element, on every thread when large.
pub fn add_assign(a: &mut [f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "add_assign: lengths differ");
    let add = |(a, b): (&mut [f32], &[f32])| a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
    if a.len() < PARALLEL_MIN {
        add((a, b));
    } else {
        a.par_chunks_mut(PARALLEL_MIN / 4)
            .zip(b.par_chunks(PARALLEL_MIN / 4))
            .for_each(add);
    }
}

/// a + b as a new vector.
pub fn sum(a: &[f32], b: &[f32]) -> Vec<f32> {
    assert_eq!(a.len(), b.len(), "sum: lengths differ");
    if a.len() < PARALLEL_MIN {
        return a.iter().zip(b).map(|(a, b)| a + b).collect();
    }
    a.par_iter()
        .zip(b)
        .with_min_len(PARALLEL_MIN / 4)
        .map(|(a, b)| a + b)
        .collect()
}

/// Arithmetic of the frozen-weight products (the decoder linears and the output projection).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// float32 everywhere: what parity tests use.
    #[default]
    F32,
    /// Operands rounded to bf16, products accumulated in f32 (AVX512-BF16 and ARM BF16 CPUs; on AMX's
    /// tiles where the CPU has them).
    Bf16,
    /// The frozen 4-bit products and the output projection's in 16-bit integers (int16_gemm.rs; by
    /// default on x86 CPUs with AVX2 whose cores multiply 16-bit pairs on two pipes, unless they have
    /// BF16 and are not Intel's with VNNI, or have AMX: `int16_gemm::preferred`); everything else in
    /// f32.
    Int16,
}

impl Precision {
    /// The fastest precision this machine runs.
    pub fn fastest() -> Self {
        if int16_gemm::preferred(isa::active()) {
            Precision::Int16
        } else if bf16_gemm::available() {
            Precision::Bf16
        } else {
            Precision::F32
        }
    }
}

/// The uniform of shaders/embed.wgsl: rows `row_start..row_start + row_count` of the table live in one
/// block (a binding), stored in format `fmt`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct EmbedParams {
    pub tokens: u32,
    pub dim: u32,
    pub fmt: u32,
    pub row_start: u32,
    pub row_count: u32,
    pub _pad: [u32; 3],
}

/// The uniform of the kernels that need only sizes (shaders/elementwise.wgsl, shaders/rows.wgsl).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Dims4 {
    pub a: u32,
    pub b: u32,
    pub c: u32,
    pub d: u32,
}

impl Dims4 {
    /// Only a length (the elementwise kernels).
    pub fn n(n: usize) -> Self {
        Dims4 {
            a: n as u32,
            b: 0,
            c: 0,
            d: 0,
        }
    }
}

/// The GPU lowering of the embedding (shaders/embed.wgsl): rows of `table` for `ids`, block by block of
/// a table split across storage bindings.
pub(crate) fn record_embed(
    r: &mut Recorder,
    table: &GpuDense,
    ids: &GpuBuffer,
    x: &GpuBuffer,
    dim: usize,
) {
    let t = ids.len;
    for (start, rows, block) in &table.blocks {
        let p = EmbedParams {
            tokens: t as u32,
            dim: dim as u32,
            fmt: table.fmt,
            row_start: *start as u32,
            row_count: *rows as u32,
            _pad: [0; 3],
        };
        let groups = [dim.div_ceil(64) as u32, t as u32, 1];
        r.dispatch("embed", &p, &[(1, block), (2, ids), (3, x)], groups);
    }
}

/// The GPU lowering of gathering rows `index[i]` of `src` (`gather_rows`) or scattering row i to row
/// `index[i]` of `dst` (`scatter_rows`; shaders/rows.wgsl).
pub(crate) fn record_rows(
    r: &mut Recorder,
    entry: &'static str,
    src: &GpuBuffer,
    index: &GpuBuffer,
    dst: &GpuBuffer,
    dim: usize,
) {
    let rows = index.len;
    let p = Dims4 {
        a: rows as u32,
        b: dim as u32,
        c: 0,
        d: 0,
    };
    // Rows past 65,535 (a dispatch's limit on y) go on over z, as the shader reads them.
    let groups = [
        dim.div_ceil(64) as u32,
        rows.clamp(1, 65535) as u32,
        rows.div_ceil(65535).max(1) as u32,
    ];
    r.dispatch(entry, &p, &[(1, src), (2, index), (3, dst)], groups);
}

/// The GPU lowering of `sum` (out = a + b) or, without `b`, of `add_assign` (out += a).
pub(crate) fn record_add(r: &mut Recorder, a: &GpuBuffer, b: Option<&GpuBuffer>, out: &GpuBuffer) {
    let n = out.len;
    let groups = groups_1d(n, 256);
    match b {
        Some(b) => r.dispatch("add", &Dims4::n(n), &[(1, a), (2, b), (3, out)], groups),
        None => r.dispatch("add_assign", &Dims4::n(n), &[(1, a), (3, out)], groups),
    }
}
