//! Dense f32 matrix products through the `gemm` crate, with explicit strides so that a product can read
//! or write a column block of a larger row-major matrix without copying.

use crate::exec::gpu::Recorder;
use crate::gpu::GpuBuffer;
use crate::ops::dropout::{DropoutParams, DropoutSide};

/// A row-major-or-transposed view: element (i, j) lives at `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> View<'a> {
    /// A row-major rows x cols matrix.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        View {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major `rows x cols` matrix, seen as cols x rows.
    pub fn transposed(data: &'a [f32], rows: usize, cols: usize) -> Self {
        View {
            data,
            rows: cols,
            cols: rows,
            row_stride: 1,
            col_stride: cols,
        }
    }

    /// This view transposed.
    pub fn t(self) -> Self {
        View {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Columns `start..start + count` of a row-major matrix whose rows are `ld` long.
    pub fn columns(data: &'a [f32], rows: usize, ld: usize, start: usize, count: usize) -> Self {
        View {
            data: &data[start..],
            rows,
            cols: count,
            row_stride: ld,
            col_stride: 1,
        }
    }

    /// Rows `start..start + count` of this view.
    pub fn rows_from(&self, start: usize, count: usize) -> Self {
        View {
            data: &self.data[(start * self.row_stride).min(self.data.len())..],
            rows: count,
            ..*self
        }
    }

    /// Columns `start..start + count` of this view.
    pub fn cols_from(&self, start: usize, count: usize) -> Self {
        View {
            data: &self.data[(start * self.col_stride).min(self.data.len())..],
            cols: count,
            ..*self
        }
    }

    fn assert_in_bounds(&self) {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride;
            assert!(
                last < self.data.len(),
                "matrix view reaches past its buffer"
            );
        }
    }
}

thread_local! {
    static IN_PARALLEL_TASK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, one of several tasks that run in parallel, with its products on this thread alone: the
/// other threads already have tasks, and splitting each product again only adds scheduling. (Whether
/// the thread is one of rayon's workers says nothing: a whole training step runs on a worker.)
pub fn in_parallel_task<R>(f: impl FnOnce() -> R) -> R {
    let outer = IN_PARALLEL_TASK.replace(true);
    let result = f();
    IN_PARALLEL_TASK.set(outer);
    result
}

/// C = (accumulate ? C : 0) + alpha · A·B, with C a rows x cols block of a row-major buffer whose rows
/// are `ldc` long, starting at column `c_col`.
pub fn matmul_into(
    a: View,
    b: View,
    alpha: f32,
    c: &mut [f32],
    ldc: usize,
    c_col: usize,
    accumulate: bool,
) {
    assert_eq!(a.cols, b.rows, "matmul: inner dimensions differ");
    let (m, n, k) = (a.rows, b.cols, a.cols);
    a.assert_in_bounds();
    b.assert_in_bounds();
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        c_col + n <= ldc && (m - 1) * ldc + c_col + n <= c.len(),
        "matmul: C too small"
    );
    if k == 0 {
        if !accumulate {
            for row in c.chunks_mut(ldc).take(m) {
                row[c_col..c_col + n].fill(0.0);
            }
        }
        return;
    }
    let parallelism = if m * n * k >= 1 << 18 && !IN_PARALLEL_TASK.get() {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above check that every element gemm reads from A and B, and writes in C, lies
    // inside the slices passed in; C is borrowed mutably so nothing else aliases it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr().add(c_col),
            1,
            ldc as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Row-major C[m, n] = A·B, a fresh buffer.
pub fn matmul(a: View, b: View) -> Vec<f32> {
    let mut c = vec![0f32; a.rows * b.cols];
    matmul_into(a, b, 1.0, &mut c, b.cols, 0, false);
    c
}

/// The uniform of shaders/matmul.wgsl: C (+)= alpha · A·B over strided views, as `matmul_into` takes them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct MatmulParams {
    pub m: u32,
    pub n: u32,
    pub k: u32,
    pub a_row_stride: u32,
    pub a_col_stride: u32,
    pub b_row_stride: u32,
    pub b_col_stride: u32,
    pub ldc: u32,
    pub c_col: u32,
    pub accumulate: u32,
    pub alpha: f32,
    /// LoRA dropout on one side (`Op::DropoutMatmul`): 0 none, 1 A, 2 B, 3 the product.
    pub mask_side: u32,
    pub mask_key: u32,
    pub mask_p: f32,
    pub mask_scale: f32,
    pub _pad: u32,
}

/// A strided view of a GPU matrix, as `View` is of a CPU one.
#[derive(Clone, Copy)]
pub(crate) struct GpuView<'a> {
    pub buf: &'a GpuBuffer,
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> GpuView<'a> {
    /// A [rows, cols] matrix stored row-major, or (`transposed`) stored as its [cols, rows] transpose.
    pub fn new(buf: &'a GpuBuffer, rows: usize, cols: usize, transposed: bool) -> Self {
        let (row_stride, col_stride) = if transposed { (1, rows) } else { (cols, 1) };
        GpuView {
            buf,
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }
}

/// The GPU lowering of `matmul_into` with c_col 0 (shaders/matmul.wgsl: 16 x 16 outputs per
/// workgroup), and with `mask` of `ops::dropout::matmul_into` (LoRA dropout on one side, the masked
/// matrix row-major, C [m, n]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn record_matmul(
    r: &mut Recorder,
    a: GpuView,
    b: GpuView,
    alpha: f32,
    c: &GpuBuffer,
    ldc: usize,
    accumulate: bool,
    mask: Option<(&DropoutParams, DropoutSide)>,
) {
    assert_eq!(a.cols, b.rows, "matmul: inner dimensions differ");
    // What `ops::dropout::matmul_into` asserts on the CPU: the shader indexes the mask by offsets
    // in a row-major masked matrix, and adds the product's masked values into C.
    if let Some((_, side)) = mask {
        let (cols, col_stride, row_stride) = match side {
            DropoutSide::A => (a.cols, a.col_stride, a.row_stride),
            DropoutSide::B => (b.cols, b.col_stride, b.row_stride),
            DropoutSide::Product => (b.cols, 1, ldc),
        };
        assert!(
            col_stride == 1 && row_stride == cols,
            "dropout matmul: the masked matrix must be row-major"
        );
        assert!(
            side != DropoutSide::Product || accumulate,
            "dropout matmul: the product's mask accumulates into C"
        );
    }
    let p = MatmulParams {
        m: a.rows as u32,
        n: b.cols as u32,
        k: a.cols as u32,
        a_row_stride: a.row_stride as u32,
        a_col_stride: a.col_stride as u32,
        b_row_stride: b.row_stride as u32,
        b_col_stride: b.col_stride as u32,
        ldc: ldc as u32,
        c_col: 0,
        accumulate: accumulate as u32,
        alpha,
        mask_side: 0,
        mask_key: 0,
        mask_p: 0.0,
        mask_scale: 0.0,
        _pad: 0,
    };
    let p = match mask {
        None => p,
        Some((params, side)) => MatmulParams {
            mask_side: match side {
                DropoutSide::A => 1,
                DropoutSide::B => 2,
                DropoutSide::Product => 3,
            },
            mask_key: params.mask_key(),
            mask_p: params.p,
            mask_scale: params.keep_scale,
            ..p
        },
    };
    let groups = [b.cols.div_ceil(16) as u32, a.rows.div_ceil(16) as u32, 1];
    r.dispatch("matmul", &p, &[(1, a.buf), (2, b.buf), (3, c)], groups);
}
