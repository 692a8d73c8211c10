//! The training run as a library call (`nibble::train::run`), without the binary: the finished-run guard,
//! the validation cadence the observer sees, a resumed run finishing as an uninterrupted one does, a
//! diverging run stopping with nothing saved, and the in-memory run (the browser's) training what the
//! file-based one does.

mod common;

use nibble::train::folder::RunFolder;
use nibble::train::run::{self, Observer, Run, RunData, RunOptions, RunSpec};
use nibble::train::{STATE_FILE, StepRecord, TrainConfig, Trainer};
use std::path::{Path, PathBuf};

/// What the observer was told, in order.
#[derive(Default)]
struct Recorded {
    started_at: Option<(usize, usize)>,
    steps: Vec<(usize, f64)>,
    evaluations: Vec<usize>,
    finished: bool,
    stalled: Option<(usize, String)>,
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
    fn stalled(&mut self, steps: usize, why: &str) {
        assert!(self.stalled.is_none(), "told once");
        self.stalled = Some((steps, why.to_string()));
    }
}

/// A random tiny Qwen2 model with the real tokenizer, and six chats.
fn model_and_data(dir: &Path) -> (PathBuf, PathBuf) {
    let model = dir.join("model");
    common::write_tiny_qwen2(&model);
    let data = dir.join("chats.jsonl");
    let chats = chat_rows(&[
        ("Name three colours.", "Red, green and blue."),
        ("What is 2+2?", "Four."),
        ("Say hello.", "Hello there!"),
        ("Count to three.", "One, two, three."),
        ("What is the capital of France?", "Paris."),
        ("Spell cat.", "C, A, T."),
    ]);
    std::fs::write(&data, chats).unwrap();
    (model, data)
}

/// JSONL messages rows of (question, answer) pairs.
fn chat_rows(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(q, a)| {
            serde_json::json!({"messages": [{"role": "user", "content": q},
                                            {"role": "assistant", "content": a}]})
            .to_string()
                + "\n"
        })
        .collect()
}

/// A flat folder's files copied into a new folder `to`.
fn copy_folder(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
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
    let data = [data.to_path_buf()];
    let spec = RunSpec {
        model,
        data: &data,
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

    // --eval-on-start validates the untrained adapter first, at step 0, and changes nothing after.
    let losses = |metrics: &str| -> Vec<(u64, f64)> {
        metrics
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter_map(|v| Some((v["step"].as_u64()?, v.get("eval_loss")?.as_f64()?)))
            .collect()
    };
    let started = dir.path().join("started");
    let options = RunOptions {
        eval_split: Some(0.34),
        eval_steps: 2,
        eval_on_start: true,
        ..Default::default()
    };
    let (result, seen) = train(&model, &data, &started, config(5), options);
    result.unwrap();
    assert_eq!(seen.evaluations, vec![0, 2, 4, 5]);
    let with_start = losses(&std::fs::read_to_string(started.join("metrics.jsonl")).unwrap());
    assert_eq!(with_start[1..], losses(&metrics)[..]);
    assert!(with_start[0].1 > with_start[1].1, "{with_start:?}");
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
    copy_folder(&whole.join("checkpoint-2"), &part.join("checkpoint-2"));
    let resume = RunOptions {
        resume: Some(part.clone()),
        ..saving.clone()
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

    // A checkpoint written before the state file had nibble's own name (trainer_state.json) resumes
    // the same way.
    let legacy = dir.path().join("legacy");
    copy_folder(&whole.join("checkpoint-2"), &legacy.join("checkpoint-2"));
    let state = legacy.join("checkpoint-2");
    std::fs::rename(state.join(STATE_FILE), state.join("trainer_state.json")).unwrap();
    let resume = RunOptions {
        resume: Some(legacy.clone()),
        ..saving
    };
    let (result, resumed) = train(&model, &data, &legacy, config(4), resume);
    result.unwrap();
    assert_eq!(resumed.steps, uninterrupted.steps[2..].to_vec());
    assert!(legacy.join("checkpoint-4").join(STATE_FILE).is_file());
}

/// A finished run goes on when more steps are asked for, as transformers' `resume_from_checkpoint`
/// under a larger `max_steps` does: under a constant rate, 2 steps and then 2 more end bit for bit
/// where 4 straight do; under the linear schedule the steps after the resume take the 4-step
/// schedule's rates (transformers builds the scheduler for the new count and restores only its step).
/// Asking for no more steps, or fewer than the checkpoint's, is refused and changes nothing.
#[test]
fn a_finished_run_goes_on_when_more_steps_are_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = model_and_data(dir.path());
    let saving = RunOptions {
        save_steps: 1,
        ..Default::default()
    };
    let resume = |out: &Path| RunOptions {
        resume: Some(out.to_path_buf()),
        ..saving.clone()
    };
    let constant = |steps| TrainConfig {
        schedule: nibble::train::schedule::Schedule::Constant,
        ..config(steps)
    };
    let whole = dir.path().join("whole");
    let (result, straight) = train(&model, &data, &whole, constant(4), saving.clone());
    result.unwrap();

    let out = dir.path().join("out");
    train(&model, &data, &out, constant(2), saving.clone())
        .0
        .unwrap();
    let before = snapshot(&out);
    refused(
        train(&model, &data, &out, constant(2), resume(&out)).0,
        &["finished run", "checkpoint-2", "step 2 of 2", "--max-steps"],
    );
    refused(
        train(&model, &data, &out, constant(1), resume(&out)).0,
        &["step 2", "past this run's 1 steps"],
    );
    assert_eq!(snapshot(&out), before, "refused resumes change nothing");

    let (result, extended) = train(&model, &data, &out, constant(4), resume(&out));
    result.unwrap();
    assert_eq!(extended.started_at, Some((2, 4)));
    assert_eq!(
        extended.steps,
        straight.steps[2..].to_vec(),
        "the steps after the resume are the straight run's, bit for bit"
    );
    assert_eq!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(whole.join("adapter_model.safetensors")).unwrap()
    );
    // The options record no longer claims to repeat the run: each change of length is noted.
    use nibble::train::settings::{RECORD_CONTINUED, RECORD_HEADER, RECORD_REPEATS};
    let recording = RunOptions {
        record: Some(format!(
            "{RECORD_HEADER} a test took them.\n{RECORD_REPEATS}lr = 0.001\n"
        )),
        ..resume(&out)
    };
    train(&model, &data, &out, constant(5), recording.clone())
        .0
        .unwrap();
    train(&model, &data, &out, constant(6), recording)
        .0
        .unwrap();
    let record = std::fs::read_to_string(out.join(nibble::train::RECORD_FILE)).unwrap();
    assert!(!record.contains(RECORD_REPEATS), "{record}");
    let notes: Vec<&str> = record
        .lines()
        .filter(|l| l.starts_with(RECORD_CONTINUED))
        .collect();
    assert_eq!(notes.len(), 2, "{record}");
    assert!(notes[0].contains("step 4 from 4 steps to 5"), "{record}");
    assert!(notes[1].contains("step 5 from 5 steps to 6"), "{record}");

    // Resumed from an earlier checkpoint with another length, the later checkpoints of the earlier
    // schedule would pass for this run's: refused, naming them.
    let before = snapshot(&out);
    refused(
        train(
            &model,
            &data,
            &out,
            constant(8),
            resume(&out.join("checkpoint-5")),
        )
        .0,
        &["checkpoint-6", "past step 5"],
    );
    assert_eq!(snapshot(&out), before);

    // Linear: 1e-3 · (4 − s) / 4 at steps s = 2 and 3 (counted from 0), transformers' formula.
    let linear = dir.path().join("linear");
    train(&model, &data, &linear, config(2), saving.clone())
        .0
        .unwrap();
    train(&model, &data, &linear, config(4), resume(&linear))
        .0
        .unwrap();
    let rates: Vec<(u64, f64)> = std::fs::read_to_string(linear.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| Some((v["step"].as_u64()?, v["lr"].as_f64()?)))
        .collect();
    let expected = [(1, 1e-3), (2, 5e-4), (3, 5e-4), (4, 2.5e-4)];
    assert_eq!(rates.len(), expected.len(), "{rates:?}");
    for ((step, lr), (want_step, want)) in rates.iter().zip(expected) {
        assert_eq!(*step, want_step);
        assert!(
            (lr - want).abs() < 1e-12,
            "step {step}: lr {lr}, expected {want}"
        );
    }
}

/// `--save-total-limit 2` (issue 19): of checkpoints written at every step, the two newest stay, and a
/// run resumes from them as from an unpruned folder; a folder nibble did not write is left alone.
#[test]
fn a_save_total_limit_keeps_the_newest_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = model_and_data(dir.path());
    let out = dir.path().join("out");
    let options = RunOptions {
        save_steps: 1,
        save_total_limit: Some(2),
        ..Default::default()
    };
    let (result, whole) = train(&model, &data, &out, config(4), options.clone());
    result.unwrap();
    let mut kept: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("checkpoint"))
        .collect();
    kept.sort();
    assert_eq!(kept, ["checkpoint-3", "checkpoint-4"]);

    // A run killed after step 3 of 4, its older checkpoints pruned, beside a Hugging Face Trainer's
    // checkpoint-1 (no optimizer.safetensors: not nibble's).
    let part = dir.path().join("part");
    copy_folder(&out.join("checkpoint-3"), &part.join("checkpoint-3"));
    std::fs::create_dir_all(part.join("checkpoint-1")).unwrap();
    std::fs::write(part.join("checkpoint-1/trainer_state.json"), "{}").unwrap();
    let resume = RunOptions {
        resume: Some(part.join("checkpoint-3")),
        save_total_limit: Some(1),
        ..options
    };
    let (result, resumed) = train(&model, &data, &part, config(4), resume);
    result.unwrap();
    assert_eq!(resumed.steps, whole.steps[3..].to_vec());
    assert!(part.join("checkpoint-4").is_dir() && !part.join("checkpoint-3").exists());
    assert!(part.join("checkpoint-1/trainer_state.json").is_file());
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
    assert!(err.contains("this run saved no adapter"), "{err}");
    // Resuming repeats the divergence bit for bit (and refuses another --lr): not the advice.
    assert!(
        !err.contains("resume with")
            && err.contains("lower --lr")
            && err.contains("--init-adapter"),
        "{err}"
    );
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
    let train = run::tokenize_file(&tok, &data, &config(5), false).unwrap();
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
    let saved = run::load_adapter(
        &out,
        &model.config,
        (&model.source, Some(&model)),
        "the file run's adapter",
    )
    .unwrap();
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

/// Every file under `dir` with its bytes, to show that a refused run changed nothing.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push((path.clone(), std::fs::read(&path).unwrap()));
            }
        }
    }
    out.sort();
    out
}

fn refused(result: nibble::Result<run::RunSummary>, names: &[&str]) {
    let err = result.unwrap_err().to_string();
    for name in names {
        assert!(err.contains(name), "the error names {name}: {err}");
    }
}

#[test]
fn an_output_folder_belongs_to_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = model_and_data(dir.path());
    let saving = RunOptions {
        save_steps: 1,
        ..Default::default()
    };

    // Files nibble did not write: never a run's folder, with or without --overwrite. A saved
    // tokenizer alone is someone's too, though a run saves one beside its adapter, and so are an
    // options file and a run.json under the names a run writes but not in its words (the user's own
    // nibble_config.toml that --config reads, another tool's run.json).
    for (name, file) in [
        ("theirs", "notes.txt"),
        ("a tokenizer", "tokenizer_config.json"),
        ("their options", "nibble_config.toml"),
        ("their manifest", "run.json"),
    ] {
        let theirs = dir.path().join(name);
        std::fs::create_dir_all(&theirs).unwrap();
        std::fs::write(theirs.join(file), "mine").unwrap();
        for overwrite in [false, true] {
            let options = RunOptions {
                overwrite,
                ..saving.clone()
            };
            let before = snapshot(&theirs);
            refused(train(&model, &data, &theirs, config(2), options).0, &[file]);
            assert_eq!(snapshot(&theirs), before, "nothing there changed");
        }
    }

    // An unfinished run (a checkpoint, no adapter) is neither restarted nor mixed with a new one.
    let out = dir.path().join("out");
    let killed = RunOptions {
        save_steps: 1,
        ..Default::default()
    };
    let (result, _) = train(
        &model,
        &data,
        &out,
        TrainConfig {
            lr: 1e30,
            ..config(4)
        },
        killed,
    );
    result.unwrap_err();
    assert!(out.join("checkpoint-1").is_dir());
    let before = snapshot(&out);
    refused(
        train(&model, &data, &out, config(4), saving.clone()).0,
        &["unfinished run", "checkpoint-1", "--resume"],
    );
    assert_eq!(snapshot(&out), before);

    // --overwrite clears the earlier run's files, so no later --resume finds its checkpoints.
    let overwrite = RunOptions {
        overwrite: true,
        ..Default::default()
    };
    train(&model, &data, &out, config(2), overwrite).0.unwrap();
    assert!(
        !out.join("checkpoint-1").exists(),
        "the old run's checkpoint is gone"
    );

    // A finished run has nothing to resume; --overwrite with --resume is a contradiction.
    let resume = RunOptions {
        resume: Some(out.clone()),
        ..Default::default()
    };
    let before = snapshot(&out);
    refused(
        train(&model, &data, &out, config(2), resume.clone()).0,
        &["finished run", "nothing to resume"],
    );
    let both = RunOptions {
        overwrite: true,
        ..resume
    };
    refused(
        train(&model, &data, &out, config(2), both).0,
        &["--overwrite", "--resume"],
    );
    assert_eq!(snapshot(&out), before);

    // --overwrite never deletes what the run reads: an --init-adapter inside the folder.
    let init = RunOptions {
        overwrite: true,
        init_adapter: Some(out.clone()),
        ..Default::default()
    };
    let before = snapshot(&out);
    refused(
        train(&model, &data, &out, config(2), init).0,
        &["--overwrite would delete"],
    );
    assert_eq!(snapshot(&out), before);

    // Another tool's checkpoint-N/ is not nibble's; a leftover temporary file of nibble's is.
    let hf = dir.path().join("hf");
    std::fs::create_dir_all(hf.join("checkpoint-500")).unwrap();
    std::fs::write(hf.join("checkpoint-500/trainer_state.json"), "{}").unwrap();
    refused(
        train(
            &model,
            &data,
            &hf,
            config(2),
            RunOptions {
                overwrite: true,
                ..Default::default()
            },
        )
        .0,
        &["checkpoint-500", "did not write"],
    );
    assert!(hf.join("checkpoint-500/trainer_state.json").exists());
    let leftover = dir.path().join("leftover");
    std::fs::create_dir_all(&leftover).unwrap();
    std::fs::write(leftover.join(".metrics.jsonl.tmp-4242"), "{").unwrap();
    train(&model, &data, &leftover, config(2), RunOptions::default())
        .0
        .unwrap();

    // While one run holds the folder, a second is refused.
    let busy = dir.path().join("busy");
    let held = RunFolder::claim(&busy, false, None).unwrap();
    refused(
        train(&model, &data, &busy, config(2), RunOptions::default()).0,
        &["in use", &std::process::id().to_string()],
    );
    drop(held);
    assert!(
        !busy.exists(),
        "a folder made for a run that wrote nothing is not left behind"
    );
    train(&model, &data, &busy, config(2), RunOptions::default())
        .0
        .unwrap();
}

#[test]
fn resuming_with_other_settings_is_refused_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = model_and_data(dir.path());
    let out = dir.path().join("out");
    let saving = RunOptions {
        save_steps: 1,
        ..Default::default()
    };
    // A run stopped after its first checkpoint.
    let diverging = TrainConfig {
        lr: 1e30,
        ..config(4)
    };
    train(&model, &data, &out, diverging.clone(), saving.clone())
        .0
        .unwrap_err();
    let resume = RunOptions {
        resume: Some(out.clone()),
        ..saving
    };
    let before = snapshot(&out);
    let other_lr = TrainConfig {
        lr: 1e-3,
        ..diverging.clone()
    };
    refused(
        train(&model, &data, &out, other_lr, resume.clone()).0,
        &["checkpoint-1", "options.lr", "different run"],
    );
    let mut rank = diverging.clone();
    rank.lora.r = 4;
    refused(
        train(&model, &data, &out, rank, resume.clone()).0,
        &["options.lora_r"],
    );
    let other_data = dir.path().join("other.jsonl");
    let text = std::fs::read_to_string(&data)
        .unwrap()
        .replace("Paris.", "Lyon.");
    std::fs::write(&other_data, text).unwrap();
    refused(
        train(&model, &other_data, &out, diverging.clone(), resume.clone()).0,
        &["data.tokens"],
    );
    // Another base model of the same shape.
    let other_model = dir.path().join("other-model");
    let mut spec = nibble::synth::SynthSpec::tiny(nibble::config::Arch::Qwen2, 151936);
    spec.seed = 99;
    nibble::synth::write_model_folder(
        &other_model,
        &spec,
        Some(&nibble::synth::qwen25_tokenizer()),
    )
    .unwrap();
    refused(
        train(&other_model, &data, &out, diverging, resume).0,
        &["model.weights"],
    );
    assert_eq!(snapshot(&out), before, "refused resumes change nothing");
}

/// Ctrl-C in the middle of `nibble train` (delivered twice at once, as `timeout` does): the step under
/// way finishes, a checkpoint is written, the process exits 130 naming it, and `--resume` then ends
/// with the adapter an uninterrupted run saves.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn an_interrupted_run_resumes_to_the_uninterrupted_result() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = model_and_data(dir.path());
    // Steps of every example (6, a batch of them), 12 of them: the signal lands mid-run on any machine.
    let flags = [
        "--max-steps",
        "12",
        "--batch-size",
        "6",
        "--grad-accum",
        "4",
        "--lr",
        "1e-3",
        "--precision",
        "f32",
    ];
    let whole = dir.path().join("whole");
    let out = common::train_cli(&model, &data, &whole, &flags);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let part = dir.path().join("part");
    let child = common::nibble_command()
        .args(common::train_args(&model, &data, &part, &flags))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = part.join("metrics.jsonl");
    let started = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 1 {
        assert!(started.elapsed().as_secs() < 120, "the run never got going");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    // Twice, the second as soon as the first has been taken (the run says so), as `timeout -s INT`
    // delivers it to the process and then to its group: one interruption, which still finishes the
    // step and saves (a second request would quit at once and save nothing).
    let mut child = child;
    let (taken, reader) = common::stderr_lines(&mut child);
    let interrupt = || {
        // SAFETY: kill(2) only sends a signal; the pid is our own child, which has not been waited
        // for, so it cannot have been reused by another process.
        let sent = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
        assert_eq!(sent, 0);
    };
    interrupt();
    while !taken
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("the run answers the interruption")
        .contains("finishing the current step")
    {}
    interrupt();
    let status = child.wait().unwrap();
    let stderr = reader.join().unwrap();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("--resume"), "{stderr}");
    assert!(!part.join("adapter_model.safetensors").exists());
    let checkpoint = nibble::train::newest_checkpoint(&part)
        .unwrap()
        .expect("a checkpoint");
    let step: usize = checkpoint.file_name().unwrap().to_str().unwrap()["checkpoint-".len()..]
        .parse()
        .unwrap();
    assert!((1..12).contains(&step), "stopped at step {step}");
    assert!(
        stderr.contains(&checkpoint.display().to_string()),
        "{stderr}"
    );

    // The metrics up to the checkpoint stay as written, byte for byte.
    let written: String = std::fs::read_to_string(part.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["step"].as_u64().unwrap() as usize <= step
        })
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(!written.is_empty());
    // What runs killed while writing leave (a checkpoint half-written, a file's temporary form) goes
    // when a run takes the folder again; a user's hidden file stays; and a checkpoint left whole
    // under its temporary name (killed between replacing an earlier save of its step and renaming)
    // is named and resumed from.
    let unnamed = part.join(format!(".checkpoint-{step}.tmp"));
    std::fs::rename(&checkpoint, &unnamed).unwrap();
    let stale_checkpoint = part.join(".checkpoint-40.tmp");
    std::fs::create_dir_all(&stale_checkpoint).unwrap();
    std::fs::write(stale_checkpoint.join("adapter_config.json"), "{").unwrap();
    let stale_file = part.join(".metrics.jsonl.tmp-4242");
    std::fs::write(&stale_file, "{").unwrap();
    let users = part.join(".notes.tmp");
    std::fs::write(&users, "mine").unwrap();

    let resume = ["--resume", part.to_str().unwrap()];
    let flags: Vec<&str> = flags.iter().chain(&resume).copied().collect();
    let out = common::train_cli(&model, &data, &part, &flags);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stale_checkpoint.exists() && !stale_file.exists() && !unnamed.exists());
    assert!(checkpoint.join("optimizer.safetensors").is_file());
    let resumed = std::fs::read_to_string(part.join("metrics.jsonl")).unwrap();
    assert!(resumed.starts_with(&written), "{written}\n---\n{resumed}");
    assert_eq!(std::fs::read_to_string(&users).unwrap(), "mine");
    assert_eq!(
        std::fs::read(part.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(whole.join("adapter_model.safetensors")).unwrap(),
        "the interrupted and resumed run saves the uninterrupted run's adapter, bit for bit"
    );
}

#[test]
fn a_run_that_learns_nothing_is_reported_once() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = model_and_data(dir.path());
    // A learning rate of 0 with no dropout: every pass over the same examples gives the same loss. One
    // example per step, all six seen in the first epoch, then again in the second (reshuffled): the loss
    // of each repeats only across epochs, so use a single-example dataset.
    let one = dir.path().join("one.jsonl");
    let first_line = std::fs::read_to_string(&data)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string();
    std::fs::write(&one, first_line + "\n").unwrap();
    let mut frozen = TrainConfig {
        lr: 0.0,
        ..config(8)
    };
    frozen.lora.dropout = 0.0;
    let (result, seen) = train(
        &model,
        &one,
        &dir.path().join("frozen"),
        frozen,
        RunOptions::default(),
    );
    result.unwrap();
    let (steps, why) = seen.stalled.expect("reported");
    assert_eq!(steps, 5);
    assert!(why.contains("loss repeats"), "{why}");

    let (result, learning) = train(
        &model,
        &one,
        &dir.path().join("learning"),
        config(8),
        RunOptions::default(),
    );
    result.unwrap();
    assert!(
        learning.stalled.is_none(),
        "a run that learns is not reported"
    );
}

#[test]
fn a_run_too_large_for_the_gpu_is_refused_before_anything_is_written() {
    let Some(gpu) = common::gpu() else { return };
    eprintln!("device memory: {:?}", gpu.memory());
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = model_and_data(dir.path());
    let output = dir.path().join("run");
    let spec = |gpu_memory| RunSpec {
        model: &model,
        data: std::slice::from_ref(&data),
        output: &output,
        quant: None,
        config: config(1),
        options: RunOptions {
            gpu_memory,
            ..Default::default()
        },
    };
    let refusal = run::run(spec(Some(1 << 20)), Some(&gpu), &mut Recorded::default());
    refused(
        refusal,
        &[
            "a training step of",
            "needs",
            &gpu.info.name,
            "--gpu-memory",
        ],
    );
    assert!(!output.exists(), "a refused run leaves no folder");
    // The same run within a cap that holds it trains.
    let mut seen = Recorded::default();
    run::run(spec(Some(1 << 30)), Some(&gpu), &mut seen).unwrap();
    assert_eq!(seen.steps.len(), 1);
    assert!(output.join("adapter_model.safetensors").exists());
}

/// A continued adapter is planned as it trains, at its own ranks and on its own parameters: a
/// Qwen3-MoE adapter's stacked gate_up_proj at twice its r (its rank_pattern), beside its routers'
/// and experts' pairs (its target_parameters), whatever the run's options say; a device cap between
/// that plan and one at r refuses the run.
#[test]
fn a_continued_mixture_of_experts_adapter_is_planned_at_its_own_ranks() {
    use nibble::graph::checkpoint::Keep;
    let Some(gpu) = common::gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let fixture = Path::new("tests/fixtures/hf_train/qwen3_moe");
    let (model, data) = (fixture.join("model"), fixture.join("data.jsonl"));
    // Shorter than every example.
    let tokens = 16;
    let source = nibble::model::ModelSource::open(&model).unwrap();
    let planned = |rank_pattern: Vec<(String, usize)>| {
        let names = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let input = nibble::plan::PlanInput {
            tokens,
            quant: Some(
                nibble::quant::QuantSpec::new(nibble::quant::QuantFormat::Nf4, 64).unwrap(),
            ),
            lora_rank: 4,
            lora_rank_pattern: rank_pattern,
            lora_targets: names(&["q_proj", "k_proj", "v_proj", "o_proj"]),
            lora_target_parameters: names(&["gate_up_proj", "gate.weight", "down_proj"]),
            lora_dropout: false,
            dora: false,
            checkpoint: false,
            checkpoints: Keep::F32,
            trainable_tokens: 0,
        };
        nibble::plan::plan(&source.config, &input).unwrap().total
    };
    let adapters = planned(vec![(r".*\.gate_up_proj".into(), 8)]);
    let at_r = planned(Vec::new());
    assert!(adapters > at_r, "{adapters} vs {at_r}");
    let base = config(1);
    let spec = RunSpec {
        model: &model,
        data: std::slice::from_ref(&data),
        output: &dir.path().join("run"),
        quant: None,
        config: TrainConfig {
            max_length: tokens,
            lora: nibble::lora::LoraConfig {
                dropout: 0.0,
                ..base.lora.clone()
            },
            ..base
        },
        options: RunOptions {
            gpu_memory: Some((adapters + at_r) / 2),
            init_adapter: Some(fixture.join("init_adapter")),
            ..Default::default()
        },
    };
    refused(
        run::run(spec, Some(&gpu), &mut Recorded::default()),
        &["a training step of 16 tokens", "--gpu-memory"],
    );
}

/// Gradient checkpointing left to nibble (`RunOptions::fit_checkpointing`, as `nibble train` sets it
/// when no checkpointing flag is given): a step that does not fit the device turns it on, with bf16
/// checkpoints where f32 ones do not fit either and offloaded ones where neither does, and run.json
/// records the choice; given the options, the same cap refuses the run.
#[test]
fn a_step_over_the_cap_trains_with_the_checkpointing_that_fits() {
    use nibble::graph::checkpoint::Keep;
    let Some(gpu) = common::gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = model_and_data(dir.path());
    let tokens = 64;
    let config = TrainConfig {
        max_length: tokens,
        ..config(1)
    };
    let source = nibble::model::ModelSource::open(&model).unwrap();
    let planned = |checkpoint, checkpoints| {
        let input = nibble::plan::PlanInput {
            tokens,
            quant: Some(
                nibble::quant::QuantSpec::new(nibble::quant::QuantFormat::Nf4, 64).unwrap(),
            ),
            lora_rank: config.lora.r,
            lora_rank_pattern: Vec::new(),
            lora_targets: config.lora.targets.clone(),
            lora_target_parameters: Vec::new(),
            lora_dropout: config.lora.dropout > 0.0,
            dora: config.lora.use_dora,
            checkpoint,
            checkpoints,
            trainable_tokens: 0,
        };
        nibble::plan::plan(&source.config, &input).unwrap().total
    };
    let (bf16, f32) = (planned(true, Keep::Bf16), planned(true, Keep::F32));
    assert!(bf16 < f32 && f32 < planned(false, Keep::F32));
    let cap = (bf16 + f32) / 2;
    let run = |output: &str, cap, fit_checkpointing, resume: Option<PathBuf>| {
        let spec = RunSpec {
            model: &model,
            data: std::slice::from_ref(&data),
            output: &dir.path().join(output),
            quant: None,
            config: TrainConfig {
                max_steps: Some(2),
                ..config.clone()
            },
            options: RunOptions {
                gpu_memory: Some(cap),
                packing: true,
                fit_checkpointing,
                save_steps: 1,
                resume,
                ..Default::default()
            },
        };
        run::run(spec, Some(&gpu), &mut Recorded::default())
    };
    refused(
        run("given", cap, None, None),
        &["a training step of 64 tokens", "--gpu-memory"],
    );
    let nibbles = Some(Keep::Bf16Host);
    run("fitted", cap, nibbles, None).unwrap();
    let manifest = std::fs::read_to_string(dir.path().join("fitted/run.json")).unwrap();
    let manifest: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    assert_eq!(manifest["options"]["bf16_checkpoints"], true);
    // Resumed where everything fits, the run keeps the checkpoints it recorded.
    let checkpoint = dir.path().join("fitted/checkpoint-1");
    run("resumed", 1 << 30, nibbles, Some(checkpoint)).unwrap();
    if !gpu.can_offload() {
        // OpenGL (where no Vulkan driver is installed) maps no device buffer into host memory.
        eprintln!(
            "skipping the offloaded runs: {} ({:?}) cannot offload",
            gpu.info.name, gpu.info.backend
        );
        return;
    }
    // Under a cap that only offloaded checkpoints meet, they are what the run trains with.
    let offloaded = planned(true, Keep::Bf16Host);
    assert!(offloaded < bf16, "{offloaded} vs {bf16}");
    let cap = (offloaded + bf16) / 2;
    // `--offload-checkpoints false` keeps nibble from offloading.
    refused(
        run("kept on the device", cap, Some(Keep::Bf16), None),
        &["a training step of 64 tokens", "--gpu-memory"],
    );
    assert_eq!(gpu.host_scratch_bytes(), 0, "nothing was offloaded before");
    run("offloaded", cap, nibbles, None).unwrap();
    assert!(gpu.host_scratch_bytes() > 0, "the run offloaded nothing");
    // Under a cap nothing meets, the error is the least memory tried, and offers only what was not.
    let err = run("nothing fits", offloaded / 2, nibbles, None)
        .expect_err("nothing fits")
        .to_string();
    let least = nibble::alloc::human_bytes(offloaded);
    assert!(
        err.contains(&format!("needs {least}"))
            && err.contains("a smaller --max-length")
            && !err.contains("--offload-checkpoints")
            && !err.contains("--quant"),
        "{err}"
    );
    let manifest = std::fs::read_to_string(dir.path().join("offloaded/run.json")).unwrap();
    let manifest: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    assert_eq!(manifest["options"]["bf16_checkpoints"], true);
}

/// The training prompts with other answers: a validation set whose loss soon rises.
fn contradicting_eval(dir: &Path) -> PathBuf {
    let path = dir.join("eval.jsonl");
    let rows = chat_rows(&[
        ("Name three colours.", "Cyan, ochre and teal, obviously."),
        ("What is 2+2?", "Seventeen, said the machine."),
        ("Say hello.", "Goodbye forever, friend."),
    ]);
    std::fs::write(&path, rows).unwrap();
    path
}

/// The evaluation losses metrics.jsonl holds, by step.
fn eval_losses(out: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| Some((v["step"].as_u64()?, v["eval_loss"].as_f64()?)))
        .collect()
}

/// Early stopping in a finished run continued for more steps: the validation the first run made at
/// its last step, off the --eval-steps schedule, is not one the longer run makes, so the continued
/// run stops where the longer run trained straight stops, with the same adapter.
#[test]
fn a_continued_run_stops_early_where_the_straight_run_does() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = model_and_data(dir.path());
    let options = RunOptions {
        eval_data: Some(contradicting_eval(dir.path())),
        eval_steps: 2,
        save_steps: 1,
        early_stopping_patience: Some(2),
        ..Default::default()
    };
    let constant = |steps| TrainConfig {
        schedule: nibble::train::schedule::Schedule::Constant,
        lr: 2e-2,
        ..config(steps)
    };
    let straight = dir.path().join("straight");
    let (result, seen) = train(&model, &data, &straight, constant(60), options.clone());
    result.unwrap();
    let evals = eval_losses(&straight);
    let (best, _) = evals
        .iter()
        .copied()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap();
    let stop = seen.steps.last().unwrap().0 as u64;
    assert_eq!(
        stop,
        best + 4,
        "two validations, two steps apart, after the best"
    );

    // A first run ends one step after the best, validating there off the schedule.
    let out = dir.path().join("out");
    let first = best as usize + 1;
    train(&model, &data, &out, constant(first), options.clone())
        .0
        .unwrap();
    let first_evals = eval_losses(&out);
    let (last_step, last_loss) = *first_evals.last().unwrap();
    assert_eq!(last_step, first as u64);
    let best_loss = evals.iter().find(|e| e.0 == best).unwrap().1;
    assert!(
        last_loss > best_loss,
        "the off-schedule validation did not improve"
    );
    let resume = RunOptions {
        resume: Some(out.clone()),
        ..options
    };
    let (result, continued) = train(&model, &data, &out, constant(60), resume);
    result.unwrap();
    assert_eq!(continued.steps.last().unwrap().0 as u64, stop);
    let adapter = |dir: &Path| std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    assert_eq!(adapter(&out), adapter(&straight));
}

/// `--early-stopping-patience 2` (issue 19): validated on the training prompts with other answers, the
/// validation loss soon rises; the run stops two validations after its lowest, says so in
/// metrics.jsonl, and saves that lowest validation's adapter (the checkpoint of that step, byte for
/// byte); resumed between the best and the stop, it ends the same way.
#[test]
fn early_stopping_saves_the_best_validation_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = model_and_data(dir.path());
    let out = dir.path().join("out");
    let options = RunOptions {
        eval_data: Some(contradicting_eval(dir.path())),
        eval_steps: 1,
        save_steps: 1,
        early_stopping_patience: Some(2),
        ..Default::default()
    };
    let mut config = config(60);
    config.lr = 2e-2;
    let (result, seen) = train(&model, &data, &out, config.clone(), options.clone());
    result.unwrap();
    let metrics: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (best_step, _) = eval_losses(&out)
        .iter()
        .copied()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap();
    let stop = metrics
        .iter()
        .find(|v| v["stopped_early"] == true)
        .expect("the run stopped early");
    let last = seen.steps.last().unwrap().0 as u64;
    assert!(last < 60, "stopped at step {last}");
    assert_eq!(stop["best_step"].as_u64(), Some(best_step));
    assert_eq!(last, best_step + 2, "two validations after the best");
    let adapter = |dir: &Path| std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    assert_eq!(
        adapter(&out),
        adapter(&out.join(format!("checkpoint-{best_step}")))
    );
    assert_ne!(
        adapter(&out),
        adapter(&out.join(format!("checkpoint-{last}")))
    );

    // Killed after the step following the best and resumed: the best adapter comes from its
    // checkpoint, and the run stops where the uninterrupted one did, saving the same adapter.
    let part = dir.path().join("part");
    for kept in [best_step, best_step + 1] {
        let name = format!("checkpoint-{kept}");
        copy_folder(&out.join(&name), &part.join(&name));
    }
    // The metrics as the killed run left them (resuming keeps those up to its checkpoint).
    std::fs::copy(out.join("metrics.jsonl"), part.join("metrics.jsonl")).unwrap();
    let resume = RunOptions {
        resume: Some(part.clone()),
        ..options
    };
    let (result, resumed) = train(&model, &data, &part, config.clone(), resume.clone());
    result.unwrap();
    assert_eq!(resumed.steps.last().unwrap().0 as u64, last);
    assert_eq!(adapter(&part), adapter(&out));

    // A run that stopped early has nothing to resume, even asked for more steps: refused, with
    // nothing written (its best adapter stays).
    let before = snapshot(&out);
    let longer = TrainConfig {
        max_steps: Some(80),
        ..config
    };
    let again = RunOptions {
        resume: Some(out.clone()),
        ..resume
    };
    refused(
        train(&model, &data, &out, longer, again).0,
        &["stopped early", "nothing to resume"],
    );
    assert_eq!(snapshot(&out), before);
}

/// LoftQ (`--init-lora-weights loftq`): each new pair's s·B·A is the best rank-r approximation of its
/// weight's 4-bit quantization error, so the 4-bit model with the adapter starts nearer the 16-bit
/// model than without it, at any lora_alpha (weights and logits); at lr 0 the run saves it as
/// computed, and a resumed run goes on with it. Refused where there is no error to approximate.
#[test]
fn loftq_starts_the_4_bit_model_nearer_its_original_weights() {
    use nibble::lora::{LoraAdapter, LoraInit};
    use nibble::model::{ModelSource, QuantRequest};
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = model_and_data(dir.path());
    let options = RunOptions {
        init_lora: LoraInit::Loftq,
        save_steps: 1,
        ..Default::default()
    };
    let source = ModelSource::open(&model).unwrap();
    let dense = source.load(Some(QuantRequest::Dense)).unwrap();
    let nf4 = source.load(None).unwrap();
    assert!(nf4.quant.is_some(), "a folder loads 4-bit by default");
    let mut rng = nibble::rng::Rng::new(5);
    let ids: Vec<u32> = (0..24).map(|_| rng.below(1000) as u32).collect();
    let reference = nibble::cpu::logits(&dense, None, &ids).unwrap();
    let plain = common::rel(&nibble::cpu::logits(&nf4, None, &ids).unwrap(), &reference);
    let weights = |m: &nibble::model::Model| -> std::collections::HashMap<String, Vec<f32>> {
        m.named_tensors()
            .into_iter()
            .filter_map(|(name, t)| match t {
                nibble::model::TensorRef::Linear(w) => Some((name, w.to_f32())),
                _ => None,
            })
            .collect()
    };
    let (originals, quantized) = (weights(&dense), weights(&nf4));
    for alpha in [16.0, 3.0] {
        let out = dir.path().join(format!("loftq-{alpha}"));
        let mut config = config(1);
        config.lr = 0.0;
        config.lora.alpha = alpha;
        train(&model, &data, &out, config, options.clone())
            .0
            .unwrap();
        let files = nibble::source::ModelFiles::Dir(out.clone());
        let adapter = LoraAdapter::load_peft(&files, &nf4.config).unwrap();
        let (mut before, mut after) = (0.0, 0.0);
        for (path, pair) in adapter.pairs() {
            let name = format!("{path}.weight");
            let (w, q) = (&originals[&name], &quantized[&name]);
            let s = adapter.config.scale_of(path) as f64;
            for (row, (wr, qr)) in w
                .chunks(pair.in_features)
                .zip(q.chunks(pair.in_features))
                .enumerate()
            {
                for (col, (&w, &q)) in wr.iter().zip(qr).enumerate() {
                    let ba: f64 = (0..pair.rank)
                        .map(|k| {
                            pair.b[row * pair.rank + k] as f64
                                * pair.a[k * pair.in_features + col] as f64
                        })
                        .sum();
                    before += (w as f64 - q as f64).powi(2);
                    after += (w as f64 - q as f64 - s * ba).powi(2);
                }
            }
        }
        // Rank 8 of widths 64 to 256: the leading directions of a noise-like error carry more than
        // their count's share of it. Measured: 0.659 of the error remains and the logits are 0.72
        // as far from the 16-bit model's, at either alpha.
        assert!(
            after < 0.75 * before,
            "alpha {alpha}: {after} of {before} remains"
        );
        let adapted = common::rel(
            &nibble::cpu::logits(&nf4, Some(&adapter), &ids).unwrap(),
            &reference,
        );
        assert!(
            adapted < 0.85 * plain,
            "alpha {alpha}: logits off by {adapted}, {plain} without"
        );
        let manifest = std::fs::read_to_string(out.join("run.json")).unwrap();
        assert!(
            manifest.contains("\"init_lora_weights\":\"loftq\""),
            "{manifest}"
        );
    }

    // A resume recomputes the same start, so the run is the one it resumes.
    let out = dir.path().join("resumed");
    let mut two = config(2);
    two.lr = 1e-3;
    train(&model, &data, &out, config(1), options.clone())
        .0
        .unwrap();
    let resume = RunOptions {
        resume: Some(out.clone()),
        ..options.clone()
    };
    let (result, resumed) = train(&model, &data, &out, two, resume);
    result.unwrap();
    assert_eq!(resumed.started_at, Some((1, 2)), "went on from step 1");

    // A rank past a module's own width takes all of its error (the rest of A and B zero).
    let out = dir.path().join("full");
    let mut wide = config(1);
    wide.lr = 0.0;
    wide.lora.r = 300;
    train(&model, &data, &out, wide, options.clone()).0.unwrap();
    let files = nibble::source::ModelFiles::Dir(out);
    let adapter = LoraAdapter::load_peft(&files, &nf4.config).unwrap();
    for (path, pair) in adapter.pairs() {
        let name = format!("{path}.weight");
        let (w, q) = (&originals[&name], &quantized[&name]);
        let s = adapter.config.scale_of(path) as f64;
        let (mut error, mut left) = (0.0, 0.0);
        for (i, (&w, &q)) in w.iter().zip(q).enumerate() {
            let (row, col) = (i / pair.in_features, i % pair.in_features);
            let ba: f64 = (0..pair.rank)
                .map(|k| {
                    pair.b[row * pair.rank + k] as f64 * pair.a[k * pair.in_features + col] as f64
                })
                .sum();
            error += (w as f64 - q as f64).powi(2);
            left += (w as f64 - q as f64 - s * ba).powi(2);
        }
        assert!(
            left < 1e-6 * error,
            "{path}: {left} of {error} left at full rank"
        );
    }

    let refused_with = |spec_quant: Option<nibble::model::QuantRequest>, extra: RunOptions| {
        let data = [data.clone()];
        let spec = RunSpec {
            model: &model,
            data: &data,
            output: &dir.path().join("refused"),
            quant: spec_quant,
            config: config(1),
            options: extra,
        };
        run::run(spec, None, &mut Recorded::default())
            .unwrap_err()
            .to_string()
    };
    let e = refused_with(Some(QuantRequest::Dense), options.clone());
    assert!(e.contains("--quant none"), "{e}");
    let e = refused_with(
        None,
        RunOptions {
            init_adapter: Some(dir.path().join("loftq-16")),
            ..options.clone()
        },
    );
    assert!(e.contains("--init-adapter"), "{e}");
    assert!(!dir.path().join("refused").exists());
}

/// A run resumed into another folder than its checkpoint's starts that folder's metrics with the
/// steps its own run recorded up to the checkpoint (as transformers' checkpoints carry their log
/// history): the new folder's metrics.jsonl is the uninterrupted run's, step for step.
#[test]
fn a_run_resumed_elsewhere_carries_its_metrics_along() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = model_and_data(dir.path());
    let saving = RunOptions {
        save_steps: 1,
        ..Default::default()
    };
    let first = dir.path().join("first");
    train(&model, &data, &first, config(3), saving.clone())
        .0
        .unwrap();
    let elsewhere = dir.path().join("elsewhere");
    let resume = RunOptions {
        resume: Some(first.join("checkpoint-1")),
        ..saving
    };
    train(&model, &data, &elsewhere, config(3), resume)
        .0
        .unwrap();
    let losses = |run: &Path| -> Vec<(u64, f64)> {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter_map(|v| Some((v["step"].as_u64()?, v["loss"].as_f64()?)))
            .collect()
    };
    assert_eq!(losses(&elsewhere), losses(&first));
    assert_eq!(losses(&first).len(), 3);
}

/// `--trainable-tokens`: a run training the chat markers' rows (and one byte's) beside the LoRA
/// matrices saves them as PEFT's trainable tokens (a list: the model is tied), resumes bit for bit
/// where an uninterrupted run ends, and its adapter evaluates (`nibble eval`, which puts the rows in
/// place) to the loss the run's last validation gave on the same data.
#[test]
fn a_run_training_token_rows_resumes_and_evaluates_as_it_trained() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = model_and_data(dir.path());
    let options = RunOptions {
        save_steps: 2,
        eval_data: Some(data.clone()),
        trainable_tokens: Some("<|im_start|>, <|im_end|>,40".into()),
        ..Default::default()
    };
    let whole = dir.path().join("whole");
    let (result, uninterrupted) = train(&model, &data, &whole, config(4), options.clone());
    result.unwrap();
    let config_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(whole.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        config_json["trainable_token_indices"],
        serde_json::json!([151644, 151645, 40])
    );
    let key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta";
    let saved = nibble::source::SafetensorsFile::open(&whole.join("adapter_model.safetensors"))
        .unwrap()
        .read_f32(key)
        .unwrap();
    let base = nibble::model::ModelSource::open(&model)
        .unwrap()
        .load(Some(nibble::model::QuantRequest::Dense))
        .unwrap();
    let hidden = base.config.hidden_size;
    let mut row = vec![0f32; hidden];
    for (i, id) in [151644usize, 151645, 40].into_iter().enumerate() {
        base.embed.row_f32(id, &mut row);
        let trained = &saved[i * hidden..(i + 1) * hidden];
        let moved = trained.iter().zip(&row).filter(|(a, b)| a != b).count();
        assert!(
            moved > hidden / 2,
            "row of {id}: {moved} of {hidden} values trained"
        );
    }

    let part = dir.path().join("part");
    copy_folder(&whole.join("checkpoint-2"), &part.join("checkpoint-2"));
    let resume = RunOptions {
        resume: Some(part.clone()),
        ..options
    };
    let (result, resumed) = train(&model, &data, &part, config(4), resume);
    result.unwrap();
    assert_eq!(resumed.steps, uninterrupted.steps[2..].to_vec());
    assert_eq!(
        std::fs::read(part.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(whole.join("adapter_model.safetensors")).unwrap()
    );

    let last_eval = std::fs::read_to_string(whole.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["eval_loss"].as_f64())
        .next_back()
        .unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let o = common::nibble(&[
        "eval",
        "--model",
        &s(&model),
        "--adapter",
        &s(&whole),
        "--data",
        &s(&data),
        "--device",
        "cpu",
        "--precision",
        "f32",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let loss = v["loss"].as_f64().unwrap();
    assert!(
        (loss - last_eval).abs() / last_eval < 1e-6,
        "nibble eval {loss} vs the run's last validation {last_eval}"
    );
}
