//! DoRA's two ops (PEFT's `DoraLinearLayer`): the per-output factors of an adapted linear from the
//! norms of its rows with the LoRA update added, and the magnitude's gradient. The rest of DoRA is
//! made of the linear, matmul and gate ops (`models::lora_linear`). The factors' GPU kernel reads
//! packed weights, so it lives beside the linear's (`ops::linear::record_dora_factors`).

use crate::exec::gpu::Recorder;
use crate::gpu::GpuBuffer;
use crate::model::LinearWeight;
use crate::ops::modulate::ModulateParams;
use rayon::prelude::*;

/// Row `r` of a frozen weight as f32 (dequantized when packed).
fn weight_row(w: &LinearWeight, r: usize, out: &mut [f32]) {
    match w {
        LinearWeight::Dense(d) => d.row_f32(r, out),
        LinearWeight::Quant(q) => q.dequantize_row(r, out),
    }
}

/// `Op::DoraFactors`: for each output o of W [out, inp] with the pair A [rank, inp], B [out, rank],
/// n = ‖W[o] + scale·(B·A)[o]‖ (`row_norms`) and factors = [m/n, m/n − 1, 1/n] (each `out` long).
pub fn factors(
    w: &LinearWeight,
    (a, b, magnitude): (&[f32], &[f32], &[f32]),
    (rank, scale): (usize, f32),
    factors: &mut [f32],
) {
    let out = w.shape().0;
    assert_eq!((magnitude.len(), factors.len()), (out, 3 * out));
    let norms = row_norms(w, (a, b), (rank, scale));
    let (ratio, rest) = factors.split_at_mut(out);
    let (minus_one, inverse) = rest.split_at_mut(out);
    for o in 0..out {
        let c = magnitude[o] as f64 / norms[o];
        ratio[o] = c as f32;
        minus_one[o] = (c - 1.0) as f32;
        inverse[o] = (1.0 / norms[o]) as f32;
    }
}

/// ‖W[o] + scale·(B·A)[o]‖ for each output o (PEFT's `get_weight_norm`; a fresh DoRA magnitude), the
/// row's update summed in f32 over the rank (as torch's product) and its squares in f32 blocks added
/// in f64. The row's decoding costs most: this reads the whole weight, as a product of `rank` tokens.
pub fn row_norms(
    w: &LinearWeight,
    (a, b): (&[f32], &[f32]),
    (rank, scale): (usize, f32),
) -> Vec<f64> {
    let (out, inp) = w.shape();
    assert_eq!(
        (a.len(), b.len()),
        (rank * inp, out * rank),
        "dora norms: A or B"
    );
    (0..out)
        .into_par_iter()
        .map_init(
            || (vec![0f32; inp], vec![0f32; inp]),
            |(row, update), o| {
                weight_row(w, o, row);
                update.fill(0.0);
                for (k, &bk) in b[o * rank..(o + 1) * rank].iter().enumerate() {
                    for (u, &ak) in update.iter_mut().zip(&a[k * inp..(k + 1) * inp]) {
                        *u += bk * ak;
                    }
                }
                // Eight f32 lanes over blocks of 256 (which vectorise), each block's sum added in f64.
                let mut sum = 0f64;
                for (w, u) in row.chunks(256).zip(update.chunks(256)) {
                    let mut lanes = [0f32; 8];
                    for (w, u) in w.chunks(8).zip(u.chunks(8)) {
                        for ((lane, &w), &u) in lanes.iter_mut().zip(w).zip(u) {
                            let v = w + scale * u;
                            *lane += v * v;
                        }
                    }
                    sum += lanes.iter().map(|&l| f64::from(l)).sum::<f64>();
                }
                sum.sqrt()
            },
        )
        .collect()
}

/// `Op::DoraMagnitudeGrad`: d_magnitude[o] (+)= factors[2·dim + o] · Σ_rows dy[·, o] · h[·, o]. Rows
/// are summed a block at a time on each thread (the rows read in order), the blocks' sums in f64.
pub fn magnitude_grad(
    dy: &[f32],
    h: &[f32],
    factors: &[f32],
    dim: usize,
    grad: &mut [f32],
    accumulate: bool,
) {
    assert_eq!(dy.len(), h.len());
    assert_eq!((grad.len(), factors.len()), (dim, 3 * dim));
    const ROWS: usize = 16;
    let sums = dy
        .par_chunks(ROWS * dim)
        .zip(h.par_chunks(ROWS * dim))
        .map(|(dy, h)| {
            let mut block = vec![0f32; dim];
            for (dy, h) in dy.chunks_exact(dim).zip(h.chunks_exact(dim)) {
                for ((s, &d), &h) in block.iter_mut().zip(dy).zip(h) {
                    *s += d * h;
                }
            }
            block.into_iter().map(f64::from).collect::<Vec<f64>>()
        })
        .reduce(
            || vec![0f64; dim],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            },
        );
    let inverse = &factors[2 * dim..];
    for ((g, sum), &inv) in grad.iter_mut().zip(&sums).zip(inverse) {
        let v = (sum * inv as f64) as f32;
        *g = if accumulate { *g + v } else { v };
    }
}

/// The GPU lowering of `magnitude_grad` (shaders/modulate.wgsl): one thread per output.
pub(crate) fn record_magnitude_grad(
    r: &mut Recorder,
    (dy, h, factors): (&GpuBuffer, &GpuBuffer, &GpuBuffer),
    dim: usize,
    grad: &GpuBuffer,
    accumulate: bool,
) {
    let p = ModulateParams {
        rows: (dy.len / dim) as u32,
        dim: dim as u32,
        accumulate: accumulate.into(),
        ..Default::default()
    };
    r.dispatch(
        "dora_magnitude_grad",
        &p,
        &[(1, dy), (2, h), (5, factors), (3, grad)],
        crate::gpu::groups_1d(dim, 64),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DenseData, DenseTensor};
    use crate::quant::{QuantFormat, QuantSpec, QuantTensor};
    use crate::rng::Rng;

    fn random(n: usize, rng: &mut Rng) -> Vec<f32> {
        (0..n).map(|_| rng.normal() as f32).collect()
    }

    /// f64 throughout: W + s·B·A densely, each row's norm.
    fn reference(
        w: &[f32],
        (out, inp, rank): (usize, usize, usize),
        a: &[f32],
        b: &[f32],
        m: &[f32],
        scale: f64,
    ) -> Vec<f64> {
        let mut f = vec![0f64; 3 * out];
        for o in 0..out {
            let mut sum = 0f64;
            for j in 0..inp {
                let mut u = 0f64;
                for k in 0..rank {
                    u += b[o * rank + k] as f64 * a[k * inp + j] as f64;
                }
                let v = w[o * inp + j] as f64 + scale * u;
                sum += v * v;
            }
            let n = sum.sqrt();
            f[o] = m[o] as f64 / n;
            f[out + o] = m[o] as f64 / n - 1.0;
            f[2 * out + o] = 1.0 / n;
        }
        f
    }

    /// The factors of a dense and of an NF4 weight (its dequantized values the reference's) against
    /// f64 (measured: within 3e-7 relative; held to 2e-6).
    #[test]
    fn factors_match_the_f64_definition() {
        let mut rng = Rng::new(11);
        let (out, inp, rank, scale) = (37, 128, 5, 1.7f32);
        let w = random(out * inp, &mut rng);
        let a = random(rank * inp, &mut rng);
        let b: Vec<f32> = random(out * rank, &mut rng)
            .iter()
            .map(|v| v * 0.1)
            .collect();
        let m: Vec<f32> = (0..out)
            .map(|_| 5.0 + rng.uniform() as f32 * 10.0)
            .collect();
        let dense = LinearWeight::Dense(DenseTensor {
            rows: out,
            cols: inp,
            data: DenseData::F32(w.clone()),
        });
        let spec = QuantSpec::new(QuantFormat::Nf4, 64).unwrap();
        let quant = QuantTensor::quantize(spec, out, inp, &w).unwrap();
        let dequantized = quant.dequantize();
        for (weight, values) in [(dense, &w), (LinearWeight::Quant(quant), &dequantized)] {
            let mut ours = vec![0f32; 3 * out];
            factors(&weight, (&a, &b, &m), (rank, scale), &mut ours);
            let expected = reference(values, (out, inp, rank), &a, &b, &m, scale as f64);
            for (i, (&o, &e)) in ours.iter().zip(&expected).enumerate() {
                let tolerance = 2e-6 * e.abs().max(1e-2);
                assert!((o as f64 - e).abs() <= tolerance, "factor {i}: {o} vs {e}");
            }
        }
    }

    /// The magnitude gradient against f64, written and accumulated (measured: exact to f32 rounding).
    #[test]
    fn magnitude_grad_matches_the_f64_definition() {
        let mut rng = Rng::new(12);
        let (rows, dim) = (9, 23);
        let dy = random(rows * dim, &mut rng);
        let h = random(rows * dim, &mut rng);
        let factors = random(3 * dim, &mut rng);
        let start = random(dim, &mut rng);
        let mut grad = start.clone();
        magnitude_grad(&dy, &h, &factors, dim, &mut grad, true);
        for o in 0..dim {
            let sum: f64 = (0..rows)
                .map(|t| dy[t * dim + o] as f64 * h[t * dim + o] as f64)
                .sum();
            let e = start[o] as f64 + factors[2 * dim + o] as f64 * sum;
            assert!((grad[o] as f64 - e).abs() <= 1e-6 * e.abs().max(1.0), "{o}");
        }
    }
}
