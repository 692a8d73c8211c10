//! One training run, as `nibble train` does it, for every caller: the overwrite guard, loading the model
//! while the data is read and tokenized, the validation split, packing, an initial adapter, resuming,
//! the metrics file, evaluation cadence, checkpoints, the PEFT folder and the loss curve. Progress
//! reaches the caller through an `Observer` (a terminal's progress bar, log lines).

use crate::cpu::Sequence;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::lora::LoraAdapter;
use crate::model::{self, QuantRequest};
use crate::tokenizer::ChatTokenizer;
use crate::train::{self, StepRecord, TrainConfig, Trainer};
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};

/// What a run does beyond the training configuration.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Replace a finished run in the output folder.
    pub overwrite: bool,
    /// Write a checkpoint every this many optimizer steps (0: none).
    pub save_steps: usize,
    /// Continue from the newest complete checkpoint in this folder.
    pub resume: Option<PathBuf>,
    /// Start from this PEFT adapter (its r, alpha and targets apply).
    pub init_adapter: Option<PathBuf>,
    /// Validation examples from their own file...
    pub eval_data: Option<PathBuf>,
    /// ...or this fraction of the training examples, held out.
    pub eval_split: Option<f64>,
    /// Validate every this many steps (0: at the end of each epoch and of the run).
    pub eval_steps: usize,
    /// Pack several examples into each sequence of at most `max_length` tokens.
    pub packing: bool,
}

/// A whole run: which model, data and output folder, with which configuration.
pub struct RunSpec<'a> {
    pub model: &'a Path,
    pub data: &'a Path,
    pub output: &'a Path,
    pub quant: Option<QuantRequest>,
    pub config: TrainConfig,
    pub options: RunOptions,
}

/// What a run reports as it goes. Every method has an empty default.
pub trait Observer {
    /// The trainer is ready: `trainer.step` steps are done (a resumed run), of `trainer.total_steps`.
    fn started(&mut self, _trainer: &Trainer) {}
    /// An optimizer step finished (its record is already in metrics.jsonl).
    fn stepped(&mut self, _record: &StepRecord) {}
    /// The validation loss after `step`.
    fn evaluated(&mut self, _step: usize, _loss: f64) {}
    /// The adapter is saved; the run is over.
    fn finished(&mut self) {}
}

/// The losses of a run's first and last steps.
#[derive(Clone, Copy, Debug)]
pub struct RunSummary {
    pub first_loss: f64,
    pub last_loss: f64,
}

/// Runs `spec` on the GPU executor when `gpu` is given, else on the CPU executor.
pub fn run(spec: RunSpec, gpu: Option<&Gpu>, observer: &mut dyn Observer) -> Result<RunSummary> {
    let RunSpec {
        model: path,
        data,
        output,
        quant,
        config,
        options: run,
    } = spec;
    if output.join("adapter_model.safetensors").exists() && !run.overwrite && run.resume.is_none() {
        return Err(Error::Invalid(format!(
            "{} already holds a finished run (adapter_model.safetensors); pass --overwrite to replace it",
            output.display()
        )));
    }
    let source = model::open(path)?;
    // The weights load (reading and quantizing, on the worker threads) while this thread reads the
    // tokenizer and the data.
    let (model, data) = std::thread::scope(|s| {
        let loading = s.spawn(|| source.load(quant));
        let data = (|| -> Result<_> {
            let tok = ChatTokenizer::from_files(&source.tokenizer, Path::new(source.label()))?;
            let sequences = tokenize_file(&tok, data, &config)?;
            let eval_sequences = match &run.eval_data {
                Some(file) => tokenize_file(&tok, file, &config)?,
                None => Vec::new(),
            };
            Ok((sequences, eval_sequences))
        })();
        (loading.join(), data)
    });
    let (mut sequences, mut eval_sequences) = data?;
    let model = model.map_err(|_| Error::Invalid("loading the model panicked".into()))??;
    if let Some(fraction) = run.eval_split {
        eval_sequences = hold_out(&mut sequences, fraction, config.seed)?;
        log::info!(
            "holding out {} of {} examples for validation",
            eval_sequences.len(),
            eval_sequences.len() + sequences.len()
        );
    }
    if run.packing {
        let examples = sequences.len();
        sequences = crate::cpu::pack(sequences, config.max_length);
        log::info!(
            "packed {examples} examples into {} sequences of at most {} tokens",
            sequences.len(),
            config.max_length
        );
    }
    let mut config = config;
    let init = match &run.init_adapter {
        Some(dir) => {
            let mut adapter = load_adapter(dir, &model.config, "--init-adapter")?;
            // The adapter's r, alpha and targets apply; dropout is a training option.
            adapter.config.dropout = config.lora.dropout;
            config.lora = adapter.config.clone();
            Some(adapter)
        }
        None => None,
    };
    log::info!("training configuration: {config:?}");
    std::fs::create_dir_all(output).map_err(|e| Error::io(output, e))?;
    let metrics_path = output.join("metrics.jsonl");
    let per_step = config.batch_size * config.grad_accum;
    let steps_per_epoch = sequences.len().div_ceil(per_step.max(1));
    let mut trainer = Trainer::new(&model, config, sequences, init)?;
    if let Some(dir) = &run.resume {
        let checkpoint = train::newest_checkpoint(dir)?.ok_or_else(|| {
            Error::Invalid(format!(
                "{} holds no complete checkpoint to resume from",
                dir.display()
            ))
        })?;
        trainer.restore(&checkpoint)?;
        truncate_metrics(&metrics_path, trainer.step)?;
        log::info!(
            "resuming from {} at step {}",
            checkpoint.display(),
            trainer.step
        );
    } else {
        std::fs::write(&metrics_path, "").map_err(|e| Error::io(&metrics_path, e))?;
    }
    let mut metrics = std::fs::OpenOptions::new()
        .append(true)
        .open(&metrics_path)
        .map_err(|e| Error::io(&metrics_path, e))?;
    let executor = match gpu {
        Some(gpu) => {
            trainer.use_gpu(gpu)?;
            format!("GPU executor on {}", gpu.info.name)
        }
        None => format!("CPU executor, {:?}", trainer.config.precision),
    };
    log::info!(
        "training {} LoRA parameters for {} steps on {} examples ({executor})",
        trainer.adapter.parameter_count(),
        trainer.total_steps,
        trainer.examples(),
    );
    observer.started(&trainer);
    let (mut first, mut last) = (None, 0.0);
    while !trainer.done() {
        let record = trainer.step().map_err(|e| {
            let hint = match train::newest_checkpoint(output).ok().flatten() {
                Some(c) => format!(
                    "the last good checkpoint is {}; resume with --resume {}",
                    c.display(),
                    output.display()
                ),
                None => "no checkpoint was written (see --save-steps)".to_string(),
            };
            Error::Invalid(format!("{e}; no adapter was saved; {hint}"))
        })?;
        writeln!(metrics, "{}", record.to_json()).map_err(|e| Error::io(&metrics_path, e))?;
        observer.stepped(&record);
        first.get_or_insert(record.loss);
        last = record.loss;
        let eval_due = if run.eval_steps > 0 {
            record.step % run.eval_steps == 0
        } else {
            record.step % steps_per_epoch == 0
        };
        if !eval_sequences.is_empty() && (eval_due || trainer.done()) {
            let (loss_sum, tokens) = trainer.evaluate(&eval_sequences)?;
            let loss = loss_sum / tokens.max(1) as f64;
            let line = json!({"step": record.step, "epoch": record.epoch, "eval_loss": loss,
                              "eval_perplexity": loss.exp(), "eval_tokens": tokens});
            writeln!(metrics, "{line}").map_err(|e| Error::io(&metrics_path, e))?;
            observer.evaluated(record.step, loss);
        }
        if run.save_steps > 0 && record.step % run.save_steps == 0 {
            trainer.save_checkpoint(output, source.label())?;
        }
    }
    trainer.sync()?;
    train::save_peft(&trainer.adapter, output, source.label())?;
    crate::plot::write_loss_curve(&metrics_path, &output.join("loss_curve.png"))?;
    observer.finished();
    Ok(RunSummary {
        first_loss: first.unwrap_or(last),
        last_loss: last,
    })
}

/// A PEFT adapter folder given by `flag`, checked against the model's shapes.
pub fn load_adapter(
    dir: &Path,
    config: &crate::config::ModelConfig,
    flag: &str,
) -> Result<LoraAdapter> {
    LoraAdapter::load_peft(&crate::source::ModelFiles::Dir(dir.to_path_buf()), config)
        .map_err(|e| Error::Invalid(format!("{flag} {}: {e}", dir.display())))
}

/// Keeps the metrics of steps up to `step` (complete lines only: a killed run may leave half a line).
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let kept: String = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["step"].as_u64().is_some_and(|s| s as usize <= step))
        .map(|v| format!("{v}\n"))
        .collect();
    crate::fsutil::write_atomically(path, |tmp| std::fs::write(tmp, kept))
}

/// Reads and tokenizes a JSONL file; errors name the file and example.
pub fn tokenize_file(
    tok: &ChatTokenizer,
    file: &Path,
    config: &TrainConfig,
) -> Result<Vec<Sequence>> {
    let examples = crate::data::read_jsonl(file)?;
    let mut sequences = Vec::with_capacity(examples.len());
    let mut cut = 0;
    for (i, ex) in examples.iter().enumerate() {
        let (seq, c) = train::tokenize(tok, ex, config.loss_on, config.max_length)
            .map_err(|e| Error::Invalid(format!("{}: example {}: {e}", file.display(), i + 1)))?;
        if seq.target_count() == 0 {
            return Err(Error::Invalid(format!(
                "{}: example {} has no label tokens (nothing to learn from{})",
                file.display(),
                i + 1,
                if c > 0 {
                    "; --max-length cut them off"
                } else {
                    ""
                }
            )));
        }
        cut += usize::from(c > 0);
        sequences.push(seq);
    }
    if cut > 0 {
        log::warn!(
            "{}: {cut} examples were longer than --max-length {} and were cut (the start is kept)",
            file.display(),
            config.max_length
        );
    }
    Ok(sequences)
}

/// Moves a seeded random `fraction` of `sequences` (at least one, leaving at least one) into the
/// returned validation set.
fn hold_out(sequences: &mut Vec<Sequence>, fraction: f64, seed: u64) -> Result<Vec<Sequence>> {
    let n = sequences.len();
    let held = ((fraction * n as f64).round() as usize).max(1);
    if held >= n {
        return Err(Error::Invalid(format!(
            "--eval-split {fraction} leaves no training examples out of {n}"
        )));
    }
    let mut rng = crate::rng::Rng::new(seed ^ 0x0E7A_15E7);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mut chosen = order[..held].to_vec();
    // Removing from the back keeps the remaining indices valid.
    chosen.sort_unstable_by(|a, b| b.cmp(a));
    let mut eval: Vec<_> = chosen.iter().map(|&i| sequences.remove(i)).collect();
    eval.reverse();
    Ok(eval)
}
