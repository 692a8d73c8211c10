//! Every CPU kernel path this machine can run (src/ops/isa.rs), each tested explicitly: 4-bit rows decode
//! to the same f32 values on every path, the few-token products (decoding) match an f64 reference on
//! every path and for every storage format, and the whole program trains to the same losses when
//! `NIBBLE_CPU_FEATURES` forces each path. Each test prints which paths ran and which were skipped.

mod common;

use nibble::model::{DenseData, DenseTensor};
use nibble::ops::isa::CpuPath;
use nibble::ops::packed::{self, Rows};
use nibble::ops::packed_gemm;
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

/// Which product of tokens with frozen rows a test runs.
#[derive(Clone, Copy, Debug)]
enum Product {
    /// packed::xwt_few: up to a few tokens per pass (decoding).
    FewTokens,
    /// packed_gemm::xwt: blocks of decoded rows (training, long prompts).
    ManyTokens,
}

/// One product to check: rows start..start + n of `w` (whose values as f32 are `values`) with `tokens`
/// random tokens on `path`, adding to what the output holds when `accumulate`.
struct Case<'a> {
    path: CpuPath,
    name: &'a str,
    w: Rows<'a>,
    values: &'a [f32],
    tokens: usize,
    start: usize,
    n: usize,
    accumulate: bool,
}

/// The largest |got − want| / (Σ|x·w| + |prior value|) of the product of rows start..start + n into
/// y's columns col0..col0 + n, with y's other entries (and, accumulating, its prior values) checked too.
fn product_error(product: Product, case: &Case, rng: &mut Rng) -> f64 {
    let Case {
        path,
        w,
        values,
        tokens,
        start,
        n,
        accumulate,
        ..
    } = *case;
    let (rows, cols) = w.shape();
    let x = random(tokens * cols, 1.0, rng);
    let want = reference(&x, values, tokens, rows, cols);
    let (stride, col0) = (n + 3, 2);
    let before = random(tokens * stride, 1.0, rng);
    let mut y = before.clone();
    match product {
        Product::FewTokens => {
            packed::xwt_few(path, &x, w, start, n, &mut y, stride, col0, accumulate)
        }
        Product::ManyTokens => {
            packed_gemm::xwt(path, &x, w, start, n, &mut y, stride, col0, accumulate)
        }
    }
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
            // Accumulating adds the prior value in f32, whose rounding scales with it too.
            let base = if accumulate { before[at] as f64 } else { 0.0 };
            worst = worst.max((y[at] as f64 - base - dot).abs() / (size + base.abs()));
        }
    }
    worst
}

/// The largest |got − want| / (Σ|a·w| + |prior value|) of dx (+)= a[:, a_col0..a_col0 + n]·W[start..start + n],
/// a's rows `a_stride` long (the input gradient of a product with those rows).
fn input_gradient_error(case: &Case, rng: &mut Rng) -> f64 {
    let Case {
        path,
        w,
        values,
        tokens,
        start,
        n,
        accumulate,
        ..
    } = *case;
    let cols = w.shape().1;
    let (a_stride, a_col0) = (n + 5, 3);
    let a = random(tokens * a_stride, 1.0, rng);
    let before = random(tokens * cols, 1.0, rng);
    let mut dx = before.clone();
    packed_gemm::aw(path, &a, a_stride, a_col0, w, start, n, &mut dx, accumulate);
    let mut worst = 0f64;
    for t in 0..tokens {
        for c in 0..cols {
            let (mut sum, mut size) = (0f64, 0f64);
            for i in 0..n {
                let p = a[t * a_stride + a_col0 + i] as f64 * values[(start + i) * cols + c] as f64;
                sum += p;
                size += p.abs();
            }
            let at = t * cols + c;
            let base = if accumulate { before[at] as f64 } else { 0.0 };
            worst = worst.max((dx[at] as f64 - base - sum).abs() / (size + base.abs()));
        }
    }
    worst
}

/// Measured worst error of any path below: 9.9e-8 of Σ|x·w| (+ |prior value|) on x86-64 (AVX2, portable), 2.6e-7 on
/// aarch64 (NEON, portable; under qemu), for f32 sums of up to 384 products; the tolerance is about ten
/// times the larger.
const PRODUCT_TOLERANCE: f64 = 3e-6;

/// Random 4-bit rows (NF4 and INT4 at every group size; `cols` plus one group where the group is
/// shorter than 128, so that rows end inside a 128-column block) and dense f32/f16/bf16 rows of
/// `dense_cols` (a length that is no multiple of any vector width), each with its values as f32.
fn frozen_row_cases(
    rows: usize,
    cols: usize,
    dense_cols: usize,
    rng: &mut Rng,
) -> Vec<(String, Rows<'static>, Vec<f32>)> {
    let mut cases: Vec<(String, Rows<'static>, Vec<f32>)> = Vec::new();
    for format in [QuantFormat::Nf4, QuantFormat::Int4] {
        for group in [32, 64, 128] {
            let cols = if group < 128 { cols + group } else { cols };
            let q: &'static QuantTensor =
                Box::leak(Box::new(quantized(format, group, rows, cols, rng)));
            let values: Vec<f32> = (0..rows * cols)
                .map(|i| defined_value(q, i / cols, i % cols))
                .collect();
            cases.push((format!("{format} g{group}"), Rows::Quant(q), values));
        }
    }
    for dtype in ["f32", "f16", "bf16"] {
        let v = random(rows * dense_cols, 0.05, rng);
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
    cases
}

/// Checks `error` for every storage case, CPU path, token count and (start, n, accumulate) run:
/// each under `tolerance`; prints the worst.
fn check_every_case(
    test: &str,
    cases: &[(String, Rows, Vec<f32>)],
    token_counts: &[usize],
    runs: &[(usize, usize, bool)],
    tolerance: f64,
    error: impl Fn(&Case, &mut Rng) -> f64,
) {
    let paths = common::cpu_paths(test);
    let mut rng = Rng::new(34);
    let mut worst = 0f64;
    for (name, w, values) in cases {
        for &path in &paths {
            for &tokens in token_counts {
                for &(start, n, accumulate) in runs {
                    let case = Case {
                        path,
                        name,
                        w: *w,
                        values,
                        tokens,
                        start,
                        n,
                        accumulate,
                    };
                    let e = error(&case, &mut rng);
                    assert!(
                        e < tolerance,
                        "{test}: {path} {}, {tokens} tokens, rows {start}+{n}: error {e:e}",
                        case.name
                    );
                    worst = worst.max(e);
                }
            }
        }
    }
    eprintln!("{test}: worst error over all paths and storages: {worst:e}");
}

#[test]
fn few_token_products_match_f64_on_every_path_and_storage() {
    let rows = 150;
    let cases = frozen_row_cases(rows, 384, 203, &mut Rng::new(32));
    // 1-4 tokens in one pass, 5 and 9 in several; all rows, or a run of them.
    check_every_case(
        "few-token products",
        &cases,
        &[1, 2, 3, 4, 5, 9],
        &[(0, rows, false), (37, 70, true)],
        PRODUCT_TOLERANCE,
        |case, rng| product_error(Product::FewTokens, case, rng),
    );
}

/// Measured worst error of any path below: 7.4e-7 of Σ|x·w| + |prior value| on x86-64 (AVX2, portable)
/// and on aarch64 (NEON, portable; under qemu), for f32 sums of up to 640 products (the input
/// gradient sums each column's products one after another); the tolerance is about ten times that.
const MANY_TOKEN_TOLERANCE: f64 = 8e-6;

#[test]
fn many_token_products_and_input_gradients_match_f64_on_every_path_and_storage() {
    // Rows not a multiple of the 3-row register block, columns longer than one 512-column pass
    // (dense: no multiple of any vector width), token counts around the 4- and 6-token blocks, and
    // more than one 256-token chunk.
    let rows = 100;
    let cases = frozen_row_cases(rows, 640, 523, &mut Rng::new(33));
    check_every_case(
        "many-token products",
        &cases,
        &[1, 7, 33, 261],
        &[(0, rows, false), (29, 43, true)],
        MANY_TOKEN_TOLERANCE,
        |case, rng| {
            product_error(Product::ManyTokens, case, rng).max(input_gradient_error(case, rng))
        },
    );
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

/// CPUID leaf 1 signatures of shipped CPUs (the vendors' published values) against the multiplier
/// pipes their optimization guides give `vpmaddwd` (one: Haswell, Broadwell, Zen 2, Hygon's Zen;
/// two: Skylake and later, Zen 3 and later).
#[test]
fn cpu_models_decode_and_one_pipe_integer_multipliers_fall_back_to_f32() {
    use nibble::ops::isa::{X86Model, X86Vendor};
    /// (vendor string, leaf 1 EAX, family, model, two-pipe vpmaddwd, name)
    type Case = (&'static [u8; 12], u32, u32, u32, bool, &'static str);
    let cases: [Case; 10] = [
        (
            b"GenuineIntel",
            0x0003_06C3,
            6,
            0x3C,
            false,
            "Haswell i7-4770",
        ),
        (
            b"GenuineIntel",
            0x0004_0671,
            6,
            0x47,
            false,
            "Broadwell i7-5775C",
        ),
        (
            b"GenuineIntel",
            0x0005_06E3,
            6,
            0x5E,
            true,
            "Skylake i7-6700K",
        ),
        (
            b"GenuineIntel",
            0x0009_06A3,
            6,
            0x9A,
            true,
            "Alder Lake i7-12700H",
        ),
        (
            b"AuthenticAMD",
            0x0083_0F10,
            0x17,
            0x31,
            false,
            "Zen 2 EPYC 7742",
        ),
        (
            b"AuthenticAMD",
            0x0087_0F10,
            0x17,
            0x71,
            false,
            "Zen 2 Ryzen 7 3700X",
        ),
        (
            b"AuthenticAMD",
            0x00A2_0F10,
            0x19,
            0x21,
            true,
            "Zen 3 Ryzen 5 5600X",
        ),
        (
            b"AuthenticAMD",
            0x00A1_0F11,
            0x19,
            0x11,
            true,
            "Zen 4 EPYC 9004",
        ),
        (
            b"AuthenticAMD",
            0x00B4_0F40,
            0x1A,
            0x44,
            true,
            "Zen 5 Ryzen 9 9950X",
        ),
        (
            b"HygonGenuine",
            0x0090_0F01,
            0x18,
            0x00,
            false,
            "Hygon Dhyana",
        ),
    ];
    for (vendor, eax, family, model, two_pipes, name) in cases {
        let cpu = X86Model::from_cpuid(vendor, eax);
        assert_eq!((cpu.family, cpu.model), (family, model), "{name}");
        assert_ne!(cpu.vendor, X86Vendor::Other, "{name}");
        assert_eq!(cpu.pair_madds_on_two_pipes(), two_pipes, "{name}");
    }
    // This machine's CPUID as the kernel reads it.
    if let (Some(cpu), Ok(info)) = (
        nibble::ops::isa::x86_model(),
        std::fs::read_to_string("/proc/cpuinfo"),
    ) {
        let field = |key: &str| {
            info.lines()
                .find(|l| l.split(':').next().is_some_and(|k| k.trim() == key))
                .and_then(|l| l.split(':').nth(1))
                .and_then(|v| v.trim().parse::<u32>().ok())
        };
        if let (Some(family), Some(model)) = (field("cpu family"), field("model")) {
            assert_eq!((cpu.family, cpu.model), (family, model), "{cpu:?}");
            println!(
                "this CPU: {cpu:?}, two-pipe vpmaddwd: {}",
                cpu.pair_madds_on_two_pipes()
            );
        }
    }
}

/// Where a core has both AVX512-BF16 and VNNI, `--precision default` takes the bf16 products on AMD's
/// (Zen 4: bf16 52.8-55.0 s, integers 75.5-85.2 s on the recipe) and the integers on Intel's
/// (Sapphire Rapids: integers 157 s, bf16 209 s): BENCHMARKS.md, session 24.
#[test]
fn the_integers_replace_bf16_on_intel_cores_only() {
    for (vendor, eax, integers, name) in [
        (b"GenuineIntel", 0x0008_06F8u32, true, "Sapphire Rapids"),
        (b"GenuineIntel", 0x0005_065B, true, "Cooper Lake"),
        (b"AuthenticAMD", 0x00A1_0F11, false, "Zen 4 EPYC"),
        (b"AuthenticAMD", 0x00B4_0F40, false, "Zen 5 Ryzen"),
    ] {
        let cpu = nibble::ops::isa::X86Model::from_cpuid(vendor, eax);
        assert_eq!(cpu.vnni_integers_beat_bf16(), integers, "{name}");
    }
    // Except where AMX's tiles run the bf16 products (1.6x the integers on an Emerald Rapids,
    // BENCHMARKS.md session 32), on any CPU.
    assert!(!nibble::ops::int16_gemm::preferred(CpuPath::Amx));
    assert!(
        !CpuPath::Amx.includes(CpuPath::Avx2Vnni)
            && CpuPath::Amx.includes(CpuPath::Avx512Bf16)
            && !CpuPath::Avx512Bf16.includes(CpuPath::Amx)
    );
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
    let losses = |path: CpuPath, precision: &str, run: &str| -> Vec<f64> {
        let out = dir
            .path()
            .join(format!("{}-{precision}-{run}", path.name()));
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
                    precision,
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
    let portable = losses(CpuPath::Portable, "f32", "reference");
    assert_eq!(portable.len(), 3);
    for &path in &paths {
        let got = losses(path, "f32", "run");
        for (a, b) in got.iter().zip(&portable) {
            // The f32 paths differ only in the order of the products' sums (the decoded weights are
            // identical): measured 0 to 1e-7 relative; tolerance 1e-5.
            assert!(
                (a - b).abs() <= 1e-5 * b.abs(),
                "{path}: losses {got:?} vs portable {portable:?}"
            );
        }
        if path.includes(CpuPath::Avx2) || path == CpuPath::NeonBf16 {
            // The default precision there rounds the frozen products' operands to bf16 (amx,
            // avx512bf16 on AMD's cores, neonbf16) or runs them in 16-bit integers (the other x86
            // paths and Intel's avx512bf16, on cores with two
            // `vpmaddwd` pipes; f32 on others); it promises losses
            // within 1e-3 (relative) of f32. Measured on neonbf16 under qemu: 9e-5.
            let fast = losses(path, "default", "run");
            let worst = fast
                .iter()
                .zip(&portable)
                .map(|(a, b)| (a - b).abs() / b.abs())
                .fold(0f64, f64::max);
            eprintln!(
                "training: {path} --precision default: losses {fast:?}, {worst:e} (relative) from f32"
            );
            assert!(
                worst <= 1e-3,
                "{path} default: losses {fast:?} vs f32 {portable:?}"
            );
        }
    }
    // `--precision int16` asks for the integer products whatever the core (the portable kernel on
    // paths without AVX2), kept in the run's settings, within the same 1e-3.
    let path = paths.last().copied().unwrap_or(CpuPath::Portable);
    let forced = losses(path, "int16", "run");
    for (a, b) in forced.iter().zip(&portable) {
        assert!(
            (a - b).abs() <= 1e-3 * b.abs(),
            "{path} int16: losses {forced:?} vs f32 {portable:?}"
        );
    }
    let settings = dir
        .path()
        .join(format!("{}-int16-run", path.name()))
        .join("nibble_config.toml");
    let settings = std::fs::read_to_string(&settings).unwrap();
    assert!(settings.contains("precision = \"int16\""), "{settings}");
}

/// The 16-bit integer products (`--precision default` on AVX2 CPUs without BF16 whose cores multiply
/// 16-bit pairs on two pipes; `--precision int16` anywhere): every kernel this
/// CPU runs gives the portable kernel's bits, and those are within the error the design allows of
/// the f64 product of the defined 4-bit values. An activation is off by at most half a step (its
/// chunk's largest magnitude over 2^31 / (chunk · 2048), at most 32767) and an NF4 level by at most
/// 0.5/2048 of the group's scale, so |error| ≤ Σ|w − min|·step/2 + Σ|x|·scale/4096 (+ f32 rounding;
/// INT4's minimum multiplies exact f32 sums of x).
/// Activations have a few channels 50 times the rest, as real models' do.
#[test]
fn integer_products_give_the_same_bits_on_every_kernel_and_stay_within_their_bound() {
    use nibble::ops::int16_gemm::{self, Kernel};
    let kernels = Kernel::available();
    eprintln!("integer products: kernels {kernels:?}");
    let mut rng = Rng::new(41);
    let (mut worst_forward, mut worst_backward) = (0f64, 0f64);
    for format in [QuantFormat::Nf4, QuantFormat::Int4] {
        for group in [32, 64, 128] {
            // Rows not a multiple of 8 or 16, more than one input-gradient block of rows.
            let (rows, cols) = (300, 2 * group + 128);
            let q = quantized(format, group, rows, cols, &mut rng);
            let values: Vec<f32> = (0..rows * cols)
                .map(|i| defined_value(&q, i / cols, i % cols))
                .collect();
            for tokens in [1, 7, 45, 261] {
                let mut x = random(tokens * cols, 1.0, &mut rng);
                for t in 0..tokens {
                    x[t * cols + 5] *= 50.0;
                    x[t * cols + cols - 3] *= 50.0;
                }
                let a = random(tokens * rows, 1.0, &mut rng);
                let mut y_ref = vec![0f32; tokens * rows];
                int16_gemm::xwt(Kernel::Portable, &x, (&q).into(), &mut y_ref);
                let mut dx_ref = random(tokens * cols, 1.0, &mut rng);
                let before = dx_ref.clone();
                int16_gemm::aw(Kernel::Portable, &a, (&q).into(), &mut dx_ref, true);
                for &kernel in &kernels[1..] {
                    let mut y = vec![f32::NAN; tokens * rows];
                    int16_gemm::xwt(kernel, &x, (&q).into(), &mut y);
                    let mut dx = before.clone();
                    int16_gemm::aw(kernel, &a, (&q).into(), &mut dx, true);
                    let same = |u: &[f32], v: &[f32]| {
                        u.iter().zip(v).all(|(a, b)| a.to_bits() == b.to_bits())
                    };
                    assert!(
                        same(&y, &y_ref),
                        "{kernel:?} {format} g{group} {tokens}: forward"
                    );
                    assert!(
                        same(&dx, &dx_ref),
                        "{kernel:?} {format} g{group} {tokens}: input gradient"
                    );
                }
                let top =
                    |len: usize| ((((1i64 << 31) - 1) / (len as i64 * 2048)).min(32767)) as f64;
                let groups = cols / group;
                let level_error = match format {
                    QuantFormat::Nf4 => 0.5 / 2048.0,
                    QuantFormat::Int4 => 0.0,
                };
                for t in 0..tokens {
                    let xt = &x[t * cols..(t + 1) * cols];
                    let steps: Vec<f64> = xt
                        .chunks(group)
                        .map(|c| c.iter().fold(0f64, |m, v| m.max(v.abs() as f64)) / top(group))
                        .collect();
                    for r in 0..rows {
                        let (mut want, mut bound, mut size) = (0f64, 0f64, 0f64);
                        for c in 0..cols {
                            let (xv, wv) = (xt[c] as f64, values[r * cols + c] as f64);
                            let gi = r * groups + c / group;
                            let scale = q.scales[gi].abs() as f64;
                            // INT4's integer part is code·scale; its minimum multiplies exact sums.
                            let integer_part = match format {
                                QuantFormat::Nf4 => wv,
                                QuantFormat::Int4 => wv - q.mins[gi] as f64,
                            };
                            want += xv * wv;
                            size += (xv * wv).abs();
                            bound += integer_part.abs() * steps[c / group] / 2.0
                                + xv.abs() * scale * level_error;
                        }
                        let err = (y_ref[t * rows + r] as f64 - want).abs();
                        let allowed = bound + 1e-6 * size;
                        assert!(
                            err <= allowed,
                            "{format} g{group} {tokens} ({t}, {r}): {err:e} > {allowed:e}"
                        );
                        worst_forward = worst_forward.max(err / size);
                    }
                    // The input gradient: the group scale is folded into a, quantized per 64 rows.
                    let at = &a[t * rows..(t + 1) * rows];
                    for c in 0..cols {
                        let (mut want, mut size) = (0f64, 0f64);
                        for (o, &ao) in at.iter().enumerate() {
                            let p = ao as f64 * values[o * cols + c] as f64;
                            want += p;
                            size += p.abs();
                        }
                        let at_dx = t * cols + c;
                        let err = (dx_ref[at_dx] as f64 - before[at_dx] as f64 - want).abs();
                        // Measured up to 4.8e-4 of Σ|a·w| (the levels rounded after their rows'
                        // relative scales, and a's steps); about ten times that allowed.
                        assert!(
                            err <= 5e-3 * size,
                            "{format} g{group} {tokens} dx ({t}, {c}): {err:e} of {size:e}"
                        );
                        worst_backward = worst_backward.max(err / size);
                    }
                }
            }
        }
    }
    eprintln!(
        "integer products: worst error of Σ|x·w|: forward {worst_forward:e}, input gradient {worst_backward:e}"
    );
}

/// A NaN or infinite activation makes its products NaN (as in f32) on every integer kernel, and a chunk
/// of values too small to scale (1e-36) adds nothing, the same on every kernel.
#[test]
fn integer_products_pass_nan_on_and_drop_negligible_chunks_on_every_kernel() {
    use nibble::ops::int16_gemm::{self, Kernel};
    let mut rng = Rng::new(43);
    let (rows, cols, tokens) = (70, 256, 40);
    let q = quantized(QuantFormat::Nf4, 64, rows, cols, &mut rng);
    let mut x = random(tokens * cols, 1.0, &mut rng);
    x[3 * cols + 10] = f32::NAN;
    x[5 * cols + 70] = f32::INFINITY;
    x[7 * cols..7 * cols + 64]
        .iter_mut()
        .for_each(|v| *v *= 1e-36);
    let mut a = random(tokens * rows, 1.0, &mut rng);
    a[4 * rows + 2] = f32::NAN;
    a[6 * rows..6 * rows + 64]
        .iter_mut()
        .for_each(|v| *v *= 1e-36);
    for kernel in Kernel::available() {
        let mut y = vec![0f32; tokens * rows];
        int16_gemm::xwt(kernel, &x, (&q).into(), &mut y);
        let mut dx = vec![0f32; tokens * cols];
        int16_gemm::aw(kernel, &a, (&q).into(), &mut dx, false);
        for t in 0..tokens {
            let y_nan = y[t * rows..(t + 1) * rows].iter().all(|v| v.is_nan());
            let y_finite = y[t * rows..(t + 1) * rows].iter().all(|v| v.is_finite());
            assert!(
                if t == 3 || t == 5 { y_nan } else { y_finite },
                "{kernel:?} y token {t}"
            );
            let d_nan = dx[t * cols..(t + 1) * cols].iter().all(|v| v.is_nan());
            let d_finite = dx[t * cols..(t + 1) * cols].iter().all(|v| v.is_finite());
            assert!(
                if t == 4 { d_nan } else { d_finite },
                "{kernel:?} dx token {t}"
            );
        }
        // The negligible chunk contributes 0: token 7's outputs equal those of its other columns alone.
        let mut x7 = x[7 * cols..8 * cols].to_vec();
        x7[..64].iter_mut().for_each(|v| *v = 0.0);
        let mut y7 = vec![0f32; rows];
        int16_gemm::xwt(kernel, &x7, (&q).into(), &mut y7);
        assert_eq!(
            &y[7 * rows..8 * rows],
            &y7[..],
            "{kernel:?}: negligible chunk"
        );
    }
}

/// A run of a 4-bit tensor's rows (one expert's of a stacked mixture-of-experts weight) through the
/// integer products gives, on every kernel, the bits of those rows made a tensor of their own: NF4
/// and INT4 (whose minimums add a term), a run starting inside a 64-row chunk of the input gradient's
/// relative scales.
#[test]
fn a_run_of_rows_in_integer_products_equals_those_rows_alone_on_every_kernel() {
    use nibble::ops::int16_gemm::{self, Frozen, Kernel};
    let mut rng = Rng::new(53);
    let (rows, cols, tokens, first, n) = (300, 128, 40, 37, 150);
    for format in [QuantFormat::Nf4, QuantFormat::Int4] {
        let q = quantized(format, 64, rows, cols, &mut rng);
        let groups = cols / 64;
        let part = |v: &[f32]| {
            v.get(first * groups..(first + n) * groups)
                .map(<[f32]>::to_vec)
        };
        let alone = QuantTensor {
            spec: q.spec,
            rows: n,
            cols,
            packed: q.packed[first * cols / 8..(first + n) * cols / 8].to_vec(),
            scales: part(&q.scales).unwrap(),
            mins: part(&q.mins).unwrap_or_default(),
        };
        let run = Frozen::Packed {
            q: &q,
            first,
            rows: n,
        };
        let x = random(tokens * cols, 1.0, &mut rng);
        let a = random(tokens * n, 1.0, &mut rng);
        for kernel in Kernel::available() {
            let (mut y_run, mut y_alone) = (vec![0f32; tokens * n], vec![0f32; tokens * n]);
            int16_gemm::xwt(kernel, &x, run, &mut y_run);
            int16_gemm::xwt(kernel, &x, (&alone).into(), &mut y_alone);
            assert!(y_run == y_alone, "{format} {kernel:?}: x·Wᵀ differs");
            let (mut d_run, mut d_alone) = (vec![0f32; tokens * cols], vec![0f32; tokens * cols]);
            int16_gemm::aw(kernel, &a, run, &mut d_run, false);
            int16_gemm::aw(kernel, &a, (&alone).into(), &mut d_alone, false);
            assert!(d_run == d_alone, "{format} {kernel:?}: a·W differs");
            eprintln!("{format} {kernel:?}: a run of rows gives its rows' bits");
        }
    }
}

/// The output projection's dense rows through the integer products: every kernel gives the portable
/// kernel's bits, for f32, bf16 and f16 tables, widths of 32- and 64-column groups, and a chunk of rows
/// that starts inside the table; against f64 each output stays within the bound of its quantization
/// (a weight off by half a step of its (row, group)'s largest / 2048 in y = x·Wᵀ, of its (64-row
/// chunk, column)'s in dx = a·W; an activation by half a step of its chunk's largest / the top integer).
#[test]
fn dense_rows_in_integer_products_give_the_same_bits_on_every_kernel_and_stay_within_their_bound() {
    use half::{bf16, f16};
    use nibble::ops::int16_gemm::{self, Frozen, Kernel};
    let kernels = Kernel::available();
    let mut rng = Rng::new(47);
    let (mut worst_forward, mut worst_backward) = (0f64, 0f64);
    let top = |len: usize| ((((1i64 << 31) - 1) / (len as i64 * 2048)).min(32767)) as f64;
    let largest = |v: &mut dyn Iterator<Item = f64>| v.fold(0f64, |m, x| m.max(x.abs()));
    for (cols, storage) in [(192, "f32"), (96, "bf16"), (160, "f16"), (320, "bf16")] {
        let group = int16_gemm::dense_group(cols).unwrap();
        let table_rows = 350;
        let mut w = random(table_rows * cols, 0.05, &mut rng);
        // A few large weights, as real embedding tables have.
        for r in (0..table_rows).step_by(37) {
            w[r * cols + (r % cols)] *= 30.0;
        }
        let data = match storage {
            "f32" => DenseData::F32(w.clone()),
            "bf16" => DenseData::BF16(w.iter().map(|&v| bf16::from_f32(v)).collect()),
            _ => DenseData::F16(w.iter().map(|&v| f16::from_f32(v)).collect()),
        };
        let table = DenseTensor {
            rows: table_rows,
            cols,
            data,
        };
        let stored: Vec<f64> = (0..table_rows)
            .flat_map(|r| {
                let mut row = vec![0f32; cols];
                table.row_f32(r, &mut row);
                row.into_iter().map(|v| v as f64)
            })
            .collect();
        // Rows 13..13 + 301: not a multiple of 8 or 64, more than one input-gradient block.
        let (first, rows) = (13, 301);
        let frozen = Frozen::Dense {
            table: &table,
            first,
            rows,
        };
        let value = |r: usize, c: usize| stored[(first + r) * cols + c];
        for tokens in [1, 7, 70, 261] {
            let mut x = random(tokens * cols, 1.0, &mut rng);
            for t in 0..tokens {
                x[t * cols + 5] *= 50.0;
            }
            // Probabilities: positive, spanning several orders of magnitude.
            let a: Vec<f32> = random(tokens * rows, 2.0, &mut rng)
                .iter()
                .map(|v| v.exp())
                .collect();
            let mut y_ref = vec![0f32; tokens * rows];
            int16_gemm::xwt(Kernel::Portable, &x, frozen, &mut y_ref);
            let before = random(tokens * cols, 1.0, &mut rng);
            let mut dx_ref = before.clone();
            int16_gemm::aw(Kernel::Portable, &a, frozen, &mut dx_ref, true);
            for &kernel in &kernels[1..] {
                let mut y = vec![f32::NAN; tokens * rows];
                int16_gemm::xwt(kernel, &x, frozen, &mut y);
                let mut dx = before.clone();
                int16_gemm::aw(kernel, &a, frozen, &mut dx, true);
                let same =
                    |u: &[f32], v: &[f32]| u.iter().zip(v).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same(&y, &y_ref),
                    "{kernel:?} {storage} {cols} {tokens}: forward"
                );
                assert!(
                    same(&dx, &dx_ref),
                    "{kernel:?} {storage} {cols} {tokens}: input gradient"
                );
            }
            for t in 0..tokens {
                let xt: Vec<f64> = x[t * cols..(t + 1) * cols]
                    .iter()
                    .map(|&v| v as f64)
                    .collect();
                let x_steps: Vec<f64> = xt
                    .chunks(group)
                    .map(|c| largest(&mut c.iter().copied()) / top(group))
                    .collect();
                for r in 0..rows {
                    let (mut want, mut bound, mut size) = (0f64, 0f64, 0f64);
                    for (g, (x_group, x_step)) in xt.chunks(group).zip(&x_steps).enumerate() {
                        let columns = g * group..(g + 1) * group;
                        let w_step = largest(&mut columns.clone().map(|c| value(r, c))) / 2048.0;
                        for (c, &xv) in columns.zip(x_group) {
                            let wv = value(r, c);
                            want += xv * wv;
                            size += (xv * wv).abs();
                            bound += xv.abs() * w_step / 2.0
                                + wv.abs() * x_step / 2.0
                                + w_step * x_step / 4.0;
                        }
                    }
                    let err = (y_ref[t * rows + r] as f64 - want).abs();
                    let allowed = bound + 1e-6 * size;
                    assert!(
                        err <= allowed,
                        "{storage} {cols} {tokens} ({t}, {r}): {err:e} > {allowed:e}"
                    );
                    worst_forward = worst_forward.max(err / size);
                }
                let at: Vec<f64> = a[t * rows..(t + 1) * rows]
                    .iter()
                    .map(|&v| v as f64)
                    .collect();
                let a_steps: Vec<f64> = at
                    .chunks(64)
                    .map(|c| largest(&mut c.iter().copied()) / top(64))
                    .collect();
                for c in 0..cols {
                    let (mut want, mut bound, mut size) = (0f64, 0f64, 0f64);
                    for (chunk, a_step) in a_steps.iter().enumerate() {
                        let span = chunk * 64..((chunk + 1) * 64).min(rows);
                        let w_step = largest(&mut span.clone().map(|o| value(o, c))) / 2048.0;
                        for o in span {
                            let (av, wv) = (at[o], value(o, c));
                            want += av * wv;
                            size += (av * wv).abs();
                            bound += av.abs() * w_step / 2.0
                                + wv.abs() * a_step / 2.0
                                + w_step * a_step / 4.0;
                        }
                    }
                    let at_dx = t * cols + c;
                    let err = (dx_ref[at_dx] as f64 - before[at_dx] as f64 - want).abs();
                    let allowed = bound + 1e-6 * (size + (before[at_dx] as f64).abs());
                    assert!(
                        err <= allowed,
                        "{storage} {cols} {tokens} dx ({t}, {c}): {err:e} > {allowed:e}"
                    );
                    worst_backward = worst_backward.max(err / size);
                }
            }
        }
    }
    eprintln!(
        "dense integer products: worst error of Σ|x·w|: forward {worst_forward:e}, input gradient {worst_backward:e}"
    );
}

/// A NaN weight makes the products that read it NaN on every kernel, and no others.
#[test]
fn dense_rows_in_integer_products_pass_nan_weights_on() {
    use nibble::ops::int16_gemm::{self, Frozen, Kernel};
    let mut rng = Rng::new(48);
    let (rows, cols, tokens) = (130, 128, 40);
    let mut w = random(rows * cols, 0.05, &mut rng);
    w[9 * cols + 70] = f32::NAN;
    let table = DenseTensor {
        rows,
        cols,
        data: DenseData::F32(w),
    };
    let frozen = Frozen::Dense {
        table: &table,
        first: 0,
        rows,
    };
    let x = random(tokens * cols, 1.0, &mut rng);
    let a = random(tokens * rows, 1.0, &mut rng);
    for kernel in Kernel::available() {
        let mut y = vec![0f32; tokens * rows];
        int16_gemm::xwt(kernel, &x, frozen, &mut y);
        let mut dx = vec![0f32; tokens * cols];
        int16_gemm::aw(kernel, &a, frozen, &mut dx, false);
        for t in 0..tokens {
            for r in 0..rows {
                assert_eq!(y[t * rows + r].is_nan(), r == 9, "{kernel:?} y ({t}, {r})");
            }
            for c in 0..cols {
                assert_eq!(
                    dx[t * cols + c].is_nan(),
                    c == 70,
                    "{kernel:?} dx ({t}, {c})"
                );
            }
        }
    }
}
