//! The ops of adaptive-norm transformers (FLUX.2): LayerNorm without affine parameters followed by a
//! per-channel scale and shift ("modulation"), a per-channel gate, SiLU, column slices, and the mean
//! squared error. Modulation vectors come from the timestep alone, through frozen weights, so no
//! gradient flows into them: their backwards are the gradients of the activations only.
//!
//! A modulation buffer holds `k` vectors of `dim` channels back to back ([shift, scale, gate, ...]);
//! ops name the vector they use by its index (`chunk`).

use crate::exec::gpu::Recorder;
use crate::gpu::{GpuBuffer, groups_1d};
use rayon::prelude::*;

/// Rows per parallel task: enough work to amortise a task, few enough rows to spread a short sequence.
const ROWS_PER_TASK: usize = 16;

fn chunk(mods: &[f32], dim: usize, index: usize) -> &[f32] {
    &mods[index * dim..(index + 1) * dim]
}

/// y = (1 + scale) ⊙ LayerNorm(x) + shift over rows of `dim`, LayerNorm without affine parameters;
/// `stats` gets each row's (mean, 1/√(var + eps)).
pub fn layernorm_modulate(
    x: &[f32],
    mods: &[f32],
    (dim, eps): (usize, f64),
    (shift, scale): (usize, usize),
    y: &mut [f32],
    stats: &mut [f32],
) {
    let (shift, scale) = (chunk(mods, dim, shift), chunk(mods, dim, scale));
    y.par_chunks_mut(dim * ROWS_PER_TASK)
        .zip(stats.par_chunks_mut(2 * ROWS_PER_TASK))
        .zip(x.par_chunks(dim * ROWS_PER_TASK))
        .for_each(|((y, stats), x)| {
            for ((y, st), x) in y
                .chunks_mut(dim)
                .zip(stats.chunks_mut(2))
                .zip(x.chunks(dim))
            {
                let mean = x.iter().map(|&v| v as f64).sum::<f64>() / dim as f64;
                let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / dim as f64;
                let rstd = 1.0 / (var + eps).sqrt();
                let (mean, rstd) = (mean as f32, rstd as f32);
                for j in 0..dim {
                    y[j] = (1.0 + scale[j]) * ((x[j] - mean) * rstd) + shift[j];
                }
                st[0] = mean;
                st[1] = rstd;
            }
        });
}

/// dx (+)= the gradient of `layernorm_modulate` with respect to x, given dy: with g = dy ⊙ (1 + scale)
/// and n the normalised row, dx = rstd · (g − mean(g) − n · mean(g ⊙ n)).
pub fn layernorm_modulate_backward(
    x: &[f32],
    mods: &[f32],
    stats: &[f32],
    dy: &[f32],
    (dim, scale): (usize, usize),
    dx: &mut [f32],
    accumulate: bool,
) {
    let scale = chunk(mods, dim, scale);
    dx.par_chunks_mut(dim * ROWS_PER_TASK)
        .zip(x.par_chunks(dim * ROWS_PER_TASK))
        .zip(dy.par_chunks(dim * ROWS_PER_TASK))
        .zip(stats.par_chunks(2 * ROWS_PER_TASK))
        .for_each(|(((dx, x), dy), stats)| {
            let rows = dx.chunks_mut(dim).zip(x.chunks(dim)).zip(dy.chunks(dim));
            for (((dx, x), dy), st) in rows.zip(stats.chunks(2)) {
                let (mean, rstd) = (st[0], st[1]);
                let (mut sum_g, mut sum_gn) = (0f64, 0f64);
                for j in 0..dim {
                    let g = (dy[j] * (1.0 + scale[j])) as f64;
                    sum_g += g;
                    sum_gn += g * ((x[j] - mean) * rstd) as f64;
                }
                let (mean_g, mean_gn) = ((sum_g / dim as f64) as f32, (sum_gn / dim as f64) as f32);
                for j in 0..dim {
                    let g = dy[j] * (1.0 + scale[j]);
                    let n = (x[j] - mean) * rstd;
                    let d = rstd * (g - mean_g - n * mean_gn);
                    dx[j] = if accumulate { dx[j] + d } else { d };
                }
            }
        });
}

/// out (+)= gate ⊙ y, the gate (vector `chunk` of `mods`) broadcast over rows of `dim`.
pub fn gate(
    mods: &[f32],
    (dim, index): (usize, usize),
    y: &[f32],
    out: &mut [f32],
    accumulate: bool,
) {
    let gate = chunk(mods, dim, index);
    out.par_chunks_mut(dim * ROWS_PER_TASK)
        .zip(y.par_chunks(dim * ROWS_PER_TASK))
        .for_each(|(out, y)| {
            for (out, y) in out.chunks_mut(dim).zip(y.chunks(dim)) {
                for j in 0..dim {
                    let v = gate[j] * y[j];
                    out[j] = if accumulate { out[j] + v } else { v };
                }
            }
        });
}

/// y = x · sigmoid(x).
pub fn silu(x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = x / (1.0 + (-x).exp());
    }
}

/// Columns `offset..offset + len` of each row of a [rows, width] matrix `src` into `dst` [rows, len],
/// or (`place`) the rows of `src` [rows, len] into those columns of `dst` [rows, width], leaving its
/// other columns as they are. `accumulate` adds into `dst`.
pub fn columns(
    src: &[f32],
    dst: &mut [f32],
    (width, offset, len): (usize, usize, usize),
    place: bool,
    accumulate: bool,
) {
    let (src_row, dst_row) = if place { (len, width) } else { (width, len) };
    for (s, d) in src.chunks(src_row).zip(dst.chunks_mut(dst_row)) {
        let (from, to) = if place {
            (s, &mut d[offset..offset + len])
        } else {
            (&s[offset..offset + len], d)
        };
        if accumulate {
            to.iter_mut().zip(from).for_each(|(t, f)| *t += f);
        } else {
            to.copy_from_slice(from);
        }
    }
}

/// The mean of (pred − target)² over every element, and, with `grad_scale`, grad_scale times its
/// gradient with respect to pred.
pub fn mse(pred: &[f32], target: &[f32], grad_scale: Option<f32>) -> (f32, Option<Vec<f32>>) {
    let n = pred.len() as f64;
    let sum: f64 = pred
        .iter()
        .zip(target)
        .map(|(&p, &t)| ((p - t) as f64).powi(2))
        .sum();
    let grad = grad_scale.map(|s| {
        let k = (2.0 * s as f64 / n) as f32;
        pred.iter()
            .zip(target)
            .map(|(&p, &t)| k * (p - t))
            .collect()
    });
    ((sum / n) as f32, grad)
}

/// The uniform of shaders/modulate.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ModulateParams {
    pub rows: u32,
    pub dim: u32,
    pub eps: f32,
    /// layernorm: the shift vector; gate: the gate vector; columns: the matrix's width.
    pub first: u32,
    /// layernorm: the scale vector; columns: the first column.
    pub second: u32,
    /// columns: how many columns.
    pub len: u32,
    pub accumulate: u32,
    /// Elements of the elementwise ops.
    pub n: u32,
}

/// The GPU lowering of `layernorm_modulate`.
pub(crate) fn record_layernorm_modulate(
    r: &mut Recorder,
    [x, mods]: [&GpuBuffer; 2],
    (dim, eps): (usize, f64),
    (shift, scale): (usize, usize),
    [y, stats]: [&GpuBuffer; 2],
) {
    let rows = x.len / dim;
    let p = ModulateParams {
        rows: rows as u32,
        dim: dim as u32,
        eps: eps as f32,
        first: shift as u32,
        second: scale as u32,
        ..Default::default()
    };
    let b = [(1, x), (2, mods), (3, y), (4, stats)];
    r.dispatch("layernorm_modulate_forward", &p, &b, groups_1d(rows, 1));
}

/// The GPU lowering of `layernorm_modulate_backward`.
pub(crate) fn record_layernorm_modulate_backward(
    r: &mut Recorder,
    [x, mods, stats, dy]: [&GpuBuffer; 4],
    (dim, eps, scale): (usize, f64, usize),
    dx: &GpuBuffer,
    accumulate: bool,
) {
    let rows = x.len / dim;
    let p = ModulateParams {
        rows: rows as u32,
        dim: dim as u32,
        eps: eps as f32,
        second: scale as u32,
        accumulate: accumulate.into(),
        ..Default::default()
    };
    let b = [(1, x), (2, mods), (3, dx), (4, stats), (5, dy)];
    r.dispatch("layernorm_modulate_backward", &p, &b, groups_1d(rows, 1));
}

/// The GPU lowering of `gate`.
pub(crate) fn record_gate(
    r: &mut Recorder,
    mods: &GpuBuffer,
    (dim, index): (usize, usize),
    y: &GpuBuffer,
    out: &GpuBuffer,
    accumulate: bool,
) {
    let p = ModulateParams {
        dim: dim as u32,
        first: index as u32,
        accumulate: accumulate.into(),
        n: y.len as u32,
        ..Default::default()
    };
    r.dispatch(
        "gate",
        &p,
        &[(1, mods), (2, y), (3, out)],
        groups_1d(y.len, 256),
    );
}

/// The GPU lowering of `silu`.
pub(crate) fn record_silu(r: &mut Recorder, x: &GpuBuffer, y: &GpuBuffer) {
    let p = ModulateParams {
        n: x.len as u32,
        ..Default::default()
    };
    r.dispatch("silu", &p, &[(1, x), (3, y)], groups_1d(x.len, 256));
}

/// The GPU lowering of `columns`: one thread per element of the narrow side.
pub(crate) fn record_columns(
    r: &mut Recorder,
    src: &GpuBuffer,
    dst: &GpuBuffer,
    (width, offset, len): (usize, usize, usize),
    place: bool,
    accumulate: bool,
) {
    let n = if place { src.len } else { dst.len };
    let p = ModulateParams {
        first: width as u32,
        second: offset as u32,
        len: len as u32,
        accumulate: accumulate.into(),
        n: n as u32,
        ..Default::default()
    };
    let entry = if place { "place_columns" } else { "columns" };
    r.dispatch(entry, &p, &[(1, src), (3, dst)], groups_1d(n, 256));
}

/// The GPU lowering of `mse`: the loss, and with `grad_scale` its gradient.
pub(crate) fn record_mse(
    r: &mut Recorder,
    [pred, target]: [&GpuBuffer; 2],
    loss: &GpuBuffer,
    grad: Option<(&GpuBuffer, &GpuBuffer)>,
) {
    let p = ModulateParams {
        n: pred.len as u32,
        ..Default::default()
    };
    r.dispatch(
        "mse_loss",
        &p,
        &[(1, pred), (2, target), (4, loss)],
        [1, 1, 1],
    );
    if let Some((grad_scale, d_pred)) = grad {
        let b = [(1, pred), (2, target), (3, d_pred), (5, grad_scale)];
        r.dispatch("mse_grad", &p, &b, groups_1d(pred.len, 256));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn random(n: usize, rng: &mut Rng) -> Vec<f32> {
        (0..n).map(|_| rng.normal() as f32).collect()
    }

    /// The modulated LayerNorm in f64, straight from its definition.
    fn reference(x: &[f32], mods: &[f32], dim: usize, eps: f64) -> Vec<f64> {
        let mut out = Vec::new();
        for row in x.chunks(dim) {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / dim as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / dim as f64;
            for j in 0..dim {
                let n = (row[j] as f64 - mean) / (var + eps).sqrt();
                out.push((1.0 + mods[2 * dim + j] as f64) * n + mods[j] as f64);
            }
        }
        out
    }

    #[test]
    fn modulated_layernorm_matches_f64_and_its_backward_finite_differences() {
        let mut rng = Rng::new(11);
        let (rows, dim, eps) = (37, 48, 1e-6);
        let x = random(rows * dim, &mut rng);
        let mods = random(3 * dim, &mut rng);
        let (mut y, mut stats) = (vec![0f32; rows * dim], vec![0f32; 2 * rows]);
        layernorm_modulate(&x, &mods, (dim, eps), (0, 2), &mut y, &mut stats);
        let want = reference(&x, &mods, dim, eps);
        let err = y
            .iter()
            .zip(&want)
            .map(|(&a, &b)| (a as f64 - b).abs())
            .fold(0.0, f64::max);
        assert!(err < 1e-5, "forward off by {err}");

        // d/dx of Σ w ⊙ y, by central differences in f64 against the kernel's gradient.
        let w = random(rows * dim, &mut rng);
        let mut dx = vec![0.5f32; rows * dim];
        layernorm_modulate_backward(&x, &mods, &stats, &w, (dim, 2), &mut dx, true);
        let objective = |x: &[f32]| -> f64 {
            reference(x, &mods, dim, eps)
                .iter()
                .zip(&w)
                .map(|(y, &w)| y * w as f64)
                .sum()
        };
        for i in [0, 5, dim + 3, rows * dim - 1] {
            let h = 1e-2f32;
            let (mut up, mut down) = (x.clone(), x.clone());
            up[i] += h;
            down[i] -= h;
            let numeric = (objective(&up) - objective(&down)) / (2.0 * h as f64);
            let got = dx[i] as f64 - 0.5;
            assert!(
                (got - numeric).abs() < 2e-3 * (1.0 + numeric.abs()),
                "dx[{i}] = {got}, finite differences {numeric}"
            );
        }
    }

    #[test]
    fn gate_columns_silu_and_mse_match_their_definitions() {
        let mut rng = Rng::new(5);
        let (rows, dim) = (9, 12);
        let mods = random(3 * dim, &mut rng);
        let y = random(rows * dim, &mut rng);
        let mut out = vec![1f32; rows * dim];
        gate(&mods, (dim, 1), &y, &mut out, true);
        for (i, &o) in out.iter().enumerate() {
            assert_eq!(o, 1.0 + mods[dim + i % dim] * y[i]);
        }

        let (width, offset, len) = (10, 3, 4);
        let mut x = random(rows * width, &mut rng);
        let mut cols = vec![0f32; rows * len];
        columns(&x, &mut cols, (width, offset, len), false, false);
        for r in 0..rows {
            assert_eq!(cols[r * len..(r + 1) * len], x[r * width + offset..][..len]);
        }
        let before = x.clone();
        columns(&cols, &mut x, (width, offset, len), true, true);
        for (i, (&a, &b)) in x.iter().zip(&before).enumerate() {
            let inside = (offset..offset + len).contains(&(i % width));
            assert_eq!(a, if inside { 2.0 * b } else { b });
        }

        let v = random(50, &mut rng);
        let mut s = vec![0f32; 50];
        silu(&v, &mut s);
        for (&a, &x) in s.iter().zip(&v) {
            let want = x as f64 / (1.0 + (-(x as f64)).exp());
            assert!((a as f64 - want).abs() < 1e-6);
        }

        let (p, t) = (random(40, &mut rng), random(40, &mut rng));
        let (loss, grad) = mse(&p, &t, Some(0.25));
        let want: f64 = p
            .iter()
            .zip(&t)
            .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
            .sum::<f64>()
            / 40.0;
        assert!((loss as f64 - want).abs() < 1e-6 * want);
        for ((g, &a), &b) in grad.unwrap().iter().zip(&p).zip(&t) {
            let want = 0.25 * 2.0 * (a as f64 - b as f64) / 40.0;
            assert!((*g as f64 - want).abs() < 1e-7);
        }
    }
}
