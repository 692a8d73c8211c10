//! The training run as a library call (`nibble::train::run`), without the binary: the finished-run guard,
//! the validation cadence the observer sees, a resumed run finishing as an uninterrupted one does, a
//! diverging run stopping with nothing saved, and the in-memory run (the browser's) training what the
//! file-based one does.

use nibble::train::run::{self, Observer, Run, RunData, RunOptions, RunSpec};
use nibble::train::{StepRecord, TrainConfig, Trainer};
use std::path::{Path, PathBuf};

/// What the observer was told, in order.
#[derive(Default)]
struct Recorded {
    started_at: Option<(usize, usize)>,
    steps: Vec<(usize, f64)>,
    evaluations: Vec<usize>,
    finished: bool,
}

impl Observer for Recorded {
    fn started(&mut self, trainer: &Trainer) {
        self.started_at = Some((trainer.step, trainer.total_steps));
    }
    fn stepped(&mut self, record: &StepRecord) {
        self.steps.push((record.step, record.loss));
    }
    fn evaluated(&mut self, step: usize, loss: f64) {
        assert!(loss.is_finite() && loss > 0.0, "validation loss {loss}");
        self.evaluations.push(step);
    }
    fn finished(&mut self) {
        self.finished = true;
    }
}

/// A random tiny Qwen2 model with the real tokenizer, and six chats.
fn model_and_data(dir: &Path) -> (PathBuf, PathBuf) {
    let model = dir.join("model");
    nibble::synth::write_model_folder(
        &model,
        &nibble::synth::SynthSpec::tiny(nibble::config::Arch::Qwen2, 151936),
        Some(&nibble::synth::qwen25_tokenizer()),
    )
    .unwrap();
    let data = dir.join("chats.jsonl");
    let chats: String = [
        ("Name three colours.", "Red, green and blue."),
        ("What is 2+2?", "Four."),
        ("Say hello.", "Hello there!"),
        ("Count to three.", "One, two, three."),
        ("What is the capital of France?", "Paris."),
        ("Spell cat.", "C, A, T."),
    ]
    .iter()
    .map(|(q, a)| {
        serde_json::json!({"messages": [{"role": "user", "content": q},
                                        {"role": "assistant", "content": a}]})
        .to_string()
            + "\n"
    })
    .collect();
    std::fs::write(&data, chats).unwrap();
    (model, data)
}

fn config(max_steps: usize) -> TrainConfig {
    TrainConfig {
        lr: 1e-3,
        max_steps: Some(max_steps),
        precision: nibble::ops::Precision::F32,
        ..Default::default()
    }
}

fn train(
    model: &Path,
    data: &Path,
    output: &Path,
    config: TrainConfig,
    options: RunOptions,
) -> (nibble::Result<run::RunSummary>, Recorded) {
    let mut seen = Recorded::default();
    let spec = RunSpec {
        model,
        data,
        output,
        quant: None,
        config,
        options,
    };
    (run::run(spec, None, &mut seen), seen)
}

#[test]
fn a_finished_run_is_kept_unless_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = model_and_data(dir.path());
    let out = dir.path().join("out");
    let (first, seen) = train(&model, &data, &out, config(2), RunOptions::default());
    let first = first.unwrap();
    assert_eq!(seen.started_at, Some((0, 2)));
    assert_eq!(seen.steps.len(), 2);
    assert!(seen.finished);
    assert_eq!(first.last_loss, seen.steps[1].1);
    let adapter = std::fs::read(out.join("adapter_model.safetensors")).unwrap();

    let (again, seen) = train(&model, &data, &out, config(2), RunOptions::default());
    let err = again.unwrap_err().to_string();
    assert!(err.contains("already holds a finished run"), "{err}");
    assert!(seen.steps.is_empty() && !seen.finished);
    assert_eq!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        adapter,
        "the refused run left the adapter as it was"
    );

    let overwrite = RunOptions {
        overwrite: true,
        ..Default::default()
    };
    let (replaced, seen) = train(&model, &data, &out, config(3), overwrite);
    replaced.unwrap();
    assert_eq!(seen.steps.len(), 3);
}

#[test]
fn validation_runs_at_the_cadence_asked_and_lands_in_the_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = model_and_data(dir.path());
    let out = dir.path().join("out");
    let options = RunOptions {
        eval_split: Some(0.34),
        eval_steps: 2,
        ..Default::default()
    };
    let (result, seen) = train(&model, &data, &out, config(5), options);
    result.unwrap();
    // Every second step, and after the last.
    assert_eq!(seen.evaluations, vec![2, 4, 5]);
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let eval_lines: Vec<u64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("eval_loss").is_some())
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(eval_lines, vec![2, 4, 5]);
}

#[test]
fn a_resumed_run_ends_where_an_uninterrupted_one_does() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = model_and_data(dir.path());
    let whole = dir.path().join("whole");
    let saving = RunOptions {
        save_steps: 2,
        ..Default::default()
    };
    let (result, uninterrupted) = train(&model, &data, &whole, config(4), saving.clone());
    result.unwrap();

    // A second folder that holds only what a run killed after step 2 would have left.
    let part = dir.path().join("part");
    std::fs::create_dir_all(&part).unwrap();
    let checkpoint = whole.join("checkpoint-2");
    let copy = part.join("checkpoint-2");
    std::fs::create_dir_all(&copy).unwrap();
    for entry in std::fs::read_dir(&checkpoint).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
    }
    let resume = RunOptions {
        resume: Some(part.clone()),
        ..saving
    };
    let (result, resumed) = train(&model, &data, &part, config(4), resume);
    result.unwrap();
    assert_eq!(resumed.started_at, Some((2, 4)));
    assert_eq!(
        resumed.steps,
        uninterrupted.steps[2..].to_vec(),
        "the resumed steps' losses are the uninterrupted run's, bit for bit"
    );
    assert_eq!(
        std::fs::read(part.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(whole.join("adapter_model.safetensors")).unwrap()
    );
}

#[test]
fn a_diverging_run_stops_naming_the_last_checkpoint_and_saves_no_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = model_and_data(dir.path());
    let out = dir.path().join("out");
    // Adam's first update moves every B entry by about lr: 1e30 overflows the next forward pass.
    let config = TrainConfig {
        lr: 1e30,
        ..config(4)
    };
    let options = RunOptions {
        save_steps: 1,
        ..Default::default()
    };
    let (result, seen) = train(&model, &data, &out, config, options);
    let err = result.unwrap_err().to_string();
    assert!(err.contains("the loss became"), "{err}");
    assert!(err.contains("no adapter was saved"), "{err}");
    let last = seen.steps.last().expect("at least one finite step").0;
    let checkpoint = out.join(format!("checkpoint-{last}"));
    assert!(
        err.contains(&checkpoint.display().to_string()),
        "the error names {}: {err}",
        checkpoint.display()
    );
    assert!(!seen.finished);
    assert!(!out.join("adapter_model.safetensors").exists());
}

#[test]
fn a_run_in_memory_trains_the_adapter_the_file_based_run_saves() {
    let dir = tempfile::tempdir().unwrap();
    let (model_dir, data) = model_and_data(dir.path());
    let out = dir.path().join("out");
    let options = RunOptions {
        eval_split: Some(0.34),
        eval_steps: 2,
        ..Default::default()
    };
    let (result, on_files) = train(&model_dir, &data, &out, config(5), options.clone());
    result.unwrap();

    let source = nibble::model::open(&model_dir).unwrap();
    let tok = nibble::tokenizer::ChatTokenizer::from_files(&source.tokenizer, &model_dir).unwrap();
    let model = std::sync::Arc::new(source.load(None).unwrap());
    let train = run::tokenize_file(&tok, &data, &config(5)).unwrap();
    let data = RunData {
        train,
        eval: Vec::new(),
    };
    // Co-owned, as the browser session holds it.
    let mut in_memory = Run::start(model.clone(), "model", config(5), data, options, None).unwrap();
    let mut seen = Recorded::default();
    while !in_memory.done() {
        in_memory.step(&mut seen).unwrap();
    }
    let summary = in_memory.finish().unwrap();
    assert_eq!(seen.steps, on_files.steps, "the same losses, bit for bit");
    assert_eq!(seen.evaluations, on_files.evaluations);
    assert_eq!(summary.last_loss, on_files.steps[4].1);
    let saved = run::load_adapter(&out, &model.config, "the file run's adapter").unwrap();
    let trained: Vec<_> = in_memory.trainer.adapter.pairs().collect();
    let saved: Vec<_> = saved.pairs().collect();
    assert_eq!(trained.len(), saved.len());
    for ((path, a), (saved_path, b)) in trained.iter().zip(&saved) {
        assert_eq!(path, saved_path);
        assert!(
            a.a == b.a && a.b == b.b,
            "{path:?}: the same weights, bit for bit"
        );
    }
}
