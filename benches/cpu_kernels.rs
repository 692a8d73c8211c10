//! CPU kernel throughput at the Qwen2.5-0.5B linear shapes: the packed-4-bit linear forward (x·Wᵀ) and
//! input gradient (dy·W) for 64 and 256 rows, next to a dense f32 GEMM of the same shape.
//!
//!     cargo bench --bench cpu_kernels
//!
//! Prints one line per case: GFLOP/s = 2·rows·in·out / seconds (median of several runs).

use nibble::model::LinearWeight;
use nibble::ops::matmul::{View, matmul_into};
use nibble::ops::{Precision, linear};
use nibble::quant::{QuantFormat, QuantSpec, QuantTensor};
use nibble::rng::Rng;
use std::time::Instant;

fn median_seconds(mut f: impl FnMut()) -> f64 {
    f(); // warm up
    let mut times: Vec<f64> = (0..7)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    times[times.len() / 2]
}

fn main() {
    let shapes = [
        (896, 896),
        (128, 896),
        (4864, 896),
        (896, 4864),
        (151936, 896),
    ];
    let mut rng = Rng::new(1);
    println!("threads: {}", rayon::current_num_threads());
    println!(
        "{:>8} {:>8} {:>5} | {:>12} {:>12} {:>12}",
        "out", "in", "rows", "nf4 fwd", "nf4 dx", "f32 gemm"
    );
    for (out, inp) in shapes {
        let w: Vec<f32> = (0..out * inp).map(|_| rng.normal() as f32 * 0.02).collect();
        let q = LinearWeight::Quant(
            QuantTensor::quantize(QuantSpec::new(QuantFormat::Nf4, 64).unwrap(), out, inp, &w)
                .unwrap(),
        );
        for rows in [64, 256] {
            let x: Vec<f32> = (0..rows * inp).map(|_| rng.normal() as f32).collect();
            let dy: Vec<f32> = (0..rows * out).map(|_| rng.normal() as f32).collect();
            let mut y = vec![0f32; rows * out];
            let mut dx = vec![0f32; rows * inp];
            let flops = 2.0 * rows as f64 * inp as f64 * out as f64;
            let fwd = median_seconds(|| linear::forward(&x, &q, None, &mut y, Precision::F32));
            let bwd =
                median_seconds(|| linear::backward_input(&dy, &q, &mut dx, false, Precision::F32));
            let fwd16 = median_seconds(|| linear::forward(&x, &q, None, &mut y, Precision::Bf16));
            let bwd16 =
                median_seconds(|| linear::backward_input(&dy, &q, &mut dx, false, Precision::Bf16));
            let dense = median_seconds(|| {
                matmul_into(
                    View::new(&x, rows, inp),
                    View::transposed(&w, out, inp),
                    1.0,
                    &mut y,
                    out,
                    0,
                    false,
                )
            });
            println!(
                "{out:>8} {inp:>8} {rows:>5} | {:>7.1} GF/s {:>7.1} GF/s {:>7.1} GF/s {:>7.1} GF/s {:>7.1} GF/s",
                flops / fwd / 1e9,
                flops / bwd / 1e9,
                flops / fwd16 / 1e9,
                flops / bwd16 / 1e9,
                flops / dense / 1e9
            );
        }
    }
}
