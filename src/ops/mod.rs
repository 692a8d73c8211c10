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
