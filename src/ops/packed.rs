//! Kernels that read frozen weight rows where they are stored: packed 4-bit rows decoded to f32, and
//! products of a few tokens with the rows (y = x·Wᵀ, 4 tokens per pass:
//! decoding and short prompts, where each weight serves few tokens).
//!
//! Decoding computes a 4-bit group's 16 possible values once (min + code·scale, the product and sum
//! separate, exactly as dequantization defines them) and looks each code up, so every path decodes
//! bit-identical weights: portable Rust, AVX2 (`vpermps` looks 8 codes up in the two halves of the
//! table), NEON (`tbl` looks 4 codes up in the table's 64 bytes). The products differ between paths
//! only in the order of their sums; their 4-bit kernels look codes up in the format's 16 code values
//! (AVX2 with `vpshufb`, AVX-512 with `vpermps`) and apply each group's scale to the group's sum.

use crate::model::{DenseTensor, LinearWeight};
use crate::ops::isa::{self, CpuPath};
use crate::quant::{NF4_CODES, QuantFormat, QuantTensor};
use rayon::prelude::*;

/// At most this many tokens go through one pass over the rows (more are split into passes).
pub const FEW_TOKENS: usize = 4;

/// Up to this many tokens an f32 frozen product streams the stored rows (one pass) rather than decoding
/// blocks of them for every token to reuse (packed_gemm.rs). Measured on a Zen 3 with AVX2 (BENCHMARKS.md,
/// session 8): streaming is faster at 4 tokens at every Qwen2.5-0.5B shape, the blocks from 8 on.
pub const STREAM_MAX_TOKENS: usize = FEW_TOKENS;

/// The INT4 codes as values: code c stands for min + c·scale.
const INT4_CODES: [f32; 16] = [
    0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
];

impl QuantTensor {
    /// The 16 values of group `gi`'s codes. −0 + x is x for every x, signed zeros included, so NF4's
    /// table is exactly code·scale.
    fn group_table(&self, gi: usize) -> [f32; 16] {
        let (codes, min) = self.codes_and_min(gi);
        let scale = self.scales[gi];
        std::array::from_fn(|c| min + codes[c] * scale)
    }

    fn codes_and_min(&self, gi: usize) -> (&'static [f32; 16], f32) {
        match self.spec.format {
            QuantFormat::Nf4 => (&NF4_CODES, -0.0),
            QuantFormat::Int4 => (&INT4_CODES, self.mins[gi]),
        }
    }

    /// Row `r`'s groups from group `first` on: (index into `scales`, first column, the group's words).
    /// Sliced, not skipped: a row may have hundreds.
    fn row_groups_from(
        &self,
        r: usize,
        first: usize,
    ) -> impl Iterator<Item = (usize, usize, &[u32])> {
        let g = self.spec.group_size;
        let words = &self.packed[(r * self.cols + first * g) / 8..(r + 1) * self.cols / 8];
        words
            .chunks_exact(g / 8)
            .enumerate()
            .map(move |(i, group_words)| {
                let i = first + i;
                (r * (self.cols / g) + i, i * g, group_words)
            })
    }

    /// Row `r` as f32 into `out[..cols]`, on the active CPU path.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        decode_row(isa::active(), self, r, &mut out[..self.cols]);
    }
}

/// Row `r` of `q` as f32 on `path` (which this CPU must support).
pub fn decode_row(path: CpuPath, q: &QuantTensor, r: usize, out: &mut [f32]) {
    assert_eq!(out.len(), q.cols, "decode_row: out is one row");
    decode_rows_part(path, q, r, 0, q.cols, out);
}

/// Columns `first_col..first_col + width` (whole groups) of rows `first_row..` as f32 on `path`, one
/// row per `width` floats of `out`: the checks once for many (short) rows.
pub fn decode_rows_part(
    path: CpuPath,
    q: &QuantTensor,
    first_row: usize,
    first_col: usize,
    width: usize,
    out: &mut [f32],
) {
    let g = q.spec.group_size;
    assert!(
        first_col.is_multiple_of(g)
            && width.is_multiple_of(g)
            && width > 0
            && first_col + width <= q.cols,
        "decode_rows_part: columns {first_col}+{width} of {} in groups of {g}",
        q.cols
    );
    let count = out.len() / width;
    assert!(
        out.len() == count * width && first_row + count <= q.rows,
        "decode_rows_part: rows {first_row}+{count} of {}",
        q.rows
    );
    assert!(
        path.supported().is_ok(),
        "decode_row: {path} does not run here"
    );
    let first_group = first_col / g;
    for (i, row_out) in out.chunks_exact_mut(width).enumerate() {
        let r = first_row + i;
        #[cfg(target_arch = "x86_64")]
        if path.includes(CpuPath::Avx2) {
            // SAFETY: the CPU supports AVX2+FMA (checked above); the row and its columns exist.
            unsafe { avx2::decode_row(q, r, first_group, row_out) };
            continue;
        }
        #[cfg(target_arch = "aarch64")]
        if path.includes(CpuPath::Neon) {
            // SAFETY: NEON is part of every aarch64 target; the row and its columns exist.
            unsafe { neon::decode_row(q, r, first_group, row_out) };
            continue;
        }
        for ((gi, _, group_words), group_out) in q
            .row_groups_from(r, first_group)
            .zip(row_out.chunks_exact_mut(g))
        {
            let table = q.group_table(gi);
            for (eight, &word) in group_out.chunks_exact_mut(8).zip(group_words) {
                for (k, value) in eight.iter_mut().enumerate() {
                    *value = table[((word >> (4 * k)) & 0xF) as usize];
                }
            }
        }
    }
}

/// Frozen rows as stored: packed 4-bit or dense 16/32-bit.
#[derive(Clone, Copy)]
pub enum Rows<'a> {
    Quant(&'a QuantTensor),
    Dense(&'a DenseTensor),
}

impl<'a> From<&'a LinearWeight> for Rows<'a> {
    fn from(w: &'a LinearWeight) -> Self {
        match w {
            LinearWeight::Quant(q) => Rows::Quant(q),
            LinearWeight::Dense(d) => Rows::Dense(d),
        }
    }
}

impl Rows<'_> {
    pub fn shape(&self) -> (usize, usize) {
        match self {
            Rows::Quant(q) => (q.rows, q.cols),
            Rows::Dense(d) => (d.rows, d.cols),
        }
    }
}

/// The token count of y (+)= x·W[start..start + n]ᵀ into y's columns y_col0.., as `xwt_few` and
/// `packed_gemm::xwt` take it, once its operands are checked.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_xwt(
    name: &str,
    path: CpuPath,
    x: &[f32],
    w: Rows,
    start: usize,
    n: usize,
    y: &[f32],
    y_stride: usize,
    y_col0: usize,
) -> usize {
    let (rows, cols) = w.shape();
    let tokens = x.len() / cols.max(1);
    assert_eq!(x.len(), tokens * cols, "{name}: x is tokens x cols");
    assert!(start + n <= rows, "{name}: rows {start}+{n} of {rows}");
    assert!(
        y_col0 + n <= y_stride && y.len() >= tokens * y_stride,
        "{name}: y too small"
    );
    assert!(path.supported().is_ok(), "{name}: {path} does not run here");
    tokens
}

/// Rows of W handed to one task: enough that a task's work outweighs its scheduling.
const ROWS_PER_TASK: usize = 64;

/// How far ahead of the row being multiplied `xwt_few` asks for rows to be loaded.
const PREFETCH_AHEAD_BYTES: usize = 2048;

/// The bytes that hold weight row `row` (its packed codes, or its 16/32-bit values).
fn row_bytes(w: Rows<'_>, row: usize) -> &[u8] {
    match w {
        Rows::Quant(q) => {
            let words = q.cols / 8;
            let first = (row * words).min(q.packed.len());
            bytemuck::cast_slice(&q.packed[first..(first + words).min(q.packed.len())])
        }
        Rows::Dense(d) => crate::ops::bf16_gemm::Bf16Rows::row_bytes(d, row, 0, d.cols),
    }
}

/// y[t, y_col0 + i] (+ when `accumulate`)= x[t]·W[start + i] for i < n, t < tokens; y rows are
/// `y_stride` long. For few tokens (`FEW_TOKENS` at a time): each weight row is read once per pass.
#[allow(clippy::too_many_arguments)]
pub fn xwt_few(
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
    let tokens = check_xwt("xwt_few", path, x, w, start, n, y, y_stride, y_col0);
    let cols = w.shape().1;
    // Rows are read once each, in order: the loads wait on memory unless asked for this far ahead
    // (the hardware's prefetcher stops at each 4 KiB page).
    let ahead = PREFETCH_AHEAD_BYTES.div_ceil(row_bytes(w, start).len().max(1));
    for t0 in (0..tokens).step_by(FEW_TOKENS) {
        let count = FEW_TOKENS.min(tokens - t0);
        let xs = &x[t0 * cols..(t0 + count) * cols];
        let xs = &*prepare_tokens(path, w, xs);
        // Row-major by weight row, each row's `count` results together, so tasks write disjoint runs.
        let mut by_row = vec![0f32; n * count];
        by_row
            .par_chunks_mut(ROWS_PER_TASK * count)
            .enumerate()
            .for_each_init(Vec::new, |scratch, (task, out)| {
                let first = start + task * ROWS_PER_TASK;
                rows_dots(path, w, first, (ahead, start + n), xs, out, scratch);
            });
        for (i, dots) in by_row.chunks_exact(count).enumerate() {
            for (t, &d) in dots.iter().enumerate() {
                let at = (t0 + t) * y_stride + y_col0 + i;
                y[at] = if accumulate { y[at] + d } else { d };
            }
        }
    }
}

/// The tokens as the path's kernel for `w` reads them, once per product: the AVX-512 kernel for 4-bit
/// rows takes a 128-column block's column 8k + j in lane k of its step j (each token padded with
/// zeros to whole blocks); the AVX2 one assembles each block of 8 values from the low codes (columns 0,
/// 2, 4, 6 of the block) and the high ones (1, 3, 5, 7).
fn prepare_tokens<'x>(path: CpuPath, w: Rows, xs: &'x [f32]) -> std::borrow::Cow<'x, [f32]> {
    #[cfg(target_arch = "x86_64")]
    if let Rows::Quant(q) = w
        && avx512_streams(path, q)
    {
        let cols = q.cols;
        let stride = cols.next_multiple_of(QUANT_BLOCK);
        let mut out = vec![0f32; xs.len() / cols * stride];
        for (token, laid) in xs.chunks_exact(cols).zip(out.chunks_exact_mut(stride)) {
            for (c, &v) in token.iter().enumerate() {
                let block = c / QUANT_BLOCK * QUANT_BLOCK;
                laid[block + avx512::lane_position(c - block)] = v;
            }
        }
        return out.into();
    }
    if path.includes(CpuPath::Avx2) && matches!(w, Rows::Quant(_)) {
        let mut out = Vec::with_capacity(xs.len());
        for block in xs.chunks_exact(8) {
            out.extend(block.iter().step_by(2));
            out.extend(block.iter().skip(1).step_by(2));
        }
        return out.into();
    }
    xs.into()
}

/// Whether `xwt_few` takes `q`'s rows through the AVX-512 kernel (groups that tile its 128-column
/// blocks: every size nibble quantizes to).
fn avx512_streams(path: CpuPath, q: &QuantTensor) -> bool {
    cfg!(target_arch = "x86_64")
        && path.includes(CpuPath::Avx512)
        && q.spec.group_size.is_power_of_two()
        && (8..=QUANT_BLOCK).contains(&q.spec.group_size)
}

/// Columns per block of the AVX-512 kernel for 4-bit rows: 16 lanes of 8 codes.
const QUANT_BLOCK: usize = 128;

/// Calls the instance of a kernel generic over the token count (1-4) that fits `dots`.
#[allow(unused_macros)]
macro_rules! for_token_count {
    ($kernel:path, $w:expr, $row:expr, $xs:expr, $dots:expr) => {{
        use $kernel as kernel;
        match $dots.len() {
            1 => kernel::<1>($w, $row, $xs, $dots),
            2 => kernel::<2>($w, $row, $xs, $dots),
            3 => kernel::<3>($w, $row, $xs, $dots),
            _ => kernel::<4>($w, $row, $xs, $dots),
        }
    }};
}

/// out[i·count + t] = xs[t]·W[first + i] for the rows of `out` (`count` = xs' 1-4 token rows), asking
/// for row first + i + ahead (while below `end`; the thread's next task usually holds the following
/// rows) to be loaded as row i is multiplied.
fn rows_dots(
    path: CpuPath,
    w: Rows,
    first: usize,
    (ahead, end): (usize, usize),
    xs: &[f32],
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let count = xs.len() / prepared_stride(path, w);
    #[cfg(target_arch = "x86_64")]
    if let Rows::Quant(q) = w
        && avx512_streams(path, q)
    {
        // SAFETY: `xwt_few` checked that the CPU supports this path, which includes AVX-512 F; xs
        // is laid out by `prepare_tokens` (whole blocks per token); the rows exist (checked).
        unsafe {
            match count {
                1 => avx512::quant_rows_dots::<1>(q, first, (ahead, end), xs, out),
                2 => avx512::quant_rows_dots::<2>(q, first, (ahead, end), xs, out),
                3 => avx512::quant_rows_dots::<3>(q, first, (ahead, end), xs, out),
                _ => avx512::quant_rows_dots::<4>(q, first, (ahead, end), xs, out),
            }
        }
        return;
    }
    for (i, dots) in out.chunks_exact_mut(count).enumerate() {
        if first + i + ahead < end {
            crate::ops::bf16_gemm::prefetch_bytes(row_bytes(w, first + i + ahead));
        }
        row_dots(path, w, first + i, xs, dots, scratch);
    }
}

/// The length of one token's row of `prepare_tokens`' layout.
fn prepared_stride(path: CpuPath, w: Rows) -> usize {
    match w {
        Rows::Quant(q) if avx512_streams(path, q) => q.cols.next_multiple_of(QUANT_BLOCK),
        _ => w.shape().1,
    }
}

/// dots[t] = x[t]·W[row] for the `dots.len()` (1-4) token rows of `xs`.
fn row_dots(
    path: CpuPath,
    w: Rows,
    row: usize,
    xs: &[f32],
    dots: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    #[cfg(target_arch = "x86_64")]
    if path.includes(CpuPath::Avx2) {
        // SAFETY: `xwt_few` checked that the CPU supports this path, which includes AVX2+FMA+F16C; the
        // kernels index only inside `xs` (dots.len() rows of cols) and row `row` (< rows, checked).
        unsafe { for_token_count!(avx2::row_dots, w, row, xs, dots) };
        return;
    }
    #[cfg(target_arch = "aarch64")]
    if path.includes(CpuPath::Neon) {
        // SAFETY: NEON is part of every aarch64 target; indices as for AVX2 above.
        unsafe { for_token_count!(neon::row_dots, w, row, xs, dots) };
        return;
    }
    let _ = path;
    let cols = w.shape().1;
    scratch.resize(cols, 0.0);
    match w {
        Rows::Quant(q) => decode_row(CpuPath::Portable, q, row, scratch),
        Rows::Dense(d) => d.row_f32(row, scratch),
    }
    for (t, dot) in dots.iter_mut().enumerate() {
        *dot = crate::ops::fastmath::dot(scratch, &xs[t * cols..(t + 1) * cols]);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{QuantTensor, Rows};
    use crate::model::DenseData;
    use std::arch::x86_64::*;

    /// The group's 16 values as two registers (codes 0-7, 8-15).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn table(q: &QuantTensor, gi: usize) -> (__m256, __m256) {
        let (codes, min) = q.codes_and_min(gi);
        let (min, scale) = (_mm256_set1_ps(min), _mm256_set1_ps(q.scales[gi]));
        // SAFETY: reads the 16 f32 of `codes`, unaligned.
        unsafe {
            (
                _mm256_add_ps(min, _mm256_mul_ps(_mm256_loadu_ps(codes.as_ptr()), scale)),
                _mm256_add_ps(
                    min,
                    _mm256_mul_ps(_mm256_loadu_ps(codes.as_ptr().add(8)), scale),
                ),
            )
        }
    }

    /// The values of the 8 codes of `word` (code k in bits 4k..4k+4).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn lookup(word: u32, lo: __m256, hi: __m256) -> __m256 {
        let shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
        let codes = _mm256_srlv_epi32(_mm256_set1_epi32(word as i32), shifts);
        lookup_low_nibbles(codes, lo, hi)
    }

    /// The values of the codes in the low 4 bits of each lane (higher bits ignored): `vpermps` indexes
    /// 8 entries with a lane's low 3 bits, so both halves of the table are looked up and bit 3, moved
    /// to the sign bit, picks one.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn lookup_low_nibbles(codes: __m256i, lo: __m256, hi: __m256) -> __m256 {
        let pick_high = _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28));
        _mm256_blendv_ps(
            _mm256_permutevar8x32_ps(lo, codes),
            _mm256_permutevar8x32_ps(hi, codes),
            pick_high,
        )
    }

    /// Row `r`'s groups from `first_group` on, decoded into `out` (whole groups).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn decode_row(
        q: &QuantTensor,
        r: usize,
        first_group: usize,
        out: &mut [f32],
    ) {
        for ((gi, _, group_words), group_out) in q
            .row_groups_from(r, first_group)
            .zip(out.chunks_exact_mut(q.spec.group_size))
        {
            // SAFETY: the caller checked AVX2+FMA; each store writes the 8 floats of one chunk.
            unsafe {
                let (lo, hi) = table(q, gi);
                for (eight, &word) in group_out.chunks_exact_mut(8).zip(group_words) {
                    _mm256_storeu_ps(eight.as_mut_ptr(), lookup(word, lo, hi));
                }
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn horizontal_sum(v: __m256) -> f32 {
        let four = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let two = _mm_add_ps(four, _mm_movehl_ps(four, four));
        _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)))
    }

    /// dots[t] = xs[t]·W[row] for T tokens: two accumulators per token (alternate 8-column blocks) so
    /// that consecutive multiply-adds do not wait on each other.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn row_dots<const T: usize>(
        w: Rows,
        row: usize,
        xs: &[f32],
        dots: &mut [f32],
    ) {
        let d = match w {
            // SAFETY: as for this function.
            Rows::Quant(q) => return unsafe { quant_row_dots::<T>(q, row, xs, dots) },
            Rows::Dense(d) => d,
        };
        let cols = d.cols;
        assert!(xs.len() >= T * cols && dots.len() >= T);
        let mut acc = [[_mm256_setzero_ps(); 2]; T];
        // Adds block `v` (8 weights at column c) times each token's 8 values there into acc[·][half].
        macro_rules! fma_block {
            ($v:expr, $c:expr, $half:expr) => {{
                let v = $v;
                for t in 0..T {
                    // SAFETY: c + 8 <= cols, so the load stays inside token t's row of xs.
                    let x = unsafe { _mm256_loadu_ps(xs.as_ptr().add(t * cols + $c)) };
                    acc[t][$half] = _mm256_fmadd_ps(v, x, acc[t][$half]);
                }
            }};
        }
        let base = row * cols;
        let tail_from = cols / 16 * 16;
        for c in (0..tail_from).step_by(16) {
            // SAFETY: c + 16 <= cols: the loads read inside row `row` of the matrix.
            let (a, b) = unsafe {
                match &d.data {
                    DenseData::F32(v) => (
                        _mm256_loadu_ps(v.as_ptr().add(base + c)),
                        _mm256_loadu_ps(v.as_ptr().add(base + c + 8)),
                    ),
                    DenseData::F16(v) => {
                        let p = v.as_ptr().add(base + c) as *const __m128i;
                        (
                            _mm256_cvtph_ps(_mm_loadu_si128(p)),
                            _mm256_cvtph_ps(_mm_loadu_si128(p.add(1))),
                        )
                    }
                    DenseData::BF16(v) => {
                        // bf16 is the top half of an f32.
                        let p = v.as_ptr().add(base + c) as *const __m128i;
                        let widen = |h: __m128i| {
                            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                        };
                        (widen(_mm_loadu_si128(p)), widen(_mm_loadu_si128(p.add(1))))
                    }
                }
            };
            fma_block!(a, c, 0);
            fma_block!(b, c + 8, 1);
        }
        for t in 0..T {
            let mut sum = horizontal_sum(_mm256_add_ps(acc[t][0], acc[t][1]));
            for c in tail_from..cols {
                sum += d.value(row, c) * xs[t * cols + c];
            }
            dots[t] = sum;
        }
    }

    /// The four byte planes of a format's 16 code values (plane i holds byte i of each value), made
    /// at compile time.
    const fn byte_planes(values: &[f32; 16]) -> [[u8; 16]; 4] {
        let mut planes = [[0u8; 16]; 4];
        let mut c = 0;
        while c < 16 {
            let bytes = values[c].to_le_bytes();
            let mut i = 0;
            while i < 4 {
                planes[i][c] = bytes[i];
                i += 1;
            }
            c += 1;
        }
        planes
    }

    const NF4_PLANES: [[u8; 16]; 4] = byte_planes(&super::NF4_CODES);
    const INT4_PLANES: [[u8; 16]; 4] = byte_planes(&super::INT4_CODES);

    /// dots[t] = xs[t]·W[row] for a 4-bit row and T tokens, 32 codes at a time through in-lane byte
    /// lookups (`vpshufb` into the four byte planes of the 16 code values, then byte and word
    /// interleaves assemble the f32s): lane-crossing `vpermps` lookups ran at half this rate. The
    /// group's scale (and INT4's min·Σx) is applied to the group's sum, so each token's blocks of 8
    /// columns come reordered by `prepare_tokens` (even columns, then odd ones).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn quant_row_dots<const T: usize>(
        q: &QuantTensor,
        row: usize,
        xs: &[f32],
        dots: &mut [f32],
    ) {
        let cols = q.cols;
        assert!(xs.len() >= T * cols && dots.len() >= T && q.spec.group_size.is_multiple_of(32));
        let int4 = q.spec.format == super::QuantFormat::Int4;
        // Each plane in both 128-bit lanes, for `vpshufb`.
        let planes = if int4 { &INT4_PLANES } else { &NF4_PLANES }.map(|plane| {
            // SAFETY: reads the 16 bytes of `plane`.
            _mm256_broadcastsi128_si256(unsafe {
                _mm_loadu_si128(plane.as_ptr() as *const __m128i)
            })
        });
        let low = _mm_set1_epi8(0x0F);
        let mut total = [_mm256_setzero_ps(); T];
        for (gi, c0, words) in q.row_groups_from(row, 0) {
            let mut acc = [[_mm256_setzero_ps(); 2]; T];
            let mut x_sum = [_mm256_setzero_ps(); T];
            for (s, four) in words.chunks_exact(4).enumerate() {
                // SAFETY: reads the 16 bytes of `four`.
                let bytes = unsafe { _mm_loadu_si128(four.as_ptr() as *const __m128i) };
                // Lane 0: the low nibbles (codes of columns 0, 2, .., 30); lane 1: the high ones.
                let codes = _mm256_set_m128i(
                    _mm_and_si128(_mm_srli_epi16(bytes, 4), low),
                    _mm_and_si128(bytes, low),
                );
                let [p0, p1, p2, p3] = planes.map(|plane| _mm256_shuffle_epi8(plane, codes));
                let (b01_lo, b01_hi) = (_mm256_unpacklo_epi8(p0, p1), _mm256_unpackhi_epi8(p0, p1));
                let (b23_lo, b23_hi) = (_mm256_unpacklo_epi8(p2, p3), _mm256_unpackhi_epi8(p2, p3));
                let values = [
                    _mm256_unpacklo_epi16(b01_lo, b23_lo),
                    _mm256_unpackhi_epi16(b01_lo, b23_lo),
                    _mm256_unpacklo_epi16(b01_hi, b23_hi),
                    _mm256_unpackhi_epi16(b01_hi, b23_hi),
                ];
                for (j, v) in values.into_iter().enumerate() {
                    let v = _mm256_castsi256_ps(v);
                    for t in 0..T {
                        // SAFETY: c0 + 32s + 8j + 8 <= cols: inside token t's row of xs.
                        let x = unsafe {
                            _mm256_loadu_ps(xs.as_ptr().add(t * cols + c0 + 32 * s + 8 * j))
                        };
                        acc[t][j % 2] = _mm256_fmadd_ps(v, x, acc[t][j % 2]);
                        if int4 {
                            x_sum[t] = _mm256_add_ps(x_sum[t], x);
                        }
                    }
                }
            }
            let scale = _mm256_set1_ps(q.scales[gi]);
            for t in 0..T {
                total[t] = _mm256_fmadd_ps(_mm256_add_ps(acc[t][0], acc[t][1]), scale, total[t]);
                if int4 {
                    total[t] = _mm256_fmadd_ps(x_sum[t], _mm256_set1_ps(q.mins[gi]), total[t]);
                }
            }
        }
        for t in 0..T {
            dots[t] = horizontal_sum(total[t]);
        }
    }
}

/// 4-bit row products with AVX-512: the format's 16 code values fill one register, so one `vpermps`
/// looks up 16 codes (it reads only the low 4 bits of each 32-bit index). Lane k of a 128-column block
/// holds packed word k (columns 8k..8k + 8); shifting the words right by 4j puts column 8k + j's code
/// in lane k's low bits, so a block takes one load, 7 shifts and 8 lookups, where byte shuffles need 12
/// shuffle-port instructions per 64 codes (BENCHMARKS.md session 19). `prepare_tokens` lays each
/// token's block out to match (j-major), padded with zeros to whole blocks; a row's last, partial
/// block loads only its words (the other lanes' codes are 0, their x is 0).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::QuantTensor;
    use std::arch::x86_64::*;

    const BLOCK: usize = super::QUANT_BLOCK;

    /// Where column `c` (< BLOCK) of a block sits in `prepare_tokens`' layout.
    pub(super) const fn lane_position(c: usize) -> usize {
        (c % 8) * 16 + c / 8
    }

    /// out[i·T + t] = xs[t]·W[first + i] for the rows of `out`, asking for row first + i + ahead
    /// (while below `end`) to be loaded as row i is multiplied. A run of rows per call: a row of 896
    /// columns is only 7 blocks, so what is set up per call would otherwise cost as much as a row.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn quant_rows_dots<const T: usize>(
        q: &QuantTensor,
        first: usize,
        (ahead, end): (usize, usize),
        xs: &[f32],
        out: &mut [f32],
    ) {
        let (cols, g) = (q.cols, q.spec.group_size);
        let stride = cols.next_multiple_of(BLOCK);
        assert!(
            xs.len() >= T * stride
                && first + out.len() / T <= q.rows
                && end <= q.rows
                && g.is_power_of_two()
                && (8..=BLOCK).contains(&g)
        );
        let int4 = q.spec.format == super::QuantFormat::Int4;
        let codes = if int4 {
            &super::INT4_CODES
        } else {
            &super::NF4_CODES
        };
        // SAFETY: reads the 16 floats of `codes`.
        let table = unsafe { _mm512_loadu_ps(codes.as_ptr()) };
        let g_shift = g.trailing_zeros();
        let (row_words, groups) = (cols / 8, cols >> g_shift);
        // Lane k of a block belongs to the block's group 8k / g.
        let lane_group = _mm512_srlv_epi32(
            _mm512_set_epi32(
                120, 112, 104, 96, 88, 80, 72, 64, 56, 48, 40, 32, 24, 16, 8, 0,
            ),
            _mm512_set1_epi32(g_shift as i32),
        );
        let groups_per_block = BLOCK >> g_shift;
        // Independent sums per token, so that consecutive multiply-adds do not wait on each other.
        let chains = if T <= 2 { 4 } else { 2 };
        for (i, dots) in out.chunks_exact_mut(T).enumerate() {
            let row = first + i;
            if row + ahead < end {
                crate::ops::bf16_gemm::prefetch_bytes(super::row_bytes(
                    super::Rows::Quant(q),
                    row + ahead,
                ));
            }
            let words = &q.packed[row * row_words..(row + 1) * row_words];
            let scales = &q.scales[row * groups..(row + 1) * groups];
            let mins = if int4 {
                &q.mins[row * groups..(row + 1) * groups]
            } else {
                &[][..]
            };
            let mut total = [_mm512_setzero_ps(); T];
            for (b, block) in words.chunks(16).enumerate() {
                let lanes: __mmask16 = ((1u32 << block.len()) - 1) as u16;
                // SAFETY: the mask covers only the block's words.
                let mut idx =
                    unsafe { _mm512_maskz_loadu_epi32(lanes, block.as_ptr() as *const i32) };
                let mut acc = [[_mm512_setzero_ps(); 4]; T];
                let mut x_sum = [_mm512_setzero_ps(); T];
                for j in 0..8 {
                    let v = _mm512_permutexvar_ps(idx, table);
                    idx = _mm512_srli_epi32::<4>(idx);
                    for t in 0..T {
                        // SAFETY: (b + 1)·BLOCK <= stride: inside token t's padded row of xs.
                        let x = unsafe {
                            _mm512_loadu_ps(xs.as_ptr().add(t * stride + b * BLOCK + 16 * j))
                        };
                        acc[t][j % chains] = _mm512_fmadd_ps(v, x, acc[t][j % chains]);
                        if int4 {
                            x_sum[t] = _mm512_add_ps(x_sum[t], x);
                        }
                    }
                }
                let group = b * groups_per_block;
                let present: __mmask16 = ((1u32 << ((block.len() * 8) >> g_shift)) - 1) as u16;
                // SAFETY: the mask covers only this block's groups of the row.
                let scale = _mm512_permutexvar_ps(lane_group, unsafe {
                    _mm512_maskz_loadu_ps(present, scales.as_ptr().add(group))
                });
                let min = if int4 {
                    // SAFETY: as for the scales.
                    _mm512_permutexvar_ps(lane_group, unsafe {
                        _mm512_maskz_loadu_ps(present, mins.as_ptr().add(group))
                    })
                } else {
                    _mm512_setzero_ps()
                };
                for t in 0..T {
                    let [a0, a1, a2, a3] = acc[t];
                    let sum = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
                    total[t] = _mm512_fmadd_ps(sum, scale, total[t]);
                    if int4 {
                        total[t] = _mm512_fmadd_ps(x_sum[t], min, total[t]);
                    }
                }
            }
            for t in 0..T {
                dots[t] = _mm512_reduce_add_ps(total[t]);
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use super::{QuantTensor, Rows};
    use crate::model::DenseData;
    use std::arch::aarch64::*;

    /// The group's 16 values as the 64 bytes `tbl` indexes.
    #[target_feature(enable = "neon")]
    unsafe fn table(q: &QuantTensor, gi: usize) -> uint8x16x4_t {
        let values = q.group_table(gi);
        // SAFETY: reads the 64 bytes of `values`.
        unsafe { vld1q_u8_x4(values.as_ptr() as *const u8) }
    }

    /// Byte offsets 4c..4c+3 for each of codes 0-3 (`first`) or 4-7 of the word's 8 codes.
    #[inline]
    #[target_feature(enable = "neon")]
    fn lookup(word: u32, table: uint8x16x4_t) -> (float32x4_t, float32x4_t) {
        // Nibble k of the word is code k: bytes b0..b3 hold codes (2j, 2j+1) in their (low, high) halves.
        let bytes = vcreate_u8(word as u64);
        let codes = vzip1_u8(vand_u8(bytes, vdup_n_u8(0xF)), vshr_n_u8(bytes, 4));
        // Each code repeated four times, times four, plus 0..3: the byte offsets of its f32.
        let repeat_lo: [u8; 16] = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3];
        let repeat_hi: [u8; 16] = [4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7];
        let byte_in_float: [u8; 16] = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3];
        // SAFETY: the loads read the 16 bytes of local arrays.
        unsafe {
            let codes = vcombine_u8(codes, codes);
            let inner = vld1q_u8(byte_in_float.as_ptr());
            let offsets = |repeat: &[u8; 16]| {
                let c = vqtbl1q_u8(codes, vld1q_u8(repeat.as_ptr()));
                vaddq_u8(vshlq_n_u8(c, 2), inner)
            };
            (
                vreinterpretq_f32_u8(vqtbl4q_u8(table, offsets(&repeat_lo))),
                vreinterpretq_f32_u8(vqtbl4q_u8(table, offsets(&repeat_hi))),
            )
        }
    }

    #[target_feature(enable = "neon")]
    pub(super) unsafe fn decode_row(
        q: &QuantTensor,
        r: usize,
        first_group: usize,
        out: &mut [f32],
    ) {
        for ((gi, _, group_words), group_out) in q
            .row_groups_from(r, first_group)
            .zip(out.chunks_exact_mut(q.spec.group_size))
        {
            // SAFETY: each pair of stores writes the 8 floats of one chunk.
            unsafe {
                let t = table(q, gi);
                for (eight, &word) in group_out.chunks_exact_mut(8).zip(group_words) {
                    let (a, b) = lookup(word, t);
                    vst1q_f32(eight.as_mut_ptr(), a);
                    vst1q_f32(eight.as_mut_ptr().add(4), b);
                }
            }
        }
    }

    /// dots[t] = xs[t]·W[row] for T tokens, two accumulators per token.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn row_dots<const T: usize>(
        w: Rows,
        row: usize,
        xs: &[f32],
        dots: &mut [f32],
    ) {
        let cols = w.shape().1;
        assert!(xs.len() >= T * cols && dots.len() >= T);
        let mut acc = [[vdupq_n_f32(0.0); 2]; T];
        macro_rules! fma_block {
            ($a:expr, $b:expr, $c:expr) => {{
                let (a, b) = ($a, $b);
                for t in 0..T {
                    // SAFETY: c + 8 <= cols: the loads stay inside token t's row of xs.
                    unsafe {
                        let x = xs.as_ptr().add(t * cols + $c);
                        acc[t][0] = vfmaq_f32(acc[t][0], a, vld1q_f32(x));
                        acc[t][1] = vfmaq_f32(acc[t][1], b, vld1q_f32(x.add(4)));
                    }
                }
            }};
        }
        let mut tail_from = cols;
        match w {
            Rows::Quant(q) => {
                for (gi, c0, group_words) in q.row_groups_from(row, 0) {
                    // SAFETY: NEON is always present on aarch64.
                    let t = unsafe { table(q, gi) };
                    for (k, &word) in group_words.iter().enumerate() {
                        let (a, b) = lookup(word, t);
                        fma_block!(a, b, c0 + 8 * k);
                    }
                }
            }
            Rows::Dense(d) => {
                let base = row * cols;
                match &d.data {
                    DenseData::F32(v) => {
                        tail_from = cols / 8 * 8;
                        for c in (0..tail_from).step_by(8) {
                            // SAFETY: c + 8 <= cols: inside row `row`.
                            let (a, b) = unsafe {
                                let p = v.as_ptr().add(base + c);
                                (vld1q_f32(p), vld1q_f32(p.add(4)))
                            };
                            fma_block!(a, b, c);
                        }
                    }
                    DenseData::BF16(v) => {
                        tail_from = cols / 8 * 8;
                        for c in (0..tail_from).step_by(8) {
                            // SAFETY: c + 8 <= cols: inside row `row`. bf16 is an f32's top half.
                            let (a, b) = unsafe {
                                let h = vld1q_u16(v.as_ptr().add(base + c) as *const u16);
                                (
                                    vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(h), 16)),
                                    vreinterpretq_f32_u32(vshll_high_n_u16(h, 16)),
                                )
                            };
                            fma_block!(a, b, c);
                        }
                    }
                    // f16 vectors are not in stable Rust's NEON intrinsics: scalar below.
                    DenseData::F16(_) => tail_from = 0,
                }
            }
        }
        for t in 0..T {
            let mut sum = vaddvq_f32(vaddq_f32(acc[t][0], acc[t][1]));
            if let Rows::Dense(d) = w {
                for c in tail_from..cols {
                    sum += d.value(row, c) * xs[t * cols + c];
                }
            }
            dots[t] = sum;
        }
    }
}
