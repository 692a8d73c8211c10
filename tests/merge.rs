//! `nibble merge`: the merged model's logits equal the base model's with the adapter applied.

mod common;

use nibble::config::EXPERTS_GATE_UP;

use common::{nibble, rel};
use nibble::config::Arch;
use nibble::cpu;
use nibble::lora::{LoraAdapter, LoraConfig, Patterns};
use nibble::model::{ModelSource, QuantRequest};
use nibble::rng::Rng;
use nibble::source::FloatDtype;
use nibble::synth::{self, SynthSpec};

/// A tiny float32 model of `arch` in `shards` files (`base` in a temporary folder), loaded dense.
fn f32_base(
    arch: Arch,
    shards: usize,
) -> (tempfile::TempDir, std::path::PathBuf, nibble::model::Model) {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let mut spec = SynthSpec::tiny(arch, 259);
    spec.dtype = FloatDtype::F32;
    spec.shards = shards;
    synth::write_model_folder(&base, &spec, Some(&synth::byte_tokenizer())).unwrap();
    let model = ModelSource::open(&base)
        .unwrap()
        .load(Some(QuantRequest::Dense))
        .unwrap();
    (dir, base, model)
}

/// An adapter of `config` for `model` whose B matrices are random too (a fresh one changes nothing).
fn random_adapter(model: &nibble::model::Model, config: LoraConfig, rng: &mut Rng) -> LoraAdapter {
    let mut adapter = LoraAdapter::init(&model.config, config, rng).unwrap();
    for (_, p) in adapter.pairs_mut() {
        p.b.iter_mut()
            .for_each(|b| *b = (rng.normal() * 0.1) as f32);
    }
    adapter
}

#[test]
fn merged_weights_give_the_adapted_models_logits() {
    let (dir, base, model) = f32_base(Arch::Qwen3, 2);
    let mut rng = Rng::new(4);
    // Some modules with ranks and alphas of their own (PEFT's rank_pattern, alpha_pattern): each
    // merges at its own scale, and the saved folder carries the patterns.
    let config = LoraConfig {
        r: 4,
        alpha: 16.0,
        use_rslora: true,
        rank_pattern: Patterns::parse_ranks(r#"{"q_proj": 2, "layers\\.1\\.mlp\\.down_proj": 6}"#)
            .unwrap(),
        alpha_pattern: Patterns::parse_alphas(r#"{"o_proj": 3}"#).unwrap(),
        ..LoraConfig::default()
    };
    let adapter = random_adapter(&model, config, &mut rng);
    let adapter_dir = dir.path().join("adapter");
    nibble::train::save_peft(&adapter, &adapter_dir, "base").unwrap();

    // The base's weights in PyTorch's format too (a folder from the Hub often holds both).
    std::fs::write(base.join("pytorch_model.bin"), b"unmerged weights").unwrap();
    std::fs::write(
        base.join("pytorch_model.bin.index.json"),
        b"{\"weight_map\": {}}",
    )
    .unwrap();
    let merged = dir.path().join("merged");
    // A folder of the user's named as merge once named its temporary folder (and deleted it) stays
    // as it was.
    let users = dir.path().join(".merged.tmp");
    std::fs::create_dir(&users).unwrap();
    std::fs::write(users.join("notes.txt"), "mine").unwrap();
    let args = |out: &std::path::Path| {
        vec![
            "merge",
            "--model",
            base.to_str().unwrap(),
            "--adapter",
            adapter_dir.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>()
    };
    let run = |a: Vec<String>| nibble(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let o = run(args(&merged));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for file in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        assert!(merged.join(file).is_file(), "{file} missing");
    }
    assert!(!merged.join("model.safetensors.index.json").exists());
    for stale in ["pytorch_model.bin", "pytorch_model.bin.index.json"] {
        assert!(!merged.join(stale).exists(), "{stale}: the unmerged base's");
    }
    assert_eq!(
        std::fs::read_to_string(users.join("notes.txt")).unwrap(),
        "mine"
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".merged.tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let ids: Vec<u32> = (0..12).map(|_| rng.below(259) as u32).collect();
    let expected = cpu::logits(&model, Some(&adapter), &ids).unwrap();
    let merged_model = ModelSource::open(&merged)
        .unwrap()
        .load(Some(QuantRequest::Dense))
        .unwrap();
    let ours = cpu::logits(&merged_model, None, &ids).unwrap();
    let e = rel(&ours, &expected);
    assert!(e < 1e-5, "merged logits differ by {e:e}");
    let without = cpu::logits(&model, None, &ids).unwrap();
    assert!(
        rel(&without, &expected) > 1e-3,
        "the adapter must matter for this test to mean anything"
    );

    // 16-bit output (what people ship): the logits move by bf16 rounding only.
    let merged16 = dir.path().join("merged16");
    let mut a = args(&merged16);
    a.extend(["--dtype".into(), "bf16".into()]);
    assert!(run(a).status.success());
    let text = std::fs::read_to_string(merged16.join("config.json")).unwrap();
    assert!(
        text.contains("bfloat16"),
        "config.json names the dtype: {text}"
    );
    let m16 = ModelSource::open(&merged16)
        .unwrap()
        .load(Some(QuantRequest::Dense))
        .unwrap();
    let e16 = rel(&cpu::logits(&m16, None, &ids).unwrap(), &expected);
    assert!(e16 < 2e-2, "bf16 merge differs by {e16:e}");

    // Past --max-shard-size: numbered shards and transformers' index, the same tensors and values.
    let whole = common::raw_tensors(&merged.join("model.safetensors"));
    let bytes: usize = whole.iter().map(|t| t.3.len()).sum();
    let sharded = dir.path().join("sharded");
    let mut a = args(&sharded);
    a.extend(["--max-shard-size".into(), format!("{}B", bytes / 3)]);
    let o = run(a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!sharded.join("model.safetensors").exists());
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(sharded.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(index["metadata"]["total_size"], bytes as u64);
    let params: usize = whole.iter().map(|t| t.2.iter().product::<usize>()).sum();
    assert_eq!(index["metadata"]["total_parameters"], params as u64);
    let map = index["weight_map"].as_object().unwrap();
    let files: std::collections::BTreeSet<&str> =
        map.values().map(|f| f.as_str().unwrap()).collect();
    assert!(files.len() >= 3, "{files:?}");
    let mut from_shards = Vec::new();
    for (k, file) in files.iter().enumerate() {
        assert_eq!(
            *file,
            format!("model-{:05}-of-{:05}.safetensors", k + 1, files.len())
        );
        let shard = common::raw_tensors(&sharded.join(file));
        let size: usize = shard.iter().map(|t| t.3.len()).sum();
        assert!(
            size <= bytes / 3 || shard.len() == 1,
            "{file}: {size} bytes"
        );
        for t in &shard {
            assert_eq!(map[&t.0], *file, "{}", t.0);
        }
        from_shards.extend(shard);
    }
    from_shards.sort();
    assert_eq!(from_shards, whole);
    let from_index = ModelSource::open(&sharded)
        .unwrap()
        .load(Some(QuantRequest::Dense))
        .unwrap();
    assert_eq!(cpu::logits(&from_index, None, &ids).unwrap(), ours);
    let mut a = args(&dir.path().join("unsized"));
    a.extend(["--max-shard-size".into(), "lots".into()]);
    let o = run(a);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--max-shard-size"));
    assert!(!o.status.success() && !dir.path().join("unsized").exists());

    // An existing output folder is refused; so is an adapter that does not fit.
    let o = run(args(&merged));
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("already exists"));
}

/// `--base-weights quantized`: a QLoRA adapter merged into the 4-bit weights it was trained against
/// (each decoder linear quantized as training loaded it, then dequantized) gives the trained model's
/// logits, where the original weights differ from it by the quantization error; the format comes
/// from the run's run.json, or from --quant / --group-size for an adapter without one.
#[test]
fn merged_onto_the_4_bit_weights_gives_the_trained_models_logits() {
    let (dir, base, _) = f32_base(Arch::Qwen2, 2);
    let data = dir.path().join("d.jsonl");
    let rows: String = (0..6)
        .map(|i| {
            serde_json::json!({"text": format!("{i}: the tide {}", "rises, ".repeat(i + 2))})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&data, rows).unwrap();
    let run = dir.path().join("run");
    let o = common::train_cli(
        &base,
        &data,
        &run,
        &[
            "--quant",
            "int4",
            "--group-size",
            "32",
            "--max-steps",
            "3",
            "--lr",
            "0.02",
            "--use-dora",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let spec = nibble::quant::QuantSpec::new(nibble::quant::QuantFormat::Int4, 32).unwrap();
    let source = ModelSource::open(&base).unwrap();
    let trained_on = source.load(Some(QuantRequest::Quantize(spec))).unwrap();
    let files = nibble::source::ModelFiles::Dir(run.clone());
    let adapter = LoraAdapter::load_peft(&files, &trained_on.config).unwrap();
    let mut rng = Rng::new(6);
    let ids: Vec<u32> = (0..12).map(|_| rng.below(259) as u32).collect();
    let trained = cpu::logits(&trained_on, Some(&adapter), &ids).unwrap();
    let merge = |out: &str, extra: &[&str]| {
        let out = dir.path().join(out);
        let mut args = vec![
            "merge",
            "--model",
            base.to_str().unwrap(),
            "--adapter",
            run.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = nibble(&args);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        let logits = o.status.success().then(|| {
            let merged = ModelSource::open(&out)
                .unwrap()
                .load(Some(QuantRequest::Dense))
                .unwrap();
            cpu::logits(&merged, None, &ids).unwrap()
        });
        (logits, err)
    };
    let (logits, err) = merge("onto-4-bit", &["--base-weights", "quantized"]);
    let logits = logits.unwrap_or_else(|| panic!("{err}"));
    assert!(err.contains("int4 (group 32)"), "{err}");
    // Measured: 4e-7 (the update folded into the weights sums in another order).
    let e = rel(&logits, &trained);
    assert!(
        e < 4e-6,
        "merged onto the 4-bit weights: {e:e} from the trained model"
    );
    let (original, err) = merge("onto-original", &[]);
    let original = original.unwrap_or_else(|| panic!("{err}"));
    let off = rel(&original, &trained);
    assert!(
        off > 100.0 * e,
        "the original weights: {off:e} from the trained model"
    );
    // The same adapter out of its run folder: the format is given, and a different one is applied
    // as asked, with a warning.
    let bare = dir.path().join("bare");
    std::fs::create_dir(&bare).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(run.join(f), bare.join(f)).unwrap();
    }
    let merge_bare = |out: &str, extra: &[&str]| {
        let out = dir.path().join(out);
        let mut args = vec![
            "merge",
            "--model",
            base.to_str().unwrap(),
            "--adapter",
            bare.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        nibble(&args)
    };
    let o = merge_bare("refused", &["--base-weights", "quantized"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("--quant") && err.contains("bare"), "{err}");
    assert!(!dir.path().join("refused").exists());
    let o = merge_bare("given", &["--quant", "int4", "--group-size", "32"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let given = ModelSource::open(&dir.path().join("given"))
        .unwrap()
        .load(Some(QuantRequest::Dense))
        .unwrap();
    assert_eq!(cpu::logits(&given, None, &ids).unwrap(), logits);
    let (other, err) = merge("nf4", &["--quant", "nf4"]);
    assert!(
        other.is_some() && err.contains("int4 (group 32)") && err.contains("nf4 (group 32)"),
        "{err}"
    );
    for (extra, says) in [
        (
            &["--base-weights", "original", "--quant", "nf4"][..],
            "--base-weights original",
        ),
        (
            &["--base-weights", "quantized", "--quant", "none"][..],
            "not none",
        ),
        (&["--group-size", "48"][..], "48"),
    ] {
        let (logits, err) = merge("never", extra);
        assert!(logits.is_none() && err.contains(says), "{extra:?}: {err}");
        assert!(!dir.path().join("never").exists());
    }
    // eval and generate load the base as the run recorded it (int4, groups of 32) unless --quant
    // says otherwise.
    let eval = |extra: &[&str]| -> f64 {
        let mut args = vec![
            "eval",
            "--model",
            base.to_str().unwrap(),
            "--adapter",
            run.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--device",
            "cpu",
        ];
        args.extend_from_slice(extra);
        let o = nibble(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let line: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        line["loss"].as_f64().unwrap()
    };
    let recorded = eval(&[]);
    assert_eq!(recorded, eval(&["--quant", "int4", "--group-size", "32"]));
    assert_ne!(recorded, eval(&["--quant", "nf4"]));
    // One half given, the other comes from the record.
    assert_eq!(recorded, eval(&["--group-size", "32"]));
    assert_eq!(recorded, eval(&["--quant", "int4"]));
    assert_ne!(recorded, eval(&["--group-size", "64"]));
    // A run.json that is not JSON is named, unless the options say everything.
    std::fs::write(bare.join("run.json"), "{\"model\": {").unwrap();
    let o = merge_bare("corrupt", &["--base-weights", "quantized"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("run.json") && err.contains("not valid JSON"),
        "{err}"
    );
    let o = merge_bare("corrupt", &["--quant", "int4", "--group-size", "32"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("ignored"), "{err}");
    // A LoftQ adapter merges into the 4-bit weights unless asked otherwise: it starts at their
    // error, which the original weights would add a second time.
    let loftq = dir.path().join("loftq");
    let o = common::train_cli(
        &base,
        &data,
        &loftq,
        &[
            "--init-lora-weights",
            "loftq",
            "--max-steps",
            "1",
            "--lr",
            "0",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = nibble(&[
        "merge",
        "--model",
        base.to_str().unwrap(),
        "--adapter",
        loftq.to_str().unwrap(),
        "-o",
        dir.path().join("loftq-merged").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && err.contains("onto the nf4 (group 64) weights"),
        "{err}"
    );

    // A run on 16-bit weights has no 4-bit ones to merge into.
    let run16 = dir.path().join("run16");
    let o = common::train_cli(
        &base,
        &data,
        &run16,
        &["--quant", "none", "--max-steps", "1"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = nibble(&[
        "merge",
        "--model",
        base.to_str().unwrap(),
        "--adapter",
        run16.to_str().unwrap(),
        "-o",
        dir.path().join("never").to_str().unwrap(),
        "--base-weights",
        "quantized",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("16-bit") && err.contains("run.json"), "{err}");
}

/// DoRA (PEFT's use_dora): each merged row is m / ‖W + s·B·A‖ · (W + s·B·A), as PEFT merges, so the
/// merged model's logits equal the adapted model's (the adapter saved and loaded back with its
/// magnitudes).
#[test]
fn dora_adapters_merge_to_the_adapted_models_logits() {
    let (dir, base, model) = f32_base(Arch::Qwen2, 1);
    let mut rng = Rng::new(5);
    let config = LoraConfig {
        use_dora: true,
        ..LoraConfig::default()
    };
    let mut adapter = random_adapter(&model, config, &mut rng);
    adapter
        .init_magnitudes(|path| model.linear_weight(path))
        .unwrap();
    for (_, p) in adapter.pairs_mut() {
        p.magnitude
            .iter_mut()
            .for_each(|m| *m *= 0.7 + 0.6 * rng.uniform() as f32);
    }
    let adapter_dir = dir.path().join("adapter");
    nibble::train::save_peft(&adapter, &adapter_dir, "base").unwrap();
    let merged = dir.path().join("merged");
    let o = nibble(&[
        "merge",
        "--model",
        base.to_str().unwrap(),
        "--adapter",
        adapter_dir.to_str().unwrap(),
        "--output",
        merged.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ids: Vec<u32> = (0..12).map(|_| rng.below(259) as u32).collect();
    let expected = cpu::logits(&model, Some(&adapter), &ids).unwrap();
    let merged_model = ModelSource::open(&merged)
        .unwrap()
        .load(Some(QuantRequest::Dense))
        .unwrap();
    let e = rel(&cpu::logits(&merged_model, None, &ids).unwrap(), &expected);
    assert!(e < 1e-5, "merged logits differ by {e:e}");
    // Without the magnitudes (plain LoRA of the same A and B) the logits are others.
    let mut plain = adapter.clone();
    plain.config.use_dora = false;
    plain.pairs_mut().for_each(|(_, p)| p.magnitude.clear());
    let lora = cpu::logits(&model, Some(&plain), &ids).unwrap();
    assert!(rel(&lora, &expected) > 1e-3, "the magnitudes must matter");
}

/// PEFT's `target_modules` as a pattern is full-matched against module paths, and its
/// `exclude_modules` (a pattern, or names) takes modules out of the targets: an adapter saved so
/// loads the modules PEFT adapts, and no others.
#[test]
fn target_patterns_and_excluded_modules_choose_the_modules_peft_adapts() {
    use nibble::source::ModelFiles;
    let (dir, _, model) = f32_base(Arch::Qwen2, 1);
    let mut rng = Rng::new(8);
    let save = |name: &str, targets: &[&str], rng: &mut Rng| {
        let config = LoraConfig {
            r: 2,
            targets: targets.iter().map(|t| t.to_string()).collect(),
            ..LoraConfig::default()
        };
        let mut adapter = LoraAdapter::init(&model.config, config, rng).unwrap();
        for (_, p) in adapter.pairs_mut() {
            p.b.iter_mut().for_each(|b| *b = rng.normal() as f32);
        }
        let folder = dir.path().join(name);
        nibble::train::save_peft(&adapter, &folder, "base").unwrap();
        (adapter, folder)
    };
    let load = |folder: &std::path::Path, edit: &dyn Fn(&mut serde_json::Value)| {
        let path = folder.join("adapter_config.json");
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        edit(&mut config);
        std::fs::write(&path, config.to_string()).unwrap();
        LoraAdapter::load_peft(&ModelFiles::Dir(folder.to_path_buf()), &model.config)
            .map_err(|e| e.to_string())
    };
    let same = |loaded: &LoraAdapter, saved: &LoraAdapter| {
        let paths = |a: &LoraAdapter| a.pairs().map(|(p, _)| p.to_string()).collect::<Vec<_>>();
        assert_eq!(paths(loaded), paths(saved));
        for ((_, l), (_, s)) in loaded.pairs().zip(saved.pairs()) {
            assert!(l.a == s.a && l.b == s.b);
        }
    };
    let (q_only, q_folder) = save("q", &["q_proj"], &mut rng);
    let loaded = load(&q_folder, &|c| c["target_modules"] = r".*\.q_proj".into()).unwrap();
    same(&loaded, &q_only);
    let err = load(&q_folder, &|c| c["target_modules"] = "nomatch_.*".into()).unwrap_err();
    assert!(err.contains("matches none"), "{err}");
    // A pattern that matches the end of a path only is no match: PEFT full-matches it.
    let err = load(&q_folder, &|c| c["target_modules"] = "q_proj".into()).unwrap_err();
    assert!(err.contains("matches none"), "{err}");
    // Python's look-ahead, as tools write it to keep a vision tower out, which the regex crate
    // lacks: the modules the weights hold are the targets.
    let vision_out = r"^(?!.*vision).*\.q_proj";
    let loaded = load(&q_folder, &|c| c["target_modules"] = vision_out.into()).unwrap();
    same(&loaded, &q_only);
    // Left out, r and lora_alpha take PEFT's defaults (8 and 8): this rank-2 adapter no longer fits.
    let loaded = load(&q_folder, &|c| {
        c.as_object_mut().unwrap().remove("lora_alpha");
    })
    .unwrap();
    assert_eq!(loaded.config.alpha, 8.0);
    let err = load(&q_folder, &|c| {
        c.as_object_mut().unwrap().remove("r");
    })
    .unwrap_err();
    assert!(err.contains("which needs [8, "), "{err}");

    let (_, all_folder) = save("all", &["all-linear"], &mut rng);
    let err = load(&all_folder, &|c| c["target_modules"] = r".*\.q_proj".into()).unwrap_err();
    assert!(err.contains("not a LoRA matrix"), "{err}");

    let (no_q, no_q_folder) = save(
        "no_q",
        &[
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        &mut rng,
    );
    for excluded in [
        serde_json::json!(["q_proj"]),
        serde_json::json!(r".*\.q_proj"),
    ] {
        let loaded = load(&no_q_folder, &|c| {
            c["target_modules"] = "all-linear".into();
            c["exclude_modules"] = excluded.clone();
        })
        .unwrap();
        same(&loaded, &no_q);
    }
    let err = load(&no_q_folder, &|c| c["exclude_modules"] = ".*".into()).unwrap_err();
    assert!(err.contains("leaves none"), "{err}");
}

/// A base without tokenizer.json merges, with a warning that the merged folder has none either.
#[test]
fn a_base_without_a_tokenizer_is_merged_with_a_warning() {
    let (dir, base, model) = f32_base(Arch::Qwen2, 1);
    std::fs::remove_file(base.join("tokenizer.json")).unwrap();
    let mut rng = Rng::new(3);
    let adapter = LoraAdapter::init(&model.config, LoraConfig::default(), &mut rng).unwrap();
    let adapter_dir = dir.path().join("adapter");
    nibble::train::save_peft(&adapter, &adapter_dir, "base").unwrap();
    let merged = dir.path().join("merged");
    let out = common::nibble_command()
        .env("RUST_LOG", "warn")
        .args(["merge", "--model", base.to_str().unwrap()])
        .args(["--adapter", adapter_dir.to_str().unwrap()])
        .args(["--output", merged.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("holds no tokenizer.json"), "{stderr}");
    assert!(merged.join("config.json").is_file() && !merged.join("tokenizer.json").exists());
}

/// PEFT's `modules_to_save`: an adapter that saved the embedding and/or the output projection whole
/// runs (eval, generate, chat) and merges as the base with those tensors in place, plus its LoRA
/// pairs. The reference is a model folder written with the replaced tensors, loaded as any model is.
/// A tied model (Qwen2) with only its embedding saved reads the base's embedding as its output
/// projection (PEFT without `ensure_weight_tying`), or the new one with it; training from such an
/// adapter is refused.
#[test]
fn saved_modules_replace_the_embedding_and_the_output_projection() {
    let mut rng = Rng::new(17);
    let vocab = 259;
    for (arch, saved, ensure_tying) in [
        (Arch::Qwen3, &["embed_tokens", "lm_head"][..], false),
        (Arch::Qwen3, &["lm_head"][..], false),
        (Arch::Qwen2, &["embed_tokens"][..], false),
        (Arch::Qwen2, &["embed_tokens"][..], true),
        (Arch::Qwen2, &["lm_head"][..], false),
    ] {
        let case = format!("{arch:?} saving {saved:?}, ensure_weight_tying {ensure_tying}");
        let (dir, base, model) = f32_base(arch, 1);
        let config = LoraConfig {
            r: 4,
            alpha: 8.0,
            ..LoraConfig::default()
        };
        let adapter = random_adapter(&model, config, &mut rng);
        let adapter_dir = dir.path().join("adapter");
        nibble::train::save_peft(&adapter, &adapter_dir, "base").unwrap();
        // The whole modules, as PEFT saves them (the `modules_to_save.default` part dropped).
        let hidden = model.config.hidden_size;
        let mut weights = common::read_f32_tensors(&adapter_dir.join("adapter_model.safetensors"));
        let mut new_tensor = |module: &str| {
            let values: Vec<f32> = (0..vocab * hidden)
                .map(|_| (rng.normal() * 0.5) as f32)
                .collect();
            (module.to_string(), values)
        };
        let replaced: Vec<(String, Vec<f32>)> = saved
            .iter()
            .map(|m| match *m {
                "embed_tokens" => new_tensor("model.embed_tokens"),
                _ => new_tensor("lm_head"),
            })
            .collect();
        for (module, values) in &replaced {
            weights.push((
                format!("base_model.model.{module}.weight"),
                vec![vocab, hidden],
                values.clone(),
            ));
        }
        if ensure_tying {
            // PEFT saves the tied projection too, sharing the embedding, though unlisted.
            let embedding = replaced[0].1.clone();
            weights.push((
                "base_model.model.lm_head.weight".into(),
                vec![vocab, hidden],
                embedding,
            ));
        }
        common::write_f32_tensors(&adapter_dir.join("adapter_model.safetensors"), &weights);
        let config_path = adapter_dir.join("adapter_config.json");
        let mut adapter_config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
        adapter_config["modules_to_save"] = serde_json::json!(saved);
        adapter_config["ensure_weight_tying"] = serde_json::json!(ensure_tying);
        std::fs::write(&config_path, adapter_config.to_string()).unwrap();

        // The reference: the base folder with the tensors replaced (a tied model made untied where
        // its two tables now differ).
        let reference = dir.path().join("reference");
        std::fs::create_dir(&reference).unwrap();
        for file in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(base.join(file), reference.join(file)).unwrap();
        }
        let mut tensors = common::read_f32_tensors(&base.join("model.safetensors"));
        let embed = tensors
            .iter()
            .find(|t| t.0 == "model.embed_tokens.weight")
            .unwrap()
            .clone();
        let tied = model.config.tie_word_embeddings;
        let head_follows = tied && ensure_tying && !saved.contains(&"lm_head");
        if tied && !head_follows {
            tensors.push(("lm_head.weight".into(), embed.1.clone(), embed.2.clone()));
            let path = reference.join("config.json");
            let mut c: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            c["tie_word_embeddings"] = false.into();
            std::fs::write(&path, c.to_string()).unwrap();
        }
        for (module, values) in &replaced {
            let name = format!("{module}.weight");
            tensors.iter_mut().find(|t| t.0 == name).unwrap().2 = values.clone();
        }
        common::write_f32_tensors(&reference.join("model.safetensors"), &tensors);
        let reference_model = ModelSource::open(&reference)
            .unwrap()
            .load(Some(QuantRequest::Dense))
            .unwrap();
        let ids: Vec<u32> = (0..12).map(|_| rng.below(vocab as u64) as u32).collect();
        let expected = cpu::logits(&reference_model, Some(&adapter), &ids).unwrap();
        let unreplaced = cpu::logits(&model, Some(&adapter), &ids).unwrap();
        assert!(
            rel(&unreplaced, &expected) > 1e-2,
            "{case}: the modules must matter"
        );

        // Run as eval, generate and chat run it.
        let (loaded, modules) = nibble::train::run::load_adapter_with_modules(
            &adapter_dir,
            &model.config,
            ("base", None),
            "--adapter",
        )
        .unwrap();
        let mut running = ModelSource::open(&base)
            .unwrap()
            .load(Some(QuantRequest::Dense))
            .unwrap();
        running.put_saved_modules(&modules);
        let e = rel(
            &cpu::logits(&running, Some(&loaded), &ids).unwrap(),
            &expected,
        );
        assert!(e < 1e-6, "{case}: logits differ by {e:e}");

        // Through the command line: eval's loss with the adapter is the reference's.
        let plain_adapter = dir.path().join("plain");
        nibble::train::save_peft(&adapter, &plain_adapter, "base").unwrap();
        let data = dir.path().join("data.jsonl");
        std::fs::write(
            &data,
            "{\"text\": \"A few words to score, with the adapter's modules.\"}\n",
        )
        .unwrap();
        let eval = |model: &std::path::Path, adapter: &std::path::Path| -> f64 {
            let o = nibble(&[
                "eval",
                "--model",
                model.to_str().unwrap(),
                "--adapter",
                adapter.to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
                "--quant",
                "none",
            ]);
            let stdout = String::from_utf8_lossy(&o.stdout);
            assert!(
                o.status.success(),
                "{case}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
            v["loss"].as_f64().unwrap()
        };
        let (ours, theirs) = (eval(&base, &adapter_dir), eval(&reference, &plain_adapter));
        assert!(
            (ours - theirs).abs() < 1e-6 * theirs.abs(),
            "{case}: eval loss {ours} vs {theirs}"
        );

        // Merged: the same logits from the merged folder alone.
        let merged = dir.path().join("merged");
        let o = nibble(&[
            "merge",
            "--model",
            base.to_str().unwrap(),
            "--adapter",
            adapter_dir.to_str().unwrap(),
            "--output",
            merged.to_str().unwrap(),
        ]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{case}: {stderr}");
        let merged_model = ModelSource::open(&merged)
            .unwrap()
            .load(Some(QuantRequest::Dense))
            .unwrap();
        assert_eq!(
            merged_model.config.tie_word_embeddings, head_follows,
            "{case}"
        );
        let e = rel(&cpu::logits(&merged_model, None, &ids).unwrap(), &expected);
        assert!(e < 1e-5, "{case}: merged logits differ by {e:e}");

        // Training on from it would drop the modules: refused, naming them.
        refuses_training(
            &adapter_dir,
            &model.config,
            &[
                "modules_to_save",
                "trains LoRA matrices and token rows only",
            ],
        );
    }
}

/// PEFT's own adapters with saved modules (scripts/make_modules_to_save_fixture.py: tiny Qwen2 bases,
/// tied and untied; the embedding, the output projection or both saved, with and without
/// `ensure_weight_tying`): run as eval and generate run them, and merged, they give the logits of
/// PEFT's model. Measured: at most 3e-7 relative; held to 3e-6.
#[test]
fn peft_adapters_with_saved_modules_give_the_logits_peft_gives() {
    gives_peft_logits(
        "tests/fixtures/modules_to_save",
        &[
            ("untied", "both"),
            ("tied", "embed"),
            ("tied", "embed_tying"),
            ("tied", "head"),
        ],
    );
}

/// PEFT's own adapters with trainable token rows (scripts/make_trainable_tokens_fixture.py: a list of
/// ids or a map of modules; a tied model's projection reading the embedding's new rows, or its own
/// rows of the base's embedding): run and merged, they give PEFT's logits (held to 3e-6).
#[test]
fn peft_adapters_with_trainable_tokens_give_the_logits_peft_gives() {
    gives_peft_logits(
        "tests/fixtures/trainable_tokens",
        &[
            ("untied", "list"),
            ("untied", "both"),
            ("tied", "list"),
            ("tied", "same"),
            ("tied", "mismatch"),
            ("tied", "head"),
        ],
    );
}

/// Token rows nibble cannot apply as PEFT would are refused by name, before anything is written: ids
/// past the vocabulary or listed twice, rows of another shape, modules other than the embedding and
/// output projection, both kinds of saved weights at once, ties `ensure_weight_tying` cannot keep,
/// and training on from such an adapter.
#[test]
fn trainable_token_rows_nibble_cannot_apply_are_refused_by_name() {
    let fixture = std::path::Path::new("tests/fixtures/trainable_tokens/tied");
    let dir = tempfile::tempdir().unwrap();
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture.join("mismatch/adapter_config.json")).unwrap(),
    )
    .unwrap();
    let with = |name: &str, change: &dyn Fn(&mut serde_json::Value)| {
        let adapter = dir.path().join(name);
        std::fs::create_dir(&adapter).unwrap();
        std::fs::copy(
            fixture.join("mismatch/adapter_model.safetensors"),
            adapter.join("adapter_model.safetensors"),
        )
        .unwrap();
        let mut config = config.clone();
        change(&mut config);
        std::fs::write(adapter.join("adapter_config.json"), config.to_string()).unwrap();
        adapter
    };
    let merge = |adapter: &std::path::Path| {
        let out = dir.path().join("merged");
        let o = nibble(&[
            "merge",
            "--model",
            fixture.join("model").to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ]);
        assert!(!out.exists(), "{}", adapter.display());
        assert_eq!(o.status.code(), Some(1));
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let tokens = |v: serde_json::Value| {
        move |c: &mut serde_json::Value| c["trainable_token_indices"] = v.clone()
    };
    for (name, change, says) in [
        (
            "past",
            Box::new(tokens(
                serde_json::json!({"embed_tokens": [3, 64], "lm_head": [17, 60]}),
            )) as Box<dyn Fn(&mut serde_json::Value)>,
            "token id 64 is past",
        ),
        (
            "twice",
            Box::new(tokens(
                serde_json::json!({"embed_tokens": [3, 3], "lm_head": [17, 60]}),
            )),
            "listed twice",
        ),
        (
            "shape",
            Box::new(tokens(
                serde_json::json!({"embed_tokens": [3, 5, 7], "lm_head": [17, 60]}),
            )),
            "shape [2, 32]",
        ),
        (
            "module",
            Box::new(tokens(
                serde_json::json!({"embed_tokens": [3, 5], "wte": [1]}),
            )),
            "names wte",
        ),
        (
            "words",
            Box::new(tokens(serde_json::json!(["<|im_start|>"]))),
            "must list token ids",
        ),
        (
            "both",
            Box::new(|c: &mut serde_json::Value| {
                c["modules_to_save"] = serde_json::json!(["lm_head"])
            }),
            "one or the other",
        ),
        (
            "tying",
            Box::new(|c: &mut serde_json::Value| c["ensure_weight_tying"] = true.into()),
            "ensure_weight_tying",
        ),
        (
            "unlisted",
            Box::new(tokens(serde_json::json!({"embed_tokens": [3, 5]}))),
            "lists none for this module",
        ),
    ] {
        let err = merge(&with(name, &*change));
        assert!(err.contains(says), "{name}: {err}");
        // What is wrong with the ids is said of the file that lists them.
        if ["past", "twice"].contains(&name) {
            assert!(err.contains("adapter_config.json"), "{name}: {err}");
        }
    }
    // A tied model's projection given the embedding's rows reads them, and a copy of its own in
    // the weights is ignored, as PEFT ignores it.
    let same = with(
        "same",
        &tokens(serde_json::json!({"embed_tokens": [3, 5], "lm_head": [3, 5]})),
    );
    let out = dir.path().join("merged-same");
    let o = nibble(&[
        "merge",
        "--model",
        fixture.join("model").to_str().unwrap(),
        "--adapter",
        same.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Training goes on from rows a tied model's tables share, not from rows that untie them.
    let model = ModelSource::open(&fixture.join("model")).unwrap();
    refuses_training(
        &fixture.join("mismatch"),
        &model.config,
        &[
            "trainable_token_indices",
            "untie",
            "trains the rows a tied model's two tables share",
        ],
    );
}

/// Rows an adapter puts in a bf16 table are bf16 in the model that runs them (PEFT casts them to
/// the base module's dtype) and in the merged model, even one written in f32: the two give the same
/// logits.
#[test]
fn token_rows_take_their_tables_dtype_in_eval_and_merge_alike() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    // Untied: the output projection gets rows of its own.
    let spec = SynthSpec::tiny(Arch::Llama, 259);
    assert_eq!(spec.dtype, FloatDtype::BF16);
    synth::write_model_folder(&base, &spec, Some(&synth::byte_tokenizer())).unwrap();
    let model = ModelSource::open(&base)
        .unwrap()
        .load(Some(QuantRequest::Dense))
        .unwrap();
    let mut rng = Rng::new(8);
    let adapter = random_adapter(&model, LoraConfig::default(), &mut rng);
    let adapter_dir = dir.path().join("adapter");
    nibble::train::save_peft(&adapter, &adapter_dir, "base").unwrap();
    let weights = adapter_dir.join("adapter_model.safetensors");
    let mut tensors = common::read_f32_tensors(&weights);
    let hidden = model.config.hidden_size;
    for module in ["model.embed_tokens", "lm_head"] {
        let rows: Vec<f32> = (0..2 * hidden).map(|_| rng.normal() as f32).collect();
        tensors.push((
            format!("base_model.model.{module}.token_adapter.trainable_tokens_delta"),
            vec![2, hidden],
            rows,
        ));
    }
    common::write_f32_tensors(&weights, &tensors);
    let config = adapter_dir.join("adapter_config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    c["trainable_token_indices"] =
        serde_json::json!({"embed_tokens": [257, 40], "lm_head": [258, 40]});
    std::fs::write(&config, c.to_string()).unwrap();

    let (adapter, saved) = nibble::train::run::load_adapter_with_modules(
        &adapter_dir,
        &model.config,
        ("base", None),
        "--adapter",
    )
    .unwrap();
    let mut running = model.clone();
    running.put_saved_modules(&saved);
    let ids: Vec<u32> = vec![257, 40, 7, 99, 40, 258, 12];
    let expected = cpu::logits(&running, Some(&adapter), &ids).unwrap();
    let e = rel(
        &merged_f32_logits(&base, &adapter_dir, &ids, &[]),
        &expected,
    );
    assert!(e < 1e-5, "merged logits differ by {e:e}");
}

/// Each (base, case) of the fixture folder `fixtures`: the adapter run on the base's model, and
/// merged into it, gives the logits PEFT recorded in expected.json.
fn gives_peft_logits(fixtures: &str, cases: &[(&str, &str)]) {
    let fixtures = std::path::Path::new(fixtures);
    for &(base, case) in cases {
        let (model_dir, adapter_dir) = (
            fixtures.join(base).join("model"),
            fixtures.join(base).join(case),
        );
        let expected: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(adapter_dir.join("expected.json")).unwrap(),
        )
        .unwrap();
        let ids: Vec<u32> = serde_json::from_value(expected["ids"].clone()).unwrap();
        let logits: Vec<f32> = serde_json::from_value(expected["logits"].clone()).unwrap();
        let load = || {
            ModelSource::open(&model_dir)
                .unwrap()
                .load(Some(QuantRequest::Dense))
                .unwrap()
        };
        let mut model = load();
        let (adapter, saved) = nibble::train::run::load_adapter_with_modules(
            &adapter_dir,
            &model.config,
            ("model", None),
            "--adapter",
        )
        .unwrap();
        let without = cpu::logits(&model, Some(&adapter), &ids).unwrap();
        assert!(
            rel(&without, &logits) > 1e-2,
            "{base}/{case}: the modules must matter"
        );
        model.put_saved_modules(&saved);
        let e = rel(&cpu::logits(&model, Some(&adapter), &ids).unwrap(), &logits);
        eprintln!("{base}/{case}: {e:e}");
        assert!(
            e < 3e-6,
            "{base}/{case}: logits differ from PEFT's by {e:e}"
        );

        let e = rel(
            &merged_f32_logits(&model_dir, &adapter_dir, &ids, &[]),
            &logits,
        );
        assert!(
            e < 3e-6,
            "{base}/{case}: merged logits differ from PEFT's by {e:e}"
        );
    }
}

/// `nibble merge` of the adapter folder `adapter` into the model folder `model`, written in f32 (with
/// `extra` flags), and the merged model's logits for `ids`.
fn merged_f32_logits(
    model: &std::path::Path,
    adapter: &std::path::Path,
    ids: &[u32],
    extra: &[&str],
) -> Vec<f32> {
    let dir = tempfile::tempdir().unwrap();
    let merged = dir.path().join("merged");
    let mut args = vec![
        "merge",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "-o",
        merged.to_str().unwrap(),
        "--dtype",
        "f32",
    ];
    args.extend_from_slice(extra);
    let o = nibble(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let merged = ModelSource::open(&merged)
        .unwrap()
        .load(Some(QuantRequest::Dense))
        .unwrap();
    cpu::logits(&merged, None, ids).unwrap()
}

/// `nibble merge` of the adapter folder `adapter` into the model folder `model` gives, for `ids`, the
/// logits of the adapted f32 model (`adapted`) and, merged onto the NF4 g64 weights
/// (`--base-weights quantized`), those of the model trained on them (`trained`). As for the dense
/// families: the update folded into the weights sums in another order (within 4e-6).
fn merges_to(
    model: &std::path::Path,
    adapter: &std::path::Path,
    ids: &[u32],
    (adapted, trained): (&[f32], &[f32]),
    name: &str,
) {
    let e = rel(&merged_f32_logits(model, adapter, ids, &[]), adapted);
    assert!(
        e < 4e-6,
        "{name}: merged in f32 {e:e} from the adapted model"
    );
    let quantized = [
        "--base-weights",
        "quantized",
        "--quant",
        "nf4",
        "--group-size",
        "64",
    ];
    let merged = merged_f32_logits(model, adapter, ids, &quantized);
    let e = rel(&merged, trained);
    assert!(
        e < 4e-6,
        "{name}: merged onto the 4-bit weights {e:e} from the trained model"
    );
}

/// Loading the adapter folder `adapter` to train on from is refused with an error saying each of
/// `expect` (what it holds, and why nibble does not train it).
fn refuses_training(
    adapter: &std::path::Path,
    config: &nibble::config::ModelConfig,
    expect: &[&str],
) {
    let files = nibble::source::ModelFiles::Dir(adapter.to_path_buf());
    let err = LoraAdapter::load_peft(&files, config)
        .unwrap_err()
        .to_string();
    assert!(
        expect.iter().all(|e| err.contains(e)),
        "{}: {err}",
        adapter.display()
    );
}

/// Qwen3-MoE with PEFT's all-linear (the attention, the routers and every expert adapted) merged, in
/// f32 and `--base-weights quantized` (each expert's rows quantized as training stacked and packed
/// them), whether the folder stores one tensor per expert (the hub's layout: the transformers
/// fixture; Mixtral's, in its own names, which the merged folder keeps) or transformers' stacked
/// [experts, rows, cols] (`nibble synth`'s): each expert's update lands on its own rows, so the merged
/// folder gives the logits of the adapted model.
#[test]
fn experts_merge_onto_the_4_bit_weights_in_either_layout() {
    let dir = tempfile::tempdir().unwrap();
    let synthetic = dir.path().join("synth");
    let mut spec = SynthSpec::tiny_qwen3_moe(259);
    spec.dtype = FloatDtype::F32;
    synth::write_model_folder(&synthetic, &spec, Some(&synth::byte_tokenizer())).unwrap();
    let fixture = std::path::PathBuf::from("tests/fixtures/hf/qwen3_moe");
    let qspec = nibble::quant::QuantSpec::new(nibble::quant::QuantFormat::Nf4, 64).unwrap();
    let mixtral = std::path::PathBuf::from("tests/fixtures/hf/mixtral");
    for (name, base) in [
        ("per expert", fixture),
        ("stacked", synthetic),
        ("Mixtral's names", mixtral),
    ] {
        let trained_on = ModelSource::open(&base)
            .unwrap()
            .load(Some(QuantRequest::Quantize(qspec)))
            .unwrap();
        let config = LoraConfig {
            dropout: 0.0,
            ..LoraConfig::default()
        };
        let mut rng = Rng::new(8);
        let adapter = random_adapter(&trained_on, config, &mut rng);
        assert!(
            adapter
                .pair(&format!("model.layers.0.mlp.{EXPERTS_GATE_UP}"))
                .is_some()
        );
        assert!(adapter.pair("model.layers.0.mlp.gate").is_some());
        let adapter_dir = dir.path().join(format!("{name} adapter"));
        nibble::train::save_peft(&adapter, &adapter_dir, "base").unwrap();
        let ids: Vec<u32> = (0..12).map(|_| rng.below(256) as u32).collect();
        let trained = cpu::logits(&trained_on, Some(&adapter), &ids).unwrap();
        let f32_model = ModelSource::open(&base)
            .unwrap()
            .load(Some(QuantRequest::Dense))
            .unwrap();
        let adapted = cpu::logits(&f32_model, Some(&adapter), &ids).unwrap();
        merges_to(&base, &adapter_dir, &ids, (&adapted, &trained), name);
        if name == "Mixtral's names" {
            let merged = dir.path().join("mixtral merged");
            let (base, adapter) = (base.to_str().unwrap(), adapter_dir.to_str().unwrap());
            let out = merged.to_str().unwrap();
            let o = nibble(&["merge", "--model", base, "--adapter", adapter, "-o", out]);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let file =
                nibble::source::SafetensorsFile::open(&merged.join("model.safetensors")).unwrap();
            let names: Vec<&String> = file.tensor_names().collect();
            assert!(
                names
                    .iter()
                    .any(|n| n.ends_with("block_sparse_moe.experts.3.w2.weight"))
            );
            assert!(names.iter().all(|n| !n.contains(".mlp.")), "{names:?}");
        }
    }
}

/// PEFT's `gate_proj` with `up_proj` on Qwen3-MoE adapt the stacked experts' gate_up_proj alone, at
/// twice the rank and alpha (its pair keyed at `mlp.experts`, with no down_proj's wrapping it); the
/// folder, whose target_modules is then empty (or null, as a config of parameters alone may say),
/// loads back to the same adapter, which merges to its logits.
#[test]
fn an_adapter_of_the_experts_alone_loads_back_and_merges() {
    let dir = tempfile::tempdir().unwrap();
    let base = std::path::PathBuf::from("tests/fixtures/hf/qwen3_moe");
    let model = ModelSource::open(&base)
        .unwrap()
        .load(Some(QuantRequest::Dense))
        .unwrap();
    let config = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: ["gate_proj", "up_proj"].map(String::from).to_vec(),
        ..LoraConfig::default()
    };
    let mut rng = Rng::new(12);
    let adapter = random_adapter(&model, config, &mut rng);
    assert!(adapter.config.targets.is_empty());
    assert_eq!(adapter.config.target_parameters, ["gate_up_proj"]);
    let path = format!("model.layers.0.mlp.{EXPERTS_GATE_UP}");
    let pair = adapter.pair(&path).unwrap();
    assert_eq!((pair.rank, pair.experts), (8, 4));
    assert_eq!(adapter.config.scale_of(&path), 2.0);
    assert_eq!(
        adapter.pairs().count(),
        2,
        "the two sparse layers' gate_up_proj"
    );
    let adapter_dir = dir.path().join("adapter");
    nibble::train::save_peft(&adapter, &adapter_dir, "base").unwrap();
    let config_path = adapter_dir.join("adapter_config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    assert_eq!(json["target_modules"], serde_json::json!([]));
    let files = nibble::source::ModelFiles::Dir(adapter_dir.clone());
    let weights =
        nibble::source::SafetensorsFile::open(&adapter_dir.join("adapter_model.safetensors"));
    let key = "base_model.model.model.layers.0.mlp.experts.lora_A.weight";
    assert_eq!(weights.unwrap().info(key).unwrap().shape, [4 * 8, 64]);
    for target_modules in [serde_json::json!([]), serde_json::Value::Null] {
        json["target_modules"] = target_modules;
        std::fs::write(&config_path, json.to_string()).unwrap();
        let loaded = LoraAdapter::load_peft(&files, &model.config).unwrap();
        assert_eq!(loaded.modules, adapter.modules);
    }
    let ids: Vec<u32> = (0..10).map(|_| rng.below(256) as u32).collect();
    let adapted = cpu::logits(&model, Some(&adapter), &ids).unwrap();
    let plain = cpu::logits(&model, None, &ids).unwrap();
    assert!(
        rel(&plain, &adapted) > 1e-3,
        "the experts' pairs change nothing"
    );
    let e = rel(&merged_f32_logits(&base, &adapter_dir, &ids, &[]), &adapted);
    assert!(e < 4e-6, "merged {e:e} from the adapted model");
}

/// An adapter PEFT saved with transformers 4, whose experts were linears of their own: a pair per
/// expert's projection (`mlp.experts.{e}.gate_proj`, Mixtral's `block_sparse_moe.experts.{e}.w1`),
/// the router's as a linear's, trained with dropout as such adapters were. It loads as PEFT converts
/// it for transformers 5 (the stacked experts' pairs, gate_proj's and up_proj's fused at rank 2r), and
/// its logits are those of the base with each module's update alpha/r·B·A (rsLoRA: alpha/√r·B·A, which
/// the fused rank would change) added by hand to that module's own tensor in the checkpoint (per
/// expert, in f64). Measured: 1.1e-6 to 2.2e-6; held to 1e-5.
#[test]
fn a_transformers_4_adapter_of_the_experts_loads_as_peft_converts_it() {
    use common::{F32Tensor, read_f32_tensors, write_f32_tensors};
    let families = [
        ("qwen3_moe", "mlp", ["gate_proj", "up_proj", "down_proj"]),
        ("mixtral", "block_sparse_moe", ["w1", "w3", "w2"]),
    ];
    for ((family, block, projections), rslora) in
        families.into_iter().flat_map(|f| [(f, false), (f, true)])
    {
        let dir = tempfile::tempdir().unwrap();
        let base = std::path::PathBuf::from(format!("tests/fixtures/hf/{family}"));
        let model = ModelSource::open(&base)
            .unwrap()
            .load(Some(QuantRequest::Dense))
            .unwrap();
        let moe = model.config.moe.clone().unwrap();
        let (r, alpha) = (4usize, 8.0f64);
        let scale = match rslora {
            true => alpha / (r as f64).sqrt(),
            false => alpha / r as f64,
        };
        let mut rng = Rng::new(21);
        let mut tensors = read_f32_tensors(&base.join("model.safetensors"));
        let mut pairs: Vec<F32Tensor> = Vec::new();
        // Adds a random pair on `module` to the adapter, and its update to the module's tensor.
        let mut adapt = |module: String, tensors: &mut Vec<F32Tensor>| {
            let (_, shape, w) = tensors
                .iter_mut()
                .find(|(n, _, _)| *n == format!("{module}.weight"))
                .unwrap_or_else(|| panic!("{module}"));
            let (out, inp) = (shape[0], shape[1]);
            let a: Vec<f32> = (0..r * inp).map(|_| rng.normal() as f32 * 0.3).collect();
            let b: Vec<f32> = (0..out * r).map(|_| rng.normal() as f32 * 0.3).collect();
            for o in 0..out {
                for i in 0..inp {
                    let update: f64 = (0..r)
                        .map(|k| b[o * r + k] as f64 * a[k * inp + i] as f64)
                        .sum();
                    w[o * inp + i] = (w[o * inp + i] as f64 + scale * update) as f32;
                }
            }
            let key = |f: &str| format!("base_model.model.{module}.lora_{f}.weight");
            pairs.push((key("A"), vec![r, inp], a));
            pairs.push((key("B"), vec![out, r], b));
        };
        for l in 0..model.config.num_layers {
            let layer = format!("model.layers.{l}");
            adapt(format!("{layer}.self_attn.q_proj"), &mut tensors);
            if !moe.sparse[l] {
                continue;
            }
            adapt(format!("{layer}.{block}.gate"), &mut tensors);
            for e in 0..moe.experts {
                for projection in projections {
                    let module = format!("{layer}.{block}.experts.{e}.{projection}");
                    adapt(module, &mut tensors);
                }
            }
        }
        let adapter_dir = dir.path().join("adapter");
        std::fs::create_dir_all(&adapter_dir).unwrap();
        write_f32_tensors(&adapter_dir.join("adapter_model.safetensors"), &pairs);
        let mut targets = vec!["q_proj", "gate"];
        targets.extend(projections);
        let config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": r,
            "lora_alpha": alpha,
            "lora_dropout": 0.05,
            "use_rslora": rslora,
            "target_modules": targets,
            "bias": "none",
        });
        std::fs::write(adapter_dir.join("adapter_config.json"), config.to_string()).unwrap();
        let merged_dir = dir.path().join("merged");
        std::fs::create_dir_all(&merged_dir).unwrap();
        std::fs::copy(base.join("config.json"), merged_dir.join("config.json")).unwrap();
        write_f32_tensors(&merged_dir.join("model.safetensors"), &tensors);

        let files = nibble::source::ModelFiles::Dir(adapter_dir);
        let loaded = LoraAdapter::load_peft(&files, &model.config).unwrap();
        let mut parameters = loaded.config.target_parameters.clone();
        parameters.sort();
        assert_eq!(
            parameters,
            ["down_proj", "gate.weight", "gate_up_proj"],
            "{family}"
        );
        let gate_up = loaded
            .pair(&format!("model.layers.0.mlp.{EXPERTS_GATE_UP}"))
            .unwrap();
        assert_eq!(
            (gate_up.rank, gate_up.experts),
            (2 * r, moe.experts),
            "{family}"
        );
        let merged = ModelSource::open(&merged_dir)
            .unwrap()
            .load(Some(QuantRequest::Dense))
            .unwrap();
        let ids: Vec<u32> = (0..12).map(|_| rng.below(256) as u32).collect();
        let adapted = cpu::logits(&model, Some(&loaded), &ids).unwrap();
        let plain = cpu::logits(&model, None, &ids).unwrap();
        assert!(
            rel(&plain, &adapted) > 1e-2,
            "{family}: the adapter changes nothing"
        );
        let e = rel(&cpu::logits(&merged, None, &ids).unwrap(), &adapted);
        eprintln!("{family} (rsLoRA {rslora}): {e:.1e} from the model merged by hand");
        assert!(
            e < 1e-5,
            "{family} (rsLoRA {rslora}): {e:e} from the merged model"
        );
    }
}

/// A Qwen2-MoE adapter PEFT saved with transformers 4 (its router a linear `mlp.gate`, its experts'
/// pairs per expert): PEFT converts no names for qwen2_moe, so transformers 5 cannot load it, and
/// nibble refuses it by the router's name, saying what the router is now.
#[test]
fn a_transformers_4_qwen2_moe_adapter_is_refused_by_its_router() {
    use common::write_f32_tensors;
    let dir = tempfile::tempdir().unwrap();
    let base = std::path::PathBuf::from("tests/fixtures/hf/qwen2_moe");
    let model = ModelSource::open(&base)
        .unwrap()
        .load(Some(QuantRequest::Dense))
        .unwrap();
    let mut rng = Rng::new(3);
    let mut random = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.normal() as f32).collect() };
    let key =
        |module: &str, f: &str| format!("base_model.model.model.layers.0.{module}.lora_{f}.weight");
    let pairs = vec![
        (key("self_attn.q_proj", "A"), vec![4, 64], random(4 * 64)),
        (key("self_attn.q_proj", "B"), vec![64, 4], random(64 * 4)),
        (key("mlp.gate", "A"), vec![4, 64], random(4 * 64)),
        (key("mlp.gate", "B"), vec![4, 4], random(4 * 4)),
        (
            key("mlp.experts.0.gate_proj", "A"),
            vec![4, 64],
            random(4 * 64),
        ),
        (
            key("mlp.experts.0.gate_proj", "B"),
            vec![64, 4],
            random(64 * 4),
        ),
    ];
    write_f32_tensors(&dir.path().join("adapter_model.safetensors"), &pairs);
    let config = serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
        "target_modules": ["q_proj", "gate", "gate_proj", "up_proj", "down_proj"],
    });
    std::fs::write(dir.path().join("adapter_config.json"), config.to_string()).unwrap();
    let files = nibble::source::ModelFiles::Dir(dir.path().to_path_buf());
    let e = match LoraAdapter::load_peft(&files, &model.config) {
        Ok(_) => panic!("a transformers-4 Qwen2-MoE adapter loaded"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("adapter_config.json")
            && e.contains("target module `gate`")
            && e.contains("--target-parameters gate.weight")
            && e.contains("transformers 4"),
        "{e}"
    );
}

/// gpt-oss with its attention (all-linear) and expert stacks (`target_parameters`) adapted, merged
/// from transformers' layout ([experts, in, out], each expert's gate and up columns interleaved) and
/// from the hub's MXFP4 blocks, in f32 and onto the 4-bit weights: the merged folder holds the
/// experts in transformers' layout (no blocks, no quantization_config left) and gives the adapted
/// model's logits, so each expert's update lands on its own columns, gate and up interleaved again.
#[test]
fn gpt_oss_merges_into_its_own_layout_from_either_checkpoint() {
    let qspec = nibble::quant::QuantSpec::new(nibble::quant::QuantFormat::Nf4, 64).unwrap();
    for fixture in ["gpt_oss", "gpt_oss_mxfp4"] {
        let dir = tempfile::tempdir().unwrap();
        let base = std::path::PathBuf::from(format!("tests/fixtures/hf/{fixture}"));
        let load = |request| {
            ModelSource::open(&base)
                .unwrap()
                .load(Some(request))
                .unwrap()
        };
        let (f32_model, trained_on) = (
            load(QuantRequest::Dense),
            load(QuantRequest::Quantize(qspec)),
        );
        let config = LoraConfig {
            dropout: 0.0,
            target_parameters: ["gate_up_proj", "down_proj"].map(String::from).to_vec(),
            ..LoraConfig::default()
        };
        let mut rng = Rng::new(31);
        let adapter = random_adapter(&f32_model, config, &mut rng);
        for path in [
            "self_attn.q_proj",
            "mlp.experts.gate_up_proj",
            "mlp.experts.down_proj",
        ] {
            assert!(adapter.pair(&format!("model.layers.1.{path}")).is_some());
        }
        let adapter_dir = dir.path().join("adapter");
        nibble::train::save_peft(&adapter, &adapter_dir, "base").unwrap();
        let ids: Vec<u32> = (0..12).map(|_| rng.below(256) as u32).collect();
        let adapted = cpu::logits(&f32_model, Some(&adapter), &ids).unwrap();
        let plain = cpu::logits(&f32_model, None, &ids).unwrap();
        assert!(
            rel(&plain, &adapted) > 1e-3,
            "{fixture}: the adapter changes nothing"
        );
        let trained = cpu::logits(&trained_on, Some(&adapter), &ids).unwrap();
        merges_to(&base, &adapter_dir, &ids, (&adapted, &trained), fixture);

        let merged = dir.path().join("merged");
        let (model, adapter) = (base.to_str().unwrap(), adapter_dir.to_str().unwrap());
        let o = nibble(&[
            "merge",
            "--model",
            model,
            "--adapter",
            adapter,
            "-o",
            merged.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let file =
            nibble::source::SafetensorsFile::open(&merged.join("model.safetensors")).unwrap();
        let moe = f32_model.config.moe.as_ref().unwrap();
        let (h, i, experts) = (f32_model.config.hidden_size, moe.inter, moe.experts);
        let stack = file
            .info("model.layers.0.mlp.experts.gate_up_proj")
            .unwrap();
        assert_eq!(stack.shape, [experts, h, 2 * i], "{fixture}");
        let down = file.info("model.layers.0.mlp.experts.down_proj").unwrap();
        assert_eq!(down.shape, [experts, i, h], "{fixture}");
        let names: Vec<&String> = file.tensor_names().collect();
        assert!(
            names.iter().any(|n| n.ends_with("mlp.router.weight")),
            "{names:?}"
        );
        assert!(
            names
                .iter()
                .all(|n| !n.ends_with("_blocks") && !n.ends_with("_scales"))
        );
        let config = std::fs::read_to_string(merged.join("config.json")).unwrap();
        assert!(
            !config.contains("quantization_config"),
            "{fixture}: {config}"
        );

        // An update no dtype holds is blamed on the adapter, and nothing is written.
        let config_path = adapter_dir.join("adapter_config.json");
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
        json["lora_alpha"] = serde_json::json!(1e9);
        std::fs::write(&config_path, json.to_string()).unwrap();
        let refused = dir.path().join("refused");
        let out = refused.to_str().unwrap();
        let f16 = ["--dtype", "f16"];
        let o = nibble(
            &[
                &["merge", "--model", model, "--adapter", adapter, "-o", out][..],
                &f16,
            ]
            .concat(),
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{fixture}: {err}");
        assert!(
            err.contains("merging into model.layers.0.mlp.experts")
                && err.contains("the adapter's update"),
            "{fixture}: {err}"
        );
        assert!(!refused.exists());
    }
}
