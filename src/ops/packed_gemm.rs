//! Products of many tokens with frozen rows (training, and prompts of more than
//! `packed::STREAM_MAX_TOKENS`): y = x·Wᵀ and dx = a·W in f32. Each task decodes one block of W's rows
//! to f32, sized to stay in a core's L2 cache, and runs every token through it with a register-blocked
//! FMA kernel. A product is one parallel region (per `TOKEN_CHUNK` tokens) whose tasks are whole blocks
//! (of rows for x·Wᵀ, of dx's columns for a·W), so a thread that the OS descheduled leaves its blocks to
//! the others instead of holding up a barrier. This replaced unpacking 256-row f32 tiles for the `gemm` crate, which copied each tile once
//! more into its own layout and synchronised the threads twice per tile (BENCHMARKS.md, session 8).
//!
//! The kernels are written once, generic over a vector type (`Lanes`): AVX2 (8 lanes), NEON (4) and
//! portable Rust (8 lanes as an array, vectorised as far as the compilation target allows). Paths
//! differ only in the order of their sums.

use crate::model::{DenseData, DenseTensor};
use crate::ops::isa::CpuPath;
use crate::ops::packed::{Rows, check_xwt, decode_rows_part};
use rayon::prelude::*;

/// Tokens per parallel region: bounds each task's results buffer (TOKEN_CHUNK x its rows or columns).
const TOKEN_CHUNK: usize = 256;
/// Decoded rows per task, in bytes: the block stays in L2 (512 KiB on current x86 and ARM cores,
/// beside the tokens) while every token passes through it.
const BLOCK_BYTES: usize = 192 * 1024;
/// At most this many rows per input-gradient block: 16 KiB of each 16-column strip.
const AW_BLOCK_ROWS: usize = 256;
/// Columns per pass of the forward kernel: a pass's 4 token rows and 3 weight rows (7 x 512 floats,
/// 14 KiB) stay in L1 (32 KiB or more).
const K_CHUNK: usize = 512;
/// The forward kernel's register block: 4 tokens x 3 rows, 12 vector accumulators (of 16 on AVX2).
const FWD_TOKENS: usize = 4;
const FWD_ROWS: usize = 3;
/// The input gradient's register block: 6 tokens x 2 vectors of columns, 12 accumulators.
const BWD_TOKENS: usize = 6;
const BWD_VECTORS: usize = 2;

/// The vector operations the kernels need.
trait Lanes: Copy {
    const N: usize;
    /// # Safety
    /// The CPU runs the vector type's instructions (the callers' entry points check the path).
    unsafe fn zero() -> Self;
    /// # Safety
    /// As `zero`, and `p` points at N readable floats.
    unsafe fn load(p: *const f32) -> Self;
    /// # Safety
    /// As `zero`, and `p` points at N writable floats.
    unsafe fn store(self, p: *mut f32);
    /// # Safety
    /// As `zero`.
    unsafe fn splat(v: f32) -> Self;
    /// self + a·b (fused where the vector path has FMA).
    /// # Safety
    /// As `zero`.
    unsafe fn mul_add(self, a: Self, b: Self) -> Self;
    /// # Safety
    /// As `zero`.
    unsafe fn sum(self) -> f32;
}

/// Eight lanes in plain Rust, for CPUs without a vector path (and as the reference the others match).
#[derive(Clone, Copy)]
struct Portable([f32; 8]);

impl Lanes for Portable {
    const N: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> Self {
        Portable([0.0; 8])
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller guarantees 8 readable floats at p.
        Portable(unsafe { std::ptr::read_unaligned(p as *const [f32; 8]) })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller guarantees 8 writable floats at p.
        unsafe { std::ptr::write_unaligned(p as *mut [f32; 8], self.0) }
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        Portable([v; 8])
    }
    /// Unfused: without FMA hardware `f32::mul_add` is a slow library call.
    #[inline(always)]
    unsafe fn mul_add(self, a: Self, b: Self) -> Self {
        Portable(std::array::from_fn(|i| self.0[i] + a.0[i] * b.0[i]))
    }
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        let v = self.0;
        ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]))
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::Lanes;
    use std::arch::x86_64::*;

    // Every method is inlined into the `#[target_feature(enable = "avx2,fma")]` entry points below,
    // which only run where the path check found AVX2+FMA.
    impl Lanes for __m256 {
        const N: usize = 8;
        #[inline(always)]
        unsafe fn zero() -> Self {
            unsafe { _mm256_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { _mm256_storeu_ps(p, self) }
        }
        #[inline(always)]
        unsafe fn splat(v: f32) -> Self {
            unsafe { _mm256_set1_ps(v) }
        }
        #[inline(always)]
        unsafe fn mul_add(self, a: Self, b: Self) -> Self {
            unsafe { _mm256_fmadd_ps(a, b, self) }
        }
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            unsafe {
                let four = _mm_add_ps(_mm256_castps256_ps128(self), _mm256_extractf128_ps(self, 1));
                let two = _mm_add_ps(four, _mm_movehl_ps(four, four));
                _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)))
            }
        }
    }

    /// # Safety
    /// The CPU supports AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn xwt_block(
        task: &super::XwtBlock,
        out: &mut [f32],
        partial: &mut Vec<f32>,
    ) {
        unsafe { super::xwt_block::<__m256>(task, out, partial) }
    }

    /// # Safety
    /// The CPU supports AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn aw_block(task: &super::AwBlock, dx: &mut [f32]) {
        unsafe { super::aw_block::<__m256>(task, dx) }
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use super::Lanes;
    use std::arch::aarch64::*;

    // NEON is part of every aarch64 target, so these run on any aarch64 CPU.
    impl Lanes for float32x4_t {
        const N: usize = 4;
        #[inline(always)]
        unsafe fn zero() -> Self {
            unsafe { vdupq_n_f32(0.0) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            unsafe { vld1q_f32(p) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { vst1q_f32(p, self) }
        }
        #[inline(always)]
        unsafe fn splat(v: f32) -> Self {
            unsafe { vdupq_n_f32(v) }
        }
        #[inline(always)]
        unsafe fn mul_add(self, a: Self, b: Self) -> Self {
            unsafe { vfmaq_f32(self, a, b) }
        }
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            unsafe { vaddvq_f32(self) }
        }
    }

    pub(super) fn xwt_block(task: &super::XwtBlock, out: &mut [f32], partial: &mut Vec<f32>) {
        // SAFETY: NEON is part of every aarch64 target.
        unsafe { super::xwt_block::<float32x4_t>(task, out, partial) }
    }

    pub(super) fn aw_block(task: &super::AwBlock, dx: &mut [f32]) {
        // SAFETY: NEON is part of every aarch64 target.
        unsafe { super::aw_block::<float32x4_t>(task, dx) }
    }
}

/// A block of decoded rows (`rows` x `cols`, row-major) and the tokens `x` (tokens x cols) of one
/// forward task: out[t * rows + j] = x[t]·block[j].
struct XwtBlock<'a> {
    x: &'a [f32],
    block: &'a [f32],
    rows: usize,
    cols: usize,
}

/// One input-gradient task: dx[t] += Σ_j a[t * a_stride + j] · block[j] over the block's `rows`
/// (`a` starts at the block's first column), each `cols` long and `block_stride` apart.
struct AwBlock<'a> {
    a: &'a [f32],
    a_stride: usize,
    block: &'a [f32],
    block_stride: usize,
    rows: usize,
    cols: usize,
}

/// One pass over columns `0..len` (whole vectors) for TM tokens (rows of `x`) by TN weight rows (rows
/// of `w`), both `stride` apart; the TM x TN running sums live in `partial` as vectors between passes.
///
/// # Safety
/// The CPU runs S; x, w reach TM and TN rows of `len` floats; partial holds TM·TN·S::N floats.
#[inline(always)]
unsafe fn dots_pass<S: Lanes, const TM: usize, const TN: usize>(
    x: *const f32,
    w: *const f32,
    stride: usize,
    len: usize,
    partial: *mut f32,
    first: bool,
) {
    unsafe {
        let mut acc = [[S::zero(); TN]; TM];
        if !first {
            for (i, row) in acc.iter_mut().enumerate() {
                for (j, a) in row.iter_mut().enumerate() {
                    *a = S::load(partial.add((i * TN + j) * S::N));
                }
            }
        }
        let mut k = 0;
        while k < len {
            let wv: [S; TN] = std::array::from_fn(|j| S::load(w.add(j * stride + k)));
            for (i, row) in acc.iter_mut().enumerate() {
                let xv = S::load(x.add(i * stride + k));
                for (a, wj) in row.iter_mut().zip(&wv) {
                    *a = a.mul_add(xv, *wj);
                }
            }
            k += S::N;
        }
        for (i, row) in acc.iter().enumerate() {
            for (j, a) in row.iter().enumerate() {
                a.store(partial.add((i * TN + j) * S::N));
            }
        }
    }
}

/// Calls `$kernel::<S, TM, TN>($args)` for the (TM, TN) at hand, each at most the block's size.
macro_rules! by_block_shape {
    ($kernel:ident, $s:ty, $tm:expr, $tn:expr, [$($m:literal),*], [$($n:literal),*], $args:tt) => {
        by_block_shape!(@rows $kernel, $s, $tm, $tn, [$($m),*], [$($n),*], $args)
    };
    (@rows $kernel:ident, $s:ty, $tm:expr, $tn:expr, [$($m:literal),*], $ns:tt, $args:tt) => {
        match $tm {
            $($m => by_block_shape!(@cols $kernel, $s, $m, $tn, $ns, $args),)*
            _ => unreachable!("register block of {} tokens", $tm),
        }
    };
    (@cols $kernel:ident, $s:ty, $m:literal, $tn:expr, [$($n:literal),*], $args:tt) => {
        match $tn {
            $($n => $kernel::<$s, $m, $n> $args,)*
            _ => unreachable!("register block of {} columns", $tn),
        }
    };
}

/// The forward task: out (tokens x rows) = x·blockᵀ, in passes of `K_CHUNK` columns per 4 tokens.
///
/// # Safety
/// The CPU runs S.
#[inline(always)]
unsafe fn xwt_block<S: Lanes>(task: &XwtBlock, out: &mut [f32], partial: &mut Vec<f32>) {
    let XwtBlock {
        x,
        block,
        rows,
        cols,
    } = *task;
    let tokens = x.len() / cols;
    assert!(x.len() == tokens * cols && block.len() == rows * cols && out.len() == tokens * rows);
    let vector_end = cols - cols % S::N;
    let triples = rows.div_ceil(FWD_ROWS);
    let per_triple = FWD_TOKENS * FWD_ROWS * S::N;
    partial.resize(triples * per_triple, 0.0);
    for t0 in (0..tokens).step_by(FWD_TOKENS) {
        let tm = FWD_TOKENS.min(tokens - t0);
        for k0 in (0..vector_end).step_by(K_CHUNK) {
            let len = K_CHUNK.min(vector_end - k0);
            for (triple, r0) in (0..rows).step_by(FWD_ROWS).enumerate() {
                let tn = FWD_ROWS.min(rows - r0);
                // SAFETY: tokens t0..t0 + tm and rows r0..r0 + tn exist (asserted lengths), columns
                // k0..k0 + len lie before vector_end <= cols; the triple's partial sums are in bounds.
                unsafe {
                    let xp = x.as_ptr().add(t0 * cols + k0);
                    let wp = block.as_ptr().add(r0 * cols + k0);
                    let pp = partial.as_mut_ptr().add(triple * per_triple);
                    by_block_shape!(
                        dots_pass,
                        S,
                        tm,
                        tn,
                        [1, 2, 3, 4],
                        [1, 2, 3],
                        (xp, wp, cols, len, pp, k0 == 0)
                    );
                }
            }
        }
        for (triple, r0) in (0..rows).step_by(FWD_ROWS).enumerate() {
            let tn = FWD_ROWS.min(rows - r0);
            for i in 0..tm {
                let xt = &x[(t0 + i) * cols..(t0 + i + 1) * cols];
                for j in 0..tn {
                    let wj = &block[(r0 + j) * cols..(r0 + j + 1) * cols];
                    let vectors = if vector_end == 0 {
                        0.0
                    } else {
                        let at = triple * per_triple + (i * tn + j) * S::N;
                        // SAFETY: at + N lies inside the triple's partial sums.
                        unsafe { S::load(partial.as_ptr().add(at)).sum() }
                    };
                    let tail: f32 = (vector_end..cols).map(|k| xt[k] * wj[k]).sum();
                    out[(t0 + i) * rows + r0 + j] = vectors + tail;
                }
            }
        }
    }
}

/// dx[i] (rows `dx_stride` apart) += Σ_{n < rows} a[i * a_stride + n] · w[n * w_stride ..] for TM
/// tokens over TN vectors of columns.
///
/// # Safety
/// The CPU runs S; a, w and dx reach TM, `rows` and TM rows of TN·S::N floats.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn axpy_pass<S: Lanes, const TM: usize, const TN: usize>(
    a: *const f32,
    a_stride: usize,
    w: *const f32,
    w_stride: usize,
    rows: usize,
    dx: *mut f32,
    dx_stride: usize,
) {
    unsafe {
        let mut acc: [[S; TN]; TM] = std::array::from_fn(|i| {
            std::array::from_fn(|j| S::load(dx.add(i * dx_stride + j * S::N)))
        });
        for n in 0..rows {
            let wv: [S; TN] = std::array::from_fn(|j| S::load(w.add(n * w_stride + j * S::N)));
            for (i, row) in acc.iter_mut().enumerate() {
                let av = S::splat(*a.add(i * a_stride + n));
                for (acc, wj) in row.iter_mut().zip(&wv) {
                    *acc = acc.mul_add(av, *wj);
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                v.store(dx.add(i * dx_stride + j * S::N));
            }
        }
    }
}

/// The input-gradient task: dx (tokens x cols) += a·block, 6 tokens by 2 vectors of columns at a time.
///
/// # Safety
/// The CPU runs S.
#[inline(always)]
unsafe fn aw_block<S: Lanes>(task: &AwBlock, dx: &mut [f32]) {
    let AwBlock {
        a,
        a_stride,
        block,
        block_stride,
        rows,
        cols,
    } = *task;
    let tokens = dx.len() / cols;
    assert!(
        dx.len() == tokens * cols && rows > 0 && block.len() >= (rows - 1) * block_stride + cols
    );
    assert!(tokens == 0 || a.len() >= (tokens - 1) * a_stride + rows);
    let wide = BWD_VECTORS * S::N;
    let vector_end = cols - cols % S::N;
    // Column strips outermost: a strip of the block (rows x 16 floats) stays in L1 while every token
    // passes; each dx tile is loaded and stored once per block.
    let mut c = 0;
    while c < vector_end {
        let tn = if c + wide <= vector_end {
            BWD_VECTORS
        } else {
            1
        };
        for t0 in (0..tokens).step_by(BWD_TOKENS) {
            let tm = BWD_TOKENS.min(tokens - t0);
            // SAFETY: tokens t0..t0 + tm exist in a and dx (asserted), columns c..c + tn·N lie before
            // vector_end <= cols, and every block row n < rows is read at those columns.
            unsafe {
                let ap = a.as_ptr().add(t0 * a_stride);
                let wp = block.as_ptr().add(c);
                let dp = dx.as_mut_ptr().add(t0 * cols + c);
                by_block_shape!(
                    axpy_pass,
                    S,
                    tm,
                    tn,
                    [1, 2, 3, 4, 5, 6],
                    [1, 2],
                    (ap, a_stride, wp, block_stride, rows, dp, cols)
                );
            }
        }
        c += tn * S::N;
    }
    if vector_end < cols {
        for t in 0..tokens {
            let at = &a[t * a_stride..t * a_stride + rows];
            let dxt = &mut dx[t * cols..(t + 1) * cols];
            for (n, &an) in at.iter().enumerate() {
                let wn = &block[n * block_stride..n * block_stride + cols];
                for k in vector_end..cols {
                    dxt[k] += an * wn[k];
                }
            }
        }
    }
}

fn run_xwt_block(path: CpuPath, task: &XwtBlock, out: &mut [f32], partial: &mut Vec<f32>) {
    #[cfg(target_arch = "x86_64")]
    if path.includes(CpuPath::Avx2) {
        // SAFETY: the public entry points checked that the CPU supports `path`, which includes AVX2+FMA.
        unsafe { avx2::xwt_block(task, out, partial) };
        return;
    }
    #[cfg(target_arch = "aarch64")]
    if path.includes(CpuPath::Neon) {
        neon::xwt_block(task, out, partial);
        return;
    }
    let _ = path;
    // SAFETY: Portable is plain Rust.
    unsafe { xwt_block::<Portable>(task, out, partial) }
}

fn run_aw_block(path: CpuPath, task: &AwBlock, dx: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if path.includes(CpuPath::Avx2) {
        // SAFETY: as in run_xwt_block.
        unsafe { avx2::aw_block(task, dx) };
        return;
    }
    #[cfg(target_arch = "aarch64")]
    if path.includes(CpuPath::Neon) {
        neon::aw_block(task, dx);
        return;
    }
    let _ = path;
    // SAFETY: Portable is plain Rust.
    unsafe { aw_block::<Portable>(task, dx) }
}

/// Rows per task: as many as fit `BLOCK_BYTES` (a multiple of the forward kernel's 3), but few enough
/// that every thread gets about four blocks of a small weight.
fn block_rows(n: usize, cols: usize) -> usize {
    let fit = (BLOCK_BYTES / (4 * cols.max(1))).max(FWD_ROWS);
    let share = n.div_ceil(4 * rayon::current_num_threads()).max(1);
    let rows = fit.min(share);
    rows.div_ceil(FWD_ROWS) * FWD_ROWS
}

/// The rows themselves when they are stored as f32: the kernels read them in place.
fn f32_rows<'w>(w: Rows<'w>) -> Option<&'w [f32]> {
    match w {
        Rows::Dense(DenseTensor {
            data: DenseData::F32(v),
            ..
        }) => Some(v),
        _ => None,
    }
}

/// Rows start..start + count of `w`, columns first_col..first_col + width, as f32 into `out`.
fn decode_rows(
    path: CpuPath,
    w: Rows,
    start: usize,
    count: usize,
    first_col: usize,
    width: usize,
    out: &mut Vec<f32>,
) {
    out.resize(count * width, 0.0);
    match w {
        Rows::Quant(q) => decode_rows_part(path, q, start, first_col, width, out),
        Rows::Dense(d) => {
            for (i, row) in out.chunks_exact_mut(width).enumerate() {
                d.row_part_f32(start + i, first_col, row)
            }
        }
    }
}

/// y[t, y_col0 + i] (+ when `accumulate`)= x[t]·W[start + i] for i < n, any number of tokens; y rows are
/// `y_stride` long.
#[allow(clippy::too_many_arguments)]
pub fn xwt(
    path: CpuPath,
    x: &[f32],
    w: Rows,
    start: usize,
    n: usize,
    y: &mut [f32],
    y_stride: usize,
    y_col0: usize,
    accumulate: bool,
) {
    let tokens = check_xwt("xwt", path, x, w, start, n, y, y_stride, y_col0);
    let cols = w.shape().1;
    if n == 0 || tokens == 0 {
        return;
    }
    let per_block = block_rows(n, cols);
    let blocks = n.div_ceil(per_block);
    let in_place = f32_rows(w);
    let y_columns = ColumnRanges::new(y, y_stride);
    for t0 in (0..tokens).step_by(TOKEN_CHUNK) {
        let tc = TOKEN_CHUNK.min(tokens - t0);
        let x_chunk = &x[t0 * cols..(t0 + tc) * cols];
        (0..blocks).into_par_iter().for_each_init(
            || (Vec::new(), Vec::new(), Vec::new()),
            |(decoded, partial, out), b| {
                let first = b * per_block;
                let count = per_block.min(n - first);
                let block = match in_place {
                    Some(all) => &all[(start + first) * cols..(start + first + count) * cols],
                    None => {
                        decode_rows(path, w, start + first, count, 0, cols, decoded);
                        &decoded[..]
                    }
                };
                let task = XwtBlock {
                    x: x_chunk,
                    block,
                    rows: count,
                    cols,
                };
                out.resize(tc * count, 0.0);
                run_xwt_block(path, &task, out, partial);
                for (t, results) in out.chunks_exact(count).enumerate() {
                    // SAFETY: block b alone writes y's columns y_col0 + first..+count.
                    let y_row = unsafe { y_columns.row(t0 + t, y_col0 + first, count) };
                    if accumulate {
                        y_row.iter_mut().zip(results).for_each(|(y, r)| *y += r);
                    } else {
                        y_row.copy_from_slice(results);
                    }
                }
            },
        );
    }
}

/// Columns per input-gradient task: whole 4-bit groups (or 16 columns of dense rows), few enough that
/// every thread gets about four tasks.
fn task_columns(w: Rows, cols: usize) -> usize {
    let unit = match w {
        Rows::Quant(q) => q.spec.group_size,
        Rows::Dense(_) => 16,
    };
    let units = cols.div_ceil(unit);
    unit * (units / (4 * rayon::current_num_threads())).max(1)
}

/// dx[t] (+ when `accumulate`)= Σ_{i < n} a[t * a_stride + a_col0 + i] · W[start + i] for every token t
/// (dx is tokens x cols): the input gradient of a product with rows start..start + n. Each task owns a
/// range of dx's columns and decodes that range of every row, a block of rows at a time.
#[allow(clippy::too_many_arguments)]
pub fn aw(
    path: CpuPath,
    a: &[f32],
    a_stride: usize,
    a_col0: usize,
    w: Rows,
    start: usize,
    n: usize,
    dx: &mut [f32],
    accumulate: bool,
) {
    let (rows, cols) = w.shape();
    let tokens = dx.len() / cols.max(1);
    assert_eq!(dx.len(), tokens * cols, "aw: dx is tokens x cols");
    assert!(start + n <= rows, "aw: rows {start}+{n} of {rows}");
    assert!(
        a_col0 + n <= a_stride && (tokens == 0 || a.len() >= (tokens - 1) * a_stride + a_col0 + n),
        "aw: a too small"
    );
    assert!(path.supported().is_ok(), "aw: {path} does not run here");
    if n == 0 || tokens == 0 {
        if !accumulate {
            dx.fill(0.0);
        }
        return;
    }
    let width = task_columns(w, cols);
    let tasks = cols.div_ceil(width);
    // Rows per block: a 16-column strip of the block (64 bytes a row) stays in L1 while the tokens pass.
    let block = (BLOCK_BYTES / (4 * width)).clamp(1, AW_BLOCK_ROWS).min(n);
    let in_place = f32_rows(w);
    let dx_columns = ColumnRanges::new(dx, cols);
    for t0 in (0..tokens).step_by(TOKEN_CHUNK) {
        let tc = TOKEN_CHUNK.min(tokens - t0);
        let a_chunk = &a[t0 * a_stride + a_col0..];
        (0..tasks).into_par_iter().for_each_init(
            || (Vec::new(), Vec::new()),
            |(decoded, out), task| {
                let first_col = task * width;
                let task_width = width.min(cols - first_col);
                // This task's columns of dx, [tc, task_width] row-major.
                out.resize(tc * task_width, 0.0);
                for (t, row) in out.chunks_exact_mut(task_width).enumerate() {
                    if accumulate {
                        // SAFETY: task `task` alone reaches dx's columns first_col..+task_width.
                        row.copy_from_slice(unsafe {
                            dx_columns.row(t0 + t, first_col, task_width)
                        });
                    } else {
                        row.fill(0.0);
                    }
                }
                for first in (0..n).step_by(block) {
                    let count = block.min(n - first);
                    let (block, block_stride) = match in_place {
                        Some(all) => (&all[(start + first) * cols + first_col..], cols),
                        None => {
                            let (r, c) = (start + first, first_col);
                            decode_rows(path, w, r, count, c, task_width, decoded);
                            (&decoded[..], task_width)
                        }
                    };
                    let task = AwBlock {
                        a: &a_chunk[first..],
                        a_stride,
                        block,
                        block_stride,
                        rows: count,
                        cols: task_width,
                    };
                    run_aw_block(path, &task, out);
                }
                for (t, row) in out.chunks_exact(task_width).enumerate() {
                    // SAFETY: as above.
                    unsafe { dx_columns.row(t0 + t, first_col, task_width) }.copy_from_slice(row);
                }
            },
        );
    }
}

/// A row-major matrix (rows `stride` floats apart) whose parallel tasks each own a range of columns.
pub(crate) struct ColumnRanges<'a> {
    ptr: *mut f32,
    len: usize,
    stride: usize,
    _borrow: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: the matrix is borrowed mutably for the struct's life, so only the tasks reach it, and they
// reach it only through `row`, whose callers own disjoint column ranges: no element is reached from two
// threads.
unsafe impl Send for ColumnRanges<'_> {}
unsafe impl Sync for ColumnRanges<'_> {}

impl<'a> ColumnRanges<'a> {
    pub(crate) fn new(m: &'a mut [f32], stride: usize) -> Self {
        ColumnRanges {
            ptr: m.as_mut_ptr(),
            len: m.len(),
            stride,
            _borrow: std::marker::PhantomData,
        }
    }

    /// Row `r`, columns `first_col..first_col + width`.
    ///
    /// # Safety
    /// While the slice lives, no other call reaches any of its elements.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn row(&self, r: usize, first_col: usize, width: usize) -> &mut [f32] {
        let at = r * self.stride + first_col;
        assert!(
            first_col + width <= self.stride && at + width <= self.len,
            "row past the matrix"
        );
        // SAFETY: in bounds (asserted); exclusive by the caller's guarantee.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(at), width) }
    }
}
