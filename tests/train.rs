//! The trainer: optimisation semantics (loss normalised over an optimizer step's label tokens, clipping,
//! AdamW, schedules), completion-only masking, PEFT adapter files, and `nibble train` end to end.

mod common;

use nibble::config::Arch;
use nibble::cpu::{self, Sequence};
use nibble::data::{Example, Turns};
use nibble::lora::{LoraAdapter, LoraConfig};
use nibble::model::{ModelSource, QuantRequest};
use nibble::ops::adamw::{self, AdamWParams};
use nibble::quant::{QuantFormat, QuantSpec};
use nibble::rng::Rng;
use nibble::source::{FloatDtype, ModelFiles};
use nibble::synth::{self, SynthSpec};
use nibble::tokenizer::{ChatTokenizer, Message};
use nibble::train::{self, LossOn, Schedule, ScheduleKwargs, TrainConfig, Trainer};

fn tiny_model(dir: &std::path::Path) -> nibble::model::Model {
    let mut spec = SynthSpec::tiny(Arch::Qwen2, 300);
    spec.dtype = FloatDtype::F32;
    synth::write_model_folder(dir, &spec, None).unwrap();
    ModelSource::open(dir)
        .unwrap()
        .load(Some(QuantRequest::Quantize(
            QuantSpec::new(QuantFormat::Nf4, 32).unwrap(),
        )))
        .unwrap()
}

/// LoRA r 4, alpha 8, no dropout: steps that depend on nothing but their inputs.
fn rank4_without_dropout() -> LoraConfig {
    LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        ..LoraConfig::default()
    }
}

fn sequences(n: usize, rng: &mut Rng) -> Vec<Sequence> {
    (0..n)
        .map(|i| {
            let mut s =
                Sequence::all_tokens((0..6 + 3 * i).map(|_| rng.below(300) as u32).collect());
            s.targets[0] = None;
            s
        })
        .collect()
}

#[test]
fn schedules_follow_transformers() {
    // get_linear_schedule_with_warmup(warmup=2, total=10), by hand.
    let none = ScheduleKwargs::default();
    let linear: Vec<f64> = (0..10)
        .map(|s| Schedule::Linear.factor(&none, 1.0, s, 2, 10))
        .collect();
    assert_eq!(
        linear,
        vec![0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
    );
    // Every schedule, with and without warmup and with its own parameters, as transformers' Trainer
    // sets each step's rate (tests/fixtures/lr_schedules.json, scripts/make_schedule_fixture.py).
    #[derive(serde::Deserialize)]
    struct Case {
        schedule: String,
        kwargs: serde_json::Value,
        warmup: usize,
        lr: f64,
        total: usize,
        lrs: Vec<f64>,
    }
    #[derive(serde::Deserialize)]
    struct Fixture {
        cases: Vec<Case>,
    }
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/lr_schedules.json"
    );
    let fixture: Fixture = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut names = std::collections::BTreeSet::new();
    for case in &fixture.cases {
        let settings = nibble::train::settings::TrainSettings::parse_json(
            &serde_json::json!({"lr_scheduler": case.schedule, "lr_scheduler_kwargs": case.kwargs,
                                "lr": case.lr, "warmup_steps": case.warmup})
            .to_string(),
        )
        .unwrap();
        let config = settings.train_config().unwrap();
        names.insert(config.schedule.name());
        for (step, &expected) in case.lrs.iter().enumerate() {
            let lr = config.lr_at(step, case.total);
            // f64 against Python's floats: the same operations, a few ulps apart at most.
            assert!(
                (lr - expected).abs() <= 1e-15 + 1e-12 * expected.abs(),
                "{} {} warmup {} step {step}: {lr} against transformers' {expected}",
                case.schedule,
                case.kwargs,
                case.warmup
            );
        }
    }
    let all = <Schedule as clap::ValueEnum>::value_variants();
    assert_eq!(
        names.len(),
        all.len(),
        "a schedule without a case: {names:?}"
    );
}

/// Parameters a schedule does not take, or lacks, are refused before training, naming them.
#[test]
fn schedule_parameters_are_checked_by_name() {
    use nibble::train::settings::TrainSettings;
    for (options, says) in [
        (
            r#"{"lr_scheduler": "cosine_with_min_lr"}"#,
            "needs min_lr or min_lr_rate",
        ),
        (
            r#"{"lr_scheduler": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr": 1e-5, "min_lr_rate": 0.1}}"#,
            "not both",
        ),
        (
            r#"{"lr_scheduler": "linear", "lr_scheduler_kwargs": {"num_cycles": 2}}"#,
            "linear takes no `num_cycles`",
        ),
        (
            r#"{"lr_scheduler": "warmup_stable_decay"}"#,
            "needs num_decay_steps",
        ),
        (
            r#"{"lr_scheduler": "polynomial", "lr": 1e-8}"#,
            "must be smaller than --lr",
        ),
        (r#"{"adam_beta2": 1.0}"#, "--adam-beta2"),
        (r#"{"adam_epsilon": -1e-8}"#, "--adam-epsilon"),
    ] {
        let e = TrainSettings::parse_json(options)
            .and_then(|s| s.train_config())
            .unwrap_err()
            .to_string();
        assert!(e.contains(says), "{options}: {e}");
    }
    let e = TrainSettings::parse_json(r#"{"lr_scheduler_kwargs": {"min_lr_ratee": 0.1}}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("min_lr_ratee"), "{e}");
    // The betas and eps reach AdamW, its bias corrections at the step's count.
    let config = TrainSettings::parse_json(
        r#"{"adam_beta1": 0.8, "adam_beta2": 0.95, "adam_epsilon": 1e-6}"#,
    )
    .unwrap()
    .train_config()
    .unwrap();
    let p = config.adamw_at(2, 10);
    assert_eq!((p.beta1, p.beta2, p.eps), (0.8, 0.95, 1e-6));
    assert_eq!(p.bias_correction1, (1.0 - 0.8f64.powi(3)) as f32);
    assert_eq!(
        p.bias_correction2_sqrt,
        (1.0 - 0.95f64.powi(3)).sqrt() as f32
    );
}

/// NEFTune (`neftune_noise_alpha`) moves the training losses a little, the same way on every run of
/// the same seed, and never the validation loss; its half-width is transformers' α/√(L·hidden), L the
/// micro-batch's padded row (its longest sequence) or, packed, its sequences end to end.
#[test]
fn neftune_noise_moves_training_steps_only() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let mut rng = Rng::new(9);
    let seqs = sequences(4, &mut rng);
    let config = |alpha: Option<f64>| TrainConfig {
        lora: rank4_without_dropout(),
        lr: 1e-2,
        max_steps: Some(2),
        neftune_noise_alpha: alpha,
        ..TrainConfig::default()
    };
    let losses = |alpha: Option<f64>| {
        let mut trainer = Trainer::new(&model, config(alpha), seqs.clone(), None).unwrap();
        let validation = trainer.evaluate(&seqs).unwrap().loss_sum;
        let steps: Vec<f64> = (0..2).map(|_| trainer.step().unwrap().loss).collect();
        (validation, steps)
    };
    let (plain_validation, plain) = losses(None);
    let (validation, noisy) = losses(Some(5.0));
    assert_eq!(validation, plain_validation, "validation sees no noise");
    assert_eq!(losses(Some(5.0)).1, noisy, "the same seed, the same noise");
    for (a, b) in noisy.iter().zip(&plain) {
        let moved = (a - b).abs() / b;
        assert!(
            moved > 1e-7 && moved < 0.1,
            "noise moved the loss by {moved:e}"
        );
    }
    let (hidden, alpha) = (model.config.hidden_size, 5.0);
    let rows = [10, 20, 30].map(|n| Sequence::all_tokens(vec![1; n]));
    let half_width = |len: usize| Some((alpha / ((len * hidden) as f64).sqrt()) as f32);
    let magnitudes = |picks: &[usize], batch: (usize, bool)| {
        train::noise_magnitudes(Some(alpha), &rows, picks, batch, hidden)
    };
    // Padded to the longest; one row end to end where packing makes rows padding-free.
    assert_eq!(magnitudes(&[0, 1], (2, false)), vec![half_width(20); 2]);
    assert_eq!(magnitudes(&[0, 2], (2, true)), vec![half_width(40); 2]);
    assert_eq!(magnitudes(&[0, 1, 2], (2, true)), vec![half_width(30); 3]);
    assert_eq!(
        magnitudes(&[0, 1], (1, false)),
        vec![half_width(10), half_width(20)]
    );
    let none = train::noise_magnitudes(None, &rows, &[0], (1, false), hidden);
    assert_eq!(none, vec![None]);
}

#[test]
fn one_step_equals_accumulated_gradients_clipping_and_adamw() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let mut rng = Rng::new(4);
    let mut seqs = sequences(4, &mut rng);
    let config = TrainConfig {
        lora: rank4_without_dropout(),
        lr: 1e-2,
        max_grad_norm: 0.05, // small, so that clipping is active
        batch_size: 2,
        grad_accum: 2,
        shuffle: false,
        schedule: Schedule::Constant,
        weight_decay: 0.1,
        ..TrainConfig::default()
    };
    let mut init = LoraAdapter::init(&model.config, config.lora.clone(), &mut rng).unwrap();
    for (_, p) in init.pairs_mut() {
        p.b.iter_mut()
            .for_each(|b| *b = (rng.normal() * 0.05) as f32);
    }
    // The first example continues its first token greedily: each of its labels ranks first.
    let vocab = model.config.vocab_size;
    let mut greedy = seqs[0].ids[..1].to_vec();
    while greedy.len() < seqs[0].ids.len() {
        let logits = cpu::logits(&model, Some(&init), &greedy).unwrap();
        let last = &logits[(greedy.len() - 1) * vocab..];
        let max = last.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        greedy.push(last.iter().position(|&z| z == max).unwrap() as u32);
    }
    seqs[0] = cpu::Sequence::all_tokens(greedy);
    let mut trainer = Trainer::new(&model, config, seqs.clone(), Some(init.clone())).unwrap();
    let record = trainer.step().unwrap();

    // By hand: Σ over the four examples of the gradient of (Σ token losses) / (all label tokens).
    let total: usize = seqs.iter().map(|s| s.target_count()).sum();
    let mut grads = init.zeros_like();
    let mut loss = 0.0;
    for s in &seqs {
        loss += cpu::forward_backward(
            &model,
            Some(&init),
            Some(&mut grads),
            s,
            1.0 / total as f32,
            None,
        )
        .unwrap()
        .loss_sum;
    }
    assert!(
        (record.loss - loss / total as f64).abs() < 1e-9,
        "step loss {} vs {}",
        record.loss,
        loss / total as f64
    );
    // TRL's metrics: per micro-batch (two examples) the share of labels ranked first and the mean
    // entropy at the labels, from the full logits in f64; then their mean over the micro-batches.
    let micro_batches: Vec<(f64, f64)> = seqs
        .chunks(2)
        .map(|micro| {
            let (mut correct, mut entropy, mut targets) = (0usize, 0f64, 0usize);
            for s in micro {
                let logits = cpu::logits(&model, Some(&init), &s.ids).unwrap();
                for (t, target) in s.targets.iter().enumerate() {
                    let Some(label) = target else { continue };
                    let row: Vec<f64> = logits[t * vocab..(t + 1) * vocab]
                        .iter()
                        .map(|&z| z as f64)
                        .collect();
                    let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let lse = max + row.iter().map(|z| (z - max).exp()).sum::<f64>().ln();
                    entropy -= row.iter().map(|z| (z - lse).exp() * (z - lse)).sum::<f64>();
                    correct +=
                        usize::from(row.iter().position(|&z| z == max) == Some(*label as usize));
                    targets += 1;
                }
            }
            (correct as f64 / targets as f64, entropy / targets as f64)
        })
        .collect();
    let predictions = record.predictions.expect("a language model's step");
    let accuracy = (micro_batches[0].0 + micro_batches[1].0) / 2.0;
    let entropy = (micro_batches[0].1 + micro_batches[1].1) / 2.0;
    assert!((predictions.mean_token_accuracy - accuracy).abs() < 1e-12);
    assert!(
        accuracy > 0.2,
        "the greedy example's labels rank first: {accuracy}"
    );
    assert!(
        (predictions.entropy - entropy).abs() < 1e-5 * entropy,
        "entropy {} vs {entropy}",
        predictions.entropy
    );
    let norm = grads
        .pairs()
        .map(|(_, g)| adamw::sum_of_squares(&g.a) + adamw::sum_of_squares(&g.b))
        .sum::<f64>()
        .sqrt();
    // The optimizer graph leaves the norm in an f32 buffer: equal to f32 rounding.
    assert!((record.grad_norm - norm).abs() < 1e-7 * norm);
    assert!(
        norm > 0.05,
        "the test needs clipping to be active (norm {norm})"
    );
    let params = AdamWParams::new(
        1e-2,
        0.9,
        0.999,
        1e-8,
        0.1,
        1,
        adamw::clip_coefficient(norm, 0.05),
    );
    let mut expected = init.clone();
    for ((_, p), (_, g)) in expected.pairs_mut().zip(grads.pairs()) {
        let (mut ma, mut va) = (vec![0f32; p.a.len()], vec![0f32; p.a.len()]);
        adamw::step(&params, &mut p.a, &g.a, &mut ma, &mut va);
        let (mut mb, mut vb) = (vec![0f32; p.b.len()], vec![0f32; p.b.len()]);
        adamw::step(&params, &mut p.b, &g.b, &mut mb, &mut vb);
    }
    assert_eq!(trainer.adapter, expected);
}

#[test]
fn training_lowers_the_loss_and_the_adapter_round_trips_through_peft_files() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let mut rng = Rng::new(8);
    let seqs = sequences(3, &mut rng);
    let config = TrainConfig {
        lr: 1e-2,
        epochs: 15.0,
        schedule: Schedule::Constant,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(&model, config, seqs, None).unwrap();
    let first = trainer.step().unwrap().loss;
    let mut last = first;
    while !trainer.done() {
        last = trainer.step().unwrap().loss;
    }
    assert!(last < 0.7 * first, "loss went from {first} to {last}");

    let out = dir.path().join("adapter");
    train::save_peft(&trainer.adapter, &out, "base").unwrap();
    let loaded = LoraAdapter::load_peft(&ModelFiles::Dir(out.clone()), &model.config).unwrap();
    assert_eq!(loaded.modules, trainer.adapter.modules);
    assert_eq!(loaded.config.scale(), trainer.adapter.config.scale());
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["bias"], "none");
    assert_eq!(cfg["target_modules"].as_array().unwrap().len(), 7);
}

#[test]
fn completion_only_loss_masks_the_prompt() {
    let tok =
        ChatTokenizer::from_files(&synth::qwen25_tokenizer(), std::path::Path::new("tok")).unwrap();
    let ex = Example::PromptCompletion {
        prompt: Turns::Messages(vec![Message::new("user", "Name a colour.")]),
        completion: Turns::Messages(vec![Message::new("assistant", "Blue.")]),
        args: Default::default(),
    };
    let (seq, _) = train::tokenize(&tok, &ex, LossOn::Default, 512).unwrap();
    let prompt = tok
        .encode(
            &tok.apply_chat_template(&[Message::new("user", "Name a colour.")], true)
                .unwrap(),
        )
        .unwrap();
    // Targets start at the first completion token, which position prompt.len() - 1 predicts.
    let first = seq.targets.iter().position(|t| t.is_some()).unwrap();
    assert_eq!(first, prompt.len() - 1);
    assert_eq!(seq.targets[first], Some(seq.ids[prompt.len()]));
    assert_eq!(
        tok.decode(&seq.ids[prompt.len()..]).unwrap(),
        "Blue.<|im_end|>\n"
    );
    let (all, _) = train::tokenize(&tok, &ex, LossOn::All, 512).unwrap();
    assert_eq!(all.target_count(), all.ids.len() - 1);
    let text = Example::Text("plain".into());
    assert!(train::tokenize(&tok, &text, LossOn::Completion, 512).is_err());
}

#[test]
fn nibble_train_writes_a_peft_folder_and_metrics_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    synth::write_model_folder(
        &model,
        &SynthSpec::tiny(Arch::Qwen3, 151936),
        Some(&synth::qwen25_tokenizer()),
    )
    .unwrap();
    let data = dir.path().join("d.jsonl");
    std::fs::write(
        &data,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello!\"}]}\n{\"prompt\": \"2+2=\", \"completion\": \"4\"}\n",
    )
    .unwrap();
    let out = dir.path().join("run");
    let run = |extra: &[&str]| {
        let mut args = vec!["--max-steps", "3"];
        args.extend_from_slice(extra);
        common::train_cli(&model, &data, &out, &args)
    };
    let o = run(&[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        out.join("adapter_model.safetensors").is_file()
            && out.join("adapter_config.json").is_file()
    );
    let metrics: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(metrics.len(), 3);
    for key in [
        "step",
        "epoch",
        "loss",
        "lr",
        "grad_norm",
        "tokens",
        "tokens_per_s",
    ] {
        assert!(metrics[2].get(key).is_some(), "metrics lack {key}");
    }
    let o = run(&[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--overwrite"));
    assert!(run(&["--overwrite"]).status.success());
}

#[test]
fn a_run_killed_with_sigkill_and_resumed_ends_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    let spec = SynthSpec::tiny(Arch::Llama, 151936);
    synth::write_model_folder(&model, &spec, Some(&synth::qwen25_tokenizer())).unwrap();
    let data = dir.path().join("d.jsonl");
    let rows: String = (0..6)
        .map(|i| format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"Question {i}?\"}}, {{\"role\": \"assistant\", \"content\": \"Answer number {i}.\"}}]}}\n"))
        .collect();
    std::fs::write(&data, rows).unwrap();
    let args = |out: &std::path::Path| -> Vec<String> {
        common::train_args(
            &model,
            &data,
            out,
            &[
                "--max-steps",
                "12",
                "--save-steps",
                "2",
                "--grad-accum",
                "2",
                "--lora-dropout",
                "0.1",
                "--lr-scheduler",
                "cosine",
                "--warmup-steps",
                "2",
                "--lr",
                "1e-3",
            ],
        )
    };
    let nibble = common::nibble_command;

    let straight = dir.path().join("straight");
    let o = nibble().args(args(&straight)).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let killed = dir.path().join("killed");
    let mut child = nibble()
        .args(args(&killed))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !killed.join("checkpoint-2").is_dir() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // However far the run got, take it back to at most step 4, as if the kill had come there.
    let _ = std::fs::remove_file(killed.join("adapter_model.safetensors"));
    for entry in std::fs::read_dir(&killed).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if let Some(step) = name
            .strip_prefix("checkpoint-")
            .and_then(|s| s.parse::<usize>().ok())
            && step > 4
        {
            std::fs::remove_dir_all(&path).unwrap();
        }
    }
    let mut resume = args(&killed);
    resume.extend(["--resume".to_string(), killed.to_str().unwrap().to_string()]);
    let o = nibble().args(&resume).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let config = nibble::model::ModelSource::open(&model).unwrap().config;
    let a = LoraAdapter::load_peft(&ModelFiles::Dir(straight.clone()), &config).unwrap();
    let b = LoraAdapter::load_peft(&ModelFiles::Dir(killed.clone()), &config).unwrap();
    assert_eq!(
        a, b,
        "the resumed run must end with the same adapter, bit for bit"
    );
    let losses = |d: &std::path::Path| -> Vec<(u64, f64)> {
        std::fs::read_to_string(d.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
            })
            .collect()
    };
    assert_eq!(losses(&straight), losses(&killed));
    assert_eq!(losses(&killed).len(), 12);
}

#[test]
fn flags_override_the_config_file_which_overrides_the_preset() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    common::write_tiny_qwen2(&model);
    let data = dir.path().join("d.jsonl");
    std::fs::write(
        &data,
        "{\"text\": \"one two three four five\"}\n{\"text\": \"six seven eight\"}\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let cfg = dir.path().join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            "model = {:?}\ndata = {:?}\nlr = 0.5\nlora_r = 4\nmax_steps = 2\ndevice = \"cpu\"\n",
            model.to_str().unwrap(),
            data.to_str().unwrap()
        ),
    )
    .unwrap();
    let run = common::nibble;
    let o = run(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--preset",
        "qwen2.5-cpu",
        "--lora-r",
        "2",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let adapter: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(adapter["r"], 2, "the flag wins over the file");
    assert_eq!(
        adapter["lora_alpha"], 16.0,
        "the preset fills what neither sets"
    );
    assert_eq!(
        adapter["lora_dropout"].as_f64(),
        Some(0.05),
        "as PEFT writes it"
    );
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(first["lr"], 0.5, "the file wins over the preset");

    std::fs::write(&cfg, "lr = 0.1\nlearnin_rate = 0.2\n").unwrap();
    let o = run(&["train", "--config", cfg.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains("run.toml") && err.contains("learnin_rate"),
        "{err}"
    );
    let o = run(&[
        "train", "--preset", "nope", "--model", "x", "--data", "y", "--output", "z",
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown preset `nope`"));
}

/// The browser page's built-in model is `nibble demo`'s: the weights of the folder `nibble demo` writes,
/// the real Qwen2.5 tokenizer; and with the demo preset (the page's default options) it learns the demo
/// chats: after the 96 steps its greedy answer to the first question is the trained one, as
/// web/test.sh checks in the page.
#[test]
fn the_browser_builtin_model_is_the_demo_and_learns_the_demo_chats() {
    use nibble::model::FrozenWeights;
    let source = ModelSource::open_folder(synth::browser_model()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    synth::write_model_folder(
        dir.path(),
        &SynthSpec::demo(),
        Some(&synth::qwen25_tokenizer()),
    )
    .unwrap();
    let model = source.load(None).unwrap();
    let written = ModelSource::open(dir.path()).unwrap().load(None).unwrap();
    assert_eq!(model.fingerprint(), written.fingerprint());
    let tok =
        ChatTokenizer::from_files(&source.tokenizer, std::path::Path::new("builtin")).unwrap();
    assert_eq!(tok.token_id("<|im_end|>"), Some(151645));

    let config = nibble::train::settings::TrainSettings::preset("demo")
        .unwrap()
        .train_config()
        .unwrap();
    let sequences = nibble::data::parse_jsonl(&nibble::data::demo_jsonl(), "demo")
        .unwrap()
        .iter()
        .map(|ex| {
            train::tokenize(&tok, ex, config.loss_on, config.max_length)
                .unwrap()
                .0
        })
        .collect();
    let mut trainer = Trainer::new(&model, config, sequences, None).unwrap();
    assert_eq!(trainer.total_steps, 96);
    while !trainer.done() {
        trainer.step().unwrap();
    }
    let (question, trained) = nibble::data::DEMO_CHATS[0];
    let executor = nibble::generate::Executor::Cpu {
        model: &model,
        adapter: Some(&trainer.adapter),
    };
    let answer = nibble::generate::answer(executor, &tok, question, 24)
        .unwrap()
        .text;
    assert_eq!(answer, trained);
}
