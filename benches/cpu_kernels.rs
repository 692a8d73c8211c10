//! CPU kernel throughput at the Qwen2.5-0.5B linear shapes: the packed-4-bit linear forward (x·Wᵀ) and
//! input gradient (dy·W) for 48, 128 and 256 rows, next to a dense f32 GEMM of the same shape.
//!
//!     cargo bench --bench cpu_kernels
//!
//! Prints one line per case: GFLOP/s = 2·rows·in·out / seconds (fastest of repeated runs), for the
//! NF4 group-64 weight in f32, bf16 and 16-bit integer products (forward and input gradient; NaN where
//! the CPU path has no such kernel), and a dense f32 GEMM. `NIBBLE_CPU_FEATURES` picks a lower path.

use nibble::model::LinearWeight;
use nibble::ops::matmul::{View, matmul_into};
use nibble::ops::{Precision, linear};
use nibble::quant::{QuantFormat, QuantSpec, QuantTensor};
use nibble::rng::Rng;
use std::time::Instant;

/// The fastest of repeated runs (at least 7, up to 200 or about 0.3 s): on a shared machine the
/// fastest run is the one least disturbed by other work, and sub-millisecond products vary twofold
/// between medians of a few runs. scripts/bench_torch_matmul.py measures PyTorch the same way.
fn fastest_seconds(mut f: impl FnMut()) -> f64 {
    f(); // warm up
    let started = Instant::now();
    let mut best = f64::INFINITY;
    for run in 0..200 {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
        if run >= 6 && started.elapsed().as_secs_f64() > 0.3 {
            break;
        }
    }
    best
}

fn main() {
    // As the nibble binary runs.
    nibble::alloc::keep_freed_memory();
    let shapes = [
        (896, 896),
        (128, 896),
        (4864, 896),
        (896, 4864),
        (151936, 896),
    ];
    let mut rng = Rng::new(1);
    println!("threads: {}", rayon::current_num_threads());
    if std::env::var_os("NIBBLE_BENCH_DECODING").is_some() {
        decoding(&shapes, &mut rng);
        return;
    }
    println!(
        "{:>8} {:>8} {:>5} | {:>12} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12}",
        "out",
        "in",
        "rows",
        "f32 fwd",
        "f32 dx",
        "bf16 fwd",
        "bf16 dx",
        "int16 fwd",
        "int16 dx",
        "dense f32"
    );
    let int16 = nibble::ops::int16_gemm::Kernel::for_path(nibble::ops::isa::active());
    println!(
        "path {}, int16 kernel {int16:?}",
        nibble::ops::isa::active()
    );
    for (out, inp) in shapes {
        let w: Vec<f32> = (0..out * inp).map(|_| rng.normal() as f32 * 0.02).collect();
        let q = LinearWeight::Quant(
            QuantTensor::quantize(QuantSpec::new(QuantFormat::Nf4, 64).unwrap(), out, inp, &w)
                .unwrap(),
        );
        for rows in [48, 128, 256] {
            let x: Vec<f32> = (0..rows * inp).map(|_| rng.normal() as f32).collect();
            let dy: Vec<f32> = (0..rows * out).map(|_| rng.normal() as f32).collect();
            let mut y = vec![0f32; rows * out];
            let mut dx = vec![0f32; rows * inp];
            let flops = 2.0 * rows as f64 * inp as f64 * out as f64;
            let fwd = fastest_seconds(|| linear::forward(&x, &q, None, &mut y, Precision::F32));
            let bwd =
                fastest_seconds(|| linear::backward_input(&dy, &q, &mut dx, false, Precision::F32));
            let (fwd16, bwd16) = if nibble::ops::bf16_gemm::available() {
                (
                    fastest_seconds(|| linear::forward(&x, &q, None, &mut y, Precision::Bf16)),
                    fastest_seconds(|| {
                        linear::backward_input(&dy, &q, &mut dx, false, Precision::Bf16)
                    }),
                )
            } else {
                (f64::NAN, f64::NAN)
            };
            let (fwd_int, bwd_int) = if int16 != nibble::ops::int16_gemm::Kernel::Portable {
                (
                    fastest_seconds(|| linear::forward(&x, &q, None, &mut y, Precision::Int16)),
                    fastest_seconds(|| {
                        linear::backward_input(&dy, &q, &mut dx, false, Precision::Int16)
                    }),
                )
            } else {
                (f64::NAN, f64::NAN)
            };
            let dense = fastest_seconds(|| {
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
                "{out:>8} {inp:>8} {rows:>5} | {:>7.1} GF/s {:>7.1} GF/s {:>7.1} GF/s {:>7.1} GF/s {:>7.1} GF/s {:>7.1} GF/s {:>7.1} GF/s",
                flops / fwd / 1e9,
                flops / bwd / 1e9,
                flops / fwd16 / 1e9,
                flops / bwd16 / 1e9,
                flops / fwd_int / 1e9,
                flops / bwd_int / 1e9,
                flops / dense / 1e9
            );
        }
    }
}

/// NIBBLE_BENCH_DECODING=1: one token's products (decoding) on the active CPU path, as the rate at
/// which each kernel reads its weights, beside this machine's plain read rate (a parallel sum over
/// 512 MiB, which no weight-reading kernel can beat).
fn decoding(shapes: &[(usize, usize)], rng: &mut Rng) {
    use nibble::model::{DenseData, DenseTensor};
    use nibble::ops::packed::{self, Rows};
    use nibble::ops::packed_gemm;
    use rayon::prelude::*;
    let words: Vec<u64> = (0..64u64 << 20).collect();
    let read = fastest_seconds(|| {
        let s: u64 = words
            .par_chunks(1 << 16)
            .map(|c| c.iter().sum::<u64>())
            .sum();
        std::hint::black_box(s);
    });
    println!(
        "path {}; plain read: {:.1} GB/s",
        nibble::ops::isa::active(),
        (words.len() * 8) as f64 / read / 1e9
    );
    for &(out, inp) in shapes {
        let w: Vec<f32> = (0..out * inp).map(|_| rng.normal() as f32 * 0.02).collect();
        let q = QuantTensor::quantize(QuantSpec::new(QuantFormat::Nf4, 64).unwrap(), out, inp, &w)
            .unwrap();
        let d = DenseTensor {
            rows: out,
            cols: inp,
            data: DenseData::BF16(w.iter().map(|&v| half::bf16::from_f32(v)).collect()),
        };
        let path = nibble::ops::isa::active();
        // Where streaming the rows once per 4 tokens stops beating blocks of decoded rows
        // (packed::STREAM_MAX_TOKENS, which BENCHMARKS.md session 8 set from this table).
        for tokens in [4, 8, 16, 32, 64] {
            let x: Vec<f32> = (0..tokens * inp).map(|_| rng.normal() as f32).collect();
            let mut y = vec![0f32; tokens * out];
            let streamed = fastest_seconds(|| {
                packed::xwt_few(path, &x, Rows::Quant(&q), 0, out, &mut y, out, 0, false)
            });
            let blocked = fastest_seconds(|| {
                packed_gemm::xwt(path, &x, Rows::Quant(&q), 0, out, &mut y, out, 0, false)
            });
            println!(
                "{out:>8} x {inp:>5} nf4 g64, {tokens:>2} tokens: streamed {:>7.3} ms, blocks {:>7.3} ms",
                streamed * 1e3,
                blocked * 1e3
            );
        }
        let x: Vec<f32> = (0..inp).map(|_| rng.normal() as f32).collect();
        let mut y = vec![0f32; out];
        for (name, rows, bytes) in [
            ("nf4 g64", Rows::Quant(&q), q.bytes() as f64),
            ("bf16", Rows::Dense(&d), (out * inp * 2) as f64),
        ] {
            let t =
                fastest_seconds(|| packed::xwt_few(path, &x, rows, 0, out, &mut y, out, 0, false));
            println!(
                "{out:>8} x {inp:>5} {name:>8}: {:>8.3} ms, {:>6.1} GB/s of weights",
                t * 1e3,
                bytes / t / 1e9
            );
        }
    }
}
