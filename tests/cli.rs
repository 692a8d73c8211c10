//! The `nibble` binary end to end: info and quantize on random Qwen2, Qwen3 and Llama folders in both
//! config spellings, and the exit status and message of bad input.

mod common;

use common::nibble;

use nibble::config::Arch;
use nibble::synth::{self, ConfigSpelling, SynthSpec};
use std::path::Path;

fn ok(args: &[&str]) -> String {
    let out = nibble(args);
    assert!(
        out.status.success(),
        "nibble {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must fail cleanly: non-zero exit, a message, no panic.
fn fails(args: &[&str]) -> String {
    let out = nibble(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "nibble {args:?} should exit 1: {stderr}"
    );
    assert!(
        !stderr.contains("panicked"),
        "nibble {args:?} panicked: {stderr}"
    );
    assert!(stderr.starts_with("nibble: error: "), "{stderr}");
    stderr
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The causal LM caps its logits where the config says so; the multimodal head (same text_config)
/// never does, as transformers' Gemma3ForConditionalGeneration.
#[test]
fn info_names_the_logit_soft_cap_where_the_head_applies_it() {
    let block = |folder: &str| {
        let info: serde_json::Value =
            serde_json::from_str(&ok(&["info", folder, "--json"])).unwrap();
        info["block"].as_str().unwrap().to_string()
    };
    let text = block("tests/fixtures/hf/gemma3_text");
    assert!(text.ends_with(", logits soft-capped at 2"), "{text}");
    let multimodal = block("tests/fixtures/hf/gemma3");
    assert!(!multimodal.contains("soft-capped"), "{multimodal}");
}

/// A quantized file keeps its folder's generation_config.json, so that `generate` decodes from it as
/// from the folder: the same sampled answer for the same seed.
#[test]
fn a_quantized_file_keeps_the_generation_config() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    synth::write_model_folder(
        &model,
        &SynthSpec::tiny(Arch::Qwen2, 259),
        Some(&synth::byte_tokenizer()),
    )
    .unwrap();
    let generation =
        r#"{"do_sample": true, "temperature": 1.5, "top_k": 40, "repetition_penalty": 1.2}"#;
    std::fs::write(model.join("generation_config.json"), generation).unwrap();
    let out = dir.path().join("q.safetensors");
    ok(&["quantize", s(&model), "--output", s(&out)]);
    let source = nibble::model::ModelSource::open(&out).unwrap();
    assert_eq!(
        source
            .generation_config
            .and_then(|(text, _)| text.ok())
            .as_deref(),
        Some(generation)
    );
    let answer = |m: &std::path::Path| {
        ok(&[
            "generate",
            "--model",
            s(m),
            "--prompt",
            "Hi",
            "--seed",
            "3",
            "--max-new-tokens",
            "12",
            "--device",
            "cpu",
        ])
    };
    let sampled = answer(&model);
    assert_eq!(answer(&out), sampled);
    std::fs::remove_file(model.join("generation_config.json")).unwrap();
    let greedy = answer(&model);
    assert_ne!(greedy, sampled, "greedy without the file");
    assert!(
        !greedy.trim().is_empty(),
        "the greedy answer says something"
    );
    // Its eos_token_id ends text as transformers ends it: every id listed, nothing is written.
    let every: Vec<u32> = (0..259).collect();
    let ends = serde_json::json!({"eos_token_id": every}).to_string();
    std::fs::write(model.join("generation_config.json"), ends).unwrap();
    assert_eq!(answer(&model).trim(), "");
    // Settings transformers applies and nibble does not are named; those at their defaults are not.
    let unapplied =
        r#"{"no_repeat_ngram_size": 3, "typical_p": 0.9, "num_beams": 1, "suppress_tokens": []}"#;
    std::fs::write(model.join("generation_config.json"), unapplied).unwrap();
    let o = nibble(&[
        "generate",
        "--model",
        s(&model),
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "2",
        "--device",
        "cpu",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("nibble decodes without no_repeat_ngram_size: 3, typical_p: 0.9 ("),
        "{err}"
    );
}

/// A group size that does not fit the model's widths is said, not sized: `info` reports what `train`
/// would refuse.
#[test]
fn info_says_where_a_group_size_does_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let spec = SynthSpec::tiny(Arch::Qwen2, 1024);
    assert_eq!(
        spec.config().hidden_size % 128,
        64,
        "128 does not divide the width"
    );
    synth::write_model_folder(&model, &spec, Some(&synth::byte_tokenizer())).unwrap();
    let info: serde_json::Value =
        serde_json::from_str(&ok(&["info", s(&model), "--json", "--group-size", "128"])).unwrap();
    assert_eq!(info["weight_bytes_quantized"], serde_json::Value::Null);
    let error = info["quant_error"].as_str().unwrap();
    assert!(error.contains("group size 128 does not divide"), "{error}");
    let text = ok(&["info", s(&model), "--group-size", "128"]);
    assert!(text.contains("not in nf4 (group 128)"), "{text}");
    let text = ok(&["info", s(&model)]);
    assert!(
        !text.contains("not in") && text.contains("nf4 (group 64)"),
        "{text}"
    );
}

#[test]
fn info_and_quantize_work_for_every_family_and_spelling() {
    for arch in Arch::ALL {
        for spelling in [ConfigSpelling::V4, ConfigSpelling::V5] {
            let dir = tempfile::tempdir().unwrap();
            let model = dir.path().join("model");
            let mut spec = SynthSpec::tiny(arch, 1024);
            spec.spelling = spelling;
            synth::write_model_folder(&model, &spec, Some(&synth::byte_tokenizer())).unwrap();

            let info: serde_json::Value =
                serde_json::from_str(&ok(&["info", s(&model), "--json"])).unwrap();
            assert_eq!(info["architecture"], arch.model_type());
            assert_eq!(info["parameters"], spec.config().parameter_count());
            assert_eq!(
                info["weight_bytes_16bit"],
                2 * spec.config().parameter_count()
            );
            assert!(
                info["weight_bytes_quantized"].as_u64().unwrap()
                    < info["weight_bytes_16bit"].as_u64().unwrap()
            );
            assert_eq!(info["tokenizer"], true);
            assert_eq!(info["tokenizer_error"], serde_json::Value::Null);

            let text = ok(&["info", s(&model)]);
            assert!(
                text.contains(arch.class_name()) && text.contains("parameters"),
                "{text}"
            );
            // Layer by layer attention: the tiny presets' windows and NoPE layers.
            let (windows, no_rope, line) = match arch {
                Arch::Mistral => (
                    serde_json::json!([{"layer": 0, "window": 8}, {"layer": 1, "window": 8}]),
                    serde_json::json!([]),
                    "sliding window 8 in all layers",
                ),
                Arch::Ministral => (
                    serde_json::json!([{"layer": 0, "window": 8}]),
                    serde_json::json!([]),
                    "sliding window 8 in layers [0]",
                ),
                Arch::SmolLM3 => (
                    serde_json::json!([]),
                    serde_json::json!([1]),
                    "no RoPE in layers [1]",
                ),
                Arch::Gemma3 => (
                    serde_json::json!([{"layer": 0, "window": 8}]),
                    serde_json::json!([]),
                    "sliding window 8 in layers [0]",
                ),
                Arch::Gemma4 => (
                    serde_json::json!([{"layer": 0, "window": 8}, {"layer": 2, "window": 8}]),
                    serde_json::json!([]),
                    "sliding window 8 in layers [0, 2]",
                ),
                Arch::Qwen2 | Arch::Qwen3 | Arch::Llama | Arch::Phi3 | Arch::Ministral3 => {
                    (serde_json::json!([]), serde_json::json!([]), "")
                }
            };
            if arch == Arch::Gemma3 {
                let (rope, block) = (
                    info["rope_scaling"].as_str().unwrap(),
                    info["block"].as_str().unwrap(),
                );
                assert!(
                    rope == "linear x8; sliding layers theta 10000, unscaled",
                    "{rope}"
                );
                // 24^-½, and √64 = 8.
                assert_eq!(
                    block,
                    "GeGLU MLP (gelu tanh), norms scale by (1 + w), sandwich norms, embeddings x8, attention scale 0.204124"
                );
            }
            if arch == Arch::Phi3 {
                let rope = info["rope_scaling"].as_str().unwrap();
                assert!(
                    rope.contains("longrope, long factors past 64 positions")
                        && rope.contains("rotating 12 of 16 channels per head"),
                    "{rope}"
                );
            }
            if arch == Arch::Gemma4 {
                assert_eq!(info["per_layer_input_size"], 64);
                assert_eq!(
                    info["kv_shared_layers"],
                    serde_json::json!([{"layer": 2, "from": 0}, {"layer": 3, "from": 1}])
                );
                let block = info["block"].as_str().unwrap();
                assert!(
                    block.contains("per-layer inputs of 64, layers 2-3 reuse the keys and values of layers {0, 1} (MLPs twice as wide)"),
                    "{block}"
                );
            }
            assert_eq!(info["sliding_window_layers"], windows, "{arch:?}");
            assert_eq!(info["layers_without_rope"], no_rope, "{arch:?}");
            match line {
                "" => assert!(
                    !text.contains("sliding window") && !text.contains("no RoPE"),
                    "{arch:?}: {text}"
                ),
                line => assert!(text.contains(line), "{arch:?}: {text}"),
            }

            let out = dir.path().join("q.safetensors");
            ok(&[
                "quantize",
                s(&model),
                "--output",
                s(&out),
                "--quant",
                "int4",
                "--group-size",
                "32",
            ]);
            let qinfo: serde_json::Value =
                serde_json::from_str(&ok(&["info", s(&out), "--json"])).unwrap();
            assert_eq!(qinfo["stored_quant"], "int4 (group 32)");
            assert_eq!(qinfo["parameters"], info["parameters"]);
            assert_eq!(qinfo["tokenizer"], true);
        }
    }
}

#[test]
fn bad_input_exits_non_zero_with_a_message_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    synth::write_model_folder(&model, &SynthSpec::tiny(Arch::Qwen2, 1024), None).unwrap();
    let out = dir.path().join("q.safetensors");

    let err = fails(&["info", s(&dir.path().join("nowhere"))]);
    assert!(err.contains("nowhere"), "{err}");
    // Training takes sequences of 2 tokens or more; so does `data`, which shows what training sees.
    let short = nibble(&[
        "data",
        "rows.jsonl",
        "--model",
        s(&model),
        "--max-length",
        "1",
    ]);
    let err = String::from_utf8_lossy(&short.stderr);
    assert!(
        !short.status.success() && err.contains("--max-length"),
        "{err}"
    );
    // A folder's config.json stands for its folder, as `plan` takes it.
    let info = |path: &Path| {
        let mut v: serde_json::Value =
            serde_json::from_str(&ok(&["info", s(path), "--json"])).unwrap();
        v["model"] = serde_json::Value::Null;
        v
    };
    assert_eq!(info(&model.join("config.json")), info(&model));

    let err = fails(&[
        "quantize",
        s(&model),
        "--output",
        s(&out),
        "--group-size",
        "48",
    ]);
    assert!(err.contains("group size 48"), "{err}");
    assert!(!out.exists(), "no output may be written on error");

    // A group size that does not divide the input dimension (64) of the model.
    let err = fails(&[
        "quantize",
        s(&model),
        "--output",
        s(&out),
        "--group-size",
        "128",
    ]);
    assert!(
        err.contains("group size 128 does not divide the input dimension 64"),
        "{err}"
    );
    assert!(!out.exists(), "no output may be written on error");

    // A truncated shard.
    let st = model.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    let err = fails(&["quantize", s(&model), "--output", s(&out)]);
    assert!(
        err.contains("model.safetensors") && err.contains("truncated"),
        "{err}"
    );
    std::fs::write(&st, &bytes).unwrap();

    // An output folder that does not exist: the error names the output, nothing is left behind.
    let missing = dir.path().join("no/such/dir/q.safetensors");
    let err = fails(&["quantize", s(&model), "--output", s(&missing)]);
    assert!(err.contains("no/such/dir"), "{err}");
    // A file where the output's folder would be, and a folder's name (a trailing slash).
    let file = dir.path().join("a-file");
    std::fs::write(&file, "mine").unwrap();
    let err = fails(&[
        "quantize",
        s(&model),
        "--output",
        s(&file.join("q.safetensors")),
    ]);
    assert!(err.contains("a-file is a file, not a folder"), "{err}");
    let slash = format!("{}/", dir.path().join("newq").display());
    let err = fails(&["quantize", s(&model), "--output", &slash]);
    assert!(err.contains("name the safetensors file"), "{err}");
    assert!(!dir.path().join("newq").exists());
    // What merge and synth write their folders with.
    let err = nibble::fsutil::write_folder_atomically(&file.join("merged"), |_| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("a-file is a file, not a folder"), "{err}");
    let err = nibble::fsutil::write_folder_atomically(&file, |_| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("a-file is a file, not a folder"), "{err}");
    let err = fails(&["demo", "--keep", s(&file.join("kept"))]);
    assert!(err.contains("a-file is a file, not a folder"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");

    // A random file that is not a quantized model.
    std::fs::write(&out, b"not a model at all").unwrap();
    let err = fails(&["info", s(&out)]);
    assert!(err.contains("q.safetensors"), "{err}");

    // An existing --output is replaced only when asked: here it is someone's file.
    let err = fails(&["quantize", s(&model), "--output", s(&out)]);
    assert!(
        err.contains("exists") && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"not a model at all");
    let err = fails(&["quantize", s(&model), "--output", s(dir.path())]);
    assert!(err.contains("is a folder"), "{err}");

    // Re-quantizing a quantized file is refused.
    ok(&["quantize", s(&model), "--output", s(&out), "--overwrite"]);
    let err = fails(&[
        "quantize",
        s(&out),
        "--output",
        s(&dir.path().join("again.safetensors")),
    ]);
    assert!(err.contains("already a quantized file"), "{err}");

    // No command writes over what it reads, or over a folder it did not make.
    let before = std::fs::read(&st).unwrap();
    let err = fails(&["quantize", s(&model), "--output", s(&st)]);
    assert!(err.contains("would replace the input"), "{err}");
    // Named by its config.json, the folder is still the input, --overwrite or not.
    let config = model.join("config.json");
    let err = fails(&["quantize", s(&config), "--output", s(&st), "--overwrite"]);
    assert!(err.contains("would replace the input"), "{err}");
    assert_eq!(
        std::fs::read(&st).unwrap(),
        before,
        "the model is untouched"
    );
    let err = fails(&["demo", "--keep", s(&model)]);
    assert!(err.contains("not empty"), "{err}");
    assert_eq!(
        std::fs::read(&st).unwrap(),
        before,
        "the model is untouched"
    );
}

#[test]
fn demo_fine_tunes_without_a_download() {
    let text = ok(&["demo"]);
    assert!(
        text.contains("Qwen2ForCausalLM") && text.contains("PEFT folder"),
        "{text}"
    );
    // Its temporary folder is gone, and the last lines say so rather than point into it.
    let folder = text
        .lines()
        .find_map(|l| l.split("tokenizer, in ").nth(1))
        .expect("the demo names its folder");
    assert!(!Path::new(folder).exists(), "{folder}");
    assert!(
        text.contains("removed now") && text.contains("--keep"),
        "{text}"
    );
    let losses: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split("loss ").nth(1))
        .map(|rest| rest.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert!(losses.len() >= 3, "{text}");
    assert!(
        losses.last().unwrap() < &(0.5 * losses[0]),
        "the demo's loss must fall: {losses:?}"
    );
}

#[test]
fn plan_reports_a_breakdown_that_adds_up() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    synth::write_model_folder(&model, &SynthSpec::tiny(Arch::Llama, 1024), None).unwrap();
    let run = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["plan", s(&model), "--seq-len", "512", "--json"];
        args.extend_from_slice(extra);
        serde_json::from_str(&ok(&args)).unwrap()
    };
    let full = run(&[]);
    let part = |k: &str| full[k].as_u64().unwrap();
    let sum: u64 = ["weights", "lora_and_optimizer", "device_step"]
        .iter()
        .map(|k| part(k))
        .sum();
    assert_eq!(part("total"), sum);
    // The GPU's shared buffers hold at least what is live at once (less the CPU's weight tiles).
    assert!(part("device_step") >= part("activations"), "{full}");
    // The tiny Llama's untied embedding is planned in host memory (a GPU uploads the rows a step
    // reads); the CPU executor holds it with the rest.
    let embedding = 2 * 1024 * SynthSpec::tiny(Arch::Llama, 1024).hidden_size as u64;
    assert_eq!(full["host_weights"].as_u64().unwrap(), embedding);
    let checkpointed = run(&["--gradient-checkpointing"]);
    assert!(checkpointed["activations"].as_u64() < full["activations"].as_u64());
    let fewer = run(&["--target-modules", "q_proj,v_proj"]);
    assert!(fewer["lora_parameters"].as_u64() < full["lora_parameters"].as_u64());
    // Three tokens' rows of both untied tables train: their parameters, and the CPU's copy of the
    // two tables (the output projection's is counted with the weights).
    let rows = run(&["--trainable-tokens", "<s>, 7,9"]);
    let hidden = SynthSpec::tiny(Arch::Llama, 1024).hidden_size as u64;
    assert_eq!(
        rows["lora_parameters"].as_u64().unwrap(),
        part("lora_parameters") + 3 * 2 * hidden
    );
    assert_eq!(rows["token_tables"].as_u64().unwrap(), 2 * embedding);
    assert_eq!(full["token_tables"].as_u64().unwrap(), 0);
    let err = fails(&["plan", s(&model), "--trainable-tokens", "7,,9"]);
    assert!(
        err.contains("--trainable-tokens \"7,,9\": an empty entry"),
        "{err}"
    );
    for dropout in ["1", "NaN", "1.5"] {
        let err = fails(&["plan", s(&model), "--lora-dropout", dropout]);
        assert!(err.contains("--lora-dropout must be"), "{dropout}: {err}");
    }
    let err = fails(&["plan", s(&model), "--target-modules", "q_proj,attn"]);
    assert!(
        err.contains("target module `attn` names no linear layer") && err.contains("q_proj"),
        "{err}"
    );
    // Targets are module paths as PEFT matches them: a longer suffix picks one layer's projection.
    let q = run(&["--target-modules", "q_proj"]);
    let one = run(&["--target-modules", "model.layers.1.self_attn.q_proj"]);
    assert_eq!(
        2 * one["lora_parameters"].as_u64().unwrap(),
        q["lora_parameters"].as_u64().unwrap(),
        "two layers"
    );

    // config.json alone (a folder, or the file itself) plans the same as the whole model folder.
    let config_only = dir.path().join("config-only");
    std::fs::create_dir(&config_only).unwrap();
    std::fs::copy(model.join("config.json"), config_only.join("config.json")).unwrap();
    for path in [config_only.clone(), config_only.join("config.json")] {
        let args = ["plan", s(&path), "--seq-len", "512", "--json"];
        let planned: serde_json::Value = serde_json::from_str(&ok(&args)).unwrap();
        assert_eq!(planned, full, "{}", path.display());
    }
}

/// `plan --budget` answers "what is the longest sequence that fits on my card" from config.json alone:
/// that many tokens fit the budget and one more does not; a budget the weights alone exceed is an
/// error that says so.
#[test]
fn plan_finds_the_longest_sequence_for_a_budget() {
    let dir = tempfile::tempdir().unwrap();
    // Llama-3.1-8B's shape.
    let config = serde_json::json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
        "tie_word_embeddings": false, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "max_position_embeddings": 131072, "hidden_act": "silu", "torch_dtype": "bfloat16"});
    let path = dir.path().join("config.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let options = [
        "--lora-r",
        "32",
        "--group-size",
        "64",
        "--gradient-checkpointing",
    ];
    let plan = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["plan", s(&path), "--json"];
        args.extend_from_slice(&options);
        args.extend_from_slice(extra);
        serde_json::from_str(&ok(&args)).unwrap()
    };
    let budget = 11.5 * (1u64 << 30) as f64;
    let found = plan(&["--budget", "11.5GiB"]);
    let longest = found["max_seq_len"].as_u64().unwrap();
    assert!(longest > 1000, "{found}");
    assert_eq!(found["assumed"]["lora_r"], 32);
    let at = |tokens: u64| {
        plan(&["--seq-len", &tokens.to_string()])["total"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(at(longest), found["total"].as_u64().unwrap());
    assert!(at(longest) as f64 <= budget && at(longest + 1) as f64 > budget);
    let text = ok(&["plan", s(&path), "--budget", "11.5GiB", "--lora-r", "32"]);
    assert!(text.starts_with("longest sequence in 11.50 GiB:"), "{text}");
    // Left to nibble, a budget assumes checkpoints in bf16 in host memory, as `nibble train` on a GPU
    // would choose them when nothing else fits; issue 16's goals: at least 22,000 tokens on a 12 GB
    // card (11.5 GiB free) and 4,096 on an 8 GB one (7.5 GiB), Llama-3.1-8B's shape, r=32.
    let chosen = |budget: &str, extra: &[&str]| -> serde_json::Value {
        let mut args = vec![
            "plan",
            s(&path),
            "--budget",
            budget,
            "--lora-r",
            "32",
            "--json",
        ];
        args.extend_from_slice(extra);
        serde_json::from_str(&ok(&args)).unwrap()
    };
    let offloaded = chosen("11.5GiB", &[]);
    assert_eq!(offloaded["assumed"]["offload_checkpoints"], true);
    assert_eq!(offloaded["assumed"]["bf16_checkpoints"], true);
    assert_eq!(offloaded["assumed"]["gradient_checkpointing"], true);
    assert!(offloaded["host_activations"].as_u64().unwrap() > 0);
    let bf16 = chosen("11.5GiB", &["--bf16-checkpoints"]);
    assert_eq!(bf16["assumed"]["offload_checkpoints"], false);
    assert_eq!(bf16["host_activations"], 0);
    let (offloaded, bf16) = (
        offloaded["max_seq_len"].as_u64().unwrap(),
        bf16["max_seq_len"].as_u64().unwrap(),
    );
    assert!(
        offloaded > bf16 && bf16 > longest,
        "{offloaded} {bf16} {longest}"
    );
    assert!(offloaded >= 22_000, "{offloaded} tokens in 11.5 GiB");
    let small = chosen("7.5GiB", &[])["max_seq_len"].as_u64().unwrap();
    assert!(small >= 4_096, "{small} tokens in 7.5 GiB");
    let err = fails(&[
        "plan",
        s(&path),
        "--offload-checkpoints",
        "--bf16-checkpoints",
        "false",
    ]);
    assert!(
        err.contains("offloaded checkpoints are kept in bf16"),
        "{err}"
    );
    let err = fails(&[
        "plan",
        s(&path),
        "--offload-checkpoints",
        "--gradient-checkpointing",
        "false",
    ]);
    assert!(
        err.contains("--offload-checkpoints is a kind of gradient checkpointing"),
        "{err}"
    );
    let err = fails(&["plan", s(&path), "--budget", "2GiB"]);
    assert!(
        err.contains("not even a 1-token step fits in 2.00 GiB"),
        "{err}"
    );
    let err = fails(&["plan", s(&path), "--budget", "lots"]);
    assert!(err.contains("--budget"), "{err}");

    // Past the positions the model places the search stops: training cuts sequences there.
    let mut short = config.clone();
    short["max_position_embeddings"] = 2048.into();
    std::fs::write(&path, short.to_string()).unwrap();
    let capped = plan(&["--budget", "11.5GiB"]);
    assert_eq!(capped["max_seq_len"], 2048, "{capped}");
    let text = ok(&["plan", s(&path), "--budget", "11.5GiB"]);
    assert!(text.contains("2,048 tokens (every position"), "{text}");
}

/// `nibble train --help` (and -h) gives every option a description and its default (issue 19).
#[test]
fn every_train_option_names_its_default_in_help() {
    for flag in ["--help", "-h"] {
        let help = ok(&["train", flag]);
        // Each option's block runs from its `--name` line to the next one.
        let mut blocks: Vec<(String, String)> = Vec::new();
        for line in help.lines() {
            let trimmed = line.trim_start();
            if let Some(rest) = trimmed
                .strip_prefix("-o, ")
                .or(Some(trimmed))
                .filter(|t| t.starts_with("--") && line.starts_with("  "))
            {
                let name = rest.split_whitespace().next().unwrap().to_string();
                blocks.push((name, String::new()));
            } else if let Some((_, text)) = blocks.last_mut() {
                text.push_str(line);
                text.push('\n');
            }
        }
        assert!(blocks.len() > 40, "{help}");
        for (name, text) in &blocks {
            if name == "--help" {
                continue;
            }
            assert!(
                text.contains("[default: ") || text.contains("[required]"),
                "{flag}: {name} states no default:\n{text}"
            );
            let description = text.split('[').next().unwrap().trim();
            assert!(!description.is_empty(), "{flag}: {name} has no description");
        }
        assert!(
            help.contains("The peak learning rate [default: 0.0002]"),
            "{help}"
        );
    }
}

/// A tiny Qwen2 folder (byte tokenizer) and a one-row text file to evaluate it on, in a temporary folder.
fn model_and_text() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    synth::write_model_folder(
        &model,
        &SynthSpec::tiny(Arch::Qwen2, 259),
        Some(&synth::byte_tokenizer()),
    )
    .unwrap();
    let data = dir.path().join("d.jsonl");
    std::fs::write(&data, "{\"text\": \"Some words to score.\"}\n").unwrap();
    (dir, model, data)
}

/// `nibble eval` of `model` on `data` with `--device device`.
fn eval_command(model: &Path, data: &Path, device: &str) -> std::process::Command {
    let mut command = common::nibble_command();
    command.args([
        "eval",
        "--model",
        s(model),
        "--data",
        s(data),
        "--device",
        device,
    ]);
    command
}

/// Without XDG_RUNTIME_DIR (ssh, containers), probing for a GPU prints no driver "error:" lines, and a
/// missing data file names its cause once (issue 19).
#[test]
fn a_gpu_probe_without_a_runtime_dir_is_quiet_and_causes_are_said_once() {
    let (dir, model, data) = model_and_text();
    let out = eval_command(&model, &data, "auto")
        .env_remove("XDG_RUNTIME_DIR")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("XDG_RUNTIME_DIR"), "{stderr}");

    let missing = dir.path().join("missing.jsonl");
    let err = fails(&["eval", "--model", s(&model), "--data", s(&missing)]);
    let cause = "no such folder or file";
    assert_eq!(err.matches(cause).count(), 1, "{err}");
}

/// `--device gpu` on a software renderer (lavapipe here and in CI) runs, with a warning that names it
/// and points to the CPU executor (issue 19); on a hardware GPU there is no such warning.
#[test]
fn a_software_gpu_is_named_as_such() {
    let (_dir, model, data) = model_and_text();
    let out = nibble(&[
        "eval",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--device",
        "gpu",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        assert!(stderr.contains("--device gpu: no GPU adapter"), "{stderr}");
        eprintln!("skipped: no GPU adapter at all");
        return;
    }
    let gpu = nibble::gpu::Gpu::new(true).expect("nibble opened one");
    let software = gpu.info.device_type == wgpu::DeviceType::Cpu;
    assert_eq!(
        stderr.contains("is a software renderer, not a GPU"),
        software,
        "{stderr}"
    );
}

/// `nibble data` shows which tokens carry loss (issue 19): with --loss-on assistant, exactly the
/// assistant's reply and its end of turn, as TRL's assistant mask has them; by default (TRL's), every
/// token but the first for a conversation and the completion alone for a prompt/completion row; the
/// totals count every example, and a cut example says so.
#[test]
fn data_shows_which_tokens_carry_loss() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    common::write_tiny_qwen2(&model);
    let data = dir.path().join("d.jsonl");
    std::fs::write(
        &data,
        concat!(
            r#"{"messages": [{"role": "user", "content": "What is LoRA, in a word?"}, {"role": "assistant", "content": "Adapters."}]}"#,
            "\n",
            r#"{"prompt": "Two plus two is", "completion": " four."}"#,
            "\n",
        ),
    )
    .unwrap();
    let lines = |extra: &[&str]| -> Vec<serde_json::Value> {
        let mut args = vec![
            "data",
            s(&data),
            "--model",
            s(&model),
            "--json",
            "--examples",
            "9",
        ];
        args.extend(extra);
        ok(&args)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let labelled_text = |v: &serde_json::Value| -> String {
        let tokens = v["tokens"].as_array().unwrap();
        let labelled = v["labelled"].as_array().unwrap();
        tokens
            .iter()
            .zip(labelled)
            .filter(|(_, l)| l.as_bool().unwrap())
            .map(|(t, _)| t.as_str().unwrap())
            .collect()
    };
    let all = lines(&[]);
    assert_eq!(all.len(), 3);
    let first = all[0]["labelled"].as_array().unwrap();
    assert!(!first[0].as_bool().unwrap() && first[1..].iter().all(|l| l.as_bool().unwrap()));
    // TRL's SFTTrainer ends a text completion with the eos token, and so does nibble.
    assert_eq!(labelled_text(&all[1]), " four.<|im_end|>");
    // With another eos token (TRL's eos_token), as `nibble train --eos-token` would end it.
    let other = lines(&["--eos-token", "<|endoftext|>"]);
    assert_eq!(labelled_text(&other[1]), " four.<|endoftext|>");
    let total_labels = first.len() - 1 + 3;
    assert_eq!(all[2]["labelled_tokens"], total_labels);
    let assistant = std::fs::read_to_string(&data).unwrap();
    let only_chat = dir.path().join("chat.jsonl");
    std::fs::write(&only_chat, assistant.lines().next().unwrap()).unwrap();
    let out = ok(&[
        "data",
        s(&only_chat),
        "--model",
        s(&model),
        "--json",
        "--loss-on",
        "assistant",
    ]);
    let shown: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(labelled_text(&shown), "Adapters.<|im_end|>\n");
    // Cut to 8 tokens: the reply is gone, and the text form says the example was cut.
    let text = ok(&["data", s(&data), "--model", s(&model), "--max-length", "8"]);
    assert!(text.contains("cut by --max-length 8"), "{text}");
    assert!(text.contains("between ⟦ and ⟧"), "{text}");
    // Text alone: config.json and the tokenizer files, as copied from a model whose weights are
    // still downloading, show the same.
    let text_only = dir.path().join("text-only");
    std::fs::create_dir(&text_only).unwrap();
    for entry in std::fs::read_dir(&model).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "safetensors") {
            std::fs::copy(&path, text_only.join(path.file_name().unwrap())).unwrap();
        }
    }
    let mut args = vec!["data", s(&data), "--model", s(&text_only), "--json"];
    args.extend(["--examples", "9"]);
    assert_eq!(
        ok(&args),
        ok(&[&args[..3], &[s(&model)], &args[4..]].concat())
    );
}

/// NIBBLE_PROFILE=1 reports, at the end, the CPU executor's time per kind of operation: here an eval's
/// forward, whose products are named by shape; without it, no report.
#[test]
fn the_profile_names_each_operation_and_its_calls() {
    let (_dir, model, data) = model_and_text();
    let out = eval_command(&model, &data, "cpu")
        .env("NIBBLE_PROFILE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report = stderr
        .split_once("CPU executor, time per operation")
        .unwrap_or_else(|| panic!("no profile in: {stderr}"))
        .1;
    let tiny = SynthSpec::tiny(Arch::Qwen2, 259);
    let (hidden, intermediate) = (tiny.hidden_size, tiny.intermediate_size);
    let up_proj = format!("Linear {intermediate}x{hidden}");
    for op in ["Embed", "RmsNorm", "Attention", &up_proj] {
        assert!(
            report.contains(&format!("\n  {op} ")),
            "{op} missing: {report}"
        );
    }
    let quiet = eval_command(&model, &data, "cpu").output().unwrap();
    assert!(!String::from_utf8_lossy(&quiet.stderr).contains("time per operation"));
}

/// `generate` warns where the prompt and the tokens asked for reach past the positions the model was
/// trained to place (as transformers' generate does), and only there.
#[test]
fn generating_past_the_models_positions_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    synth::write_model_folder(
        &model,
        &SynthSpec::tiny(Arch::Qwen2, 259),
        Some(&synth::byte_tokenizer()),
    )
    .unwrap();
    let generate = |positions: usize| {
        let path = model.join("config.json");
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        config["max_position_embeddings"] = positions.into();
        std::fs::write(&path, config.to_string()).unwrap();
        let args = [
            "generate",
            "--model",
            s(&model),
            "--prompt",
            "hello",
            "--raw",
            "--max-new-tokens",
            "6",
            "--device",
            "cpu",
        ];
        let out = nibble(&args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        stderr
    };
    // "hello" is 5 byte tokens: 11 positions at most.
    let warned = generate(8);
    assert!(warned.contains("reach past the 8 positions"), "{warned}");
    let quiet = generate(11);
    assert!(!quiet.contains("positions the model"), "{quiet}");
    // What only the chat template reads is refused with --raw rather than dropped.
    for extra in [["--system", "be brief"], ["--chat-template-kwargs", "{}"]] {
        let mut args = vec!["generate", "--model", s(&model), "--prompt", "hi", "--raw"];
        args.extend(extra);
        let out = nibble(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(extra[0]) && stderr.contains("--raw"),
            "{stderr}"
        );
    }
}

/// Ctrl-C while `synth` or `merge` writes a model removes what was written (a temporary folder the
/// size of the model, hidden by a dot) and leaves no output: the same command can run again.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn an_interrupted_synth_or_merge_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    // Interrupted once its temporary folder is there, so while it writes.
    let interrupted = |args: &[&str], output: &Path| {
        let child = common::nibble_command()
            .args(args)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let name = output.file_name().unwrap().to_str().unwrap();
        let temporary = output.with_file_name(format!(".{name}.tmp-{}", child.id()));
        let started = std::time::Instant::now();
        while !temporary.exists() {
            assert!(started.elapsed().as_secs() < 60, "{args:?} never wrote");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // SAFETY: kill(2) only sends a signal; the pid is our own child, which has not been waited
        // for, so it cannot have been reused by another process.
        assert_eq!(
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) },
            0
        );
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(130), "{args:?}: {stderr}");
        assert!(stderr.contains("removed the partial"), "{stderr}");
        assert!(
            !temporary.exists() && !output.exists(),
            "{args:?}: {stderr}"
        );
        let left: Vec<_> = std::fs::read_dir(output.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().contains(".tmp"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    };
    let model = dir.path().join("model");
    interrupted(
        &["synth", "--preset", "qwen2.5-0.5b", "-o", &s(&model)],
        &model,
    );
    let out = nibble(&["synth", "--preset", "qwen2.5-0.5b", "-o", &s(&model)]);
    assert!(out.status.success());
    let data = dir.path().join("chats.jsonl");
    std::fs::write(
        &data,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi there\"}, {\"role\": \"assistant\", \"content\": \"Hello, friend\"}]}\n",
    )
    .unwrap();
    let adapter = dir.path().join("adapter");
    let out = nibble(&[
        "train",
        "--model",
        &s(&model),
        "--data",
        &s(&data),
        "--output",
        &s(&adapter),
        "--max-steps",
        "1",
        "--device",
        "cpu",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let merged = dir.path().join("merged");
    interrupted(
        &[
            "merge",
            "--model",
            &s(&model),
            "--adapter",
            &s(&adapter),
            "-o",
            &s(&merged),
            "--dtype",
            "f32",
        ],
        &merged,
    );
}

/// synth names what is wrong with its output or shard count (a file there gave the OS's words
/// alone; shard counts outside 1..=tensors were quietly changed).
#[test]
fn synth_names_a_bad_output_or_shard_count() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, "mine").unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let err = fails(&["synth", "-o", &s(&file)]);
    assert!(err.contains("notes.txt is not a folder"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");
    let model = s(&dir.path().join("m"));
    for shards in ["0", "1000"] {
        let err = fails(&["synth", "-o", &model, "--shards", shards]);
        assert!(
            err.contains(&format!("--shards {shards}: from 1 to")),
            "{err}"
        );
    }
    assert!(!dir.path().join("m").exists());
    // As many files as asked for (26 tensors in chunks of ceil(26 / 10) made 9).
    let out = nibble(&["synth", "-o", &model, "--shards", "10"]);
    assert!(out.status.success());
    let shards = std::fs::read_dir(dir.path().join("m"))
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            name.to_string_lossy().ends_with("-of-00010.safetensors")
        })
        .count();
    assert_eq!(shards, 10);
}

/// Ctrl-C in `chat` at a terminal stops the answer being written and returns to the prompt, as chat
/// programs do; at the prompt it ends the session (exit 130); with input from a pipe (a script, which
/// `timeout` stops by signal) it ends the session during an answer too.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn ctrl_c_in_chat_stops_the_answer_at_a_terminal_and_the_session_at_the_prompt() {
    use std::io::{Read, Write};
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::sync::{Arc, Mutex};
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    // Random weights under the real vocabulary: a greedy answer of thousands of tokens, which the
    // interruption cuts short.
    common::write_tiny_qwen2(&model);
    let terminal = || {
        let (mut leader, mut follower) = (-1, -1);
        // SAFETY: openpty writes two fresh descriptors into the two integers it is given; the name,
        // termios and window-size arguments may be null.
        let made = unsafe {
            libc::openpty(
                &mut leader,
                &mut follower,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(made, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: both descriptors were just opened by openpty and are owned by nothing else.
        unsafe { (OwnedFd::from_raw_fd(leader), OwnedFd::from_raw_fd(follower)) }
    };
    // Spawns `chat` with `stdin`, collecting stdout and stderr as they come.
    let spawn = |stdin: std::process::Stdio| {
        let mut child = common::nibble_command()
            .args(["chat", "--model", s(&model), "--max-new-tokens", "4000"])
            .stdin(stdin)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let collect = |mut from: Box<dyn Read + Send>| {
            let seen = Arc::new(Mutex::new(Vec::new()));
            let into = seen.clone();
            std::thread::spawn(move || {
                let mut chunk = [0u8; 4096];
                while let Ok(n @ 1..) = from.read(&mut chunk) {
                    into.lock().unwrap().extend_from_slice(&chunk[..n]);
                }
            });
            seen
        };
        let stdout = collect(Box::new(child.stdout.take().unwrap()));
        let stderr = collect(Box::new(child.stderr.take().unwrap()));
        (child, stdout, stderr)
    };
    let wait_for = |seen: &Arc<Mutex<Vec<u8>>>, what: &str| {
        let started = std::time::Instant::now();
        while !String::from_utf8_lossy(&seen.lock().unwrap()).contains(what) {
            assert!(started.elapsed().as_secs() < 60, "never saw {what:?}");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    };
    let interrupt = |child: &std::process::Child| {
        // SAFETY: kill(2) only sends a signal; the pid is our own child, not yet waited for, so it
        // cannot have been reused.
        assert_eq!(
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) },
            0
        );
    };
    let text =
        |seen: &Arc<Mutex<Vec<u8>>>| String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();

    // A session at a terminal, its first answer under way.
    let answering = || {
        let (leader, follower) = terminal();
        let mut keys = std::fs::File::from(leader);
        let (child, stdout, stderr) = spawn(follower.into());
        wait_for(&stderr, "chatting with");
        keys.write_all(b"Tell me a story.\n").unwrap();
        wait_for(&stdout, " ");
        (keys, child, stdout, stderr)
    };

    // At a terminal, during the answer: the answer stops, the session goes on to /quit.
    let (mut keys, mut child, stdout, stderr) = answering();
    interrupt(&child);
    wait_for(&stderr, "(stopped");
    keys.write_all(b"/quit\n").unwrap();
    let status = child.wait().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(status.success(), "{status}: {}", text(&stderr));
    let answer = text(&stdout);
    assert!(
        answer.len() < 4000 && answer.ends_with('\n'),
        "a short answer, ended with its line: {answer:?}"
    );

    // At a terminal, at the prompt: the session ends.
    let (leader, follower) = terminal();
    let (mut child, _, stderr) = spawn(follower.into());
    wait_for(&stderr, "> ");
    interrupt(&child);
    assert_eq!(child.wait().unwrap().code(), Some(130), "{}", text(&stderr));
    drop(leader);

    // At a terminal, SIGTERM during the answer ends the process, as it would without the handler.
    let (_keys, mut child, _, stderr) = answering();
    // SAFETY: as in `interrupt`.
    assert_eq!(
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
    use std::os::unix::process::ExitStatusExt;
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{}", text(&stderr));

    // From a pipe, during the answer: the session ends.
    let (mut child, stdout, stderr) = spawn(std::process::Stdio::piped());
    let mut input = child.stdin.take().unwrap();
    input.write_all(b"Tell me a story.\n").unwrap();
    wait_for(&stdout, " ");
    interrupt(&child);
    assert_eq!(child.wait().unwrap().code(), Some(130), "{}", text(&stderr));
    assert!(!text(&stderr).contains("(stopped"), "{}", text(&stderr));
}

/// `--trainable-tokens` names tokens by id or by their text, one token each; anything else is refused
/// by name before a step runs: a text of several tokens, an id past the vocabulary, an id twice, an
/// empty entry.
#[test]
fn trainable_tokens_are_checked_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    common::write_tiny_qwen2(&model);
    let data = dir.path().join("d.jsonl");
    std::fs::write(
        &data,
        r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}"#,
    )
    .unwrap();
    let out = dir.path().join("out");
    let train = |tokens: &str, extra: &[&str]| -> Vec<String> {
        let extra = [
            &["--max-steps", "1", "--trainable-tokens", tokens][..],
            extra,
        ]
        .concat();
        common::train_args(&model, &data, &out, &extra)
    };
    let refused = |tokens: &str, extra: &[&str], expect: &[&str]| {
        let args = train(tokens, extra);
        let err = fails(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(
            expect.iter().all(|e| err.contains(e)),
            "--trainable-tokens {tokens}: {err}"
        );
        assert!(!out.exists(), "a refused run leaves no folder");
    };
    refused(
        "<|im_end|>,hello world",
        &[],
        &["--trainable-tokens", "`hello world` is 2 tokens", "not one"],
    );
    refused(
        "7,151936",
        &[],
        &["token id 151936", "past the model's vocabulary of 151936"],
    );
    refused("7,8,7", &[], &["token id 7 is listed twice"]);
    refused("7,,8", &[], &["an empty entry"]);
    // The text of a special token, a plain token and an id alike.
    let args = train("<|im_end|>, Hello,42", &[]);
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    let hello = config["trainable_token_indices"][1].as_u64().unwrap();
    assert_eq!(
        config["trainable_token_indices"],
        serde_json::json!([151645, hello, 42])
    );
    assert_ne!(hello, 151645);
}

/// Training on from a PEFT adapter with token rows (`--init-adapter`): with DoRA asked for too (the
/// magnitudes start for the linears alone), and `--trainable-tokens` agreeing with the adapter's
/// rows in another order; other rows are refused, naming the adapter's. An options file may list
/// the tokens as PEFT's `trainable_token_indices` does.
#[test]
fn training_goes_on_from_an_adapter_with_token_rows() {
    let fixture = std::path::Path::new("tests/fixtures/hf_train/qwen2");
    let (model, init) = (
        fixture.join("trainable_tokens/model"),
        fixture.join("trainable_tokens/init_adapter"),
    );
    let data = fixture.join("data.jsonl");
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, extra: &[&str]| -> (std::process::Output, std::path::PathBuf) {
        let out = dir.path().join(name);
        let mut args = common::train_args(&model, &data, &out, &["--max-steps", "1"]);
        args.extend(extra.iter().map(|a| a.to_string()));
        let o = nibble(&args.iter().map(String::as_str).collect::<Vec<_>>());
        (o, out)
    };
    let init = init.to_str().unwrap();
    let (o, out) = run(
        "dora",
        &[
            "--init-adapter",
            init,
            "--use-dora",
            "--trainable-tokens",
            "200,32,111,258,257",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["use_dora"], true);
    assert_eq!(
        config["trainable_token_indices"],
        serde_json::json!([257, 258, 111, 32, 200])
    );
    let (o, out) = run(
        "other",
        &["--init-adapter", init, "--trainable-tokens", "257"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--trainable-tokens [257]")
            && err.contains("model.embed_tokens [257, 258, 111, 32, 200]"),
        "{err}"
    );
    assert!(!out.exists());

    let options = dir.path().join("options.toml");
    std::fs::write(
        &options,
        "trainable_token_indices = [258, \"<|im_start|>\"]\n",
    )
    .unwrap();
    let (o, out) = run("listed", &["--config", options.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        config["trainable_token_indices"],
        serde_json::json!([258, 257])
    );
}

/// A Qwen2-MoE model on the CLI: PEFT converts no target names for qwen2_moe, so all-linear (the
/// default) adapts the attention, the dense MLP and each shared expert with its gate, under LoRA
/// dropout; `--target-parameters` adds the routers and experts (at rank r), where dropout is refused
/// as PEFT refuses it; the adapter's folder is in PEFT's layout and every kind of pair trains.
/// A `nibble synth --preset` model with the byte tokenizer, and chats to train it on, under `dir`.
fn synth_with_chats(dir: &Path, preset: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let (model, data) = (dir.join("model"), dir.join("data.jsonl"));
    ok(&[
        "synth",
        "--preset",
        preset,
        "--tokenizer",
        "byte",
        "--output",
        s(&model),
    ]);
    std::fs::copy("tests/fixtures/hf_train/qwen3_moe/data.jsonl", &data).unwrap();
    (model, data)
}

/// Trains a tiny model's stacks of experts by name (4 experts of width 64, hidden size 64, r 8)
/// into dir/experts, checks PEFT's keys and shapes for them at `module` (layer 0's experts,
/// gate_up_proj's pair inside down_proj's wrapper), and continues a run from that adapter; returns
/// its folder.
fn trains_named_experts(
    dir: &Path,
    module: &str,
    train: &dyn Fn(&Path, &[&str]) -> std::process::Output,
) -> std::path::PathBuf {
    let experts = dir.join("experts");
    let named = [
        "--target-parameters",
        "gate_up_proj,down_proj",
        "--lora-dropout",
        "0",
    ];
    let o = train(&experts, &named);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let file = experts.join("adapter_model.safetensors");
    let saved = saved_tensors(&file);
    // Trained: B starts at zero, and the experts' gradients moved it.
    let weights = std::fs::read(&file).unwrap();
    let weights = safetensors::SafeTensors::deserialize(&weights).unwrap();
    for stack in ["base_layer.lora_B.weight", "lora_B.weight"] {
        let key = format!("base_model.model.model.{module}.{stack}");
        let b = weights.tensor(&key).unwrap();
        assert!(
            b.data().chunks_exact(4).any(|v| v != [0; 4]),
            "{key} untrained"
        );
    }
    let (slots, hidden, width) = (4 * 8, 64, 64);
    for (key, shape) in [
        ("base_layer.lora_A.weight", [slots, hidden]),
        ("base_layer.lora_B.weight", [2 * width, slots]),
        ("lora_A.weight", [slots, width]),
        ("lora_B.weight", [hidden, slots]),
    ] {
        let key = format!("base_model.model.model.{module}.{key}");
        assert!(
            saved.contains(&(key.clone(), shape.to_vec())),
            "{key} in {saved:?}"
        );
    }
    let o = train(
        &dir.join("continued"),
        &["--init-adapter", s(&experts), "--lora-dropout", "0"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    experts
}

/// The (name, shape) of every tensor in a safetensors file, sorted.
fn saved_tensors(file: &Path) -> Vec<(String, Vec<usize>)> {
    let weights = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&weights).unwrap();
    let mut names: Vec<(String, Vec<usize>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.shape().to_vec()))
        .collect();
    names.sort();
    names
}

/// Gemma 4 with 26B-A4B's experts end to end on the CPU: all-linear trains the attention, the dense
/// MLPs and the routers' linears (`router.proj`) with dropout, the experts train when named (without
/// it, as PEFT requires), a continued run reads that adapter, `nibble info` names the block, and the
/// merged folder holds the experts stacked as transformers does.
#[test]
fn a_gemma4_moe_model_trains_its_routers_and_named_experts() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = synth_with_chats(dir.path(), "tiny-gemma4-moe");
    let train = |out: &Path, extra: &[&str]| two_cpu_steps(&model, &data, out, extra);
    let names = |out: &Path| saved_tensors(&out.join("adapter_model.safetensors"));
    let plain = dir.path().join("plain");
    // Unnamed, the experts stay frozen: the run says so, and how to train them.
    let told = dir.path().join("told");
    let o = common::nibble_command()
        .env("RUST_LOG", "info")
        .args([
            "train",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--output",
            s(&told),
        ])
        .args(["--max-steps", "1", "--device", "cpu"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success()
            && err.contains("the experts stay frozen")
            && err.contains("--target-parameters gate_up_proj,down_proj"),
        "{err}"
    );
    let o = train(
        &plain,
        &["--target-modules", "all-linear", "--lora-dropout", "0.1"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let saved = names(&plain);
    // 8 linears in the sliding layer (its v_proj too), 7 in the full one, A and B each.
    assert_eq!(saved.len(), 2 * (8 + 7), "{saved:?}");
    let router = "base_model.model.model.layers.1.router.proj";
    for (key, shape) in [("lora_A.weight", [8, 64]), ("lora_B.weight", [4, 8])] {
        let key = format!("{router}.{key}");
        assert!(
            saved.contains(&(key.clone(), shape.to_vec())),
            "{key} in {saved:?}"
        );
    }
    assert!(
        !saved.iter().any(|(n, _)| n.contains("experts")),
        "{saved:?}"
    );
    // LoftQ starts each pair at its weight's quantization error; the routers, kept dense, have
    // none and start as PEFT's.
    let loftq = dir.path().join("loftq");
    let o = train(&loftq, &["--init-lora-weights", "loftq"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let experts = trains_named_experts(dir.path(), "layers.0.experts", &train);

    let info = ok(&["info", s(&model)]);
    assert!(
        info.contains("gemma4_text (Gemma4ForCausalLM)")
            && info.contains("4 experts of width 64, 2 per token")
            && info.contains("added to the dense MLP's output"),
        "{info}"
    );
    let merged = dir.path().join("merged");
    ok(&[
        "merge",
        "--model",
        s(&model),
        "--adapter",
        s(&experts),
        "--output",
        s(&merged),
    ]);
    let stored = saved_tensors(&merged.join("model.safetensors"));
    for (name, shape) in [
        ("model.layers.1.experts.gate_up_proj", vec![4, 128, 64]),
        ("model.layers.1.experts.down_proj", vec![4, 64, 64]),
        ("model.layers.1.router.proj.weight", vec![4, 64]),
    ] {
        assert!(
            stored.contains(&(name.to_string(), shape)),
            "{name} in {stored:?}"
        );
    }
}

/// Two training steps of `model` on `data` on the CPU, into `out`, with `extra` options.
fn two_cpu_steps(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["train", "--model", s(model), "--data", s(data)];
    args.extend(["--output", s(out), "--max-steps", "2", "--device", "cpu"]);
    args.extend_from_slice(extra);
    nibble(&args)
}

/// gpt-oss end to end on the CPU: `nibble synth` writes it as transformers does (the router as
/// `mlp.router`, the experts [experts, in, out] with interleaved gate and up columns), all-linear trains
/// the attention alone, the experts train when named (their B rows written back interleaved: PEFT's
/// shapes), a continued run reads that adapter, `nibble info` names the parts, and the merged folder
/// reads as gpt-oss again.
#[test]
fn a_gpt_oss_model_trains_its_attention_and_named_experts() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = synth_with_chats(dir.path(), "tiny-gpt-oss");
    let train = |out: &Path, extra: &[&str]| two_cpu_steps(&model, &data, out, extra);
    let names = |out: &Path| saved_tensors(&out.join("adapter_model.safetensors"));
    let plain = dir.path().join("plain");
    let o = train(&plain, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let saved = names(&plain);
    assert_eq!(saved.len(), 2 * 4 * 2, "{saved:?}");
    assert!(
        saved.iter().all(|(n, _)| n.contains(".self_attn.")),
        "{saved:?}"
    );

    let experts = trains_named_experts(dir.path(), "layers.0.mlp.experts", &train);

    // From `nibble quantize`'s file (its biases as nibble holds them), the same steps bit for bit.
    let quantized = dir.path().join("q.safetensors");
    ok(&["quantize", s(&model), "--output", s(&quantized)]);
    let from_file = dir.path().join("from_file");
    let o = two_cpu_steps(&quantized, &data, &from_file, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let weights = |out: &Path| std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    assert!(weights(&from_file) == weights(&plain));

    let info = ok(&["info", s(&model)]);
    assert!(
        info.contains("gpt_oss (GptOssForCausalLM)")
            && info.contains("clamped SwiGLU")
            && info.contains("sinks"),
        "{info}"
    );
    let merged = dir.path().join("merged");
    ok(&[
        "merge",
        "--model",
        s(&model),
        "--adapter",
        s(&experts),
        "--output",
        s(&merged),
    ]);
    let info = ok(&["info", s(&merged)]);
    assert!(info.contains("gpt_oss (GptOssForCausalLM)"), "{info}");
}

#[test]
fn a_qwen2_moe_model_trains_its_shared_experts_and_named_experts() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = synth_with_chats(dir.path(), "tiny-qwen2-moe");
    let train = |out: &Path, extra: &[&str]| two_cpu_steps(&model, &data, out, extra);
    let saved = |out: &Path| -> (serde_json::Value, Vec<u8>) {
        let config = std::fs::read_to_string(out.join("adapter_config.json")).unwrap();
        let weights = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
        (serde_json::from_str(&config).unwrap(), weights)
    };
    let trained = |weights: &[u8], key: &str| {
        let weights = safetensors::SafeTensors::deserialize(weights).unwrap();
        let b = weights.tensor(key).unwrap_or_else(|e| panic!("{key}: {e}"));
        b.data().chunks_exact(4).any(|v| v != [0; 4])
    };
    let layer0 = "base_model.model.model.layers.0.mlp";

    let plain = dir.path().join("plain");
    let o = train(&plain, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (config, weights) = saved(&plain);
    assert_eq!(config["target_parameters"], serde_json::Value::Null);
    assert_eq!(config["lora_dropout"], 0.05);
    for key in ["shared_expert.down_proj", "shared_expert_gate"] {
        assert!(
            trained(&weights, &format!("{layer0}.{key}.lora_B.weight")),
            "{key}"
        );
    }
    let st = safetensors::SafeTensors::deserialize(&weights).unwrap();
    assert!(
        st.names()
            .iter()
            .all(|k| !k.contains("experts.lora") && !k.contains("mlp.gate."))
    );

    // transformers 4's router was a linear `mlp.gate`: named as a module now, the error says how
    // to adapt it.
    let o = train(
        &dir.path().join("router"),
        &["--target-modules", "q_proj,gate"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("target module `gate`") && err.contains("--target-parameters gate.weight"),
        "{err}"
    );

    let named = ["--target-parameters", "gate.weight,gate_up_proj,down_proj"];
    let experts = dir.path().join("experts");
    let o = train(&experts, &named);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("--lora-dropout 0"), "{err}");
    assert!(!experts.exists());
    let o = train(&experts, &[&named[..], &["--lora-dropout", "0"]].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (config, weights) = saved(&experts);
    let mut parameters: Vec<&str> = config["target_parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    parameters.sort();
    assert_eq!(parameters, ["down_proj", "gate.weight", "gate_up_proj"]);
    assert_eq!(config["rank_pattern"], serde_json::json!({}));
    let st = safetensors::SafeTensors::deserialize(&weights).unwrap();
    let gate_up = format!("{layer0}.experts.base_layer.lora_A.weight");
    assert_eq!(st.tensor(&gate_up).unwrap().shape(), [8 * 8, 64]);
    for key in [
        "experts.lora_B",
        "gate.lora_B",
        "shared_expert.up_proj.lora_B",
    ] {
        assert!(
            trained(&weights, &format!("{layer0}.{key}.weight")),
            "{key}"
        );
    }
    // Continued, the adapter's own parameters train: others named are refused.
    let again = dir.path().join("again");
    let init = ["--init-adapter", s(&experts), "--lora-dropout", "0"];
    let o = train(
        &again,
        &[&init[..], &["--target-parameters", "down_proj"]].concat(),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("differs from the initial adapter's"), "{err}");
    assert!(!again.exists());

    // The plan counts the named parameters' pairs; `nibble info` names the shared experts.
    let lora_parameters = |extra: &[&str]| {
        let plan = ok(&[&["plan", s(&model), "--json"][..], extra].concat());
        let plan: serde_json::Value = serde_json::from_str(&plan).unwrap();
        plan["lora_parameters"].as_u64().unwrap()
    };
    let (with, without) = (lora_parameters(&named), lora_parameters(&[]));
    // Per sparse layer: the router's pair (8 x 64 and 8 x 8) and the two stacks' (8 experts at r 8).
    let per_layer = 8 * (64 + 8) + 8 * 8 * (64 + 128) + 8 * 8 * (64 + 64);
    assert_eq!(with - without, 2 * per_layer as u64);
    assert!(ok(&["info", s(&model)]).contains("shared expert of width 192"));
}

/// A Qwen3-MoE model end to end on the CLI: `nibble train` refuses LoRA dropout on the experts and
/// routers that all-linear (its default) adapts, as PEFT does, half of the experts' fused gate_up_proj,
/// and the GPU executor, naming what to do (and dropout again when the adapter is continued); trains
/// all-linear on the CPU into a folder in PEFT's
/// layout (target_parameters, gate_up_proj at twice the rank, its pair under base_layer), the
/// experts' and routers' pairs trained; the adapter generates alike from the folder and from a `nibble quantize` file of it
/// (experts packed, router dense); `nibble info` names the experts.
#[test]
fn a_mixture_of_experts_model_trains_its_experts_and_generates() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = (dir.path().join("model"), dir.path().join("data.jsonl"));
    ok(&[
        "synth",
        "--preset",
        "tiny-qwen3-moe",
        "--tokenizer",
        "byte",
        "--output",
        s(&model),
    ]);
    std::fs::copy("tests/fixtures/hf_train/qwen3_moe/data.jsonl", &data).unwrap();
    let out = dir.path().join("run");
    let train = |extra: &[&str]| {
        let mut args = vec!["train", "--model", s(&model), "--data", s(&data)];
        args.extend(["--output", s(&out), "--max-steps", "2"]);
        args.extend_from_slice(extra);
        nibble(&args)
    };
    let refused = |extra: &[&str], why: &[&str]| {
        let o = train(extra);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(why.iter().all(|w| err.contains(w)), "{err}");
        assert!(!out.exists());
    };
    refused(&[], &["refuses LoRA dropout 0.05", "--lora-dropout 0"]);
    let no_dropout = ["--lora-dropout", "0"];
    let half = [&no_dropout[..], &["--target-modules", "q_proj,gate_proj"]].concat();
    refused(&half, &["target module `gate_proj` without `up_proj`"]);
    // On the GPU executor where a device opens (lavapipe here and in CI): its experts' B's train.
    let gpu_out = dir.path().join("gpu run");
    let mut args = vec!["train", "--model", s(&model), "--data", s(&data)];
    args.extend([
        "--output",
        s(&gpu_out),
        "--max-steps",
        "2",
        "--device",
        "gpu",
    ]);
    let o = nibble(&[&args[..], &no_dropout[..]].concat());
    let err = String::from_utf8_lossy(&o.stderr);
    match o.status.success() {
        true => {
            let weights = std::fs::read(gpu_out.join("adapter_model.safetensors")).unwrap();
            let weights = safetensors::SafeTensors::deserialize(&weights).unwrap();
            let b = weights
                .tensor("base_model.model.model.layers.2.mlp.experts.lora_B.weight")
                .unwrap();
            assert!(b.data().chunks_exact(4).any(|v| v != [0; 4]), "{err}");
        }
        false => assert!(err.contains("--device gpu: no GPU adapter"), "{err}"),
    }
    let o = train(&no_dropout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    let sorted = |key: &str| {
        let mut names: Vec<&str> = config[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        names.sort();
        names
    };
    assert_eq!(
        sorted("target_modules"),
        ["k_proj", "o_proj", "q_proj", "v_proj"]
    );
    assert_eq!(
        sorted("target_parameters"),
        ["down_proj", "gate.weight", "gate_up_proj"]
    );
    assert_eq!(config["rank_pattern"][r".*\.gate_up_proj"], 16);
    assert_eq!(config["lora_dropout"], 0.0);
    let weights = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let weights = safetensors::SafeTensors::deserialize(&weights).unwrap();
    let gate_up = "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight";
    assert_eq!(weights.tensor(gate_up).unwrap().shape(), [8 * 16, 64]);
    let router = "base_model.model.model.layers.0.mlp.gate.lora_B.weight";
    assert_eq!(weights.tensor(router).unwrap().shape(), [8, 8]);
    // Every B starts at zero: the experts' and the router's moved in training.
    for key in [
        router,
        "base_model.model.model.layers.2.mlp.experts.lora_B.weight",
    ] {
        let b = weights.tensor(key).unwrap();
        let mut values = b.data().chunks_exact(4);
        assert!(values.any(|v| v != [0; 4]), "{key} did not train");
    }

    // Continuing the adapter: the run's dropout is refused on its experts as on a new one's.
    let again = dir.path().join("again");
    let continued = |extra: &[&str]| {
        let mut args = vec!["train", "--model", s(&model), "--data", s(&data)];
        args.extend([
            "--output",
            s(&again),
            "--max-steps",
            "1",
            "--init-adapter",
            s(&out),
        ]);
        args.extend_from_slice(extra);
        nibble(&args)
    };
    let o = continued(&[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("target_parameters") && err.contains("--lora-dropout 0"),
        "{err}"
    );
    assert!(!again.exists());
    let o = continued(&no_dropout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let quantized = dir.path().join("model.safetensors");
    ok(&["quantize", s(&model), "--output", s(&quantized)]);
    let answer = |m: &Path| {
        ok(&[
            "generate",
            "--model",
            s(m),
            "--adapter",
            s(&out),
            "--prompt",
            "Hi",
            "--seed",
            "3",
            "--max-new-tokens",
            "12",
        ])
    };
    assert_eq!(answer(&quantized), answer(&model));
    let info = ok(&["info", s(&model)]);
    assert!(
        info.contains("mixture of experts in 2 of 3 layers: 8 experts of width 64, 2 per token"),
        "{info}"
    );
}
