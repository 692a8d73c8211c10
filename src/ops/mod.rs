//! Op definitions shared by every executor: for each op, its parameter struct (`#[repr(C)]`, `Pod`, the
//! same layout as the WGSL uniform struct the GPU kernel will read), its shape rule, its backward rule,
//! and the CPU kernel. GPU kernels live in shaders/ and must agree with these CPU kernels.

pub mod adamw;
pub mod attention;
pub mod cross_entropy;
pub mod linear;
pub mod matmul;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;
