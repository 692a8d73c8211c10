//! Op definitions shared by every executor: for each op, its parameter struct (`#[repr(C)]`, `Pod`, the
//! same layout as the WGSL uniform struct the GPU kernel will read), its shape rule, its backward rule,
//! and the CPU kernel. GPU kernels live in shaders/ and must agree with these CPU kernels.

pub mod adamw;
pub mod attention;
pub mod bf16_gemm;
pub mod cross_entropy;
pub mod dropout;
pub mod fastmath;
pub mod linear;
pub mod matmul;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;

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
    /// Operands rounded to bf16, products accumulated in f32 (AVX512-BF16 CPUs).
    Bf16,
}

impl Precision {
    /// The fastest precision this machine runs.
    pub fn fastest() -> Self {
        if bf16_gemm::available() {
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
