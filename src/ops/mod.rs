//! Op definitions shared by every executor: for each op, its parameter struct (`#[repr(C)]`, `Pod`, the
//! same layout as the WGSL uniform struct the GPU kernel will read), its shape rule, its backward rule,
//! and the CPU kernel. GPU kernels live in shaders/ and must agree with these CPU kernels.

pub mod adamw;
pub mod attention;
pub mod bf16_gemm;
pub mod cross_entropy;
pub mod dropout;
pub mod linear;
pub mod matmul;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;

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
