//! Mixed-precision products for the frozen-weight matmuls on CPUs with AVX512-BF16: operands rounded to
//! bf16, products accumulated in f32 with `vdpbf16ps` (two multiply-adds per lane per instruction, twice
//! the f32 FMA rate). Used by the default precision; `--precision f32` never comes here.
//!
//! The right-hand operand is packed into panels of 32 columns: for each pair of k indices, the 32
//! columns' two values lie side by side (64 bf16 = two 512-bit registers), which is the layout
//! `vdpbf16ps` consumes. The left operand is rounded to bf16 pairs along k and broadcast.

use crate::model::{DenseData, DenseTensor, LinearWeight};
use crate::quant::{NF4_CODES, QuantFormat};
use rayon::prelude::*;

const NR: usize = 32;
const MR: usize = 8;

/// Whether this CPU can run the bf16 kernels.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// bf16 bits of `x`, rounded to nearest even (as `vcvtne2ps2bf16` rounds).
fn bf16_bits(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// B [k, n] packed in 32-column panels of k-pairs.
struct Panel {
    n: usize,
    k_pairs: usize,
    /// k-pairs of bf16 (low half first), k_pairs·NR words per 32-column block.
    data: Vec<u32>,
}

impl Panel {
    fn blocks(&self) -> usize {
        self.n.div_ceil(NR)
    }
}

/// A matrix whose rows can be read as bf16 bits: frozen weights, packed or dense.
pub trait Bf16Rows: Sync {
    fn cols(&self) -> usize;
    /// bf16 bits of row `row`, columns `c0..c0 + out.len()` (a 32-aligned slice, or the whole row).
    fn row_bf16(&self, row: usize, c0: usize, out: &mut [u16]);
}

impl Bf16Rows for LinearWeight {
    fn cols(&self) -> usize {
        self.shape().1
    }

    fn row_bf16(&self, row: usize, c0: usize, out: &mut [u16]) {
        match self {
            LinearWeight::Dense(d) => d.row_bf16(row, c0, out),
            LinearWeight::Quant(q) => {
                let (g, cols) = (q.spec.group_size, q.cols);
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
                    let first = row * cols + c;
                    let dst = &mut out[c - c0..c - c0 + len];
                    if first % 32 == 0 && len % 32 == 0 {
                        decode_codes(&q.packed[first / 8..(first + len) / 8], &lut, dst);
                    } else {
                        for (i, o) in dst.iter_mut().enumerate() {
                            let col = c + i;
                            let word = q.packed[(row * cols + col) / 8];
                            *o = lut[((word >> (4 * (col % 8))) & 0xF) as usize];
                        }
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
    if available() {
        // SAFETY: `available()` checked AVX512F/BF16.
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

/// out[i] = lut[code i] for the 8·words.len() 4-bit codes of `words` (low nibble first).
fn decode_codes(words: &[u32], lut: &[u16; 16], out: &mut [u16]) {
    assert_eq!(out.len(), words.len() * 8);
    #[cfg(target_arch = "x86_64")]
    if available() && words.len() % 4 == 0 {
        // SAFETY: `available()` checked AVX512F/BW; lengths are checked just above.
        unsafe { decode_codes_avx512(words, lut, out) };
        return;
    }
    for (w, o) in words.iter().zip(out.chunks_exact_mut(8)) {
        for (i, v) in o.iter_mut().enumerate() {
            *v = lut[((w >> (4 * i)) & 0xF) as usize];
        }
    }
}

/// 32 codes per step: the 16 bytes of four words widen to 16 u32 lanes, each lane's two nibbles
/// become two u16 lanes in code order, and `vpermw` looks all 32 up in the table at once.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn decode_codes_avx512(words: &[u32], lut: &[u16; 16], out: &mut [u16]) {
    use std::arch::x86_64::*;
    debug_assert!(words.len() % 4 == 0 && out.len() == words.len() * 8);
    // SAFETY: the caller guarantees AVX512F/BW and out.len() == 8·words.len() with words.len() a
    // multiple of 4, so step s reads words[4s..4s + 4] (16 bytes) and writes out[32s..32s + 32]; the
    // table load reads exactly the 16 u16 of `lut`. All loads and stores are unaligned.
    unsafe {
        let table = _mm512_castsi256_si512(_mm256_loadu_si256(lut.as_ptr() as *const __m256i));
        let low = _mm512_set1_epi32(0xF);
        for s in 0..words.len() / 4 {
            let bytes = _mm_loadu_si128(words.as_ptr().add(4 * s) as *const __m128i);
            let wide = _mm512_cvtepu8_epi32(bytes);
            let codes = _mm512_or_si512(
                _mm512_and_si512(wide, low),
                _mm512_slli_epi32(_mm512_srli_epi32(wide, 4), 16),
            );
            let values = _mm512_permutexvar_epi16(codes, table);
            _mm512_storeu_si512(out.as_mut_ptr().add(32 * s) as *mut __m512i, values);
        }
    }
}

impl Bf16Rows for DenseTensor {
    fn cols(&self) -> usize {
        self.cols
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

impl Panel {
    /// The panel of Wᵀ for rows `start..start + n` of W: column j is W's row start + j; k runs along W's
    /// columns. Used for x·Wᵀ.
    fn of_rows_transposed(w: &impl Bf16Rows, start: usize, n: usize) -> Self {
        let k = w.cols();
        let k_pairs = k.div_ceil(2);
        let mut data = vec![0u32; n.div_ceil(NR) * k_pairs * NR];
        data.par_chunks_mut(k_pairs * NR).enumerate().for_each_init(
            || vec![0u32; k_pairs],
            |pairs, (jb, block)| {
                // Column i's k-pair kp sits at word kp·NR + i of the block: one u32 store per pair.
                for i in 0..NR.min(n - jb * NR) {
                    let row: &mut [u16] = bytemuck::cast_slice_mut(pairs.as_mut_slice());
                    w.row_bf16(start + jb * NR + i, 0, &mut row[..k]);
                    for (kp, &pair) in pairs.iter().enumerate() {
                        block[kp * NR + i] = pair;
                    }
                }
            },
        );
        Panel { n, k_pairs, data }
    }

    /// The panel of W's rows `start..start + kn` as the k dimension; columns are W's columns. Used for
    /// dy·W.
    fn of_rows(w: &impl Bf16Rows, start: usize, kn: usize) -> Self {
        let n = w.cols();
        let k_pairs = kn.div_ceil(2);
        let mut data = vec![0u32; n.div_ceil(NR) * k_pairs * NR];
        data.par_chunks_mut(k_pairs * NR).enumerate().for_each_init(
            || vec![0u16; NR],
            |slice, (jb, block)| {
                let block: &mut [u16] = bytemuck::cast_slice_mut(block);
                let cols = NR.min(n - jb * NR);
                for kk in 0..kn {
                    w.row_bf16(start + kk, jb * NR, &mut slice[..cols]);
                    for (i, &bits) in slice[..cols].iter().enumerate() {
                        block[(kk / 2) * 2 * NR + 2 * i + kk % 2] = bits;
                    }
                }
            },
        );
        Panel { n, k_pairs, data }
    }
}

/// C (+)= A·Wᵀ for rows `start..start + n` of a frozen weight, written from column `c_col` of C.
pub fn matmul_a_rows_t(
    a: &PackedA,
    w: &impl Bf16Rows,
    start: usize,
    n: usize,
    c: &mut [f32],
    ldc: usize,
    c_col: usize,
    accumulate: bool,
) {
    gemm(
        a,
        &Panel::of_rows_transposed(w, start, n),
        c,
        ldc,
        c_col,
        accumulate,
    );
}

/// C (+)= A·W[start..start + k, :] for a frozen weight (A has k columns).
pub fn matmul_a_rows(
    a: &PackedA,
    w: &impl Bf16Rows,
    start: usize,
    c: &mut [f32],
    ldc: usize,
    c_col: usize,
    accumulate: bool,
) {
    gemm(a, &Panel::of_rows(w, start, a.k), c, ldc, c_col, accumulate);
}

/// A [m, k] rounded to bf16, two k-neighbours per u32 (low half first): pack once, multiply by many
/// panels.
pub struct PackedA {
    m: usize,
    k: usize,
    pairs: Vec<u32>,
}

impl PackedA {
    pub fn new(a: &[f32], m: usize, k: usize) -> Self {
        assert_eq!(a.len(), m * k);
        PackedA {
            m,
            k,
            pairs: pack_a(a, m, k),
        }
    }
}

fn pack_a(a: &[f32], m: usize, k: usize) -> Vec<u32> {
    let k_pairs = k.div_ceil(2);
    let mut out = vec![0u32; m * k_pairs];
    out.par_chunks_mut(k_pairs)
        .enumerate()
        .for_each(|(i, row)| {
            let src = &a[i * k..(i + 1) * k];
            // 32 values (16 pairs) at a time with the CPU's own conversion, the rest one by one.
            let vectorised = if available() { (k / 32) * 16 } else { 0 };
            #[cfg(target_arch = "x86_64")]
            if vectorised > 0 {
                // SAFETY: `available()` checked AVX512F/BF16; the call reads src[..2·vectorised] and
                // writes row[..vectorised], within both slices (vectorised = 16·(k / 32)).
                unsafe { round_pairs_avx512(&src[..2 * vectorised], &mut row[..vectorised]) };
            }
            for (kp, pair) in row.iter_mut().enumerate().skip(vectorised) {
                let lo = bf16_bits(src[2 * kp]) as u32;
                let hi = src.get(2 * kp + 1).map_or(0, |&v| bf16_bits(v) as u32);
                *pair = lo | (hi << 16);
            }
        });
    out
}

/// pairs[p] = bf16(src[2p]) | bf16(src[2p + 1]) << 16, rounding to nearest even like `bf16_bits`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn round_pairs_avx512(src: &[f32], pairs: &mut [u32]) {
    use std::arch::x86_64::*;
    debug_assert!(src.len() == 2 * pairs.len() && pairs.len() % 16 == 0);
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

/// C[m, n] (+)= A[m, k]·B with B given by `b(kk, j)`; C is row-major with rows `ldc` long, written
/// from column `c_col`. Falls back to nothing: callers check `available()` first.
// Without x86-64 the kernel call is compiled out; `available()` is false there, so this never runs.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables, unused_mut))]
fn gemm(a: &PackedA, panel: &Panel, c: &mut [f32], ldc: usize, c_col: usize, accumulate: bool) {
    assert!(available(), "bf16 kernels need AVX512-BF16");
    let (m, n) = (a.m, panel.n);
    assert_eq!(
        a.k.div_ceil(2),
        panel.k_pairs,
        "bf16 gemm: inner dimensions differ"
    );
    assert!(
        m == 0 || (m - 1) * ldc + c_col + n <= c.len(),
        "bf16 gemm: C too small"
    );
    let a_packed = &a.pairs;
    let k_pairs = panel.k_pairs;
    // Each task owns MR·rows_per_task consecutive rows of C.
    let rows_per_task = (m.div_ceil(rayon::current_num_threads() * 2))
        .next_multiple_of(MR)
        .max(MR);
    c.par_chunks_mut(rows_per_task * ldc)
        .zip(a_packed.par_chunks(rows_per_task * k_pairs))
        .for_each(|(c_rows, a_rows)| {
            let rows = a_rows.len() / k_pairs.max(1);
            for i0 in (0..rows).step_by(MR) {
                let mr = MR.min(rows - i0);
                for jb in 0..panel.blocks() {
                    let b: &[u16] = bytemuck::cast_slice(
                        &panel.data[jb * k_pairs * NR..(jb + 1) * k_pairs * NR],
                    );
                    let mut acc = [[0f32; NR]; MR];
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `available()` was checked above, so the CPU has AVX512F and AVX512-BF16;
                    // the kernel reads exactly `mr` rows of k_pairs words from `a_rows` and k_pairs·64
                    // values from `b`, both of which the slices hold.
                    unsafe {
                        micro_kernel(
                            &a_rows[i0 * k_pairs..(i0 + mr) * k_pairs],
                            mr,
                            k_pairs,
                            b,
                            &mut acc,
                        );
                    }
                    let cols = NR.min(n - jb * NR);
                    for (r, acc_row) in acc.iter().enumerate().take(mr) {
                        let dst = &mut c_rows[(i0 + r) * ldc + c_col + jb * NR..][..cols];
                        if accumulate {
                            dst.iter_mut().zip(acc_row).for_each(|(d, v)| *d += v);
                        } else {
                            dst.copy_from_slice(&acc_row[..cols]);
                        }
                    }
                }
            }
        });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn micro_kernel(a: &[u32], mr: usize, k_pairs: usize, b: &[u16], acc: &mut [[f32; NR]; MR]) {
    use std::arch::x86_64::*;
    debug_assert!(a.len() >= mr * k_pairs && b.len() >= k_pairs * 2 * NR);
    // SAFETY (for the loads below): kp < k_pairs, so b[kp·64 .. kp·64 + 64] and a[r·k_pairs + kp] are in
    // bounds by the caller's contract (checked by the debug assertion); unaligned loads are used.
    unsafe {
        let mut c = [[_mm512_setzero_ps(); 2]; MR];
        let bp = b.as_ptr();
        if mr == MR {
            for kp in 0..k_pairs {
                let b0 = _mm512_loadu_si512(bp.add(kp * 2 * NR) as *const __m512i);
                let b1 = _mm512_loadu_si512(bp.add(kp * 2 * NR + NR) as *const __m512i);
                let (b0, b1): (__m512bh, __m512bh) =
                    (std::mem::transmute(b0), std::mem::transmute(b1));
                for (r, cr) in c.iter_mut().enumerate() {
                    let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(
                        *a.get_unchecked(r * k_pairs + kp) as i32,
                    ));
                    cr[0] = _mm512_dpbf16_ps(cr[0], av, b0);
                    cr[1] = _mm512_dpbf16_ps(cr[1], av, b1);
                }
            }
        } else {
            for kp in 0..k_pairs {
                let b0 = _mm512_loadu_si512(bp.add(kp * 2 * NR) as *const __m512i);
                let b1 = _mm512_loadu_si512(bp.add(kp * 2 * NR + NR) as *const __m512i);
                let (b0, b1): (__m512bh, __m512bh) =
                    (std::mem::transmute(b0), std::mem::transmute(b1));
                for (r, cr) in c.iter_mut().enumerate().take(mr) {
                    let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(
                        *a.get_unchecked(r * k_pairs + kp) as i32,
                    ));
                    cr[0] = _mm512_dpbf16_ps(cr[0], av, b0);
                    cr[1] = _mm512_dpbf16_ps(cr[1], av, b1);
                }
            }
        }
        // Lane i of a dpbf16 accumulator is column i of its 16-column half: the panel stores column i's
        // pair at positions 2i, 2i+1, which is the pair dpbf16 multiplies into lane i.
        for (r, cr) in c.iter().enumerate().take(mr) {
            _mm512_storeu_ps(acc[r].as_mut_ptr(), cr[0]);
            _mm512_storeu_ps(acc[r].as_mut_ptr().add(16), cr[1]);
        }
    }
}
