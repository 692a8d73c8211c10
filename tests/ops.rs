//! Each op's CPU kernel against a plain f64 reference on random inputs, and its backward against central
//! finite differences of that reference. Tolerances are relative norms: ‖a − b‖ / ‖b‖.

use nibble::ops::{rmsnorm, swiglu};
use nibble::rng::Rng;

fn random(n: usize, scale: f64, rng: &mut Rng) -> Vec<f32> {
    (0..n).map(|_| (rng.normal() * scale) as f32).collect()
}

fn rel_err(a: &[f32], b: &[f64]) -> f64 {
    let diff: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - y).powi(2)).sum();
    let norm: f64 = b.iter().map(|y| y * y).sum();
    (diff / norm).sqrt()
}

/// Gradient of L(x) = Σ dy·f(x) by central differences, in f64.
fn finite_diff(x: &[f32], dy: &[f32], f: impl Fn(&[f64]) -> Vec<f64>) -> Vec<f64> {
    let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let loss = |v: &[f64]| f(v).iter().zip(dy).map(|(y, g)| y * *g as f64).sum::<f64>();
    let h = 1e-6;
    (0..x.len())
        .map(|i| {
            let mut plus = x64.clone();
            let mut minus = x64.clone();
            plus[i] += h;
            minus[i] -= h;
            (loss(&plus) - loss(&minus)) / (2.0 * h)
        })
        .collect()
}

fn rmsnorm_reference(x: &[f64], w: &[f32], dim: usize, eps: f64) -> Vec<f64> {
    x.chunks(dim)
        .flat_map(|row| {
            let r = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / dim as f64 + eps).sqrt();
            row.iter()
                .zip(w)
                .map(move |(v, w)| *w as f64 * v * r)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn rmsnorm_forward_and_backward_match_references() {
    let mut rng = Rng::new(10);
    for (rows, dim, eps) in [(3, 64, 1e-6), (5, 96, 1e-5), (1, 896, 1e-6)] {
        let x = random(rows * dim, 1.3, &mut rng);
        let w: Vec<f32> = random(dim, 0.1, &mut rng).iter().map(|v| 1.0 + v).collect();
        let p = rmsnorm::RmsNormParams::new(rows, dim, eps);
        let mut y = vec![0f32; rows * dim];
        let mut inv_rms = vec![0f32; rows];
        rmsnorm::forward(&p, &x, &w, &mut y, &mut inv_rms);
        let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let e = rel_err(&y, &rmsnorm_reference(&x64, &w, dim, eps));
        assert!(e < 1e-6, "rmsnorm forward {rows}x{dim}: {e:e}");

        let dy = random(rows * dim, 1.0, &mut rng);
        let mut dx = vec![0f32; rows * dim];
        rmsnorm::backward(&p, &x, &w, &inv_rms, &dy, &mut dx);
        let fd = finite_diff(&x, &dy, |v| rmsnorm_reference(v, &w, dim, eps));
        let e = rel_err(&dx, &fd);
        assert!(e < 1e-5, "rmsnorm backward {rows}x{dim}: {e:e}");
    }
}

fn silu(v: f64) -> f64 {
    v / (1.0 + (-v).exp())
}

#[test]
fn swiglu_forward_and_backward_match_references() {
    let mut rng = Rng::new(11);
    let n = 5000; // more than one parallel chunk
    let g = random(n, 2.0, &mut rng);
    let u = random(n, 1.0, &mut rng);
    let mut h = vec![0f32; n];
    swiglu::forward(&g, &u, &mut h);
    let reference: Vec<f64> = g
        .iter()
        .zip(&u)
        .map(|(&g, &u)| silu(g as f64) * u as f64)
        .collect();
    let e = rel_err(&h, &reference);
    assert!(e < 1e-6, "swiglu forward: {e:e}");

    let dh = random(n, 1.0, &mut rng);
    let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
    swiglu::backward(&g, &u, &dh, &mut dg, &mut du);
    // Elementwise, so the finite differences of each input are independent.
    let fd_g: Vec<f64> = (0..n)
        .map(|i| {
            let (x, h) = (g[i] as f64, 1e-6);
            (silu(x + h) - silu(x - h)) / (2.0 * h) * u[i] as f64 * dh[i] as f64
        })
        .collect();
    let fd_u: Vec<f64> = (0..n).map(|i| silu(g[i] as f64) * dh[i] as f64).collect();
    let (eg, eu) = (rel_err(&dg, &fd_g), rel_err(&du, &fd_u));
    assert!(
        eg < 1e-5 && eu < 1e-6,
        "swiglu backward: d gate {eg:e}, d up {eu:e}"
    );
}
