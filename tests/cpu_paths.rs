//! Every CPU kernel path this machine can run (src/ops/isa.rs), each tested explicitly: 4-bit rows decode
//! to the same f32 values on every path, the few-token products (decoding) match an f64 reference on
//! every path and for every storage format, and the whole program trains to the same losses when
//! `NIBBLE_CPU_FEATURES` forces each path. Each test prints which paths ran and which were skipped.

mod common;

use nibble::model::{DenseData, DenseTensor};
use nibble::ops::isa::CpuPath;
use nibble::ops::packed::{self, Rows};
use nibble::quant::{NF4_CODES, QuantFormat, QuantSpec, QuantTensor};
use nibble::rng::Rng;

fn random(n: usize, scale: f32, rng: &mut Rng) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32 * scale).collect()
}

/// Element (r, c) of a 4-bit matrix by the format's definition: min + value(code)·scale in f32.
fn defined_value(q: &QuantTensor, r: usize, c: usize) -> f32 {
    let gi = r * (q.cols / q.spec.group_size) + c / q.spec.group_size;
    let code = q.code(r, c) as usize;
    match q.spec.format {
        QuantFormat::Nf4 => NF4_CODES[code] * q.scales[gi],
        QuantFormat::Int4 => q.mins[gi] + code as f32 * q.scales[gi],
    }
}

fn quantized(
    format: QuantFormat,
    group: usize,
    rows: usize,
    cols: usize,
    rng: &mut Rng,
) -> QuantTensor {
    let w = random(rows * cols, 0.05, rng);
    QuantTensor::quantize(QuantSpec::new(format, group).unwrap(), rows, cols, &w).unwrap()
}

#[test]
fn every_path_decodes_4bit_rows_to_the_defined_values() {
    let paths = common::cpu_paths("decode");
    let mut rng = Rng::new(31);
    for format in [QuantFormat::Nf4, QuantFormat::Int4] {
        for group in [32, 64, 128] {
            let (rows, cols) = (5, 3 * 128);
            let q = quantized(format, group, rows, cols, &mut rng);
            for &path in &paths {
                let mut row = vec![f32::NAN; cols];
                for r in 0..rows {
                    packed::decode_row(path, &q, r, &mut row);
                    for (c, got) in row.iter().enumerate() {
                        let want = defined_value(&q, r, c);
                        assert_eq!(
                            got.to_bits(),
                            want.to_bits(),
                            "{path} {format} g{group} ({r}, {c}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}

/// Σ_k x[t, k]·w[r, k] in f64, and Σ |x·w| (the scale of the rounding error an f32 sum may make).
fn reference(x: &[f32], w: &[f32], tokens: usize, rows: usize, cols: usize) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    for t in 0..tokens {
        for r in 0..rows {
            let (mut dot, mut size) = (0f64, 0f64);
            for c in 0..cols {
                let p = x[t * cols + c] as f64 * w[r * cols + c] as f64;
                dot += p;
                size += p.abs();
            }
            out.push((dot, size));
        }
    }
    out
}

/// The largest |got − want| / Σ|x·w| of the product of rows start..start + n into y's columns
/// col0..col0 + n, with y's other entries (and, accumulating, its prior values) checked too.
#[allow(clippy::too_many_arguments)]
fn product_error(
    path: CpuPath,
    w: Rows,
    values: &[f32],
    tokens: usize,
    start: usize,
    n: usize,
    accumulate: bool,
    rng: &mut Rng,
) -> f64 {
    let (rows, cols) = w.shape();
    let x = random(tokens * cols, 1.0, rng);
    let want = reference(&x, values, tokens, rows, cols);
    let (stride, col0) = (n + 3, 2);
    let before = random(tokens * stride, 1.0, rng);
    let mut y = before.clone();
    packed::xwt_few(path, &x, w, start, n, &mut y, stride, col0, accumulate);
    let mut worst = 0f64;
    for t in 0..tokens {
        for j in 0..stride {
            let at = t * stride + j;
            if !(col0..col0 + n).contains(&j) {
                assert_eq!(
                    y[at], before[at],
                    "{path}: y[{t}, {j}] is outside the product"
                );
                continue;
            }
            let (dot, size) = want[t * rows + start + j - col0];
            let base = if accumulate { before[at] as f64 } else { 0.0 };
            worst = worst.max((y[at] as f64 - base - dot).abs() / size);
        }
    }
    worst
}

/// Measured worst error of any path below: 9.9e-8 of Σ|x·w| on x86-64 (AVX2, portable), 2.6e-7 on
/// aarch64 (NEON, portable; under qemu), for f32 sums of up to 384 products; the tolerance is about ten
/// times the larger.
const PRODUCT_TOLERANCE: f64 = 3e-6;

#[test]
fn few_token_products_match_f64_on_every_path_and_storage() {
    let paths = common::cpu_paths("few-token products");
    let mut rng = Rng::new(32);
    let (rows, cols) = (150, 384);
    // (name, rows, the rows' values as f32)
    let mut cases: Vec<(String, Rows<'static>, Vec<f32>)> = Vec::new();
    for format in [QuantFormat::Nf4, QuantFormat::Int4] {
        for group in [32, 64, 128] {
            let q: &'static QuantTensor =
                Box::leak(Box::new(quantized(format, group, rows, cols, &mut rng)));
            let values: Vec<f32> = (0..rows * cols)
                .map(|i| defined_value(q, i / cols, i % cols))
                .collect();
            cases.push((format!("{format} g{group}"), Rows::Quant(q), values));
        }
    }
    // Dense rows with a length that is not a multiple of any vector width.
    let dense_cols = 203;
    for dtype in ["f32", "f16", "bf16"] {
        let v = random(rows * dense_cols, 0.05, &mut rng);
        let data = match dtype {
            "f32" => DenseData::F32(v),
            "f16" => DenseData::F16(v.iter().map(|&x| half::f16::from_f32(x)).collect()),
            _ => DenseData::BF16(v.iter().map(|&x| half::bf16::from_f32(x)).collect()),
        };
        let d: &'static DenseTensor = Box::leak(Box::new(DenseTensor {
            rows,
            cols: dense_cols,
            data,
        }));
        let values: Vec<f32> = (0..rows * dense_cols)
            .map(|i| d.value(i / dense_cols, i % dense_cols))
            .collect();
        cases.push((format!("dense {dtype}"), Rows::Dense(d), values));
    }
    let mut worst = 0f64;
    for (name, w, values) in &cases {
        for &path in &paths {
            // 1-4 tokens in one pass, 5 and 9 in several; all rows, or a run of them.
            for tokens in [1, 2, 3, 4, 5, 9] {
                for (start, n, accumulate) in [(0, rows, false), (37, 70, true)] {
                    let e = product_error(path, *w, values, tokens, start, n, accumulate, &mut rng);
                    assert!(
                        e < PRODUCT_TOLERANCE,
                        "{path} {name}, {tokens} tokens, rows {start}+{n}: error {e:e}"
                    );
                    worst = worst.max(e);
                }
            }
        }
    }
    eprintln!("worst error over all paths and storages: {worst:e} of Σ|x·w|");
}

#[test]
fn a_cpu_path_the_machine_lacks_or_an_unknown_one_is_refused() {
    for value in ["sse9", "neon", "avx2"] {
        let path = CpuPath::parse(value);
        if path.is_some_and(|p| p.supported().is_ok()) {
            continue;
        }
        let o = common::nibble_command()
            .env("NIBBLE_CPU_FEATURES", value)
            .args(["info", "no-such-model"])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{value}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("NIBBLE_CPU_FEATURES"), "{value}: {err}");
    }
}

#[test]
fn training_gives_the_same_losses_on_every_cpu_path() {
    let paths = common::cpu_paths("training");
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    nibble::synth::write_model_folder(
        &model,
        &nibble::synth::SynthSpec::tiny(nibble::config::Arch::Qwen2, 151936),
        Some(&nibble::synth::qwen25_tokenizer()),
    )
    .unwrap();
    let data = dir.path().join("d.jsonl");
    std::fs::write(
        &data,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"Name three colours.\"}, {\"role\": \"assistant\", \"content\": \"Red, green and blue.\"}]}\n\
         {\"prompt\": \"2+2=\", \"completion\": \"4\"}\n",
    )
    .unwrap();
    let losses = |path: CpuPath, run: &str| -> Vec<f64> {
        let out = dir.path().join(format!("{}-{run}", path.name()));
        let o = common::nibble_command()
            .env("NIBBLE_CPU_FEATURES", path.name())
            .args(common::train_args(
                &model,
                &data,
                &out,
                &[
                    "--max-steps",
                    "3",
                    "--quant",
                    "nf4",
                    "--group-size",
                    "32",
                    "--precision",
                    "f32",
                ],
            ))
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{path}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                    .as_f64()
                    .unwrap()
            })
            .collect()
    };
    let portable = losses(CpuPath::Portable, "reference");
    assert_eq!(portable.len(), 3);
    for &path in &paths {
        let got = losses(path, "run");
        for (a, b) in got.iter().zip(&portable) {
            // The f32 paths differ only in the order of the few-token products' sums (the decoded
            // weights are identical): measured 0 to 1e-7 relative; tolerance 1e-5.
            assert!(
                (a - b).abs() <= 1e-5 * b.abs(),
                "{path}: losses {got:?} vs portable {portable:?}"
            );
        }
    }
}
