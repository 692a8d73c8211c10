//! `nibble train` against transformers + peft over three optimizer steps from the same initial PEFT
//! adapter (NF4 group 64 emulated exactly, dropout 0, constant lr, gradient accumulation 2, clipping),
//! for Qwen2, Gemma 3, Phi-3 (fused projections), Gemma 4 (E2B's per-layer inputs and shared keys and
//! values beside 31B's values from k_proj), Ministral 3, Qwen3-MoE and Mixtral (all-linear, PEFT's
//! LoRA on the attention, the routers and every expert), Qwen2-MoE (a shared expert beside them) and
//! gpt-oss (sinks, biased experts stored [experts, in, out] and interleaved, the clamped SwiGLU) and
//! Gemma 4 with 26B-A4B's experts beside each dense MLP: fixtures from scripts/make_train_fixtures.py,
//! which also checks that PEFT loads the adapters nibble writes with no missing or unexpected keys and
//! that transformers loads the folders `nibble merge` writes (recorded in each expected.json, read
//! here). Per-step losses and gradient norms must agree to `SCALAR_TOLERANCE` relative and the LoRA
//! updates (final minus initial) to `UPDATE_TOLERANCE` relative norm, on the CPU executor and on
//! the GPU executor (lavapipe in CI; skipped without a Vulkan device unless NIBBLE_REQUIRE_GPU is set).

mod common;

use common::rel;
use nibble::source::SafetensorsFile;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf_train")
}

fn adapter(dir: &Path) -> SafetensorsFile {
    SafetensorsFile::open(&dir.join("adapter_model.safetensors")).unwrap()
}

/// Each family's fixture and its LoRA-adapted linears over all layers (tiny Gemma 4: 9 in its sliding
/// layer, 8 in its full one without v_proj, 7 in each of the two reusing their keys and values).
/// Qwen3-MoE (all-linear): the attention's 4 in each of 3 layers, and in each of the 2 sparse ones
/// the router and the two stacks of experts (one pair each, of every expert's matrices). Mixtral
/// (all-linear): 7 in each of 2 layers. Qwen2-MoE (all-linear, which PEFT does not convert there,
/// and the routers and experts as target_parameters): the attention's 4 in each of 3 layers, the
/// dense layer's MLP's 3, and in each of the 2 sparse ones the shared expert's 3 linears and its gate,
/// the router and the two stacks. gpt-oss (all-linear: the attention's 4, and its two stacks of
/// experts as target_parameters) in each of 2 layers. Gemma 4 with 26B-A4B's experts (all-linear:
/// the attention, the dense MLP and the router linear, and the two stacks of experts as
/// target_parameters): 10 in its sliding layer, 9 in its full one without v_proj.
const FAMILIES: [(&str, usize); 10] = [
    ("qwen2", 14),
    ("gemma3_text", 14),
    ("phi3", 8),
    ("gemma4_text", 31),
    ("ministral3", 14),
    ("qwen3_moe", 18),
    ("mixtral", 14),
    ("qwen2_moe", 29),
    ("gpt_oss", 12),
    ("gemma4_moe", 19),
];

/// Every family on `device`; `NIBBLE_PARITY_ONLY=<family>` runs that one alone (for debugging).
fn check(device: &str) {
    let only = std::env::var("NIBBLE_PARITY_ONLY").ok();
    for (family, linears) in FAMILIES {
        if only.as_deref().is_none_or(|o| o == family) {
            check_family(device, family, linears, None);
        }
    }
}

/// A variant of the recipe: its flags, the fixture's subfolder (expected.json and the adapter after the
/// steps) that transformers' run with it wrote, and the tolerance of the LoRA updates.
struct Variant<'a> {
    flags: &'a [&'a str],
    folder: &'a str,
    update_tolerance: f64,
    /// The run starts from the adapter in the variant's folder's `init_adapter` (else the family's).
    own_init: bool,
    /// The base is the variant folder's `model` (else the family's).
    own_model: bool,
    /// How many tables' token rows the adapter trains (`trainable_tokens_delta` tensors).
    token_tables: usize,
}

fn check_family(device: &str, family: &str, linears: usize, variant: Option<Variant>) {
    let f = fixtures().join(family);
    let (flags, results, update_tolerance) = match &variant {
        Some(v) => (v.flags, f.join(v.folder), v.update_tolerance),
        None if family == "gemma4_moe" => (&[][..], f.join("expected_adapter"), 5e-4),
        None => (&[][..], f.join("expected_adapter"), UPDATE_TOLERANCE),
    };
    let expected_file = match variant {
        Some(_) => results.join("expected.json"),
        None => f.join("expected.json"),
    };
    let init_adapter = match &variant {
        Some(v) if v.own_init => results.join("init_adapter"),
        _ => f.join("init_adapter"),
    };
    let model = match &variant {
        Some(v) if v.own_model => results.join("model"),
        _ => f.join("model"),
    };
    let token_tables = variant.as_ref().map_or(0, |v| v.token_tables);
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(expected_file).unwrap()).unwrap();
    let out = tempfile::tempdir().unwrap();
    let run = out.path().join("run");
    let o = Command::new(env!("CARGO_BIN_EXE_nibble"))
        .args(["train", "--model"])
        .arg(model)
        .arg("--data")
        .arg(f.join("data.jsonl"))
        .arg("--init-adapter")
        .arg(&init_adapter)
        .arg("--output")
        .arg(&run)
        .args([
            "--device",
            device,
            "--precision",
            "f32",
            "--quant",
            "nf4",
            "--group-size",
            "64",
        ])
        .args([
            "--lora-dropout",
            "0",
            "--lr",
            "1e-3",
            "--lr-scheduler",
            "constant",
        ])
        .args([
            "--grad-accum",
            "2",
            "--max-steps",
            "3",
            "--no-shuffle",
            "--max-grad-norm",
            "1.0",
        ])
        .args(flags)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    if variant.is_none() {
        let peft = &expected["peft_loads_nibble_adapter"];
        assert_eq!(peft["missing_lora_keys"], serde_json::json!([]), "{family}");
        assert_eq!(peft["unexpected_keys"], serde_json::json!([]), "{family}");
        let merged =
            expected["transformers_loads_nibble_merge"]["logits_relative_difference_vs_peft"]
                .as_f64()
                .unwrap();
        assert!(merged < 1e-5, "{family}: merged folder {merged:e}");
    }
    let metrics: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(metrics.len(), 3);
    let mut worst_scalar = 0f64;
    for (i, m) in metrics.iter().enumerate() {
        for (ours, theirs) in [("loss", "losses"), ("grad_norm", "grad_norms")] {
            let (a, b) = (
                m[ours].as_f64().unwrap(),
                expected[theirs][i].as_f64().unwrap(),
            );
            let e = (a - b).abs() / b;
            worst_scalar = worst_scalar.max(e);
            // Or four times what float32 arithmetic alone moves transformers' value, where its float64
            // run is recorded and that is larger.
            let noise = expected[format!("float64_{theirs}")][i]
                .as_f64()
                .map_or(0.0, |b64| (b - b64).abs() / b64);
            let tolerance = SCALAR_TOLERANCE.max(4.0 * noise);
            assert!(
                e < tolerance,
                "{device} {family}, step {}: {ours} {a} vs transformers {b} (held to {tolerance:e})",
                i + 1
            );
        }
    }
    eprintln!(
        "{device} {family} {flags:?}: worst relative difference of a loss or grad norm {worst_scalar:.1e}"
    );
    // What TRL logs beside the loss (metrics.json, scripts/make_train_metrics_fixtures.py): the
    // entropy to float32's rounding (measured on the CPU and lavapipe: within 2.6e-8), and the same
    // tokens ranked first (measured: all, on both); on a GPU, whose arithmetic differs more, one token
    // of an example may flip where two logits all but tie.
    let trl: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(f.join("metrics.json")).unwrap()).unwrap();
    for (i, m) in metrics.iter().enumerate().filter(|_| variant.is_none()) {
        let step = i + 1;
        let (a, b) = (
            m["entropy"].as_f64().unwrap(),
            trl["entropy"][i].as_f64().unwrap(),
        );
        assert!(
            (a - b).abs() / b < 3e-7,
            "{device} {family}, step {step}: entropy {a} vs TRL's {b}"
        );
        let (a, b) = (
            m["mean_token_accuracy"].as_f64().unwrap(),
            trl["mean_token_accuracy"][i].as_f64().unwrap(),
        );
        // One token of an example of 20 or more, averaged over the step's two micro-batches.
        let allowed = if device == "cpu" { 1e-12 } else { 0.5 / 20.0 };
        assert!(
            (a - b).abs() <= allowed,
            "{device} {family}, step {step}: mean_token_accuracy {a} vs TRL's {b}"
        );
    }
    let (init, theirs, ours) = (adapter(&init_adapter), adapter(&results), adapter(&run));
    let mut worst = (0.0f64, String::new());
    let mut count = 0;
    for name in theirs.tensor_names() {
        let start = init.read_f32(name).unwrap();
        let delta = |file: &SafetensorsFile| -> Vec<f32> {
            let v = file.read_f32(name).unwrap();
            v.iter().zip(&start).map(|(a, b)| a - b).collect()
        };
        // Held to the tolerance, or to four times what float32 arithmetic alone moves this update in
        // transformers (its float64 run), whichever is larger.
        let noise = expected["update_float32_noise"][name.as_str()]
            .as_f64()
            .unwrap();
        let e = rel(&delta(&ours), &delta(&theirs));
        let tolerance = update_tolerance.max(4.0 * noise);
        assert!(
            e < tolerance,
            "{device} {family}: LoRA update {name} differs by {e:e} (held to {tolerance:e})"
        );
        if e > worst.0 {
            worst = (e, name.clone());
        }
        count += 1;
    }
    // A and B, and DoRA's magnitude where the adapter has them.
    let dora = theirs
        .tensor_names()
        .any(|n| n.ends_with(".lora_magnitude_vector"));
    let per_linear = if dora { 3 } else { 2 };
    assert_eq!(
        count,
        linears * per_linear + token_tables,
        "every trained tensor of both layers, and the tables' token rows"
    );
    eprintln!(
        "{device} {family} {flags:?}: worst relative difference of a LoRA update {:.1e} ({})",
        worst.0, worst.1
    );
}

/// Measured (CPU and lavapipe): losses and grad norms within 9.3e-7, LoRA updates within 9.7e-6
/// (1.5e-5 for Gemma 4's, 1.1e-5 for gpt-oss's gate_up B) (relative); held to about ten times that. Gemma's k_proj A behind its k norm is the exception: there
/// transformers' own float32 run is 5.1e-4 from its float64 one (AdamW divides each element by its own
/// magnitude), and nibble 1.8e-4 (CPU) and 5.2e-4 (lavapipe) from transformers' float32; each update
/// is held to four times that noise where it exceeds the tolerance. Gemma 4 with 26B-A4B's experts:
/// updates within 5.6e-5 (CPU) and 7.8e-5 (lavapipe), beside transformers' own float32 4.4e-5 from
/// its float64 on the same tensors: held to 5e-4.
const SCALAR_TOLERANCE: f64 = 1e-5;
const UPDATE_TOLERANCE: f64 = 1e-4;

#[test]
fn three_steps_on_the_cpu_match_transformers_and_peft() {
    check("cpu");
}

#[test]
fn three_steps_on_the_gpu_match_transformers_and_peft() {
    if nibble::gpu::Gpu::new(true).is_err() && std::env::var_os("NIBBLE_REQUIRE_GPU").is_none() {
        eprintln!("skipping: no Vulkan device");
        return;
    }
    check("gpu");
}

/// TRL's dynamic fine-tuning loss (`--loss-type dft`, SFTConfig(loss_type="dft")): the same three
/// steps against transformers + peft with TRL's formula (scripts/make_dft_fixture.py), for Qwen2 and
/// for Gemma 4's capped logits, on both executors, to the tolerances above, or to four times what
/// float32 alone moves transformers' value (its float64 run) where that is larger. Measured: losses and
/// grad norms within 1.4e-6 for Qwen2 and 1.2e-5 for Gemma 4 (whose float32 reference is itself 1.3e-5
/// from float64); LoRA updates within 3.7e-5 for Qwen2 and, for Gemma 4, 3.8e-4 on the CPU (where its
/// reference's own float32 noise is 5.8e-4) and 1.9e-4 on lavapipe (where that is 4.1e-5; the weights
/// exp(−loss) are about 1/vocabulary, and AdamW divides each element by its own magnitude), held to 2e-3.
#[test]
fn dft_loss_steps_match_trls() {
    let gpu =
        nibble::gpu::Gpu::new(true).is_ok() || std::env::var_os("NIBBLE_REQUIRE_GPU").is_some();
    for device in ["cpu", "gpu"].into_iter().filter(|&d| d == "cpu" || gpu) {
        for (family, linears) in [("qwen2", 14), ("gemma4_text", 31)] {
            let variant = Variant {
                flags: &["--loss-type", "dft"],
                folder: "dft",
                update_tolerance: 2e-3,
                own_init: false,
                own_model: false,
                token_tables: 0,
            };
            check_family(device, family, linears, Some(variant));
        }
    }
}

/// PEFT's per-module ranks and alphas (rank_pattern, alpha_pattern) read from the initial adapter's
/// adapter_config.json: ranks 2 to 6 and scales 0.75 to 6 across the fourteen linears, one module named
/// by two expressions (the first in the file wins, as PEFT loads it), three steps against transformers +
/// peft (scripts/make_rank_pattern_fixture.py) on both executors, to the tolerances above.
#[test]
fn steps_with_per_module_ranks_and_alphas_match_peft() {
    let gpu =
        nibble::gpu::Gpu::new(true).is_ok() || std::env::var_os("NIBBLE_REQUIRE_GPU").is_some();
    for device in ["cpu", "gpu"].into_iter().filter(|&d| d == "cpu" || gpu) {
        let variant = Variant {
            flags: &[],
            folder: "rank_pattern",
            update_tolerance: UPDATE_TOLERANCE,
            own_init: true,
            own_model: false,
            token_tables: 0,
        };
        check_family(device, "qwen2", 14, Some(variant));
    }
}

/// DoRA (PEFT's use_dora, read from the initial adapter's adapter_config.json): magnitudes 0.8 to 1.2
/// times the rows' norms and random A and B, so that every output is rescaled, q/k/v with biases;
/// three steps against transformers + peft on the 4-bit base (scripts/make_dora_fixture.py) on both
/// executors, to the tolerances above or four times the reference's own float32 noise. Measured:
/// losses and grad norms within 4.3e-6 (CPU; PEFT's float32 grad norm is itself 2.8e-6 from its
/// float64 one, and the CPU's 1.5e-6) and 3.8e-7 (lavapipe); updates within 3.7e-3 (CPU) and 2.8e-4
/// (lavapipe), where PEFT's float32 update of that tensor (layer 0's gate_proj A) is 2.2e-3 from its
/// float64 one: AdamW divides each element by its own magnitude.
#[test]
fn dora_steps_match_peft() {
    let gpu =
        nibble::gpu::Gpu::new(true).is_ok() || std::env::var_os("NIBBLE_REQUIRE_GPU").is_some();
    for device in ["cpu", "gpu"].into_iter().filter(|&d| d == "cpu" || gpu) {
        let variant = Variant {
            flags: &[],
            folder: "dora",
            update_tolerance: UPDATE_TOLERANCE,
            own_init: true,
            own_model: false,
            token_tables: 0,
        };
        check_family(device, "qwen2", 14, Some(variant));
    }
}

/// Trainable token rows (PEFT's trainable_token_indices, read from the initial adapter) beside the
/// LoRA matrices: five tokens' rows moved off the base's, three steps against transformers + peft
/// (scripts/make_trainable_tokens_train_fixture.py) on both executors, to the tolerances above or
/// four times the reference's own float32 noise: Qwen2 and Gemma 3 (its √hidden embedding scale)
/// tied, one set of rows feeding the embedding and the output projection; Ministral 3 untied, each
/// table its own rows. Rows of a token the data never holds train through the output projection's
/// softmax alone. Measured: losses and grad norms within 7.3e-7, updates (the rows' among them)
/// within 1.2e-5.
#[test]
fn steps_with_trainable_token_rows_match_peft() {
    let gpu =
        nibble::gpu::Gpu::new(true).is_ok() || std::env::var_os("NIBBLE_REQUIRE_GPU").is_some();
    for device in ["cpu", "gpu"].into_iter().filter(|&d| d == "cpu" || gpu) {
        let families = [
            ("qwen2", 14, 1),
            ("gemma3_text", 14, 1),
            ("ministral3", 14, 2),
        ];
        for (family, linears, token_tables) in families {
            let variant = Variant {
                flags: &[],
                folder: "trainable_tokens",
                update_tolerance: UPDATE_TOLERANCE,
                own_init: true,
                own_model: true,
                token_tables,
            };
            check_family(device, family, linears, Some(variant));
        }
    }
}

/// A fresh DoRA adapter's magnitudes (PEFT's `DoraLinearLayer.update_layer`: each output row's norm of
/// the dequantized 4-bit weight, B being zero) for every adapted linear of the qwen2 fixture, against
/// PEFT's on bitsandbytes' NF4 (group 64) of the same weights (scripts/make_dora_fixture.py). Measured:
/// within 5.1e-8 relative; held to 1e-6.
#[test]
fn fresh_dora_magnitudes_are_peft_s() {
    use nibble::lora::{LoraAdapter, LoraConfig};
    use nibble::model::{ModelSource, QuantRequest};
    use nibble::quant::{QuantFormat, QuantSpec};
    let f = fixtures().join("qwen2");
    let model = ModelSource::open(&f.join("model"))
        .unwrap()
        .load(Some(QuantRequest::Quantize(
            QuantSpec::new(QuantFormat::Nf4, 64).unwrap(),
        )))
        .unwrap();
    let peft: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(f.join("dora/fresh_magnitudes.json")).unwrap(),
    )
    .unwrap();
    let peft = peft["magnitudes"].as_object().unwrap();
    let config = LoraConfig {
        r: 4,
        alpha: 8.0,
        use_dora: true,
        ..LoraConfig::default()
    };
    let mut adapter =
        LoraAdapter::init(&model.config, config, &mut nibble::rng::Rng::new(1)).unwrap();
    adapter
        .init_magnitudes(|path| model.linear_weight(path))
        .unwrap();
    assert_eq!(adapter.pairs().count(), peft.len());
    let mut worst = 0f64;
    for (path, pair) in adapter.pairs() {
        let theirs: Vec<f32> = peft[path]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let e = rel(&pair.magnitude, &theirs);
        assert!(e < 1e-6, "{path}: magnitudes differ by {e:e}");
        worst = worst.max(e);
    }
    eprintln!("fresh DoRA magnitudes: worst relative difference {worst:.1e}");
}
