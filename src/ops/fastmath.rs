//! exp for the elementwise hot loops (softmax over the vocabulary, SiLU, attention). libm's `expf` is
//! an opaque scalar call, so loops around it run one element at a time; this one is plain arithmetic
//! (Cody-Waite range reduction and Cephes' degree-6 polynomial), so those loops vectorise. Relative
//! error under 3e-7 (about 2 ulp), tested against f64.

#[cfg(target_arch = "x86_64")]
use crate::ops::isa::CpuPath;

const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split so that n·LN2_HI is exact for the n that occur.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Adding then subtracting 1.5·2^23 rounds to the nearest integer without a rounding instruction.
const ROUND: f32 = 12_582_912.0;
/// Below this exp(x) is under the smallest normal f32: the result is 0.
const LOWEST: f32 = -87.336_54;
/// Above this exp(x) exceeds f32::MAX: the result is ∞.
const OVERFLOW: f32 = 88.722_84;

/// 2^n for −127 < n < 128, from its bits.
#[inline(always)]
fn pow2(n: i32) -> f32 {
    f32::from_bits((n.wrapping_add(127) as u32) << 23)
}

/// e^x. NaN stays NaN; inputs below −87.34 (where e^x is under the smallest normal f32) give 0 and
/// inputs above ln(f32::MAX) give ∞.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // NaN stays NaN through the clamp and flows through to the result.
    let clamped = x.clamp(LOWEST, OVERFLOW);
    let shifted = clamped * LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = (clamped - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.987_569_2e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    // Cephes' coefficient as published (it rounds to 0.5 in f32).
    #[allow(clippy::excessive_precision)]
    {
        p = p * r + 5.000_000_1e-1;
    }
    let y = p * (r * r) + r + 1.0;
    // n reaches 128 near the top of the range, past what one power of two can hold: scale in halves.
    // The integer n is read off `shifted`'s low mantissa bits: `n as i32` (a saturating conversion)
    // does not vectorise, and left the loops around exp converting one lane at a time (BENCHMARKS.md
    // session 19). For a NaN x the integer is meaningless and y, hence the result, NaN.
    let n = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let half = n >> 1;
    let scaled = y * pow2(half) * pow2(n - half);
    if x < LOWEST {
        0.0
    } else if x > OVERFLOW {
        f32::INFINITY
    } else {
        scaled
    }
}

/// The largest element (−∞ for an empty slice), with eight running maxima so the loop vectorises. A
/// NaN element is skipped here; callers that exponentiate the elements still see it.
#[inline(always)]
pub fn max(values: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = values.chunks_exact(8);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    for chunk in chunks {
        for i in 0..8 {
            acc[i] = if chunk[i] > acc[i] { chunk[i] } else { acc[i] };
        }
    }
    acc.iter().fold(tail, |m, &v| if v > m { v } else { m })
}

/// Σ values with eight running sums, so the loop vectorises (one running sum must keep its order).
#[inline(always)]
pub fn sum(values: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = values.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for i in 0..8 {
            acc[i] += chunk[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// values[i] = e^(values[i] − shift), returning their sum: a softmax's numerators.
pub fn exp_shifted_sum(values: &mut [f32], shift: f32) -> f32 {
    let mut total = 0.0;
    wide(
        #[inline(always)]
        || {
            for v in values.iter_mut() {
                *v = exp(*v - shift);
            }
            total = sum(values);
        },
    );
    total
}

/// values[i] = e^(values[i] − shift), returning Σ e^(v − shift) and Σ e^(v − shift)·v: a softmax's
/// numerators, and the sum its entropy needs (H = shift + ln Σ e − Σ e·v / Σ e).
pub fn exp_shifted_sums(values: &mut [f32], shift: f32) -> (f32, f32) {
    let (mut total, mut weighted) = (0.0, 0.0);
    wide(
        #[inline(always)]
        || {
            // A block at a time: the exponentials in one plain loop over the values, which the
            // compiler vectorises (computed inside the loop of eight running sums below, they ran one
            // lane at a time: a third of the output projection's products, BENCHMARKS.md session 32),
            // then the sums over the block and its values kept aside. Blocks are whole runs of eight,
            // so each running sum adds the same values in the same order as one pass would.
            const BLOCK: usize = 512;
            let mut kept = [0f32; BLOCK];
            let (mut acc, mut wacc) = ([0f32; 8], [0f32; 8]);
            let (mut tail, mut wtail) = (0f32, 0f32);
            for block in values.chunks_mut(BLOCK) {
                let kept = &mut kept[..block.len()];
                kept.copy_from_slice(block);
                for v in block.iter_mut() {
                    *v = exp(*v - shift);
                }
                let (exps, originals) = (block.chunks_exact(8), kept.chunks_exact(8));
                for (e, v) in exps.remainder().iter().zip(originals.remainder()) {
                    tail += e;
                    wtail += e * v;
                }
                for (e, v) in exps.zip(originals) {
                    for i in 0..8 {
                        acc[i] += e[i];
                        wacc[i] += e[i] * v[i];
                    }
                }
            }
            total = acc.iter().sum::<f32>() + tail;
            weighted = wacc.iter().sum::<f32>() + wtail;
        },
    );
    (total, weighted)
}

/// a·b with eight running sums, which the compiler keeps in one vector register (a single running sum
/// must keep its order and stays scalar).
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut partial = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for (a, b) in a8.zip(b8) {
        for i in 0..8 {
            partial[i] += a[i] * b[i];
        }
    }
    partial.iter().sum::<f32>() + tail
}

/// Runs `f` compiled for the widest vectors the active CPU path has (AVX-512, else AVX2, else baseline
/// x86-64's SSE2): `f` (a closure the caller marks `#[inline(always)]`) is inlined into a function with those
/// features enabled, so its loops vectorise 16 or 8 wide instead of 4. Only the vector width changes, not
/// the order of any operation, so results are the same bit for bit on every path.
#[inline(always)]
pub fn wide(f: impl FnOnce()) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw")]
        fn avx512(f: impl FnOnce()) {
            f()
        }
        #[target_feature(enable = "avx2")]
        fn avx2(f: impl FnOnce()) {
            f()
        }
        let path = crate::ops::isa::active();
        if path.includes(CpuPath::Avx512) {
            // SAFETY: the active path is one this CPU supports, and it includes AVX-512 F and BW.
            unsafe { avx512(f) };
            return;
        }
        if path.includes(CpuPath::Avx2) {
            // SAFETY: the active path is one this CPU supports, and it includes AVX2.
            unsafe { avx2(f) };
            return;
        }
    }
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_three_ten_millionths_of_f64() {
        let mut worst = 0f64;
        // Every 1/1000 over the whole finite range, plus points right at the edges.
        let mut x = -87.33f32;
        while x < 88.72 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max((got - want).abs() / want);
            x += 1e-3;
        }
        assert!(worst < 3e-7, "relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-1000.0), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(88.7).is_finite() && exp(88.7) > 1e38);
    }

    #[test]
    fn sums_agree_with_f64() {
        let mut values: Vec<f32> = (0..1000)
            .map(|i| ((i * 37) % 23) as f32 * 0.37 - 4.0)
            .collect();
        let want: f64 = values.iter().map(|&v| v as f64).sum();
        assert!((sum(&values) as f64 - want).abs() < 1e-5 * want.abs().max(1.0));
        let shift = 2.5f32;
        let want: f64 = values
            .iter()
            .map(|&v| (v as f64 - shift as f64).exp())
            .sum();
        let got = exp_shifted_sum(&mut values, shift) as f64;
        assert!((got - want).abs() < 1e-6 * want, "{got} vs {want}");
    }

    #[test]
    fn exp_shifted_sums_weigh_each_value_by_its_exponential() {
        let values: Vec<f32> = (0..1003)
            .map(|i| ((i * 37) % 23) as f32 * 0.37 - 4.0)
            .collect();
        let shift = 2.5f32;
        let want_sum: f64 = values.iter().map(|&v| (v as f64 - 2.5).exp()).sum();
        let want_weighted: f64 = values
            .iter()
            .map(|&v| (v as f64 - 2.5).exp() * v as f64)
            .sum();
        let (mut a, mut b) = (values.clone(), values.clone());
        let single = exp_shifted_sum(&mut a, shift);
        let (sum, weighted) = exp_shifted_sums(&mut b, shift);
        assert_eq!(a, b, "both leave the exponentials");
        assert!((sum as f64 - want_sum).abs() < 1e-6 * want_sum);
        // The same values summed in the same order, though one function keeps a second sum beside
        // (1003 values: more than one of its blocks, and a tail).
        assert_eq!(single.to_bits(), sum.to_bits());
        assert!(
            (weighted as f64 - want_weighted).abs() < 1e-5 * want_weighted.abs(),
            "{weighted} vs {want_weighted}"
        );
    }

    #[test]
    fn max_finds_the_largest_anywhere() {
        let values: Vec<f32> = (0..37).map(|i| ((i * 7919) % 101) as f32 - 50.0).collect();
        let want = values.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(max(&values), want);
        for len in 0..values.len() {
            let want = values[..len]
                .iter()
                .cloned()
                .fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&values[..len]), want, "first {len}");
        }
    }
}
