//! Mixed-precision products for the frozen-weight matmuls on CPUs with BF16 dot products (AVX512-BF16,
//! ARM's BF16 extension): operands rounded to bf16, products accumulated in f32 with `vdpbf16ps` or
//! `bfdot` (two multiply-adds per lane per instruction, twice the f32 FMA rate). Used by the default
//! precision; `--precision f32` never comes here. The packing and decoding have AVX-512 versions; on ARM
//! only the kernel is vectorised.
//!
//! The right-hand operand is packed into panels of 32 columns: for each pair of k indices, the 32
//! columns' two values lie side by side (64 bf16 = two 512-bit registers), which is the layout
//! `vdpbf16ps` consumes. The left operand is rounded to bf16 pairs along k and broadcast.
//!
//! Where the CPU has AMX (`CpuPath::Amx`), the same operands go through its tiles instead (amx.rs): the
//! panels are already the tiles' right-hand layout, and the left operand is rows of pairs.

use crate::model::{DenseData, DenseTensor, LinearWeight};
use crate::ops::amx;
use crate::quant::{NF4_CODES, QuantFormat};
use rayon::prelude::*;

const NR: usize = 32;
const MR: usize = 8;

/// Whether the bf16 kernels run here: the CPU has AVX512-BF16 or ARM's BF16 and the active path
/// includes it.
pub fn available() -> bool {
    use crate::ops::isa::{CpuPath, active};
    active().includes(CpuPath::Avx512Bf16) || active().includes(CpuPath::NeonBf16)
}

/// Which instructions multiply the bf16 operands. Both give the products of the same bf16 operands
/// summed in f32 (in another order, so not always the same bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// `vdpbf16ps` (AVX512-BF16) or `bfdot` (ARM BF16).
    Dot,
    /// AMX's `tdpbf16ps` tiles.
    Tiles,
}

impl Bf16Kernel {
    /// The kernel the active CPU path takes.
    pub fn active() -> Bf16Kernel {
        if crate::ops::isa::active().includes(crate::ops::isa::CpuPath::Amx) {
            Bf16Kernel::Tiles
        } else {
            Bf16Kernel::Dot
        }
    }

    /// Every kernel the active path runs (for tests).
    pub fn available() -> Vec<Bf16Kernel> {
        match (available(), Bf16Kernel::active()) {
            (false, _) => Vec::new(),
            (true, Bf16Kernel::Tiles) => vec![Bf16Kernel::Dot, Bf16Kernel::Tiles],
            (true, Bf16Kernel::Dot) => vec![Bf16Kernel::Dot],
        }
    }
}

/// Whether the AVX-512 packing, decoding and kernel run here.
fn avx512_bf16() -> bool {
    crate::ops::isa::active().includes(crate::ops::isa::CpuPath::Avx512Bf16)
}

/// bf16 bits of `x`, rounded to nearest even (as `vcvtne2ps2bf16` rounds).
fn bf16_bits(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// A matrix whose rows can be read as bf16 bits: frozen weights, packed or dense.
pub trait Bf16Rows: Sync {
    fn cols(&self) -> usize;
    /// bf16 bits of row `row`, columns `c0..c0 + out.len()` (a 32-aligned slice, or the whole row).
    fn row_bf16(&self, row: usize, c0: usize, out: &mut [u16]);
    /// The bytes that hold row `row`, columns `c0..c0 + len` (empty when out of range).
    fn row_bytes(&self, row: usize, c0: usize, len: usize) -> &[u8];
    /// The whole matrix as bf16 bits, row-major, when it is stored so (a dense bf16 output projection):
    /// the kernels then read it in place instead of copying every row (2-3% of a step).
    fn bf16_bits(&self) -> Option<&[u16]> {
        None
    }
}

/// Asks the CPU to start loading the bytes of a weight row that will be decoded soon. Weights stream
/// from memory once per product, and without this the decode waits on every cache miss (measured:
/// most of the decode's time in a 0.5B model's step was that one stall).
fn prefetch(w: &impl Bf16Rows, row: usize, c0: usize, len: usize) {
    prefetch_bytes(w.row_bytes(row, c0, len));
}

/// Asks the CPU to start loading `bytes` into its caches (a hint; x86-64 only).
pub(crate) fn prefetch_bytes(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for line in bytes.chunks(64) {
        // SAFETY: prefetching is a hint that never faults; the pointer lies inside a live slice.
        unsafe {
            std::arch::x86_64::_mm_prefetch(
                line.as_ptr() as *const i8,
                std::arch::x86_64::_MM_HINT_T0,
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

impl Bf16Rows for LinearWeight {
    fn cols(&self) -> usize {
        self.shape().1
    }

    fn row_bytes(&self, row: usize, c0: usize, len: usize) -> &[u8] {
        match self {
            LinearWeight::Dense(d) => d.row_bytes(row, c0, len),
            LinearWeight::Quant(q) => {
                let (first, end) = (row * q.cols + c0, row * q.cols + c0 + len);
                let words = (first / 8).min(q.packed.len())..end.div_ceil(8).min(q.packed.len());
                bytemuck::cast_slice(&q.packed[words])
            }
        }
    }

    fn row_bf16(&self, row: usize, c0: usize, out: &mut [u16]) {
        match self {
            LinearWeight::Dense(d) => d.row_bf16(row, c0, out),
            LinearWeight::Quant(q) => {
                let (g, cols) = (q.spec.group_size, q.cols);
                #[cfg(target_arch = "x86_64")]
                if avx512_bf16()
                    && c0.is_multiple_of(32)
                    && out.len().is_multiple_of(32)
                    && g % 32 == 0
                {
                    // SAFETY: `avx512_bf16()` checked AVX512F/BW/BF16; the alignment is checked above.
                    unsafe { decode_span_avx512(q, row, c0, out) };
                    return;
                }
                let groups = cols / g;
                let mut c = c0;
                while c < c0 + out.len() {
                    let len = (g - c % g).min(c0 + out.len() - c);
                    // One 16-entry table per group turns each code into its bf16 value with a lookup,
                    // identical to rounding the f32 dequantized value.
                    let gi = row * groups + c / g;
                    let scale = q.scales[gi];
                    let lut = match q.spec.format {
                        // −0 + x is x for every x, signed zeros included, so the table is exactly
                        // the NF4 product.
                        QuantFormat::Nf4 => group_table(&NF4_CODES, scale, -0.0),
                        QuantFormat::Int4 => group_table(&INT4_CODES, scale, q.mins[gi]),
                    };
                    let dst = &mut out[c - c0..c - c0 + len];
                    for (i, o) in dst.iter_mut().enumerate() {
                        let col = c + i;
                        let word = q.packed[(row * cols + col) / 8];
                        *o = lut[((word >> (4 * (col % 8))) & 0xF) as usize];
                    }
                    c += len;
                }
            }
        }
    }
}

/// The INT4 codes as values: code c stands for min + c·scale.
const INT4_CODES: [f32; 16] = [
    0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
];

/// bf16 bits of min + codes[c]·scale for the 16 codes: one group's lookup table. The product and sum
/// are separate f32 operations (no fused multiply-add), as dequantization computes them.
fn group_table(codes: &[f32; 16], scale: f32, min: f32) -> [u16; 16] {
    #[cfg(target_arch = "x86_64")]
    if avx512_bf16() {
        // SAFETY: `avx512_bf16()` checked AVX512F/BF16.
        return unsafe { group_table_avx512(codes, scale, min) };
    }
    std::array::from_fn(|c| bf16_bits(min + codes[c] * scale))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn group_table_avx512(codes: &[f32; 16], scale: f32, min: f32) -> [u16; 16] {
    use std::arch::x86_64::*;
    let mut out = [0u16; 16];
    // SAFETY: reads the 16 f32 of `codes` and writes the 16 u16 of `out`; unaligned load and store.
    unsafe {
        let v = _mm512_add_ps(
            _mm512_set1_ps(min),
            _mm512_mul_ps(_mm512_loadu_ps(codes.as_ptr()), _mm512_set1_ps(scale)),
        );
        let bits: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
        _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, bits);
    }
    out
}

/// Row `row`, columns `c0..c0 + out.len()` of a packed matrix as bf16 bits, 32 codes per step: the 16
/// bytes of four words widen to 16 u32 lanes, each lane's two nibbles become two u16 lanes in code
/// order, and `vpermw` looks all 32 up in the group's 16-entry table (min + code·scale rounded to bf16,
/// the product and sum separate as dequantization computes them, so each value is the bf16 of the
/// dequantized weight). One pass per span: decoding group by group through separate table and lookup
/// calls cost twice as much. Needs c0 and out.len() multiples of 32 and a group size that is one too.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn decode_span_avx512(
    q: &crate::quant::QuantTensor,
    row: usize,
    c0: usize,
    out: &mut [u16],
) {
    use std::arch::x86_64::*;
    let (g, cols) = (q.spec.group_size, q.cols);
    assert!(
        c0.is_multiple_of(32)
            && out.len().is_multiple_of(32)
            && g % 32 == 0
            && c0 + out.len() <= cols
    );
    let first_word = (row * cols + c0) / 8;
    let words = &q.packed[first_word..first_word + out.len() / 8];
    let (codes, int4) = match q.spec.format {
        QuantFormat::Nf4 => (&NF4_CODES, false),
        QuantFormat::Int4 => (&INT4_CODES, true),
    };
    // SAFETY: step s reads words[4s..4s + 4] (16 bytes) and writes out[32s..32s + 32], inside both
    // slices as out.len() == 8·words.len() is a multiple of 32; the code load reads the 16 f32 of
    // `codes`. All loads and stores are unaligned; the caller checked the CPU features.
    unsafe {
        let code_values = _mm512_loadu_ps(codes.as_ptr());
        let low = _mm512_set1_epi32(0xF);
        let mut table = _mm512_setzero_si512();
        for s in 0..out.len() / 32 {
            let c = c0 + 32 * s;
            if s == 0 || c.is_multiple_of(g) {
                let gi = row * (cols / g) + c / g;
                // −0 + x is x for every x, signed zeros included, so NF4's table is exactly the product.
                let min = if int4 { q.mins[gi] } else { -0.0 };
                let values = _mm512_add_ps(
                    _mm512_set1_ps(min),
                    _mm512_mul_ps(code_values, _mm512_set1_ps(q.scales[gi])),
                );
                let bits: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(values));
                table = _mm512_castsi256_si512(bits);
            }
            let bytes = _mm_loadu_si128(words.as_ptr().add(4 * s) as *const __m128i);
            let wide = _mm512_cvtepu8_epi32(bytes);
            let codes = _mm512_or_si512(
                _mm512_and_si512(wide, low),
                _mm512_slli_epi32(_mm512_srli_epi32(wide, 4), 16),
            );
            _mm512_storeu_si512(
                out.as_mut_ptr().add(32 * s) as *mut __m512i,
                _mm512_permutexvar_epi16(codes, table),
            );
        }
    }
}

impl Bf16Rows for DenseTensor {
    fn cols(&self) -> usize {
        self.cols
    }

    fn bf16_bits(&self) -> Option<&[u16]> {
        match &self.data {
            DenseData::BF16(v) => Some(bytemuck::cast_slice(v)),
            _ => None,
        }
    }

    fn row_bytes(&self, row: usize, c0: usize, len: usize) -> &[u8] {
        let total = self.rows * self.cols;
        let range = (row * self.cols + c0).min(total)..(row * self.cols + c0 + len).min(total);
        match &self.data {
            DenseData::F32(v) => bytemuck::cast_slice(&v[range]),
            DenseData::F16(v) => bytemuck::cast_slice(&v[range]),
            DenseData::BF16(v) => bytemuck::cast_slice(&v[range]),
        }
    }

    fn row_bf16(&self, row: usize, c0: usize, out: &mut [u16]) {
        let start = row * self.cols + c0;
        let range = start..start + out.len();
        match &self.data {
            DenseData::BF16(v) => out
                .iter_mut()
                .zip(&v[range])
                .for_each(|(o, x)| *o = x.to_bits()),
            DenseData::F16(v) => out
                .iter_mut()
                .zip(&v[range])
                .for_each(|(o, x)| *o = bf16_bits(x.to_f32())),
            DenseData::F32(v) => out
                .iter_mut()
                .zip(&v[range])
                .for_each(|(o, x)| *o = bf16_bits(*x)),
        }
    }
}

/// Rows of an activation matrix A [m, k] rounded to bf16 and laid out for the kernel: groups of rows,
/// and within a group, for each pair of k indices, the group's rows' two values side by side (one u32
/// per row, low half first). As the right-hand operand of x·Wᵀ a group is 32 rows, so that a k-pair
/// is the two 512-bit registers `vdpbf16ps` consumes; as the left-hand operand of a·W a group is the
/// kernel's 8 rows, whose pairs it broadcasts one at a time from 32 consecutive bytes. Rows past m and
/// the odd k's partner are zero.
///
/// For the AMX tiles' a·W, a is instead rows one after another (`row_stride` pairs each: k's pairs,
/// then zeros to a multiple of 16), in blocks of 32 rows (zero rows past m).
pub struct PackedRows {
    m: usize,
    k: usize,
    k_pairs: usize,
    group: usize,
    data: Vec<u32>,
    kernel: Bf16Kernel,
    row_stride: Option<usize>,
}

impl PackedRows {
    /// x packed for `matmul_xwt` on the active path's kernel.
    pub fn for_xwt(x: &[f32], m: usize, k: usize) -> Self {
        Self::for_xwt_on(Bf16Kernel::active(), x, m, k)
    }

    /// a packed for `matmul_aw` on the active path's kernel.
    pub fn for_aw(a: &[f32], m: usize, k: usize) -> Self {
        Self::for_aw_on(Bf16Kernel::active(), a, m, k)
    }

    /// x packed for `matmul_xwt` on `kernel` (one of `Bf16Kernel::available()`): both kernels read
    /// the same layout.
    pub fn for_xwt_on(kernel: Bf16Kernel, x: &[f32], m: usize, k: usize) -> Self {
        let mut packed = Self::new(x, m, k, NR);
        packed.kernel = kernel;
        packed
    }

    /// a packed for `matmul_aw` on `kernel` (one of `Bf16Kernel::available()`).
    pub fn for_aw_on(kernel: Bf16Kernel, a: &[f32], m: usize, k: usize) -> Self {
        match kernel {
            Bf16Kernel::Dot => Self::new(a, m, k, MR),
            Bf16Kernel::Tiles => Self::rows_for_tiles(a, m, k),
        }
    }

    /// a's rows as the tiles' left operand (the layout described above).
    fn rows_for_tiles(a: &[f32], m: usize, k: usize) -> Self {
        assert_eq!(a.len(), m * k, "bf16 pack: A is m x k");
        let k_pairs = k.div_ceil(2);
        let stride = k_pairs.next_multiple_of(amx::STEP_PAIRS);
        let mut data = spare_buffer(m.next_multiple_of(amx::BLOCK) * stride);
        // Every word is written (a reused buffer holds stale words).
        data.par_chunks_mut(stride.max(1))
            .enumerate()
            .for_each(|(r, dst)| {
                if r < m {
                    round_pairs(&a[r * k..(r + 1) * k], &mut dst[..k_pairs]);
                    dst[k_pairs..].fill(0);
                } else {
                    dst.fill(0);
                }
            });
        PackedRows {
            m,
            k,
            k_pairs,
            group: amx::BLOCK,
            data,
            kernel: Bf16Kernel::Tiles,
            row_stride: Some(stride),
        }
    }

    fn new(a: &[f32], m: usize, k: usize, group: usize) -> Self {
        assert_eq!(a.len(), m * k, "bf16 pack: A is m x k");
        let k_pairs = k.div_ceil(2);
        let mut data = spare_buffer(m.div_ceil(group) * k_pairs * group);
        // Every word of `data` is written below (a reused buffer holds stale words).
        data.par_chunks_mut((k_pairs * group).max(1))
            .enumerate()
            .for_each_init(
                || vec![0u32; k_pairs],
                |pairs, (g, dst)| {
                    let rows = &a[g * group * k..((g + 1) * group).min(m) * k];
                    // Whole blocks of 16 pairs through a transpose in registers; the rest (and CPUs
                    // without AVX512-BF16) one row at a time.
                    let scalar_from = pack_register_blocks(rows, k, group, dst);
                    let present = group.min(m - g * group);
                    for t in 0..present {
                        let tail = &mut pairs[scalar_from..];
                        round_pairs(&rows[t * k + 2 * scalar_from..(t + 1) * k], tail);
                        for (kp, &pair) in tail.iter().enumerate() {
                            dst[(scalar_from + kp) * group + t] = pair;
                        }
                    }
                    // The padding rows of the last group (the register blocks zeroed their part).
                    for kp in scalar_from..k_pairs {
                        dst[kp * group + present..(kp + 1) * group].fill(0);
                    }
                },
            );
        PackedRows {
            m,
            k,
            k_pairs,
            group,
            data,
            kernel: Bf16Kernel::Dot,
            row_stride: None,
        }
    }

    fn groups(&self) -> usize {
        self.m.div_ceil(self.group)
    }

    /// Group `g`'s words from k-pair `kp` on.
    fn group_from(&self, g: usize, kp: usize) -> &[u32] {
        let group = self.group;
        &self.data[(g * self.k_pairs + kp) * group..(g + 1) * self.k_pairs * group]
    }
}

impl Drop for PackedRows {
    fn drop(&mut self) {
        let mut spare = SPARE_BUFFERS.lock().unwrap_or_else(|e| e.into_inner());
        if spare.len() < MAX_SPARE_BUFFERS {
            spare.push(std::mem::take(&mut self.data));
        }
    }
}

/// Packed-operand buffers that dropped `PackedRows` left behind. A fresh buffer had to be zeroed (or its
/// pages faulted in) before the packing overwrote it: for the k/v projection of 256 tokens that pass
/// cost a sixth of the product.
static SPARE_BUFFERS: std::sync::Mutex<Vec<Vec<u32>>> = std::sync::Mutex::new(Vec::new());

/// A step keeps at most this many packed operands alive at once (q/k/v's input and dy), so a few spares
/// serve it; more would only hold memory.
const MAX_SPARE_BUFFERS: usize = 4;

/// A buffer of `len` words with arbitrary contents: the smallest spare that holds them, else the
/// largest spare grown, else a new one. (Best fit keeps each spare at the size of the operand it
/// served: a buffer cut short would be zeroed again beyond its cut when it grows back.)
fn spare_buffer(len: usize) -> Vec<u32> {
    let mut spare = SPARE_BUFFERS.lock().unwrap_or_else(|e| e.into_inner());
    let fits = (0..spare.len())
        .filter(|&i| spare[i].len() >= len)
        .min_by_key(|&i| spare[i].len());
    let largest = (0..spare.len()).max_by_key(|&i| spare[i].len());
    let mut buffer = fits
        .or(largest)
        .map(|i| spare.swap_remove(i))
        .unwrap_or_default();
    drop(spare);
    if buffer.len() >= len {
        buffer.truncate(len);
    } else {
        // Only the part beyond the old length is written here.
        buffer.resize(len, 0);
    }
    buffer
}

/// Packs the group's rows (`rows`, k columns) into `dst` in whole blocks of 16 pairs through a transpose
/// in registers, where the CPU can; returns how many pairs of each row it packed (0 elsewhere).
fn pack_register_blocks(rows: &[f32], k: usize, group: usize, dst: &mut [u32]) -> usize {
    #[cfg(target_arch = "x86_64")]
    if avx512_bf16() && group.is_multiple_of(8) {
        let packed = k / 32 * 16;
        for t0 in (0..group).step_by(16) {
            for kp0 in (0..packed).step_by(16) {
                // SAFETY: `avx512_bf16()` checked AVX512F/BF16; the block's reads (pairs kp0..kp0 + 16
                // < k / 2 of rows that exist) and writes are bounds-checked inside.
                unsafe { pack_block_avx512(rows, k, t0, kp0, group, dst) };
            }
        }
        return packed;
    }
    let _ = (rows, k, group, dst);
    0
}

/// pairs[p] = bf16(src[2p]) | bf16(src[2p + 1]) << 16, the missing partner of an odd length zero.
fn round_pairs(src: &[f32], pairs: &mut [u32]) {
    debug_assert_eq!(pairs.len(), src.len().div_ceil(2));
    // 32 values (16 pairs) at a time with the CPU's own conversion, the rest one by one.
    let vectorised = if avx512_bf16() {
        (src.len() / 32) * 16
    } else {
        0
    };
    #[cfg(target_arch = "x86_64")]
    if vectorised > 0 {
        // SAFETY: `avx512_bf16()` checked AVX512F/BF16; the call reads src[..2·vectorised] and writes
        // pairs[..vectorised], within both slices (vectorised = 16·(len / 32)).
        unsafe { round_pairs_avx512(&src[..2 * vectorised], &mut pairs[..vectorised]) };
    }
    for (kp, pair) in pairs.iter_mut().enumerate().skip(vectorised) {
        let lo = bf16_bits(src[2 * kp]) as u32;
        let hi = src.get(2 * kp + 1).map_or(0, |&v| bf16_bits(v) as u32);
        *pair = lo | (hi << 16);
    }
}

/// Pairs kp0..kp0 + 16 of rows t0..t0 + 16 of a group (`rows`, row-major with k columns; rows past its
/// end count as zero) into the group's packed block `dst`, where pair kp of row t lives at
/// dst[kp·group + t]. Each row's 16 pairs are rounded into one register, the 16 registers transposed
/// (four rounds of `vpermt2d`, each swapping one bit of the row index with one of the pair index), and
/// each resulting register (one pair index, 16 rows) stored whole: the element-by-element scatter cost
/// a third of the time of a small projection's product.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_block_avx512(
    rows: &[f32],
    k: usize,
    t0: usize,
    kp0: usize,
    group: usize,
    dst: &mut [u32],
) {
    use std::arch::x86_64::*;
    let width = (group - t0).min(16);
    let present = (rows.len() / k).saturating_sub(t0).min(width);
    assert!(2 * kp0 + 32 <= k && (kp0 + 15) * group + t0 + width <= dst.len());
    // SAFETY: row t's loads read rows[(t0 + t)·k + 2·kp0..][..32], inside `rows` for the `present`
    // rows (asserted k bound); each store writes dst[(kp0 + kp)·group + t0..][..width], inside `dst` as
    // asserted. Loads and stores are unaligned; the caller checked the CPU features.
    unsafe {
        let mut r: [__m512i; 16] = [_mm512_setzero_si512(); 16];
        for (t, reg) in r.iter_mut().enumerate().take(present) {
            let src = rows.as_ptr().add((t0 + t) * k + 2 * kp0);
            let (lo, hi) = (_mm512_loadu_ps(src), _mm512_loadu_ps(src.add(16)));
            // The second operand fills the low 16 bf16 lanes: values 0..32 in order, as 16 pairs.
            *reg = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
        }
        for bit in [8usize, 4, 2, 1] {
            // Registers i and i + bit exchange the lanes where their lane's bit differs from theirs.
            let low: [u32; 16] =
                std::array::from_fn(|l| if l & bit == 0 { l } else { 16 + l - bit } as u32);
            let high: [u32; 16] =
                std::array::from_fn(|l| if l & bit == 0 { l + bit } else { 16 + l } as u32);
            let (low, high) = (
                _mm512_loadu_si512(low.as_ptr() as *const __m512i),
                _mm512_loadu_si512(high.as_ptr() as *const __m512i),
            );
            for i in (0..16).filter(|i| i & bit == 0) {
                let (a, b) = (r[i], r[i + bit]);
                r[i] = _mm512_permutex2var_epi32(a, low, b);
                r[i + bit] = _mm512_permutex2var_epi32(a, high, b);
            }
        }
        let mask: __mmask16 = if width == 16 {
            0xFFFF
        } else {
            (1 << width) - 1
        };
        for (kp, column) in r.iter().enumerate() {
            let out = dst.as_mut_ptr().add((kp0 + kp) * group + t0);
            _mm512_mask_storeu_epi32(out as *mut i32, mask, *column);
        }
    }
}

/// pairs[p] = bf16(src[2p]) | bf16(src[2p + 1]) << 16, rounding to nearest even like `bf16_bits`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn round_pairs_avx512(src: &[f32], pairs: &mut [u32]) {
    use std::arch::x86_64::*;
    debug_assert!(src.len() == 2 * pairs.len() && pairs.len().is_multiple_of(16));
    // SAFETY: step s reads src[32s..32s + 32] and writes pairs[16s..16s + 16], in bounds by the length
    // contract above; loads and stores are unaligned.
    unsafe {
        for s in 0..pairs.len() / 16 {
            let lo = _mm512_loadu_ps(src.as_ptr().add(32 * s));
            let hi = _mm512_loadu_ps(src.as_ptr().add(32 * s + 16));
            // The second operand fills the low 16 bf16 lanes: values 0..32 in order, as 16 pairs.
            let packed: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(pairs.as_mut_ptr().add(16 * s) as *mut __m512i, packed);
        }
    }
}

/// The output matrix C shared by the tasks of one product. Each task owns a disjoint set of C's columns
/// (x·Wᵀ splits W's rows, dy·W splits W's columns), which no slice split can express, so the tasks
/// write through a raw pointer.
struct SharedOut {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: the pointer comes from a `&mut [f32]` that outlives the parallel section, and tasks write
// disjoint elements (see `row`'s contract), so sharing it between threads cannot race.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    fn new(c: &mut [f32]) -> Self {
        SharedOut {
            ptr: c.as_mut_ptr(),
            len: c.len(),
        }
    }

    /// C[c_row0 + i, c_col0 + j] (+)= tile[i][j] for i < rows, j < cols. Callers must be the only task
    /// touching these elements.
    #[allow(clippy::too_many_arguments)]
    fn add_tile(
        &self,
        tile: &[[f32; NR]; MR],
        c_row0: usize,
        c_col0: usize,
        ldc: usize,
        rows: usize,
        cols: usize,
        accumulate: bool,
    ) {
        for (i, tile_row) in tile.iter().enumerate().take(rows) {
            let dst = self.row(c_row0 + i, ldc, c_col0, cols);
            if accumulate {
                dst.iter_mut().zip(tile_row).for_each(|(d, v)| *d += v);
            } else {
                dst.copy_from_slice(&tile_row[..cols]);
            }
        }
    }

    /// C[c_row0 + j, c_col0 + i] (+)= tile[i][j] for i < rows, j < cols: the tile transposed.
    #[allow(clippy::too_many_arguments)]
    fn add_tile_transposed(
        &self,
        tile: &[[f32; NR]; MR],
        c_row0: usize,
        c_col0: usize,
        ldc: usize,
        rows: usize,
        cols: usize,
        accumulate: bool,
    ) {
        #[cfg(target_arch = "x86_64")]
        if rows == MR && avx512_bf16() {
            // SAFETY: `avx512_bf16()` checked AVX-512, which includes AVX2.
            unsafe { self.add_tile_transposed_avx2(tile, c_row0, c_col0, ldc, cols, accumulate) };
            return;
        }
        // j indexes the tile's second dimension, not one slice.
        #[allow(clippy::needless_range_loop)]
        for j in 0..cols {
            let dst = self.row(c_row0 + j, ldc, c_col0, rows);
            for (i, d) in dst.iter_mut().enumerate() {
                *d = if accumulate {
                    *d + tile[i][j]
                } else {
                    tile[i][j]
                };
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn add_tile_transposed_avx2(
        &self,
        tile: &[[f32; NR]; MR],
        c_row0: usize,
        c_col0: usize,
        ldc: usize,
        cols: usize,
        accumulate: bool,
    ) {
        use std::arch::x86_64::*;
        for j0 in (0..cols).step_by(8) {
            // SAFETY: j0 + 8 <= NR as NR is a multiple of 8; the caller checked AVX2.
            let columns = unsafe { tile_columns_avx2(tile, j0) };
            for (j, column) in columns.iter().enumerate().take(cols - j0) {
                let dst = self.row(c_row0 + j0 + j, ldc, c_col0, MR);
                // SAFETY: `dst` holds exactly the MR = 8 floats loaded and stored.
                unsafe {
                    let value = if accumulate {
                        _mm256_add_ps(_mm256_loadu_ps(dst.as_ptr()), *column)
                    } else {
                        *column
                    };
                    _mm256_storeu_ps(dst.as_mut_ptr(), value);
                }
            }
        }
    }

    /// C[row, col..col + len] as a slice. Callers must be the only task touching these elements.
    #[allow(clippy::mut_from_ref)]
    fn row(&self, row: usize, ldc: usize, col: usize, len: usize) -> &mut [f32] {
        assert!(row * ldc + col + len <= self.len, "bf16 gemm: C too small");
        // SAFETY: the assertion bounds the slice within C; exclusivity is the caller's contract (tasks
        // own disjoint column ranges of C, and each task writes one slice at a time).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(row * ldc + col), len) }
    }
}

/// Columns `j0..j0 + 8` of the tile as eight registers, each one column (the tile's MR = 8 rows): an 8x8
/// transpose in registers. Transposing element by element cost a tenth of the forward products.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn tile_columns_avx2(tile: &[[f32; NR]; MR], j0: usize) -> [std::arch::x86_64::__m256; 8] {
    use std::arch::x86_64::*;
    const { assert!(MR == 8, "one 256-bit register holds a tile column") };
    assert!(j0 + 8 <= NR);
    // SAFETY: each load reads tile[i][j0..j0 + 8], inside the row as asserted.
    let r: [__m256; 8] =
        std::array::from_fn(|i| unsafe { _mm256_loadu_ps(tile[i][j0..].as_ptr()) });
    let t = [
        _mm256_unpacklo_ps(r[0], r[1]),
        _mm256_unpackhi_ps(r[0], r[1]),
        _mm256_unpacklo_ps(r[2], r[3]),
        _mm256_unpackhi_ps(r[2], r[3]),
        _mm256_unpacklo_ps(r[4], r[5]),
        _mm256_unpackhi_ps(r[4], r[5]),
        _mm256_unpacklo_ps(r[6], r[7]),
        _mm256_unpackhi_ps(r[6], r[7]),
    ];
    let u = [
        _mm256_shuffle_ps::<0x44>(t[0], t[2]),
        _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
        _mm256_shuffle_ps::<0x44>(t[1], t[3]),
        _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
        _mm256_shuffle_ps::<0x44>(t[4], t[6]),
        _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
        _mm256_shuffle_ps::<0x44>(t[5], t[7]),
        _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
    ];
    [
        _mm256_permute2f128_ps::<0x20>(u[0], u[4]),
        _mm256_permute2f128_ps::<0x20>(u[1], u[5]),
        _mm256_permute2f128_ps::<0x20>(u[2], u[6]),
        _mm256_permute2f128_ps::<0x20>(u[3], u[7]),
        _mm256_permute2f128_ps::<0x31>(u[0], u[4]),
        _mm256_permute2f128_ps::<0x31>(u[1], u[5]),
        _mm256_permute2f128_ps::<0x31>(u[2], u[6]),
        _mm256_permute2f128_ps::<0x31>(u[3], u[7]),
    ]
}

/// Buffers a product's tasks reuse on each thread from one product to the next. Fresh ones per split of
/// the work (`for_each_init`) were allocated and zeroed again and again: a tenth of a small product.
#[derive(Default)]
struct Scratch {
    words: Vec<u32>,
    tiles: Vec<[[f32; NR]; MR]>,
    even: Vec<u16>,
    odd: Vec<u16>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// Runs `f` with this thread's scratch buffers (their contents are whatever the last task left). `f`
/// must not start parallel work: a task stolen meanwhile would find the buffers borrowed.
fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with_borrow_mut(f)
}

/// `count` tile accumulators. The first k chunk overwrites them, so they keep whatever an earlier task
/// left, unless there is no chunk at all (k = 0): then they must read zero.
fn prepare_tiles(tiles: &mut Vec<[[f32; NR]; MR]>, count: usize, k_pairs: usize) {
    tiles.resize(count, [[0f32; NR]; MR]);
    if k_pairs == 0 {
        tiles.fill([[0f32; NR]; MR]);
    }
}

/// k-pairs per chunk of the inner dimension, chosen so that the activations' chunk (all of its rows)
/// takes about 256 KiB and stays in L2 while every weight tile passes over it.
fn k_chunk(packed: &PackedRows) -> usize {
    // A multiple of 32 pairs, so that chunks start on 64-column boundaries, where the packed weights'
    // fast decode applies.
    (256 * 1024 / (packed.m.next_multiple_of(packed.group).max(1) * 4)).clamp(64, 1024) / 32 * 32
}

/// How many rows ahead of the decode the weight bytes are prefetched.
const PREFETCH_ROWS: usize = 4;

/// Tasks per thread: enough to balance uneven work, few enough that each decodes a useful block.
const TASKS_PER_THREAD: usize = 4;

/// C[t, c_col + j] (+)= Σ_k x[t, k]·W[start + j, k] for j < n: x·Wᵀ for a block of W's rows, each
/// weight decoded to bf16 exactly once. W's rows are the kernel's left operand (a decoded row is already
/// a run of k-pairs), x the right one, so the kernel computes Cᵀ and the tile is stored transposed.
#[allow(clippy::too_many_arguments)]
pub fn matmul_xwt(
    x: &PackedRows,
    w: &impl Bf16Rows,
    start: usize,
    n: usize,
    c: &mut [f32],
    ldc: usize,
    c_col: usize,
    accumulate: bool,
) {
    assert!(available(), "bf16 kernels need AVX512-BF16 or ARM BF16");
    assert_eq!(w.cols(), x.k, "bf16 x·Wᵀ: inner dimensions differ");
    assert!(
        x.group == NR && x.row_stride.is_none(),
        "bf16 x·Wᵀ: x must be packed with PackedRows::for_xwt"
    );
    let (k, k_pairs, m, blocks) = (x.k, x.k_pairs, x.m, x.groups());
    if x.kernel == Bf16Kernel::Tiles && k > 0 && k.is_multiple_of(2 * amx::STEP_PAIRS) {
        return tiles_xwt(x, w, start, n, (c, ldc, c_col), accumulate);
    }
    let kc_max = k_chunk(x);
    let task_rows = (n / (rayon::current_num_threads() * TASKS_PER_THREAD))
        .next_multiple_of(MR)
        .clamp(MR, 64);
    let in_place = in_place_pairs(w, k);
    let out = SharedOut::new(c);
    (0..n.div_ceil(task_rows)).into_par_iter().for_each(|task| {
        with_scratch(|scratch| {
            let (decoded, tiles) = (&mut scratch.words, &mut scratch.tiles);
            let r0 = task * task_rows;
            let rows = task_rows.min(n - r0);
            let row_blocks = rows.div_ceil(MR);
            // Cᵀ for this task's rows, tile by tile, summed over the k chunks and stored transposed at
            // the end.
            prepare_tiles(tiles, row_blocks * blocks, k_pairs);
            let in_place = in_place.filter(|_| rows.is_multiple_of(MR));
            for kc0 in (0..k_pairs).step_by(kc_max) {
                let kc = kc_max.min(k_pairs - kc0);
                if let Some(pairs) = in_place {
                    for rb in 0..row_blocks {
                        let first_row = start + r0 + rb * MR;
                        for block in 0..blocks {
                            kernel(
                                &pairs[first_row * k_pairs + kc0..],
                                (k_pairs, 1),
                                x.group_from(block, kc0),
                                kc,
                                &mut tiles[rb * blocks + block],
                                kc0 > 0,
                            );
                        }
                    }
                    continue;
                }
                decode_rows(
                    w,
                    k,
                    (start + r0, rows, row_blocks * MR),
                    (kc0, kc),
                    decoded,
                );
                for rb in 0..row_blocks {
                    for block in 0..blocks {
                        kernel(
                            &decoded[rb * MR * kc..(rb + 1) * MR * kc],
                            (kc, 1),
                            x.group_from(block, kc0),
                            kc,
                            &mut tiles[rb * blocks + block],
                            kc0 > 0,
                        );
                    }
                }
            }
            for rb in 0..row_blocks {
                for block in 0..blocks {
                    out.add_tile_transposed(
                        &tiles[rb * blocks + block],
                        block * NR,
                        c_col + r0 + rb * MR,
                        ldc,
                        MR.min(rows - rb * MR),
                        NR.min(m - block * NR),
                        accumulate,
                    );
                }
            }
        })
    });
}

/// W's rows read in place as a kernel's left operand, where W is stored as bf16 with an even k: bf16
/// pairs along k, rows k/2 pairs apart.
fn in_place_pairs(w: &impl Bf16Rows, k: usize) -> Option<&[u32]> {
    w.bf16_bits()
        .filter(|_| k.is_multiple_of(2))
        .and_then(|bits| bytemuck::try_cast_slice(bits).ok())
}

/// W's rows `first..first + rows` of the k-pairs `kc0..kc0 + kc` decoded into `decoded` (`kc` pairs per
/// row, zero past k and in the rows up to `padded_rows`), the decode running `PREFETCH_ROWS` ahead of
/// the bytes it reads.
fn decode_rows(
    w: &impl Bf16Rows,
    k: usize,
    (first, rows, padded_rows): (usize, usize, usize),
    (kc0, kc): (usize, usize),
    decoded: &mut Vec<u32>,
) {
    // Every word is written below (the decoded span, the odd k's zero partner, the zero padding rows),
    // so the buffer is not cleared first: that would double its traffic.
    decoded.resize(padded_rows * kc, 0);
    let span = (2 * kc).min(k - 2 * kc0);
    for r in 0..rows {
        prefetch(w, first + r + PREFETCH_ROWS, 2 * kc0, span);
        let row: &mut [u16] = bytemuck::cast_slice_mut(&mut decoded[r * kc..][..kc]);
        w.row_bf16(first + r, 2 * kc0, &mut row[..span]);
        row[span..].fill(0);
    }
    decoded[rows * kc..padded_rows * kc].fill(0);
}

/// `matmul_xwt` on AMX tiles, for a k of whole tile steps (32): blocks of 32 of W's rows (decoded, or
/// in place) by 32 tokens (x's groups), summed over k in the tiles and stored transposed.
fn tiles_xwt(
    x: &PackedRows,
    w: &impl Bf16Rows,
    start: usize,
    n: usize,
    (c, ldc, c_col): (&mut [f32], usize, usize),
    accumulate: bool,
) {
    const BLOCK: usize = amx::BLOCK;
    let (k, k_pairs, m, blocks) = (x.k, x.k_pairs, x.m, x.groups());
    let kc_max = k_chunk(x);
    let task_rows = (n / (rayon::current_num_threads() * TASKS_PER_THREAD))
        .next_multiple_of(BLOCK)
        .clamp(BLOCK, 2 * BLOCK);
    let in_place = in_place_pairs(w, k);
    let out = SharedOut::new(c);
    (0..n.div_ceil(task_rows)).into_par_iter().for_each(|task| {
        with_scratch(|scratch| {
            let (decoded, tiles) = (&mut scratch.words, &mut scratch.tiles);
            let r0 = task * task_rows;
            let rows = task_rows.min(n - r0);
            let row_blocks = rows.div_ceil(BLOCK);
            // Per (row block, token group) four MR x NR tiles: 32 rows of 32 sums, one after another.
            const SUB: usize = BLOCK / MR;
            tiles.resize(row_blocks * blocks * SUB, [[0f32; NR]; MR]);
            let in_place = in_place.filter(|_| rows.is_multiple_of(BLOCK));
            let mut amx_tiles = amx::Tiles::start();
            for kc0 in (0..k_pairs).step_by(kc_max) {
                let kc = kc_max.min(k_pairs - kc0);
                let (rows_pairs, stride): (&[u32], usize) = match in_place {
                    Some(pairs) => (&pairs[(start + r0) * k_pairs + kc0..], k_pairs),
                    None => {
                        decode_rows(
                            w,
                            k,
                            (start + r0, rows, row_blocks * BLOCK),
                            (kc0, kc),
                            decoded,
                        );
                        (decoded, kc)
                    }
                };
                for rb in 0..row_blocks {
                    for block in 0..blocks {
                        let sums = &mut tiles[(rb * blocks + block) * SUB..][..SUB];
                        amx_tiles.block(
                            &rows_pairs[rb * BLOCK * stride..],
                            stride,
                            x.group_from(block, kc0),
                            kc,
                            bytemuck::cast_slice_mut(sums),
                            kc0 > 0,
                        );
                    }
                }
            }
            drop(amx_tiles);
            for rb in 0..row_blocks {
                for block in 0..blocks {
                    for sub in 0..SUB {
                        let row = rb * BLOCK + sub * MR;
                        if row >= rows {
                            break;
                        }
                        out.add_tile_transposed(
                            &tiles[(rb * blocks + block) * SUB + sub],
                            block * NR,
                            c_col + r0 + row,
                            ldc,
                            MR.min(rows - row),
                            NR.min(m - block * NR),
                            accumulate,
                        );
                    }
                }
            }
        })
    });
}

/// Runs `task(scratch, (j0, width, blocks))` in parallel for each task's run of `blocks` 32-column
/// blocks of W's n columns from column j0 (`width` of them real), with this thread's scratch buffers,
/// their even and odd rows zeroed: the column split of both a·W kernels.
fn for_each_column_task(n: usize, task: impl Fn(&mut Scratch, (usize, usize, usize)) + Sync) {
    let col_blocks = n.div_ceil(NR);
    let task_blocks = (col_blocks / (rayon::current_num_threads() * TASKS_PER_THREAD)).clamp(1, 4);
    (0..col_blocks.div_ceil(task_blocks))
        .into_par_iter()
        .for_each(|t| {
            with_scratch(|scratch| {
                for row in [&mut scratch.even, &mut scratch.odd] {
                    row.resize(4 * NR, 0);
                    row.fill(0);
                }
                let b0 = t * task_blocks;
                let blocks = task_blocks.min(col_blocks - b0);
                task(scratch, (b0 * NR, (blocks * NR).min(n - b0 * NR), blocks))
            })
        });
}

/// C[t, c_col + j] (+)= Σ_q a[t, q]·W[start + q, j] for every column j of W: dy·W over the block of W's
/// rows `start..start + a.k`, each weight decoded to bf16 exactly once. Pairs of W's rows are
/// interleaved into 32-column panels (the kernel's right operand); a's rows are broadcast.
pub fn matmul_aw(
    a: &PackedRows,
    w: &impl Bf16Rows,
    start: usize,
    c: &mut [f32],
    ldc: usize,
    c_col: usize,
    accumulate: bool,
) {
    assert!(available(), "bf16 kernels need AVX512-BF16 or ARM BF16");
    if a.kernel == Bf16Kernel::Tiles {
        return tiles_aw(a, w, start, (c, ldc, c_col), accumulate);
    }
    assert_eq!(
        a.group, MR,
        "bf16 a·W: a must be packed with PackedRows::for_aw"
    );
    let (n, k_pairs, m) = (w.cols(), a.k_pairs, a.m);
    let kc_max = k_chunk(a);
    let out = SharedOut::new(c);
    for_each_column_task(n, |scratch, (j0, width, blocks)| {
        let Scratch {
            words: panel,
            even,
            odd,
            tiles,
        } = scratch;
        // This task's tiles of C, summed over the k chunks and stored once at the end: a long
        // k (the output projection's 151936) has hundreds of chunks, and adding each chunk's
        // partial tiles into C cost as much again as storing them.
        prepare_tiles(tiles, a.groups() * blocks, k_pairs);
        for kc0 in (0..k_pairs).step_by(kc_max) {
            let kc = kc_max.min(k_pairs - kc0);
            let columns = (j0, width, blocks);
            fill_panel(w, (start, a.k), (kc0, kc), columns, (even, odd), panel);
            for g in 0..a.groups() {
                let a_group = a.group_from(g, kc0);
                for b in 0..blocks {
                    kernel(
                        a_group,
                        (1, MR),
                        &panel[b * kc * NR..(b + 1) * kc * NR],
                        kc,
                        &mut tiles[g * blocks + b],
                        kc0 > 0,
                    );
                }
            }
        }
        for g in 0..a.groups() {
            for b in 0..blocks {
                out.add_tile(
                    &tiles[g * blocks + b],
                    g * MR,
                    c_col + j0 + b * NR,
                    ldc,
                    MR.min(m - g * MR),
                    NR.min(n - j0 - b * NR),
                    accumulate,
                );
            }
        }
    });
}

/// The panels of W's rows `start + 2·kc0..` (`kc` pairs of rows; rows at or past `start + k` read as
/// zeros) for the `blocks` 32-column blocks from column j0 (`width` of them real, the rest zero):
/// panel[(b·kc + kp)·NR + j] is column j0 + 32b + j of rows 2(kc0 + kp) and 2(kc0 + kp) + 1.
fn fill_panel(
    w: &impl Bf16Rows,
    (start, k): (usize, usize),
    (kc0, kc): (usize, usize),
    (j0, width, blocks): (usize, usize, usize),
    (even, odd): (&mut [u16], &mut [u16]),
    panel: &mut Vec<u32>,
) {
    let n = w.cols();
    panel.resize(blocks * kc * NR, 0);
    for kp in 0..kc {
        let q = 2 * (kc0 + kp);
        prefetch(w, start + q + PREFETCH_ROWS, j0, width);
        prefetch(w, start + q + PREFETCH_ROWS + 1, j0, width);
        let (pair_even, pair_odd): (&[u16], &[u16]) = match w.bf16_bits() {
            Some(bits) if width == blocks * NR && q + 1 < k => (
                &bits[(start + q) * n + j0..][..width],
                &bits[(start + q + 1) * n + j0..][..width],
            ),
            _ => {
                if q < k {
                    w.row_bf16(start + q, j0, &mut even[..width]);
                } else {
                    even.fill(0);
                }
                if q + 1 < k {
                    w.row_bf16(start + q + 1, j0, &mut odd[..width]);
                } else {
                    odd.fill(0);
                }
                (even, odd)
            }
        };
        for b in 0..blocks {
            interleave(
                &pair_even[b * NR..(b + 1) * NR],
                &pair_odd[b * NR..(b + 1) * NR],
                &mut panel[(b * kc + kp) * NR..][..NR],
            );
        }
    }
}

/// `matmul_aw` on AMX tiles: blocks of 32 of a's rows by the panels' 32 columns, summed over the
/// row-major operand's padded pairs in the tiles.
fn tiles_aw(
    a: &PackedRows,
    w: &impl Bf16Rows,
    start: usize,
    (c, ldc, c_col): (&mut [f32], usize, usize),
    accumulate: bool,
) {
    const BLOCK: usize = amx::BLOCK;
    const SUB: usize = BLOCK / MR;
    let stride = a
        .row_stride
        .expect("the tiles' a·W operand is rows of pairs");
    let (n, m) = (w.cols(), a.m);
    let row_blocks = m.div_ceil(BLOCK);
    let kc_max = k_chunk(a);
    let out = SharedOut::new(c);
    for_each_column_task(n, |scratch, (j0, width, blocks)| {
        let Scratch {
            words: panel,
            even,
            odd,
            tiles,
        } = scratch;
        // Per (column block, row block) four MR x NR tiles: 32 rows of 32 sums. Zeros where
        // there is nothing to sum; else the first chunk overwrites them.
        tiles.resize(blocks * row_blocks * SUB, [[0f32; NR]; MR]);
        if stride == 0 {
            tiles.fill([[0f32; NR]; MR]);
        }
        let mut amx_tiles = amx::Tiles::start();
        for kc0 in (0..stride).step_by(kc_max) {
            let kc = kc_max.min(stride - kc0);
            let columns = (j0, width, blocks);
            fill_panel(w, (start, a.k), (kc0, kc), columns, (even, odd), panel);
            for b in 0..blocks {
                for rb in 0..row_blocks {
                    let sums = &mut tiles[(b * row_blocks + rb) * SUB..][..SUB];
                    amx_tiles.block(
                        &a.data[rb * BLOCK * stride + kc0..],
                        stride,
                        &panel[b * kc * NR..(b + 1) * kc * NR],
                        kc,
                        bytemuck::cast_slice_mut(sums),
                        kc0 > 0,
                    );
                }
            }
        }
        drop(amx_tiles);
        for b in 0..blocks {
            for rb in 0..row_blocks {
                for sub in 0..SUB {
                    let row = rb * BLOCK + sub * MR;
                    if row >= m {
                        break;
                    }
                    out.add_tile(
                        &tiles[(b * row_blocks + rb) * SUB + sub],
                        row,
                        c_col + j0 + b * NR,
                        ldc,
                        MR.min(m - row),
                        NR.min(n - j0 - b * NR),
                        accumulate,
                    );
                }
            }
        }
    });
}

/// out[i] = even[i] | odd[i] << 16: two rows' values side by side, as the kernel's right operand.
fn interleave(even: &[u16], odd: &[u16], out: &mut [u32]) {
    debug_assert!(even.len() == NR && odd.len() == NR && out.len() == NR);
    #[cfg(target_arch = "x86_64")]
    if avx512_bf16() {
        // SAFETY: `avx512_bf16()` checked AVX512F/BW; the three slices hold exactly 32 elements each.
        unsafe { interleave_avx512(even, odd, out) };
        return;
    }
    for ((o, &e), &d) in out.iter_mut().zip(even).zip(odd) {
        *o = e as u32 | (d as u32) << 16;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn interleave_avx512(even: &[u16], odd: &[u16], out: &mut [u32]) {
    use std::arch::x86_64::*;
    // vpermt2w index i picks lane i of the first source (< 32) or lane i − 32 of the second.
    let low: [u16; 32] = std::array::from_fn(|i| (i / 2 + 32 * (i % 2)) as u16);
    let high: [u16; 32] = std::array::from_fn(|i| (16 + i / 2 + 32 * (i % 2)) as u16);
    // SAFETY: the caller guarantees 32 elements in each slice: two 64-byte loads and two 64-byte
    // stores, all unaligned.
    unsafe {
        let e = _mm512_loadu_si512(even.as_ptr() as *const __m512i);
        let o = _mm512_loadu_si512(odd.as_ptr() as *const __m512i);
        let lo_idx = _mm512_loadu_si512(low.as_ptr() as *const __m512i);
        let hi_idx = _mm512_loadu_si512(high.as_ptr() as *const __m512i);
        _mm512_storeu_si512(
            out.as_mut_ptr() as *mut __m512i,
            _mm512_permutex2var_epi16(e, lo_idx, o),
        );
        _mm512_storeu_si512(
            out.as_mut_ptr().add(16) as *mut __m512i,
            _mm512_permutex2var_epi16(e, hi_idx, o),
        );
    }
}

/// tile[r][j] = Σ_kp a(r, kp)·b(kp, j) over `k_pairs` pairs, for MR rows and NR columns: `a(r, kp)` is
/// the pair at a[r·stride.0 + kp·stride.1], b holds NR pairs per kp. With `add`, the sum is added to
/// what the tile holds.
fn kernel(
    a: &[u32],
    stride: (usize, usize),
    b: &[u32],
    k_pairs: usize,
    tile: &mut [[f32; NR]; MR],
    add: bool,
) {
    assert!(
        k_pairs == 0 || (MR - 1) * stride.0 + (k_pairs - 1) * stride.1 < a.len(),
        "bf16 kernel: left operand too short"
    );
    assert!(
        b.len() >= k_pairs * NR,
        "bf16 kernel: right operand too short"
    );
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    // SAFETY: the callers checked `available()` (AVX512F and AVX512-BF16, or NEON and BF16); the
    // assertions above bound every index the kernel reads.
    unsafe {
        micro_kernel(a, stride, b, k_pairs, tile, add)
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let _ = (a, stride, b, k_pairs, tile, add);
        unreachable!("bf16 kernels need AVX512-BF16 or ARM BF16")
    }
}

/// `bfdot`: lane i of acc += a.h[2i]·b.h[2i] + a.h[2i+1]·b.h[2i+1] (bf16 pairs, f32 sums). Rust has
/// no stable intrinsic for it yet.
#[cfg(target_arch = "aarch64")]
#[inline]
#[target_feature(enable = "neon,bf16")]
fn bfdot(
    acc: std::arch::aarch64::float32x4_t,
    a: std::arch::aarch64::uint32x4_t,
    b: std::arch::aarch64::uint32x4_t,
) -> std::arch::aarch64::float32x4_t {
    let mut acc = acc;
    // SAFETY: one register-only instruction, which the CPU has (this function's target features).
    unsafe {
        std::arch::asm!(
            "bfdot {acc:v}.4s, {a:v}.8h, {b:v}.8h",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    acc
}

/// The AVX-512 kernel's contract on ARM: 4 rows x 16 columns at a time (16 accumulators of 4 lanes,
/// of NEON's 32 registers), each column's pair broadcast against the rows' pairs.
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon,bf16")]
unsafe fn micro_kernel(
    a: &[u32],
    (row_stride, kp_stride): (usize, usize),
    b: &[u32],
    k_pairs: usize,
    tile: &mut [[f32; NR]; MR],
    add: bool,
) {
    use std::arch::aarch64::*;
    // SAFETY (for the loads below): `kernel` asserted that a[r·row_stride + kp·kp_stride] for r < MR,
    // kp < k_pairs and b[..k_pairs·NR] are in bounds.
    unsafe {
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        for r0 in (0..MR).step_by(4) {
            for j0 in (0..NR).step_by(16) {
                let mut c = [[vdupq_n_f32(0.0); 4]; 4];
                if add {
                    for (r, cr) in c.iter_mut().enumerate() {
                        for (v, cv) in cr.iter_mut().enumerate() {
                            *cv = vld1q_f32(tile[r0 + r].as_ptr().add(j0 + 4 * v));
                        }
                    }
                }
                for kp in 0..k_pairs {
                    let b_kp = bp.add(kp * NR + j0);
                    let bv: [uint32x4_t; 4] = std::array::from_fn(|v| vld1q_u32(b_kp.add(4 * v)));
                    for (r, cr) in c.iter_mut().enumerate() {
                        let av = vdupq_n_u32(*ap.add((r0 + r) * row_stride + kp * kp_stride));
                        for (cv, &bw) in cr.iter_mut().zip(&bv) {
                            // Lane i is column j0 + 4v + i: b holds that column's pair at word i.
                            *cv = bfdot(*cv, bw, av);
                        }
                    }
                }
                for (r, cr) in c.iter().enumerate() {
                    for (v, cv) in cr.iter().enumerate() {
                        vst1q_f32(tile[r0 + r].as_mut_ptr().add(j0 + 4 * v), *cv);
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn micro_kernel(
    a: &[u32],
    (row_stride, kp_stride): (usize, usize),
    b: &[u32],
    k_pairs: usize,
    tile: &mut [[f32; NR]; MR],
    add: bool,
) {
    use std::arch::x86_64::*;
    // SAFETY (for the loads below): `kernel` asserted that a[r·row_stride + kp·kp_stride] for r < MR,
    // kp < k_pairs and b[..k_pairs·NR] are in bounds; unaligned loads are used.
    unsafe {
        let mut c = [[_mm512_setzero_ps(); 2]; MR];
        if add {
            for (r, cr) in c.iter_mut().enumerate() {
                cr[0] = _mm512_loadu_ps(tile[r].as_ptr());
                cr[1] = _mm512_loadu_ps(tile[r].as_ptr().add(16));
            }
        }
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        for kp in 0..k_pairs {
            let b0 = _mm512_loadu_si512(bp.add(kp * NR) as *const __m512i);
            let b1 = _mm512_loadu_si512(bp.add(kp * NR + NR / 2) as *const __m512i);
            let (b0, b1) = (
                std::mem::transmute::<__m512i, __m512bh>(b0),
                std::mem::transmute::<__m512i, __m512bh>(b1),
            );
            let a_kp = ap.add(kp * kp_stride);
            for (r, cr) in c.iter_mut().enumerate() {
                let av: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*a_kp.add(r * row_stride) as i32));
                cr[0] = _mm512_dpbf16_ps(cr[0], av, b0);
                cr[1] = _mm512_dpbf16_ps(cr[1], av, b1);
            }
        }
        // Lane i of a dpbf16 accumulator is column i of its 16-column half: the right operand holds
        // column i's pair at word i, which is the pair dpbf16 multiplies into lane i.
        for (r, cr) in c.iter().enumerate() {
            _mm512_storeu_ps(tile[r].as_mut_ptr(), cr[0]);
            _mm512_storeu_ps(tile[r].as_mut_ptr().add(16), cr[1]);
        }
    }
}
