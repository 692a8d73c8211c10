//! The best rank-r approximation of a matrix (its truncated SVD), for LoftQ's LoRA initialisation:
//! randomized subspace iteration (Halko, Martinsson and Tropp, 2011), with the large products in
//! f32 through `ops::matmul` and the small factorisations in f64.

use crate::ops::matmul::{View, matmul_into};
use crate::rng::Rng;

/// Extra directions the subspace carries beyond the rank asked for, and the passes over the
/// matrix: a quantization residual is close to noise, whose singular values are close together, so
/// the subspace needs both to settle on its leading directions.
const OVERSAMPLE: usize = 10;
const POWER_ITERATIONS: usize = 8;

/// `e` (row-major m x n) ≈ L·R with L m x r and R r x n, the best such product up to the
/// iteration's convergence, split as PEFT's LoftQ splits it: L = U·√S, R = √S·Vᵀ. Returns (L, R),
/// row-major; r is at most min(m, n).
pub fn truncated_svd(
    e: &[f32],
    m: usize,
    n: usize,
    r: usize,
    rng: &mut Rng,
) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(e.len(), m * n, "truncated_svd: an m x n matrix");
    assert!(
        r >= 1 && r <= m.min(n),
        "truncated_svd: rank {r} of a {m} x {n} matrix"
    );
    let k = (r + OVERSAMPLE).min(m.min(n));
    // Y = E·Ω (m x k), Ω Gaussian.
    let omega: Vec<f32> = (0..n * k).map(|_| rng.normal() as f32).collect();
    let mut y = vec![0f32; m * k];
    matmul_into(
        View::new(e, m, n),
        View::new(&omega, n, k),
        1.0,
        &mut y,
        k,
        0,
        false,
    );
    let mut z = vec![0f32; n * k];
    for _ in 0..POWER_ITERATIONS {
        orthonormalize(&mut y, m, k);
        // Z = Eᵀ·Y (n x k)
        matmul_into(
            View::transposed(e, m, n),
            View::new(&y, m, k),
            1.0,
            &mut z,
            k,
            0,
            false,
        );
        orthonormalize(&mut z, n, k);
        matmul_into(
            View::new(e, m, n),
            View::new(&z, n, k),
            1.0,
            &mut y,
            k,
            0,
            false,
        );
    }
    orthonormalize(&mut y, m, k);
    // B = Qᵀ·E (k x n): E ≈ Q·B, and B's SVD gives E's.
    let mut b = vec![0f32; k * n];
    matmul_into(
        View::transposed(&y, m, k),
        View::new(e, m, n),
        1.0,
        &mut b,
        n,
        0,
        false,
    );
    // B·Bᵀ = W·Λ·Wᵀ: B's left singular vectors W, its singular values √λ.
    let mut gram = vec![0f64; k * k];
    for i in 0..k {
        for j in 0..=i {
            let dot: f64 = (0..n)
                .map(|c| b[i * n + c] as f64 * b[j * n + c] as f64)
                .sum();
            gram[i * k + j] = dot;
            gram[j * k + i] = dot;
        }
    }
    let (values, vectors) = symmetric_eigen(&mut gram, k);
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
    let mut l = vec![0f32; m * r];
    let mut rr = vec![0f32; r * n];
    for (slot, &i) in order.iter().take(r).enumerate() {
        let sigma = values[i].max(0.0).sqrt();
        if sigma == 0.0 {
            continue; // E has rank below r: the rest of L and R stay zero.
        }
        let root = sigma.sqrt();
        // U's column = Q·w; Vᵀ's row = wᵀ·B / σ.
        let w: Vec<f64> = (0..k).map(|row| vectors[row * k + i]).collect();
        for row in 0..m {
            let u: f64 = (0..k).map(|c| y[row * k + c] as f64 * w[c]).sum();
            l[row * r + slot] = (u * root) as f32;
        }
        for col in 0..n {
            let v: f64 = (0..k).map(|c| w[c] * b[c * n + col] as f64).sum::<f64>() / sigma;
            rr[slot * n + col] = (v * root) as f32;
        }
    }
    (l, rr)
}

/// LoftQ's initialisation (Li et al., 2023) of `adapter`'s pairs for the 4-bit `model` loaded from
/// `source`, which holds its original weights: each pair's s·B·A is the best rank-r approximation of
/// the quantization error W − Q(W), so that training starts from Q(W) + s·B·A ≈ W rather than from
/// Q(W). PEFT's `replace_lora_weights_loftq` sets B·A to that approximation whatever the scale s
/// (PEFT issue 1982); here A and B share 1/√s, so that the adapted weight is the approximation at
/// any lora_alpha. Returns the share of the quantization error (‖W − Q‖²) that remains, and how many
/// pairs it started (a dense router's keeps PEFT's start).
/// LoftQ starts linears' pairs; an adapter of parameters (`target_parameters`) it refuses.
pub fn refuse_parameters(target_parameters: &[String]) -> crate::error::Result<()> {
    match target_parameters.is_empty() {
        true => Ok(()),
        false => Err(crate::error::Error::Invalid(format!(
            "--init-lora-weights loftq starts linears' pairs from their weights' quantization \
             error; the adapter also adapts target_parameters ({}: a mixture of experts' experts \
             or router), which LoftQ does not start (nor does PEFT's): leave LoftQ out, or adapt \
             the attention alone: --target-modules q_proj,k_proj,v_proj,o_proj",
            target_parameters.join(", ")
        ))),
    }
}

pub fn loftq(
    adapter: &mut crate::lora::LoraAdapter,
    model: &crate::model::Model,
    source: &crate::model::ModelSource,
    rng: &mut Rng,
) -> crate::error::Result<(f64, usize)> {
    use crate::error::Error;
    let tensors: std::collections::HashMap<String, crate::model::TensorRef> =
        model.named_tensors().into_iter().collect();
    refuse_parameters(&adapter.config.target_parameters)?;
    let (mut before, mut after, mut started) = (0.0, 0.0, 0);
    let scales: Vec<f32> = adapter
        .pairs()
        .map(|(path, _)| adapter.config.scale_of(path))
        .collect();
    for ((path, pair), scale) in adapter.pairs_mut().zip(scales) {
        let name = format!("{path}.weight");
        let weight = tensors.get(&name);
        // Gemma 4's router linears stay dense whatever --quant says: no error to start from, so
        // their pairs keep PEFT's initialisation.
        let router = format!(
            ".{}.{}",
            crate::config::LinearKind::Router
                .block()
                .unwrap_or_default(),
            crate::config::LinearKind::Router.module_name()
        );
        if path.ends_with(&router)
            && matches!(
                weight,
                Some(crate::model::TensorRef::Linear(
                    crate::model::LinearWeight::Dense(_)
                ))
            )
        {
            log::info!(
                "--init-lora-weights loftq: {path} is a router, kept dense: initialised as PEFT's default"
            );
            continue;
        }
        let Some(crate::model::TensorRef::Linear(crate::model::LinearWeight::Quant(packed))) =
            weight
        else {
            return Err(Error::Invalid(format!(
                "--init-lora-weights loftq: {name} is not 4-bit, so there is no quantization error \
                 to start from (give --quant nf4 or int4)"
            )));
        };
        if scale.is_nan() || scale <= 0.0 {
            return Err(Error::Invalid(format!(
                "--init-lora-weights loftq: {path} has the scale {scale} (lora_alpha over r), which \
                 cannot carry the quantization error"
            )));
        }
        let (m, n) = (pair.out_features, pair.in_features);
        let mut error = vec![0f32; m * n];
        source.read_f32_into(&name, &mut error)?;
        let quantized = packed.dequantize();
        error.iter_mut().zip(&quantized).for_each(|(w, q)| *w -= q);
        drop(quantized);
        // A rank past the matrix's own has nothing more to take: the rest of A and B stay zero.
        let k = pair.rank.min(m).min(n);
        let (l, r) = truncated_svd(&error, m, n, k, rng);
        let share = 1.0 / (scale as f64).sqrt();
        let rank = pair.rank;
        pair.b = vec![0.0; m * rank];
        for (row, l_row) in pair.b.chunks_exact_mut(rank).zip(l.chunks_exact(k)) {
            for (b, &v) in row.iter_mut().zip(l_row) {
                *b = (v as f64 * share) as f32;
            }
        }
        pair.a = vec![0.0; rank * n];
        for (a, &v) in pair.a.iter_mut().zip(&r) {
            *a = (v as f64 * share) as f32;
        }
        before += error.iter().map(|&e| e as f64 * e as f64).sum::<f64>();
        // What is left of the error: E − L·R.
        matmul_into(
            View::new(&l, m, k),
            View::new(&r, k, n),
            -1.0,
            &mut error,
            n,
            0,
            true,
        );
        after += error.iter().map(|&e| e as f64 * e as f64).sum::<f64>();
        started += 1;
    }
    let remaining = if before > 0.0 { after / before } else { 0.0 };
    Ok((remaining, started))
}

/// Makes the k columns of the row-major rows x k matrix `a` orthonormal (modified Gram-Schmidt in
/// f64, twice for the orthogonality f32 storage allows); a column that vanishes is replaced by a
/// unit vector orthogonal to the others.
fn orthonormalize(a: &mut [f32], rows: usize, k: usize) {
    let mut cols: Vec<Vec<f64>> = (0..k)
        .map(|c| (0..rows).map(|r| a[r * k + c] as f64).collect())
        .collect();
    for c in 0..k {
        for _ in 0..2 {
            for prev in 0..c {
                let dot: f64 = cols[c].iter().zip(&cols[prev]).map(|(x, y)| x * y).sum();
                let (done, rest) = cols.split_at_mut(c);
                rest[0]
                    .iter_mut()
                    .zip(&done[prev])
                    .for_each(|(x, y)| *x -= dot * y);
            }
        }
        let norm = cols[c].iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm > 1e-300 {
            cols[c].iter_mut().for_each(|x| *x /= norm);
        } else {
            // The subspace is smaller than k: any direction orthogonal to the others will do.
            let fresh = (0..rows)
                .map(|r| {
                    let mut e = vec![0.0; rows];
                    e[r] = 1.0;
                    e
                })
                .find_map(|mut e| {
                    for prev in &cols[..c] {
                        let dot: f64 = e.iter().zip(prev).map(|(x, y)| x * y).sum();
                        e.iter_mut().zip(prev).for_each(|(x, y)| *x -= dot * y);
                    }
                    let norm = e.iter().map(|x| x * x).sum::<f64>().sqrt();
                    (norm > 1e-6).then(|| e.into_iter().map(|x| x / norm).collect())
                })
                .unwrap_or_else(|| vec![0.0; rows]);
            cols[c] = fresh;
        }
    }
    for (c, col) in cols.iter().enumerate() {
        for (r, &v) in col.iter().enumerate() {
            a[r * k + c] = v as f32;
        }
    }
}

/// Eigenvalues and eigenvectors (columns of the row-major k x k result) of the symmetric k x k
/// matrix `a` (overwritten), by cyclic Jacobi rotations.
fn symmetric_eigen(a: &mut [f64], k: usize) -> (Vec<f64>, Vec<f64>) {
    let mut v = vec![0f64; k * k];
    for i in 0..k {
        v[i * k + i] = 1.0;
    }
    let total: f64 = a.iter().map(|x| x * x).sum();
    for _sweep in 0..100 {
        let off: f64 = (0..k)
            .flat_map(|i| (0..k).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * k + j] * a[i * k + j])
            .sum();
        if off <= 1e-30 * total.max(f64::MIN_POSITIVE) {
            break;
        }
        for p in 0..k {
            for q in p + 1..k {
                let apq = a[p * k + q];
                if apq == 0.0 {
                    continue;
                }
                let theta = (a[q * k + q] - a[p * k + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for i in 0..k {
                    let (aip, aiq) = (a[i * k + p], a[i * k + q]);
                    a[i * k + p] = c * aip - s * aiq;
                    a[i * k + q] = s * aip + c * aiq;
                }
                for i in 0..k {
                    let (api, aqi) = (a[p * k + i], a[q * k + i]);
                    a[p * k + i] = c * api - s * aqi;
                    a[q * k + i] = s * api + c * aqi;
                }
                for i in 0..k {
                    let (vip, viq) = (v[i * k + p], v[i * k + q]);
                    v[i * k + p] = c * vip - s * viq;
                    v[i * k + q] = s * vip + c * viq;
                }
            }
        }
    }
    ((0..k).map(|i| a[i * k + i]).collect(), v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ‖E − L·R‖²_F in f64.
    fn residual(e: &[f32], l: &[f32], r_: &[f32], m: usize, n: usize, r: usize) -> f64 {
        let mut total = 0.0;
        for i in 0..m {
            for j in 0..n {
                let lr: f64 = (0..r)
                    .map(|c| l[i * r + c] as f64 * r_[c * n + j] as f64)
                    .sum();
                let d = e[i * n + j] as f64 - lr;
                total += d * d;
            }
        }
        total
    }

    /// The squared singular values of `e`, largest first: EᵀE's eigenvalues by the same Jacobi
    /// rotations run to convergence on the whole n x n matrix (no subspace, no randomness).
    fn squared_singular_values(e: &[f32], m: usize, n: usize) -> Vec<f64> {
        let mut g = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                g[i * n + j] = (0..m)
                    .map(|r| e[r * n + i] as f64 * e[r * n + j] as f64)
                    .sum();
            }
        }
        let (mut values, _) = symmetric_eigen(&mut g, n);
        values.sort_by(|a, b| b.total_cmp(a));
        values
    }

    /// On random matrices, of full rank with a spread-out spectrum and of noise (a quantization
    /// residual's flat spectrum): ‖E − L·R‖² is the Eckart-Young optimum, the sum of the squared
    /// singular values past r, and L, R split the scales evenly (‖L‖ = ‖R‖, as U·√S and √S·Vᵀ).
    #[test]
    fn the_truncated_svd_reaches_the_best_rank_r_error() {
        let mut rng = Rng::new(3);
        for (m, n, r, decay) in [
            (48, 30, 4, 0.8),
            (30, 48, 6, 1.0),
            (64, 40, 8, 1.0),
            (20, 20, 20, 0.9),
        ] {
            // E = Σ_i decay^i · u_i v_iᵀ-like: random Gaussian columns scaled down the spectrum.
            let e: Vec<f32> = (0..m * n)
                .map(|idx| (rng.normal() * decay_f(decay, idx % n)) as f32)
                .collect();
            let (l, rr) = truncated_svd(&e, m, n, r, &mut rng);
            let got = residual(&e, &l, &rr, m, n, r);
            let sv = squared_singular_values(&e, m, n);
            let best: f64 = sv.iter().skip(r).sum();
            let total: f64 = sv.iter().sum();
            // Measured: at most 2.7e-7 of the total above the optimum (the noise matrix); held to
            // 3e-6.
            assert!(
                (got - best) <= 3e-6 * total,
                "{m}x{n} rank {r}: residual {got} against the best {best} (of {total})"
            );
            let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>();
            assert!(
                (norm(&l) - norm(&rr)).abs() <= 1e-4 * norm(&l),
                "{m}x{n}: the split"
            );
        }
    }

    fn decay_f(decay: f64, column: usize) -> f64 {
        decay.powi(column as i32)
    }
}
