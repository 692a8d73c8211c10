//! Products of many tokens with frozen 4-bit rows in 16-bit integers: `--precision default` on x86
//! CPUs without BF16 dot products (every AVX2 laptop). Their f32 multiply-adds run at the FMA units'
//! rate already (BENCHMARKS.md, session 19), so the only way to a faster step there is narrower
//! arithmetic: `vpmaddwd` multiplies 16 pairs of 16-bit integers per instruction where an FMA does 8
//! floats, and AVX-VNNI's `vpdpwssd` (Intel since Alder Lake) also adds them in.
//!
//! - A code's value is a 16-bit level: NF4's table times 2048, rounded (at most 2.4e-4 from the
//!   value, where bf16 rounds a weight by up to 2e-3 of itself); INT4's code times 128, exact. The
//!   group's scale (and INT4's minimum) stay f32.
//! - An activation row is quantized per chunk of the reduction (a weight group in the forward
//!   product): its largest magnitude maps to the largest integer whose chunk of products cannot
//!   overflow an i32 (2^31 / (chunk · 2048): 14 bits at 64, 13 at 128). An element is off by at most
//!   half a step, 1/32766 of its chunk's largest (bf16: 1/512 of itself).
//! - Each chunk's integer sum is exact; it is scaled into an f32 sum with one FMA per chunk, in the
//!   same order on every path, so the portable, AVX2 and VNNI kernels give the same bits.
//!
//! y = x·Wᵀ pairs two columns of a packed word (c and c + 4 of its eight) per 32-bit lane, eight rows
//! per vector; dx = a·W pairs two rows, eight columns per vector, with the group scale folded into `a`
//! (its chunks are 64 rows).
//!
//! The output projection's dense table (bf16 in checkpoints) takes the same kernels: each row is
//! quantized to 12-bit levels as a task reads it, per group of `dense_group` columns for y = x·Wᵀ and
//! per column of 64 rows for dx = a·W, so that its levels are as fine as a 4-bit group's.

use crate::model::DenseTensor;
use crate::ops::isa::{self, CpuPath};
use crate::quant::{NF4_CODES, QuantFormat, QuantTensor};
use rayon::prelude::*;

/// The largest level's magnitude: NF4's ±1 and INT4's 15 map to at most this.
const LEVEL_MAX: i64 = 2048;
/// Rows per chunk of the input gradient's integer sums.
const AW_CHUNK: usize = 64;
/// Rows (a multiple of 16) per forward task and per input-gradient block: the decoded 16-bit rows
/// stay in L2 while every token passes.
const BLOCK_BYTES: usize = 192 * 1024;
/// Tokens per parallel region, bounding each task's results buffer.
const TOKEN_CHUNK: usize = 256;

/// Each code's 16-bit level and what a level is worth (value = level / factor).
fn levels(format: QuantFormat) -> ([i16; 16], f32) {
    match format {
        QuantFormat::Nf4 => (
            std::array::from_fn(|c| (NF4_CODES[c] * LEVEL_MAX as f32).round() as i16),
            LEVEL_MAX as f32,
        ),
        QuantFormat::Int4 => (std::array::from_fn(|c| (c as i16) * 128), 128.0),
    }
}

/// The largest integer an activation may take in a chunk of `len` products with levels.
fn activation_max(len: usize) -> f32 {
    (((1i64 << 31) - 1) / (len as i64 * LEVEL_MAX)).min(32767) as f32
}

/// Two 16-bit values as the 32-bit lane `vpmaddwd` reads: `lo` in the low half.
fn pair(lo: i16, hi: i16) -> i32 {
    (lo as u16 as u32 | ((hi as u16 as u32) << 16)) as i32
}

/// Which instructions run the kernels. All give the same bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Portable,
    /// `vpmaddwd` + `vpaddd` (AVX2).
    Avx2,
    /// `vpdpwssd`, VEX-encoded (AVX-VNNI).
    AvxVnni,
    /// `vpdpwssd` on 256-bit vectors, EVEX-encoded (AVX512-VNNI with VL).
    Avx512Vnni,
}

impl Kernel {
    /// The fastest kernel `path` allows on this CPU.
    pub fn for_path(path: CpuPath) -> Kernel {
        #[cfg(target_arch = "x86_64")]
        {
            if path == CpuPath::Avx2Vnni {
                return Kernel::AvxVnni;
            }
            if path.includes(CpuPath::Avx512)
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("avx512vl")
            {
                return Kernel::Avx512Vnni;
            }
            if path.includes(CpuPath::Avx2) {
                return Kernel::Avx2;
            }
        }
        let _ = path;
        Kernel::Portable
    }

    /// Below this many tokens the input gradient runs faster in f32: its per-product set-up (the
    /// rows' relative scales, the scaled decode) is paid for by fewer tokens. Measured on one
    /// thread at 4864 x 896 (BENCHMARKS.md, session 20): `vpmaddwd` 0.92x the f32 kernel at 45
    /// tokens and 1.1x at 64; `vpdpwssd` 1.28x at 45.
    pub fn input_gradient_min_tokens(self) -> usize {
        match self {
            Kernel::Portable | Kernel::Avx2 => 64,
            Kernel::AvxVnni | Kernel::Avx512Vnni => crate::ops::linear::BF16_MIN_TOKENS,
        }
    }

    /// Whether this CPU runs the kernel (the public entry points refuse one it does not).
    pub fn runs_here(self) -> bool {
        static AVAILABLE: std::sync::OnceLock<Vec<Kernel>> = std::sync::OnceLock::new();
        AVAILABLE.get_or_init(Kernel::available).contains(&self)
    }

    /// Every kernel this CPU runs (for tests).
    pub fn available() -> Vec<Kernel> {
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut all = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if CpuPath::Avx2.supported().is_ok() {
                all.push(Kernel::Avx2);
            }
            if CpuPath::Avx2Vnni.supported().is_ok() {
                all.push(Kernel::AvxVnni);
            }
            if CpuPath::Avx512.supported().is_ok()
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("avx512vl")
            {
                all.push(Kernel::Avx512Vnni);
            }
        }
        all
    }
}

/// The frozen rows of a product.
#[derive(Clone, Copy)]
pub enum Frozen<'a> {
    /// Rows first..first + rows of a 4-bit tensor (one expert's of a stack): their codes' levels
    /// and their groups' scales.
    Packed {
        q: &'a QuantTensor,
        first: usize,
        rows: usize,
    },
    /// Rows first..first + rows of a dense table (a vocabulary chunk of the output projection).
    Dense {
        table: &'a DenseTensor,
        first: usize,
        rows: usize,
    },
}

impl<'a> From<&'a QuantTensor> for Frozen<'a> {
    fn from(q: &'a QuantTensor) -> Self {
        Frozen::Packed {
            q,
            first: 0,
            rows: q.rows,
        }
    }
}

impl Frozen<'_> {
    fn shape(&self) -> (usize, usize) {
        match *self {
            Frozen::Packed { q, rows, .. } => (rows, q.cols),
            Frozen::Dense { table, rows, .. } => (rows, table.cols),
        }
    }

    /// Columns per chunk of the forward product's integer sums, and per input-gradient task group.
    fn group(&self) -> usize {
        match *self {
            Frozen::Packed { q, .. } => q.spec.group_size,
            Frozen::Dense { table, .. } => dense_group(table.cols)
                .unwrap_or_else(|| panic!("int16: {} columns are not whole groups", table.cols)),
        }
    }

    /// The 4-bit tensor whose groups' minimums add to the products (INT4), and the first of its
    /// rows these are.
    fn with_minimums(&self) -> Option<(&QuantTensor, usize)> {
        match *self {
            Frozen::Packed { q, first, .. } if q.spec.format == QuantFormat::Int4 => {
                Some((q, first))
            }
            _ => None,
        }
    }

    /// Refuses parts that disagree with the shape (the vector decoders read through them
    /// unchecked).
    fn check(&self) {
        match *self {
            Frozen::Packed { q, first, rows } => {
                check_tensor(q);
                assert!(
                    first + rows <= q.rows,
                    "int16: rows {first}..{} of a {}-row tensor",
                    first + rows,
                    q.rows
                );
            }
            Frozen::Dense { table, first, rows } => {
                assert!(
                    first + rows <= table.rows,
                    "int16: rows {first}..{} of a {}-row table",
                    first + rows,
                    table.rows
                );
                self.group();
            }
        }
    }

    /// The forward panel of rows first..first + count (see `forward_panel`).
    fn forward_panel(
        &self,
        kernel: Kernel,
        first: usize,
        count: usize,
        panel: &mut Panel,
        values: &mut Vec<f32>,
    ) {
        match *self {
            Frozen::Packed {
                q, first: offset, ..
            } => forward_panel(kernel, q, offset + first, count, panel),
            Frozen::Dense {
                table,
                first: offset,
                ..
            } => dense_forward_panel(
                kernel,
                table,
                offset + first,
                count,
                self.group(),
                panel,
                values,
            ),
        }
    }
}

/// Columns per chunk of a dense table's forward integer sums: 64 (14-bit activations, as for 4-bit
/// groups of 64), or 32 where the width is not a multiple of 64; None (the products stay f32) where
/// it is not a multiple of 32.
pub fn dense_group(cols: usize) -> Option<usize> {
    [64, 32]
        .into_iter()
        .find(|&g| cols > 0 && cols.is_multiple_of(g))
}

/// Asks for columns first_col..first_col + len of `rows` ahead of their reading: a task reads a few
/// columns of many rows, a stride the hardware's prefetchers follow too late.
fn prefetch_rows(table: &DenseTensor, rows: std::ops::Range<usize>, first_col: usize, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let bytes = table.as_bytes();
        let size = table.dtype().size();
        for r in rows {
            let at = (r * table.cols + first_col) * size;
            // From the line that holds the first byte, so that a span across one more line is whole.
            for line in (at & !63..at + len * size).step_by(64) {
                // SAFETY: a prefetch only hints the cache and never faults; the address is inside the
                // table (wrapping_add keeps the pointer arithmetic defined regardless).
                unsafe {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                        bytes.as_ptr().wrapping_add(line) as *const i8,
                    )
                };
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (table, rows, first_col, len);
}

/// Columns first_col.. of row `r` as f32, converted with AVX2 where the kernel has it.
fn dense_row(kernel: Kernel, table: &DenseTensor, r: usize, first_col: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if kernel != Kernel::Portable {
        // SAFETY: as in decode_forward_strip.
        unsafe { x86::dense_row(table, r, first_col, out) };
        return;
    }
    let _ = kernel;
    table.row_part_f32(r, first_col, out);
}

/// Folds each value's magnitude into `largest`, element by element, compared as the bits of an f32 (a
/// NaN's are above infinity's), so that every kernel finds the same maxima. Inlined into the portable
/// build and into the AVX2 one (which the VNNI kernels share): the generic x86-64 target has no
/// unsigned 32-bit vector maximum, so there it is a scalar loop (the head's integer products ran up to
/// 7% faster with it built for AVX2). The AVX2 builds are functions in `x86`, not closures run through
/// `fastmath::wide`: that way the forward panel's maxima measured 12% slower.
#[inline(always)]
fn fold_magnitudes(values: &[f32], largest: &mut [u32]) {
    for (m, v) in largest.iter_mut().zip(values) {
        *m = (*m).max(v.to_bits() & 0x7FFF_FFFF);
    }
}

/// The largest magnitude among `values`, as `fold_magnitudes` compares them. Eight running maxima, one
/// vector's lanes, so that the loop vectorises rather than running one serial chain of maxima.
#[inline(always)]
fn largest_magnitude(values: &[f32]) -> f32 {
    let mut lanes = [0u32; 8];
    let blocks = values.chunks_exact(8);
    let rest = blocks.remainder();
    for block in blocks {
        fold_magnitudes(block, &mut lanes);
    }
    fold_magnitudes(rest, &mut lanes[..rest.len()]);
    f32::from_bits(lanes.into_iter().max().unwrap_or(0))
}

/// Each column's largest magnitude over the rows of `values` (rows of `largest.len()` values).
fn column_maxima(kernel: Kernel, values: &[f32], largest: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if kernel != Kernel::Portable {
        // SAFETY: as in decode_forward_strip.
        unsafe { x86::column_maxima(values, largest) };
        return;
    }
    let _ = kernel;
    fold_columns(values, largest);
}

/// `column_maxima`'s loop, row by row so that the maxima vectorise (inlined into its AVX2 build).
#[inline(always)]
fn fold_columns(values: &[f32], largest: &mut [u32]) {
    largest.fill(0);
    for row in values.chunks_exact(largest.len()) {
        fold_magnitudes(row, largest);
    }
}

/// A dense value's level: round(v · inverse), half to even as the vector conversion rounds (v is at
/// most its chunk's largest, so the level is at most LEVEL_MAX; a NaN, whose inverse is 0, gives 0
/// here and in the vector conversion's low half).
fn dense_level(v: f32, inverse: f32) -> i16 {
    (v * inverse).round_ties_even() as i16
}

/// `dense_forward_panel`'s steps and inverses for one strip: eight rows of `cols` values in `values`,
/// per (row, group) the step of LEVEL_MAX levels; rows from `live` on get a step of 0.
fn dense_row_steps(
    kernel: Kernel,
    values: &[f32],
    cols: usize,
    group: usize,
    live: usize,
    steps: &mut [f32],
) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if kernel != Kernel::Portable {
        // SAFETY: as in decode_forward_strip.
        return unsafe { x86::dense_row_steps(values, cols, group, live, steps) };
    }
    let _ = kernel;
    row_steps(values, cols, group, live, steps)
}

/// `dense_row_steps` (inlined into its AVX2 build).
#[inline(always)]
fn row_steps(
    values: &[f32],
    cols: usize,
    group: usize,
    live: usize,
    steps: &mut [f32],
) -> Vec<f32> {
    let groups = cols / group;
    let mut inverses = vec![0f32; 8 * groups];
    for j in 0..8 {
        for g in 0..groups {
            let chunk = &values[j * cols + g * group..j * cols + (g + 1) * group];
            let (step, inverse) = step_and_inverse(largest_magnitude(chunk), LEVEL_MAX as f32);
            steps[g * 8 + j] = if j < live { step } else { 0.0 };
            inverses[j * groups + g] = inverse;
        }
    }
    inverses
}

/// The forward panel of a dense table's rows first..first + count, as `forward_panel` lays out 4-bit
/// rows: each (row, group) as levels of its largest magnitude, whose step is the panel's scale.
#[allow(clippy::too_many_arguments)]
fn dense_forward_panel(
    kernel: Kernel,
    table: &DenseTensor,
    first: usize,
    count: usize,
    group: usize,
    panel: &mut Panel,
    values: &mut Vec<f32>,
) {
    let cols = table.cols;
    let (groups, words) = (cols / group, cols / 8);
    let strips = count.div_ceil(8);
    panel.strips = strips;
    panel.pairs.resize(strips * words * 32, 0);
    panel.scales.resize(strips * groups * 8, 0.0);
    panel.mins.clear();
    values.resize(8 * cols, 0.0);
    for s in 0..strips {
        // The next strip's rows arrive while this one's are quantized.
        let next = (first + 8 * s + 8).min(first + count);
        prefetch_rows(table, next..(next + 8).min(first + count), 0, cols);
        for j in 0..8 {
            let row = first + (8 * s + j).min(count - 1);
            dense_row(kernel, table, row, 0, &mut values[j * cols..(j + 1) * cols]);
        }
        let live = count - 8 * s;
        let steps = &mut panel.scales[s * groups * 8..(s + 1) * groups * 8];
        let inverses = dense_row_steps(kernel, values, cols, group, live, steps);
        let out = &mut panel.pairs[s * words * 32..(s + 1) * words * 32];
        #[cfg(target_arch = "x86_64")]
        if kernel != Kernel::Portable {
            // SAFETY: as in decode_forward_strip.
            unsafe { x86::dense_forward_strip(values, cols, group, &inverses, out) };
            continue;
        }
        let _ = kernel;
        for w in 0..words {
            let g = 8 * w / group;
            for c in 0..4 {
                for j in 0..8 {
                    let row = &values[j * cols + 8 * w..j * cols + 8 * w + 8];
                    let inverse = inverses[j * groups + g];
                    out[(4 * w + c) * 8 + j] = pair(
                        dense_level(row[c], inverse),
                        dense_level(row[c + 4], inverse),
                    );
                }
            }
        }
    }
}

/// The input-gradient panel of a dense table's rows first..first + count (the rest of `row_pairs`
/// pairs 0) for columns first_col..first_col + group: pair p of lane j of strip s holds rows 2p and
/// 2p + 1 of column 8s + j as levels of that column's largest magnitude in their chunk of AW_CHUNK
/// rows, whose step is the panel's scale for (strip, chunk, lane).
#[allow(clippy::too_many_arguments)]
fn dense_backward_panel(
    kernel: Kernel,
    table: &DenseTensor,
    first: usize,
    count: usize,
    row_pairs: usize,
    first_col: usize,
    group: usize,
    panel: &mut Panel,
    values: &mut Vec<f32>,
) {
    let (strips, chunks) = (group / 8, 2 * row_pairs / AW_CHUNK);
    assert!(count <= 2 * row_pairs && row_pairs.is_multiple_of(AW_CHUNK / 2));
    values.clear();
    values.resize(2 * row_pairs * group, 0.0);
    prefetch_rows(table, first..first + count, first_col, group);
    for (i, row) in values.chunks_exact_mut(group).take(count).enumerate() {
        dense_row(kernel, table, first + i, first_col, row);
    }
    panel.strips = strips;
    panel.pairs.resize(strips * row_pairs * 8, 0);
    panel.scales.resize(strips * chunks * 8, 0.0);
    panel.mins.clear();
    let mut inverses = vec![0f32; chunks * group];
    let mut largest = vec![0u32; group];
    for c in 0..chunks {
        let rows = &values[c * AW_CHUNK * group..(c + 1) * AW_CHUNK * group];
        column_maxima(kernel, rows, &mut largest);
        for (col, &bits) in largest.iter().enumerate() {
            let (step, inverse) = step_and_inverse(f32::from_bits(bits), LEVEL_MAX as f32);
            panel.scales[((col / 8) * chunks + c) * 8 + col % 8] = step;
            inverses[c * group + col] = inverse;
        }
    }
    #[cfg(target_arch = "x86_64")]
    if kernel != Kernel::Portable {
        // SAFETY: as in decode_forward_strip.
        unsafe { x86::dense_backward_pairs(values, group, row_pairs, &inverses, &mut panel.pairs) };
        return;
    }
    let _ = kernel;
    for s in 0..strips {
        for p in 0..row_pairs {
            let inverse = &inverses[(2 * p / AW_CHUNK) * group + 8 * s..][..8];
            let (lo, hi) = (
                &values[2 * p * group + 8 * s..],
                &values[(2 * p + 1) * group + 8 * s..],
            );
            for j in 0..8 {
                panel.pairs[(s * row_pairs + p) * 8 + j] = pair(
                    dense_level(lo[j], inverse[j]),
                    dense_level(hi[j], inverse[j]),
                );
            }
        }
    }
}

/// Whether `--precision default` runs these products on `path`: an x86 CPU with AVX2 whose core
/// multiplies 16-bit pairs on two pipes, and whose path has no bf16 products or a core where VNNI's
/// integers beat them (`X86Model::vnni_integers_beat_bf16`: Intel's, unless AMX's tiles run the bf16
/// products). Where `vpmaddwd` has one pipe and
/// FMA two (Haswell, Broadwell, Zen 2 and older), the integers multiply no more values per cycle than
/// f32 FMAs and add the quantization's work and error, so f32 it is.
pub fn preferred(path: CpuPath) -> bool {
    let Some(cpu) = isa::x86_model() else {
        return false;
    };
    let vnni = matches!(Kernel::for_path(path), Kernel::AvxVnni | Kernel::Avx512Vnni);
    path.includes(CpuPath::Avx2)
        && cpu.pair_madds_on_two_pipes()
        && (!path.includes(CpuPath::Avx512Bf16) || (vnni && cpu.vnni_integers_beat_bf16()))
        && !path.includes(CpuPath::Amx)
}

/// Rows of 16-bit pairs (`pairs` per row, each chunk of `chunk_pairs` with one f32 step), the operand
/// that is broadcast: the tokens.
struct Quantized {
    pairs: Vec<i32>,
    steps: Vec<f32>,
    /// Per chunk, the sum of the row's f32 values (INT4's minimum multiplies it).
    sums: Vec<f32>,
    row_pairs: usize,
    chunk_pairs: usize,
}

impl Quantized {
    fn chunks(&self) -> usize {
        self.row_pairs / self.chunk_pairs
    }

    /// Every row of `values` (rows of `cols` values, zeros to whole chunks), each chunk scaled to the
    /// integers' range: pair i holds values (i, i + 1) in `Order::Adjacent`, and in `Order::Words`
    /// (8w + c, 8w + c + 4) for i = 4w + c. Rows are quantized on every thread when there are enough
    /// of them: done on one, this was about a twentieth of the input gradient's time with the
    /// other core idle.
    fn from_rows(
        kernel: Kernel,
        values: &[f32],
        cols: usize,
        (row_pairs, chunk_pairs): (usize, usize),
        order: Order,
        sums: bool,
    ) -> Self {
        let chunk_len = 2 * chunk_pairs;
        assert!(cols <= 2 * row_pairs && chunk_len.is_multiple_of(8));
        assert!(!sums || cols == 2 * row_pairs);
        let rows = values.len() / cols.max(1);
        let chunks = row_pairs / chunk_pairs;
        let mut quantized = Quantized {
            pairs: vec![0; rows * row_pairs],
            steps: vec![0.0; rows * chunks],
            sums: vec![0.0; if sums { rows * chunks } else { 0 }],
            row_pairs,
            chunk_pairs,
        };
        let top = activation_max(chunk_len);
        let quantize = |((values, pairs), steps): ((&[f32], &mut [i32]), &mut [f32])| {
            let row = RowValues { values };
            #[cfg(target_arch = "x86_64")]
            if kernel != Kernel::Portable {
                // SAFETY: as in decode_forward_strip.
                return unsafe { x86::quantize_row(row, chunk_len, top, order, pairs, steps) };
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = kernel;
            quantize_row(row, chunk_len, top, order, pairs, steps)
        };
        let (pairs, steps) = (&mut quantized.pairs, &mut quantized.steps);
        if values.len() >= PARALLEL_QUANTIZE_VALUES {
            values
                .par_chunks_exact(cols)
                .zip(pairs.par_chunks_exact_mut(row_pairs))
                .zip(steps.par_chunks_exact_mut(chunks))
                .for_each(quantize);
        } else {
            values
                .chunks_exact(cols)
                .zip(pairs.chunks_exact_mut(row_pairs))
                .zip(steps.chunks_exact_mut(chunks))
                .for_each(quantize);
        }
        if sums {
            for (row, sums) in values
                .chunks_exact(cols)
                .zip(quantized.sums.chunks_exact_mut(chunks))
            {
                for (chunk, sum) in row.chunks_exact(chunk_len).zip(sums) {
                    *sum = chunk.iter().sum::<f32>();
                }
            }
        }
        quantized
    }
}

/// Values from which `Quantized::from_rows` quantizes on every thread (below, a task costs more
/// than the work it takes on).
const PARALLEL_QUANTIZE_VALUES: usize = 32 * 1024;

/// A row to quantize: its values, then zeros to whole chunks.
#[derive(Clone, Copy)]
struct RowValues<'a> {
    values: &'a [f32],
}

impl RowValues<'_> {
    fn get(&self, i: usize) -> f32 {
        self.values.get(i).copied().unwrap_or(0.0)
    }
}

/// Some of the pairs of every row of a `Quantized`: what the kernels read.
#[derive(Clone, Copy)]
struct Tokens<'a> {
    /// Token t's pair p at `pairs[t * pair_stride + p]`, p < row_pairs.
    pairs: &'a [i32],
    /// Token t's chunk c at `steps[t * chunk_stride + c]` (and `sums`, when not empty).
    steps: &'a [f32],
    sums: &'a [f32],
    tokens: usize,
    pair_stride: usize,
    chunk_stride: usize,
    row_pairs: usize,
    chunk_pairs: usize,
}

impl Tokens<'_> {
    fn chunks(&self) -> usize {
        self.row_pairs / self.chunk_pairs
    }
}

impl Quantized {
    /// Pairs first_pair..first_pair + row_pairs (whole chunks) of every row.
    fn view(&self, first_pair: usize, row_pairs: usize) -> Tokens<'_> {
        let cp = self.chunk_pairs;
        assert!(first_pair.is_multiple_of(cp) && row_pairs.is_multiple_of(cp));
        assert!(first_pair + row_pairs <= self.row_pairs);
        let chunks = self.chunks();
        let tokens = self.steps.len() / chunks.max(1);
        let first_chunk = first_pair / cp;
        Tokens {
            pairs: &self.pairs[first_pair.min(self.pairs.len())..],
            steps: &self.steps[first_chunk.min(self.steps.len())..],
            sums: &self.sums[first_chunk.min(self.sums.len())..],
            tokens,
            pair_stride: self.row_pairs,
            chunk_stride: chunks,
            row_pairs,
            chunk_pairs: cp,
        }
    }
}

/// A chunk's step (what one integer is worth) and its inverse, from its largest magnitude. An inverse
/// of 0 means the chunk's integers are all 0: its values are 0 or too small for the inverse to be
/// finite (below 1e-34: they add nothing an f32 sum would keep), or one is NaN or infinite, and then
/// the step is NaN, so that the chunk's products are NaN as in f32.
fn step_and_inverse(largest: f32, top: f32) -> (f32, f32) {
    if !largest.is_finite() {
        (f32::NAN, 0.0)
    } else if largest > 0.0 && (top / largest).is_finite() {
        (largest / top, top / largest)
    } else {
        (0.0, 0.0)
    }
}

/// Each chunk of the row as pairs of round(v / step) (half to even, as the vector conversion
/// rounds), and its step.
fn quantize_row(
    row: RowValues,
    chunk_len: usize,
    top: f32,
    order: Order,
    pairs: &mut [i32],
    steps: &mut [f32],
) {
    for (c, (out, step)) in pairs
        .chunks_exact_mut(chunk_len / 2)
        .zip(steps.iter_mut())
        .enumerate()
    {
        let value = |i: usize| row.get(c * chunk_len + i);
        let largest = (0..chunk_len)
            .map(|i| value(i).abs().to_bits())
            .max()
            .unwrap_or(0);
        let (s, inverse) = step_and_inverse(f32::from_bits(largest), top);
        *step = s;
        if inverse == 0.0 {
            out.fill(0);
            continue;
        }
        let q = |v: f32| (v * inverse).round_ties_even().clamp(-top, top) as i16;
        for (i, o) in out.iter_mut().enumerate() {
            let (lo, hi) = match order {
                Order::Adjacent => (2 * i, 2 * i + 1),
                Order::Words => (8 * (i / 4) + i % 4, 8 * (i / 4) + i % 4 + 4),
            };
            *o = pair(q(value(lo)), q(value(hi)));
        }
    }
}

/// Which two values a 32-bit pair holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Order {
    /// Values 2i and 2i + 1 (a row of a, the input gradient's operand).
    Adjacent,
    /// Values 8w + c and 8w + c + 4 for pair 4w + c (x, matching a packed word's nibbles).
    Words,
}

/// Decoded weights for the kernel: `strips` of eight lanes, each `row_pairs` vectors of eight pairs,
/// with an f32 multiplier per (strip, chunk, lane) and, for INT4, a minimum per (strip, chunk, lane).
#[derive(Default)]
struct Panel {
    pairs: Vec<i32>,
    scales: Vec<f32>,
    mins: Vec<f32>,
    strips: usize,
}

/// The pair (from two 16-bit level codes in one 32-bit lane's halves) → levels.
fn level_pair(table: &[i16; 16], codes: u32) -> i32 {
    pair(
        table[(codes & 15) as usize],
        table[((codes >> 16) & 15) as usize],
    )
}

/// Packed word `w` of row `r`.
fn word(q: &QuantTensor, r: usize, w: usize) -> u32 {
    q.packed[r * (q.cols / 8) + w]
}

/// The forward panel of rows first..first + count (padded to whole strips with copies of the last row,
/// whose scales are 0): lane j of strip s is row first + 8s + j; pair 4w + c of a lane holds columns
/// 8w + c and 8w + c + 4.
fn forward_panel(kernel: Kernel, q: &QuantTensor, first: usize, count: usize, panel: &mut Panel) {
    let (table, factor) = levels(q.spec.format);
    let groups = q.cols / q.spec.group_size;
    let words = q.cols / 8;
    let strips = count.div_ceil(8);
    panel.strips = strips;
    panel.pairs.resize(strips * words * 4 * 8, 0);
    panel.scales.resize(strips * groups * 8, 0.0);
    let int4 = q.spec.format == QuantFormat::Int4;
    panel
        .mins
        .resize(if int4 { strips * groups * 8 } else { 0 }, 0.0);
    for s in 0..strips {
        let row = |j: usize| first + (8 * s + j).min(count - 1);
        let out = &mut panel.pairs[s * words * 32..(s + 1) * words * 32];
        decode_forward_strip(kernel, q, &table, std::array::from_fn(row), out);
        for g in 0..groups {
            for j in 0..8 {
                let live = 8 * s + j < count;
                let at = (s * groups + g) * 8 + j;
                let meta = row(j) * groups + g;
                panel.scales[at] = if live { q.scales[meta] / factor } else { 0.0 };
                if int4 {
                    panel.mins[at] = if live { q.mins[meta] } else { 0.0 };
                }
            }
        }
    }
}

fn decode_forward_strip(
    kernel: Kernel,
    q: &QuantTensor,
    table: &[i16; 16],
    rows: [usize; 8],
    out: &mut [i32],
) {
    #[cfg(target_arch = "x86_64")]
    if kernel != Kernel::Portable {
        // SAFETY: a kernel other than Portable is only chosen where the CPU has AVX2 (Kernel::for_path
        // and Kernel::available ask it).
        unsafe { x86::decode_forward_strip(q, table, rows, out) };
        return;
    }
    let _ = kernel;
    for w in 0..q.cols / 8 {
        for c in 0..4 {
            for (j, &r) in rows.iter().enumerate() {
                let codes = (word(q, r, w) >> (4 * c)) & 0x000F_000F;
                out[(4 * w + c) * 8 + j] = level_pair(table, codes);
            }
        }
    }
}

/// round(a · m / 2^15) as `vpmulhrsw` computes it.
fn mulhrs(a: i16, m: i16) -> i16 {
    ((a as i32 * m as i32 + 0x4000) >> 15) as i16
}

/// The input-gradient panel of rows first..first + count for columns first_col.. (one group) in
/// `strips` strips of eight: pair p of a lane holds rows 2p and 2p + 1 of its column, each level
/// times its row's `multipliers` entry / 2^15 (the row's scale relative to its chunk's largest);
/// rows past `count` are 0.
#[allow(clippy::too_many_arguments)]
fn backward_panel(
    kernel: Kernel,
    q: &QuantTensor,
    table: &[i16; 16],
    first: usize,
    count: usize,
    row_pairs: usize,
    first_col: usize,
    strips: usize,
    multipliers: &[i16],
    out: &mut Vec<i32>,
) {
    assert!(
        first + count <= q.rows && first_col / 8 + strips <= q.cols / 8 && 2 * row_pairs >= count
    );
    assert!(multipliers.len() >= count);
    out.resize(strips * row_pairs * 8, 0);
    let words = |p: usize, s: usize| {
        let row = |i: usize| {
            if i < count {
                (first + i, multipliers[i])
            } else {
                (first, 0)
            }
        };
        let ((lo, m_lo), (hi, m_hi)) = (row(2 * p), row(2 * p + 1));
        let w = first_col / 8 + s;
        (word(q, lo, w), word(q, hi, w), pair(m_lo, m_hi))
    };
    #[cfg(target_arch = "x86_64")]
    if kernel != Kernel::Portable {
        // SAFETY: as in decode_forward_strip.
        unsafe { x86::decode_backward(table, row_pairs, strips, words, out) };
        return;
    }
    let _ = kernel;
    for s in 0..strips {
        for p in 0..row_pairs {
            let (lo, hi, m) = words(p, s);
            let (m_lo, m_hi) = (m as i16, (m >> 16) as i16);
            for j in 0..8 {
                let level = |w: u32| table[((w >> (4 * j)) & 15) as usize];
                let pairs = pair(mulhrs(level(lo), m_lo), mulhrs(level(hi), m_hi));
                out[(s * row_pairs + p) * 8 + j] = pairs;
            }
        }
    }
}

/// out[t][8s + j] += Σ_chunks (step[t, c] · scale[s, c, j]) · Σ_{pairs of c} x·w (+ sum[t, c] ·
/// min[s, c, j]), for every token of `x` and strip of `panel`; out rows `out_stride` apart. Adds, so
/// that the input gradient's blocks of rows sum in its task's own rows with no pass of their own.
fn run(kernel: Kernel, x: Tokens, panel: &Panel, out: &mut [f32], out_stride: usize) {
    match kernel {
        // SAFETY (each x86 arm): Kernel::for_path and Kernel::available choose a kernel only where the
        // CPU has its instructions.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => unsafe { x86::run_avx2(x, panel, out, out_stride) },
        #[cfg(target_arch = "x86_64")]
        Kernel::AvxVnni => unsafe { x86::run_avxvnni(x, panel, out, out_stride) },
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Vnni => unsafe { x86::run_avx512vnni(x, panel, out, out_stride) },
        _ => {
            // SAFETY: Portable is plain Rust.
            unsafe { run_tiles::<Portable, 4>(x, panel, out, out_stride) }
        }
    }
}

/// Eight 32-bit integer sums of 16-bit pairs.
trait Pairs: Copy {
    /// # Safety
    /// The CPU runs the type's instructions (Kernel::for_path checked it).
    unsafe fn zero() -> Self;
    /// self + Σ over both halves of x·w[lane]: `w` points at eight pairs.
    /// # Safety
    /// As `zero`.
    unsafe fn madd(self, x: i32, w: *const i32) -> Self;
    /// out[lane] = fma(self[lane] as f32, step · scales[lane], out[lane]), then, with `mins`,
    /// out[lane] = fma(sum, mins[lane], out[lane]). Each pointer reaches eight floats.
    /// # Safety
    /// As `zero`.
    unsafe fn flush(
        self,
        step: f32,
        scales: *const f32,
        min_term: Option<(f32, *const f32)>,
        out: *mut f32,
    );
}

#[derive(Clone, Copy)]
struct Portable([i32; 8]);

impl Pairs for Portable {
    unsafe fn zero() -> Self {
        Portable([0; 8])
    }
    unsafe fn madd(self, x: i32, w: *const i32) -> Self {
        let (x0, x1) = (x as i16 as i32, (x >> 16) as i16 as i32);
        // SAFETY: the caller's w reaches eight pairs.
        let w = unsafe { std::slice::from_raw_parts(w, 8) };
        Portable(std::array::from_fn(|j| {
            let (w0, w1) = (w[j] as i16 as i32, (w[j] >> 16) as i16 as i32);
            self.0[j].wrapping_add(x0 * w0 + x1 * w1)
        }))
    }
    unsafe fn flush(
        self,
        step: f32,
        scales: *const f32,
        min_term: Option<(f32, *const f32)>,
        out: *mut f32,
    ) {
        for j in 0..8 {
            // SAFETY: the caller's pointers reach eight floats.
            unsafe {
                let o = out.add(j);
                *o = (self.0[j] as f32).mul_add(step * *scales.add(j), *o);
                if let Some((sum, mins)) = min_term {
                    *o = sum.mul_add(*mins.add(j), *o);
                }
            }
        }
    }
}

/// Every token through every strip, TM tokens by two strips at a time, chunk by chunk.
///
/// # Safety
/// The CPU runs P.
#[inline(always)]
unsafe fn run_tiles<P: Pairs, const TM: usize>(
    x: Tokens,
    panel: &Panel,
    out: &mut [f32],
    out_stride: usize,
) {
    let tokens = x.tokens;
    let kp = x.row_pairs;
    let chunks = x.chunks();
    assert!(tokens == 0 || x.pairs.len() >= (tokens - 1) * x.pair_stride + kp);
    assert!(tokens == 0 || x.steps.len() >= (tokens - 1) * x.chunk_stride + chunks);
    assert!(panel.pairs.len() == panel.strips * kp * 8);
    assert!(panel.scales.len() == panel.strips * chunks * 8);
    assert!(tokens == 0 || out.len() >= (tokens - 1) * out_stride + panel.strips * 8);
    let int4 = !panel.mins.is_empty();
    assert!(!int4 || (x.sums.len() == x.steps.len() && panel.mins.len() == panel.scales.len()));
    for s0 in (0..panel.strips).step_by(2) {
        let two = s0 + 1 < panel.strips;
        for t0 in (0..tokens).step_by(TM) {
            let tm = TM.min(tokens - t0);
            // SAFETY: tokens t0..t0 + tm and strips s0..s0 + 1 (+1 when `two`) exist (asserted).
            unsafe {
                let args = (&x, panel, t0, s0, &mut *out, out_stride);
                // The last tokens in one tile of their own count: one token at a time reads a
                // strip's pairs once per token, and the loads, not the multiplies, bound it.
                match (tm.min(TM), two) {
                    (n, true) if n == TM => call_tile::<P, TM, 2>(args),
                    (n, false) if n == TM => call_tile::<P, TM, 1>(args),
                    (5, true) => call_tile::<P, 5, 2>(args),
                    (4, true) => call_tile::<P, 4, 2>(args),
                    (3, true) => call_tile::<P, 3, 2>(args),
                    (2, true) => call_tile::<P, 2, 2>(args),
                    (_, true) => call_tile::<P, 1, 2>(args),
                    (5, false) => call_tile::<P, 5, 1>(args),
                    (4, false) => call_tile::<P, 4, 1>(args),
                    (3, false) => call_tile::<P, 3, 1>(args),
                    (2, false) => call_tile::<P, 2, 1>(args),
                    (_, false) => call_tile::<P, 1, 1>(args),
                }
            }
        }
    }
}

type TileArgs<'a, 'b> = (
    &'a Tokens<'b>,
    &'a Panel,
    usize,
    usize,
    &'a mut [f32],
    usize,
);

/// `tile` with its arguments as one tuple.
///
/// # Safety
/// As `tile`.
#[inline(always)]
unsafe fn call_tile<P: Pairs, const TM: usize, const TS: usize>(args: TileArgs) {
    let (x, panel, t0, s0, out, out_stride) = args;
    // SAFETY: the caller's guarantees are tile's.
    unsafe { tile::<P, TM, TS>(x, panel, t0, s0, out, out_stride) }
}

/// Tokens t0..t0 + TM through strips s0..s0 + TS.
///
/// # Safety
/// The CPU runs P; the tokens and strips exist; out reaches them.
#[inline(always)]
unsafe fn tile<P: Pairs, const TM: usize, const TS: usize>(
    x: &Tokens,
    panel: &Panel,
    t0: usize,
    s0: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    let kp = x.row_pairs;
    let cp = x.chunk_pairs;
    let chunks = x.chunks();
    let int4 = !panel.mins.is_empty();
    unsafe {
        let xp = x.pairs.as_ptr().add(t0 * x.pair_stride);
        let wp = panel.pairs.as_ptr().add(s0 * kp * 8);
        let op = out.as_mut_ptr().add(t0 * out_stride + s0 * 8);
        for c in 0..chunks {
            let mut acc = [[P::zero(); TS]; TM];
            for p in c * cp..(c + 1) * cp {
                let w: [*const i32; TS] = std::array::from_fn(|j| wp.add((j * kp + p) * 8));
                for (i, row) in acc.iter_mut().enumerate() {
                    let xv = *xp.add(i * x.pair_stride + p);
                    for (a, wj) in row.iter_mut().zip(&w) {
                        *a = a.madd(xv, *wj);
                    }
                }
            }
            for (i, row) in acc.iter().enumerate() {
                let t = t0 + i;
                let step = x.steps[t * x.chunk_stride + c];
                for (j, a) in row.iter().enumerate() {
                    let meta = ((s0 + j) * chunks + c) * 8;
                    let min_term = int4.then(|| {
                        (
                            x.sums[t * x.chunk_stride + c],
                            panel.mins.as_ptr().add(meta),
                        )
                    });
                    a.flush(
                        step,
                        panel.scales.as_ptr().add(meta),
                        min_term,
                        op.add(i * out_stride + j * 8),
                    );
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Pairs, Panel, Tokens, run_tiles};
    use std::arch::x86_64::*;

    /// Shared by the three x86 kernels: they differ only in how a pair product is added.
    macro_rules! flush_avx {
        () => {
            #[inline(always)]
            unsafe fn flush(
                self,
                step: f32,
                scales: *const f32,
                min_term: Option<(f32, *const f32)>,
                out: *mut f32,
            ) {
                unsafe {
                    let scale = _mm256_mul_ps(_mm256_set1_ps(step), _mm256_loadu_ps(scales));
                    let mut o =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(self.0), scale, _mm256_loadu_ps(out));
                    if let Some((sum, mins)) = min_term {
                        o = _mm256_fmadd_ps(_mm256_set1_ps(sum), _mm256_loadu_ps(mins), o);
                    }
                    _mm256_storeu_ps(out, o);
                }
            }
        };
    }

    #[derive(Clone, Copy)]
    struct Madd(__m256i);
    impl Pairs for Madd {
        #[inline(always)]
        unsafe fn zero() -> Self {
            unsafe { Madd(_mm256_setzero_si256()) }
        }
        #[inline(always)]
        unsafe fn madd(self, x: i32, w: *const i32) -> Self {
            unsafe {
                let w = _mm256_loadu_si256(w as *const __m256i);
                Madd(_mm256_add_epi32(
                    self.0,
                    _mm256_madd_epi16(_mm256_set1_epi32(x), w),
                ))
            }
        }
        flush_avx!();
    }

    // LLVM splits the vpdpwssd intrinsics into vpmaddwd + vpaddd for CPUs it does not know to have a
    // fast vpdpwssd (the generic x86-64 target), which halves their rate; asm keeps the one
    // instruction, in its VEX (AVX-VNNI) or EVEX (AVX512-VNNI) encoding.
    macro_rules! vnni_pairs {
        ($name:ident, $features:literal, $instruction:literal) => {
            #[derive(Clone, Copy)]
            struct $name(__m256i);
            impl Pairs for $name {
                #[inline(always)]
                unsafe fn zero() -> Self {
                    unsafe { $name(_mm256_setzero_si256()) }
                }
                #[target_feature(enable = $features)]
                unsafe fn madd(self, x: i32, w: *const i32) -> Self {
                    let mut acc = self.0;
                    // SAFETY: w reaches eight pairs (caller); the asm touches registers only, and
                    // the CPU has the instruction (Kernel::for_path / Kernel::available checked).
                    unsafe {
                        let w = _mm256_loadu_si256(w as *const __m256i);
                        std::arch::asm!(
                            $instruction,
                            acc = inout(ymm_reg) acc,
                            x = in(ymm_reg) _mm256_set1_epi32(x),
                            w = in(ymm_reg) w,
                            options(pure, nomem, nostack, preserves_flags),
                        );
                    }
                    $name(acc)
                }
                flush_avx!();
            }
        };
    }
    vnni_pairs!(Vnni, "avx2,avxvnni", "{{vex}} vpdpwssd {acc}, {x}, {w}");
    vnni_pairs!(
        Vnni512,
        "avx2,avx512f,avx512vl,avx512vnni",
        "{{evex}} vpdpwssd {acc}, {x}, {w}"
    );

    // Four tokens by two strips: 8 accumulators, and the adds' temporaries, within AVX2's 16
    // registers; VNNI needs no temporaries, so six tokens (measured 1.35x faster than four there).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn run_avx2(x: Tokens, panel: &Panel, out: &mut [f32], stride: usize) {
        unsafe { run_tiles::<Madd, 4>(x, panel, out, stride) }
    }

    #[target_feature(enable = "avx2,fma,avxvnni")]
    pub(super) unsafe fn run_avxvnni(x: Tokens, panel: &Panel, out: &mut [f32], stride: usize) {
        unsafe { run_tiles::<Vnni, 6>(x, panel, out, stride) }
    }

    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vnni")]
    pub(super) unsafe fn run_avx512vnni(x: Tokens, panel: &Panel, out: &mut [f32], stride: usize) {
        unsafe { run_tiles::<Vnni512, 6>(x, panel, out, stride) }
    }

    /// Eight values of the row from i on (zeros past its values).
    #[inline(always)]
    unsafe fn row_vector(row: super::RowValues, i: usize) -> __m256 {
        unsafe {
            if i + 8 <= row.values.len() {
                _mm256_loadu_ps(row.values.as_ptr().add(i))
            } else {
                let lanes: [f32; 8] = std::array::from_fn(|j| row.get(i + j));
                _mm256_loadu_ps(lanes.as_ptr())
            }
        }
    }

    /// quantize_row with vector instructions (the same products, so the same values); the
    /// conversion rounds half to even and never leaves the range (|v · inverse| is at most the top
    /// integer times 1 + 2^-22).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize_row(
        row: super::RowValues,
        chunk_len: usize,
        top: f32,
        order: super::Order,
        pairs: &mut [i32],
        steps: &mut [f32],
    ) {
        assert!(chunk_len.is_multiple_of(8) && pairs.len() * 2 >= steps.len() * chunk_len);
        unsafe {
            let magnitude = _mm256_set1_ps(f32::from_bits(0x7FFF_FFFF));
            for (c, step) in steps.iter_mut().enumerate() {
                let first = c * chunk_len;
                let mut largest = _mm256_setzero_si256();
                for i in (first..first + chunk_len).step_by(8) {
                    let v = _mm256_and_ps(row_vector(row, i), magnitude);
                    largest = _mm256_max_epu32(largest, _mm256_castps_si256(v));
                }
                let mut lanes = [0u32; 8];
                _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, largest);
                let largest = f32::from_bits(lanes.into_iter().max().unwrap_or(0));
                let (s, inverse) = super::step_and_inverse(largest, top);
                *step = s;
                let out = pairs.as_mut_ptr().add(first / 2);
                if inverse == 0.0 {
                    std::ptr::write_bytes(out, 0, chunk_len / 2);
                    continue;
                }
                let inv = _mm256_set1_ps(inverse);
                for w in 0..chunk_len / 8 {
                    let v = row_vector(row, first + 8 * w);
                    let q = _mm256_cvtps_epi32(_mm256_mul_ps(v, inv));
                    let (lo, hi) = (_mm256_castsi256_si128(q), _mm256_extracti128_si256::<1>(q));
                    let four = match order {
                        // (v0, v4), (v1, v5), ...: the upper four in the upper halves.
                        super::Order::Words => {
                            _mm_blend_epi16::<0xAA>(lo, _mm_slli_epi32::<16>(hi))
                        }
                        // Eight 16-bit values in order are four pairs of neighbours.
                        super::Order::Adjacent => _mm_packs_epi32(lo, hi),
                    };
                    _mm_storeu_si128(out.add(4 * w) as *mut __m128i, four);
                }
            }
        }
    }

    /// Levels of the codes in the low nibble of each 16-bit half of `codes` (both halves' upper bits
    /// zero), by two byte lookups: the level's low and high byte.
    #[inline(always)]
    unsafe fn lookup(table_lo: __m256i, table_hi: __m256i, codes: __m256i) -> __m256i {
        unsafe {
            // Each 16-bit half's code in both of its bytes, so one lookup serves each byte.
            let index = _mm256_or_si256(codes, _mm256_slli_epi16(codes, 8));
            let lo = _mm256_shuffle_epi8(table_lo, index);
            let hi = _mm256_shuffle_epi8(table_hi, index);
            _mm256_blendv_epi8(lo, hi, _mm256_set1_epi16(0xFF00u16 as i16))
        }
    }

    /// The two byte tables of 16-bit levels, in both 128-bit halves.
    #[inline(always)]
    unsafe fn tables(table: &[i16; 16]) -> (__m256i, __m256i) {
        let lo: [u8; 16] = std::array::from_fn(|c| table[c] as u16 as u8);
        let hi: [u8; 16] = std::array::from_fn(|c| (table[c] as u16 >> 8) as u8);
        unsafe {
            let lo = _mm_loadu_si128(lo.as_ptr() as *const __m128i);
            let hi = _mm_loadu_si128(hi.as_ptr() as *const __m128i);
            (_mm256_set_m128i(lo, lo), _mm256_set_m128i(hi, hi))
        }
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn decode_forward_strip(
        q: &crate::quant::QuantTensor,
        table: &[i16; 16],
        rows: [usize; 8],
        out: &mut [i32],
    ) {
        let words = q.cols / 8;
        assert!(out.len() >= words * 32 && rows.iter().all(|&r| r < q.rows));
        assert!(
            q.packed.len() <= i32::MAX as usize,
            "gather offsets are i32"
        );
        unsafe {
            let (table_lo, table_hi) = tables(table);
            let offsets: [i32; 8] = std::array::from_fn(|j| (rows[j] * words) as i32);
            let offsets = _mm256_loadu_si256(offsets.as_ptr() as *const __m256i);
            let mask = _mm256_set1_epi32(0x000F_000F);
            let base = q.packed.as_ptr() as *const i32;
            for w in 0..words {
                // Word w of each of the eight rows: every offset + w < q.packed.len() (asserted rows).
                let v = _mm256_i32gather_epi32::<4>(base.add(w), offsets);
                let o = out.as_mut_ptr().add(w * 32) as *mut __m256i;
                _mm256_storeu_si256(o, lookup(table_lo, table_hi, _mm256_and_si256(v, mask)));
                let v1 = _mm256_and_si256(_mm256_srli_epi32(v, 4), mask);
                _mm256_storeu_si256(o.add(1), lookup(table_lo, table_hi, v1));
                let v2 = _mm256_and_si256(_mm256_srli_epi32(v, 8), mask);
                _mm256_storeu_si256(o.add(2), lookup(table_lo, table_hi, v2));
                let v3 = _mm256_and_si256(_mm256_srli_epi32(v, 12), mask);
                _mm256_storeu_si256(o.add(3), lookup(table_lo, table_hi, v3));
            }
        }
    }

    /// super::row_steps built for AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dense_row_steps(
        values: &[f32],
        cols: usize,
        group: usize,
        live: usize,
        steps: &mut [f32],
    ) -> Vec<f32> {
        super::row_steps(values, cols, group, live, steps)
    }

    /// super::fold_columns built for AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn column_maxima(values: &[f32], largest: &mut [u32]) {
        super::fold_columns(values, largest)
    }

    /// DenseTensor::row_part_f32 built for AVX2 (it is inlined here).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dense_row(
        table: &crate::model::DenseTensor,
        r: usize,
        first_col: usize,
        out: &mut [f32],
    ) {
        table.row_part_f32(r, first_col, out);
    }

    /// Eight f32 values times `inverse`, converted (half to even) to i32: levels, within ±LEVEL_MAX.
    #[inline(always)]
    unsafe fn levels_of(values: *const f32, inverse: __m256) -> __m256i {
        unsafe { _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(values), inverse)) }
    }

    /// The dense forward strip's pairs (super::dense_forward_panel's loop): each of the eight rows'
    /// words as the four pairs (c, c + 4), then those 8 x 4 pairs transposed so that a vector holds
    /// one pair of every row.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dense_forward_strip(
        values: &[f32],
        cols: usize,
        group: usize,
        inverses: &[f32],
        out: &mut [i32],
    ) {
        let (words, groups) = (cols / 8, cols / group);
        assert!(
            values.len() >= 8 * cols && inverses.len() >= 8 * groups && out.len() >= 32 * words
        );
        unsafe {
            for w in 0..words {
                let g = 8 * w / group;
                let row: [__m128i; 8] = std::array::from_fn(|j| {
                    let inverse = _mm256_set1_ps(inverses[j * groups + g]);
                    let q = levels_of(values.as_ptr().add(j * cols + 8 * w), inverse);
                    let (lo, hi) = (_mm256_castsi256_si128(q), _mm256_extracti128_si256::<1>(q));
                    _mm_blend_epi16::<0xAA>(lo, _mm_slli_epi32::<16>(hi))
                });
                // Rows j and j + 4 in the two halves, then a 4 x 4 transpose within each half.
                let v: [__m256i; 4] = std::array::from_fn(|j| _mm256_set_m128i(row[j + 4], row[j]));
                let (t0, t1) = (
                    _mm256_unpacklo_epi32(v[0], v[1]),
                    _mm256_unpackhi_epi32(v[0], v[1]),
                );
                let (t2, t3) = (
                    _mm256_unpacklo_epi32(v[2], v[3]),
                    _mm256_unpackhi_epi32(v[2], v[3]),
                );
                let o = out.as_mut_ptr().add(w * 32) as *mut __m256i;
                _mm256_storeu_si256(o, _mm256_unpacklo_epi64(t0, t2));
                _mm256_storeu_si256(o.add(1), _mm256_unpackhi_epi64(t0, t2));
                _mm256_storeu_si256(o.add(2), _mm256_unpacklo_epi64(t1, t3));
                _mm256_storeu_si256(o.add(3), _mm256_unpackhi_epi64(t1, t3));
            }
        }
    }

    /// The dense input-gradient panel's pairs (super::dense_backward_panel's loop): two rows' eight
    /// levels, the second's in the upper halves.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dense_backward_pairs(
        values: &[f32],
        group: usize,
        row_pairs: usize,
        inverses: &[f32],
        out: &mut [i32],
    ) {
        let strips = group / 8;
        assert!(values.len() >= 2 * row_pairs * group && out.len() >= strips * row_pairs * 8);
        assert!(inverses.len() >= (2 * row_pairs).div_ceil(super::AW_CHUNK) * group);
        unsafe {
            for s in 0..strips {
                for p in 0..row_pairs {
                    let at = (2 * p / super::AW_CHUNK) * group + 8 * s;
                    let inverse = _mm256_loadu_ps(inverses.as_ptr().add(at));
                    let lo = levels_of(values.as_ptr().add(2 * p * group + 8 * s), inverse);
                    let hi = levels_of(values.as_ptr().add((2 * p + 1) * group + 8 * s), inverse);
                    let pairs = _mm256_blend_epi16::<0xAA>(lo, _mm256_slli_epi32::<16>(hi));
                    _mm256_storeu_si256(
                        out.as_mut_ptr().add((s * row_pairs + p) * 8) as *mut __m256i,
                        pairs,
                    );
                }
            }
        }
    }

    /// Strip s, pair p of the input-gradient panel from `words(p, s)`: the two rows' words holding
    /// the strip's eight columns and their multipliers as a pair.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn decode_backward(
        table: &[i16; 16],
        row_pairs: usize,
        strips: usize,
        words: impl Fn(usize, usize) -> (u32, u32, i32),
        out: &mut [i32],
    ) {
        assert!(out.len() >= strips * row_pairs * 8);
        unsafe {
            let (table_lo, table_hi) = tables(table);
            let shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
            let nibble = _mm256_set1_epi32(15);
            let codes_of = |w: u32| {
                _mm256_and_si256(
                    _mm256_srlv_epi32(_mm256_set1_epi32(w as i32), shifts),
                    nibble,
                )
            };
            for s in 0..strips {
                for p in 0..row_pairs {
                    let (lo, hi, m) = words(p, s);
                    let codes = _mm256_or_si256(codes_of(lo), _mm256_slli_epi32(codes_of(hi), 16));
                    let levels = lookup(table_lo, table_hi, codes);
                    let scaled = _mm256_mulhrs_epi16(levels, _mm256_set1_epi32(m));
                    let at = out.as_mut_ptr().add((s * row_pairs + p) * 8) as *mut __m256i;
                    _mm256_storeu_si256(at, scaled);
                }
            }
        }
    }
}

/// The tensor's parts have the lengths its shape implies (the vector decoders read through them
/// unchecked).
fn check_tensor(q: &QuantTensor) {
    let groups = q.rows * (q.cols / q.spec.group_size);
    assert!(
        q.cols.is_multiple_of(q.spec.group_size)
            && q.packed.len() == q.rows * q.cols / 8
            && q.scales.len() == groups
            && (q.spec.format == QuantFormat::Nf4 || q.mins.len() == groups),
        "int16: a {}x{} tensor whose parts have other lengths",
        q.rows,
        q.cols
    );
}

/// x [tokens, cols] quantized for the forward product: chunks are the weight's groups, pair 4w + c
/// holds columns 8w + c and 8w + c + 4.
fn quantize_forward(kernel: Kernel, x: &[f32], cols: usize, group: usize, sums: bool) -> Quantized {
    let shape = (cols / 2, group / 2);
    Quantized::from_rows(kernel, x, cols, shape, Order::Words, sums)
}

/// y[t] = x[t]·Wᵀ over all of `w`'s rows (a tensor's, or a run of them), for any number of tokens (y
/// is tokens x rows).
pub fn xwt(kernel: Kernel, x: &[f32], w: Frozen, y: &mut [f32]) {
    assert!(kernel.runs_here(), "int16 xwt: this CPU lacks {kernel:?}");
    w.check();
    let (rows, cols) = w.shape();
    let tokens = x.len() / cols;
    assert!(
        x.len() == tokens * cols && y.len() == tokens * rows,
        "int16 xwt: shapes"
    );
    if tokens == 0 || rows == 0 {
        return;
    }
    let int4 = w.with_minimums().is_some();
    let per_block = block_rows(rows, cols);
    let blocks = rows.div_ceil(per_block);
    let y_columns = super::packed_gemm::ColumnRanges::new(y, rows);
    for t0 in (0..tokens).step_by(TOKEN_CHUNK) {
        let tc = TOKEN_CHUNK.min(tokens - t0);
        let qx = quantize_forward(
            kernel,
            &x[t0 * cols..(t0 + tc) * cols],
            cols,
            w.group(),
            int4,
        );
        (0..blocks).into_par_iter().for_each_init(
            || (Panel::default(), Vec::new(), Vec::new()),
            |(panel, out, values), b| {
                let first = b * per_block;
                let count = per_block.min(rows - first);
                w.forward_panel(kernel, first, count, panel, values);
                let stride = panel.strips * 8;
                out.clear();
                out.resize(tc * stride, 0.0);
                run(kernel, qx.view(0, qx.row_pairs), panel, out, stride);
                for (t, results) in out.chunks_exact(stride).enumerate() {
                    // SAFETY: block b alone writes y's columns first..first + count.
                    unsafe { y_columns.row(t0 + t, first, count) }
                        .copy_from_slice(&results[..count]);
                }
            },
        );
    }
}

/// Rows per forward task: a multiple of 16 whose 16-bit panel fits `BLOCK_BYTES`, few enough that every
/// thread gets about four blocks.
fn block_rows(n: usize, cols: usize) -> usize {
    let fit = (BLOCK_BYTES / (2 * cols.max(1))).max(16);
    let share = n.div_ceil(4 * rayon::current_num_threads()).max(1);
    fit.min(share).div_ceil(16) * 16
}

/// One input-gradient task's buffers, kept across its tasks.
struct Scratch {
    panel: Panel,
    task_dx: Vec<f32>,
    /// A dense table's rows as f32.
    values: Vec<f32>,
}

/// Each group's row scales relative to the largest of their chunk of `AW_CHUNK` rows: per group, each
/// row's round(scale / largest · 32767) and per chunk largest / factor · 32768/32767, which turns the
/// product of a level with a multiplier (over 2^15) back into the weight. Over q's rows
/// offset..offset + rows, counted from offset.
fn relative_scales(
    q: &QuantTensor,
    (offset, n): (usize, usize),
    factor: f32,
) -> (Vec<i16>, Vec<f32>) {
    let groups = q.cols / q.spec.group_size;
    let chunks = n.div_ceil(AW_CHUNK);
    let mut multipliers = vec![0i16; groups * n];
    let mut largest = vec![0f32; groups * chunks];
    // On every thread: on one, this was a fiftieth of the input gradient's time with a core idle.
    multipliers
        .par_chunks_mut(n)
        .zip(largest.par_chunks_mut(chunks))
        .enumerate()
        .for_each(|(g, (multipliers, largest))| {
            let scale = |o: usize| q.scales[(offset + o) * groups + g];
            for (c, largest) in largest.iter_mut().enumerate() {
                let rows = c * AW_CHUNK..((c + 1) * AW_CHUNK).min(n);
                let top = rows.clone().map(|o| scale(o).abs()).fold(0f32, f32::max);
                *largest = top / factor * (32768.0 / 32767.0);
                for o in rows {
                    let relative = if top > 0.0 { scale(o) / top } else { 0.0 };
                    multipliers[o] = (relative * 32767.0).round() as i16;
                }
            }
        });
    (multipliers, largest)
}

/// dx (+ when `accumulate`)= a·W (a is tokens x W's rows, dx tokens x cols): the input gradient.
/// a is quantized per 64 rows once; each task owns whole groups of dx's columns and, for each block of
/// rows, decodes their levels times the rows' scales relative to their chunk's largest (4-bit rows) or
/// quantizes each column of the block's 64-row chunks (dense rows).
pub fn aw(kernel: Kernel, a: &[f32], w: Frozen, dx: &mut [f32], accumulate: bool) {
    assert!(kernel.runs_here(), "int16 aw: this CPU lacks {kernel:?}");
    w.check();
    let (rows, cols) = w.shape();
    let g = w.group();
    let tokens = dx.len() / cols;
    assert!(
        dx.len() == tokens * cols && a.len() == tokens * rows,
        "int16 aw: shapes"
    );
    if tokens == 0 || rows == 0 {
        if !accumulate {
            dx.fill(0.0);
        }
        return;
    }
    let groups = cols / g;
    let chunks = rows.div_ceil(AW_CHUNK);
    // 4-bit rows: their codes' levels, and each group's row scales relative to their chunk's.
    let packed = match w {
        Frozen::Packed { q, first, rows } => {
            let (table, factor) = levels(q.spec.format);
            Some((q, first, table, relative_scales(q, (first, rows), factor)))
        }
        Frozen::Dense { .. } => None,
    };
    // A group per task: a task runs its groups one at a time anyway, and with many small tasks the
    // threads finish together (down_proj's 76 groups in 9 tasks left a core idle for a twentieth of
    // its input gradient).
    let per_task = 1;
    let tasks = groups.div_ceil(per_task);
    let block = (BLOCK_BYTES / (2 * g)).clamp(AW_CHUNK, 4 * AW_CHUNK) / AW_CHUNK * AW_CHUNK;
    let dx_columns = super::packed_gemm::ColumnRanges::new(dx, cols);
    for t0 in (0..tokens).step_by(TOKEN_CHUNK) {
        let tc = TOKEN_CHUNK.min(tokens - t0);
        let a_chunk = &a[t0 * rows..(t0 + tc) * rows];
        let shape = (chunks * AW_CHUNK / 2, AW_CHUNK / 2);
        let qa = Quantized::from_rows(kernel, a_chunk, rows, shape, Order::Adjacent, false);
        (0..tasks).into_par_iter().for_each_init(
            || Scratch {
                panel: Panel::default(),
                task_dx: Vec::new(),
                values: Vec::new(),
            },
            |scratch, task| {
                let Scratch {
                    panel,
                    task_dx,
                    values,
                } = scratch;
                let first_group = task * per_task;
                let task_groups = per_task.min(groups - first_group);
                let width = task_groups * g;
                let first_col = first_group * g;
                task_dx.clear();
                task_dx.resize(tc * width, 0.0);
                for first in (0..rows).step_by(block) {
                    let count = block.min(rows - first);
                    let row_pairs = count.div_ceil(AW_CHUNK) * AW_CHUNK / 2;
                    let block_chunks = row_pairs / (AW_CHUNK / 2);
                    for gi in 0..task_groups {
                        let group = first_group + gi;
                        let col = first_col + gi * g;
                        match (w, &packed) {
                            (_, Some((q, offset, table, (multipliers, largest)))) => {
                                let at = group * rows + first;
                                backward_panel(
                                    kernel,
                                    q,
                                    table,
                                    offset + first,
                                    count,
                                    row_pairs,
                                    col,
                                    g / 8,
                                    &multipliers[at..at + count],
                                    &mut panel.pairs,
                                );
                                panel.strips = g / 8;
                                panel.scales.clear();
                                for _ in 0..panel.strips {
                                    for c in 0..block_chunks {
                                        let top = largest[group * chunks + first / AW_CHUNK + c];
                                        panel.scales.extend([top; 8]);
                                    }
                                }
                            }
                            (
                                Frozen::Dense {
                                    table,
                                    first: offset,
                                    ..
                                },
                                None,
                            ) => dense_backward_panel(
                                kernel,
                                table,
                                offset + first,
                                count,
                                row_pairs,
                                col,
                                g,
                                panel,
                                values,
                            ),
                            (Frozen::Packed { .. }, None) => {
                                unreachable!("4-bit rows have their levels")
                            }
                        }
                        let group_dx = &mut task_dx[gi * g..];
                        run(
                            kernel,
                            qa.view(first / 2, row_pairs),
                            panel,
                            group_dx,
                            width,
                        );
                        if let Some((q, offset)) = w.with_minimums() {
                            for t in 0..tc {
                                let at = &a_chunk[t * rows + first..t * rows + first + count];
                                let min_term = (0..count)
                                    .map(|o| at[o] * q.mins[(offset + first + o) * groups + group])
                                    .sum::<f32>();
                                group_dx[t * width..t * width + g]
                                    .iter_mut()
                                    .for_each(|d| *d += min_term);
                            }
                        }
                    }
                }
                for (t, row) in task_dx.chunks_exact(width).enumerate() {
                    // SAFETY: task `task` alone reaches dx's columns first_col..first_col + width.
                    let dst = unsafe { dx_columns.row(t0 + t, first_col, width) };
                    if accumulate {
                        dst.iter_mut().zip(row).for_each(|(d, s)| *d += s);
                    } else {
                        dst.copy_from_slice(row);
                    }
                }
            },
        );
    }
}
