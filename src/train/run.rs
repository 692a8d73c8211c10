//! One training run, as `nibble train` does it, for every caller: the overwrite guard, loading the model
//! while the data is read and tokenized, the validation split, packing, an initial adapter, resuming,
//! the metrics file, evaluation cadence, checkpoints, the PEFT folder and the loss curve. Progress
//! reaches the caller through an `Observer` (a terminal's progress bar, log lines).

use crate::cpu::Sequence;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::lora::LoraAdapter;
use crate::model::{FrozenWeights, Model, QuantRequest};
use crate::shared::Shared;
use crate::tokenizer::ChatTokenizer;
use crate::train::{self, StepRecord, TrainConfig, Trainer};
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};

/// One of `--sample-prompts`: its text, and for an image run the control images an edit LoRA
/// is shown on (None: the first training image's; empty: none).
#[derive(Clone, Debug, PartialEq)]
pub struct SamplePrompt {
    pub text: String,
    pub control: Option<Vec<PathBuf>>,
}

/// What a run does beyond the training configuration.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Replace a finished run in the output folder.
    pub overwrite: bool,
    /// Write a checkpoint every this many optimizer steps (0: none).
    pub save_steps: usize,
    /// Write a checkpoint at the end of each epoch too.
    pub save_each_epoch: bool,
    /// Keep only this many of the newest checkpoints, deleting older ones as new ones are written.
    pub save_total_limit: Option<usize>,
    /// The run's options as an options file (`TrainSettings::record`), written to the output folder as
    /// `RECORD_FILE` beside metrics.jsonl and run.json, once the model and data have loaded.
    pub record: Option<String>,
    /// Continue from the newest complete checkpoint in this folder.
    pub resume: Option<PathBuf>,
    /// Start from this PEFT adapter (its r, alpha and targets apply).
    pub init_adapter: Option<PathBuf>,
    /// How a new adapter starts (`LoraInit`); LoftQ's is computed by `run` from the model's source
    /// and handed to the run as `initial`.
    pub init_lora: crate::lora::LoraInit,
    /// The adapter a new run starts from, made by the caller (LoftQ's).
    pub initial: Option<LoraAdapter>,
    /// Validation examples from their own file...
    pub eval_data: Option<PathBuf>,
    /// ...or this fraction of the training examples, held out.
    pub eval_split: Option<f64>,
    /// Validate every this many steps (0: at the end of each epoch and of the run).
    pub eval_steps: usize,
    /// Validate before the first step too (transformers' `eval_on_start`): the untrained adapter's
    /// loss, at step 0, which early stopping does not count (as transformers sets no best metric
    /// from it).
    pub eval_on_start: bool,
    /// `--trainable-tokens` as given: token ids or texts, which the model's tokenizer resolves into
    /// `TrainConfig::trainable_tokens`.
    pub trainable_tokens: Option<String>,
    /// Stop once this many validations in a row have not lowered the validation loss, and save the
    /// adapter of the best one (also when the run ends without stopping).
    pub early_stopping_patience: Option<usize>,
    /// Prompts answered greedily (up to `SAMPLE_TOKENS` tokens) as the run goes, into the log and
    /// samples.jsonl: each a user turn through the chat template (an image run draws them).
    pub sample_prompts: Vec<SamplePrompt>,
    /// Answer them every this many steps (0: when validating, or at the end of each epoch without
    /// validation data), and at the end of the run.
    pub sample_steps: usize,
    /// Conversations render through this template instead of the model's; the adapter folder keeps
    /// it (chat_template.jinja), so that what loads the adapter chats the way it was trained.
    pub chat_template: Option<crate::tokenizer::TemplateChoice>,
    /// The tokenizer's eos token in place of its own (TRL's `eos_token`): what text rows and
    /// completions end with, and what chat templates see as `eos_token`.
    pub eos_token: Option<String>,
    /// Pack several examples into each sequence of at most `max_length` tokens.
    pub packing: bool,
    /// How (`PackingStrategy`).
    pub packing_strategy: crate::cpu::PackingStrategy,
    /// The device memory the run may use, in bytes, where less than the driver reports.
    pub gpu_memory: Option<u64>,
    /// Gradient checkpointing left to nibble, up to this kind (`Keep::ALL`): a step that would not fit
    /// turns it on, then keeps the checkpoints in bf16, then offloads them (a GPU with memory of its
    /// own), as `nibble plan --budget` assumes. None: the flags fixed it.
    pub fit_checkpointing: Option<crate::graph::checkpoint::Keep>,
}

impl RunOptions {
    /// Whether packing splits or wraps examples, cutting them itself to the sequence length.
    fn packing_cuts(&self) -> bool {
        self.packing && self.packing_strategy != crate::cpu::PackingStrategy::Bfd
    }

    /// How the training data is tokenized under `config`: uncut where packing cuts examples itself.
    pub fn tokenizing(&self, config: &TrainConfig) -> TrainConfig {
        match self.packing_cuts() {
            true => TrainConfig {
                max_length: usize::MAX,
                ..config.clone()
            },
            false => config.clone(),
        }
    }

    /// Whether a step's micro-batch is one padding-free row, as TRL's best-fit packing makes it.
    fn padding_free(&self) -> bool {
        self.packing && self.packing_strategy != crate::cpu::PackingStrategy::Wrapped
    }
}

/// A whole run: which model, data and output folder, with which configuration.
pub struct RunSpec<'a> {
    pub model: &'a Path,
    /// The data files, one dataset read one after the other (TRL's mixture of datasets).
    pub data: &'a [std::path::PathBuf],
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
    /// A validation pass over `examples` examples begins.
    fn validating(&mut self, _examples: usize) {}
    /// The validation loss after `step`.
    fn evaluated(&mut self, _step: usize, _loss: f64) {}
    /// The adapter is saved; the run is over.
    fn finished(&mut self) {}
    /// Nothing has been learned for `steps` steps in a row: `why` says what was seen (zero gradients, or
    /// the same loss on the same examples). Told once per run.
    fn stalled(&mut self, _steps: usize, _why: &str) {}
    /// Asked before each step: true stops the run there, with a checkpoint of the steps so far.
    fn stop_requested(&mut self) -> bool {
        false
    }
}

/// The losses of a run's first and last steps.
#[derive(Clone, Copy, Debug)]
pub struct RunSummary {
    pub first_loss: f64,
    pub last_loss: f64,
}

/// Tokenized examples: what a run trains on, and what it validates on.
pub struct RunData {
    pub train: Vec<Sequence>,
    /// Validation examples from their own file (empty: none, or `eval_split` holds some out).
    pub eval: Vec<Sequence>,
}

/// Where a run writes: metrics.jsonl, checkpoints, the PEFT folder and the loss curve.
struct RunOutput {
    dir: PathBuf,
    metrics_path: PathBuf,
    metrics: std::fs::File,
    /// The same numbers for TensorBoard.
    events: train::tensorboard::EventWriter,
}

/// A training run in progress, stepped by its caller: `nibble train` and `nibble demo` through `run`, the
/// browser one awaited step at a time. Everything a run does besides the optimizer step lives here: the
/// validation split, packing, an initial adapter, resuming, metrics, the evaluation cadence, checkpoints
/// and the final save.
pub struct Run<'m> {
    pub trainer: Trainer<'m>,
    eval: Vec<Sequence>,
    options: RunOptions,
    steps_per_epoch: usize,
    /// The base model's name, for the adapter's config.
    base_model: String,
    output: Option<RunOutput>,
    /// What identifies this run (see `manifest`), saved with each checkpoint.
    manifest: serde_json::Value,
    first_loss: Option<f64>,
    last_loss: f64,
    /// Steps in a row that changed nothing (see `STALL_STEPS`), and whether that was reported.
    still: usize,
    stall_reported: bool,
    /// The step this process last saved a checkpoint of, or restored one from.
    saved_step: Option<usize>,
    /// With early stopping: the best validation so far and the validations since it; whether the
    /// run stopped for it.
    best: Option<Best>,
    validations_since_best: usize,
    stopped_early: bool,
    /// The tokenizer that renders `options.sample_prompts`.
    sample_tokenizer: Option<ChatTokenizer>,
    /// What an image run's `options.sample_prompts` are drawn with.
    #[cfg(not(target_arch = "wasm32"))]
    image_samples: Option<crate::train::flux2::ImageSamples>,
    /// Whether the step-0 validation `options.eval_on_start` asks for is behind.
    validated_at_start: bool,
}

/// The lowest validation loss of a run with early stopping, at which step, and the adapter then
/// (None when it predates a resumed process: only the metrics recorded it).
struct Best {
    loss: f64,
    step: usize,
    adapter: Option<LoraAdapter>,
}

/// Tokens each sample answer runs to at most.
pub const SAMPLE_TOKENS: usize = 64;

/// The file in a run's folder that holds its sample answers, one JSON line each.
pub const SAMPLES_FILE: &str = "samples.jsonl";

/// Steps in a row without a gradient, or with a loss repeated to the bit, before a run is reported as
/// stalled. Honest training repeats neither: dropout, a new batch or a moved adapter changes the loss.
const STALL_STEPS: usize = 5;

impl<'m> Run<'m> {
    /// Sets a run up on the CPU executor (see `use_gpu`). With an `output` folder it writes metrics and
    /// checkpoints there (and resumes from `options.resume`); without one it keeps everything in memory.
    pub fn start(
        model: impl Into<Shared<'m, Model>>,
        base_model: &str,
        config: TrainConfig,
        data: RunData,
        options: RunOptions,
        output: Option<&Path>,
    ) -> Result<Self> {
        let mut run = Self::prepare(model.into(), base_model, config, data, options)?;
        match output {
            Some(dir) => run.write_to(dir)?,
            None if run.options.resume.is_some() => {
                return Err(Error::Invalid(
                    "resuming needs the run's output folder".into(),
                ));
            }
            None => {}
        }
        Ok(run)
    }

    /// Everything of `start` but the output folder, which `write_to` then gives it.
    fn prepare(
        model: Shared<'m, Model>,
        base_model: &str,
        config: TrainConfig,
        data: RunData,
        options: RunOptions,
    ) -> Result<Self> {
        let data_digest = tokens_digest(&data.train);
        let examples = data.train.len();
        let RunData {
            train: mut sequences,
            eval: mut eval_sequences,
        } = data;
        if let Some(fraction) = options.eval_split {
            let examples = sequences.len();
            eval_sequences = hold_out(&mut sequences, fraction, config.seed)?;
            if options.packing_cuts() {
                // Held out of examples left whole for packing to cut: validation cuts them as
                // --max-length does.
                eval_sequences = eval_sequences
                    .into_iter()
                    .map(|s| train::cut_sequence(s, config.cut()).0)
                    .filter(|s| s.target_count() > 0)
                    .collect();
                if eval_sequences.is_empty() {
                    return Err(Error::Invalid(format!(
                        "--eval-split {fraction}: no held-out example keeps a token that carries loss within --max-length {}",
                        config.max_length
                    )));
                }
            }
            log::info!(
                "holding out {} of {examples} examples for validation",
                eval_sequences.len(),
            );
        }
        if options.packing {
            let examples = sequences.len();
            sequences =
                crate::cpu::pack_with(sequences, config.max_length, options.packing_strategy);
            // A row may hold only tokens that carry no loss (TRL keeps it, a step's micro-batch
            // adding nothing): it is left out.
            sequences.retain(|s| s.target_count() > 0);
            log::info!(
                "packed {examples} examples into {} sequences of at most {} tokens",
                sequences.len(),
                config.max_length
            );
        }
        let mut config = config;
        let mut options = options;
        // LoftQ's start, made by `run` from the model's source (on a resume, the checkpoint's
        // matrices replace it, and `run` makes none).
        let initial = options.initial.take();
        let computed = initial.is_some();
        let init = match &options.init_adapter {
            Some(dir) => {
                let mut adapter = load_adapter(
                    dir,
                    &model.config,
                    (&model.source, Some(&model)),
                    "--init-adapter",
                )?;
                // Converted again for the run's dropout, which PEFT refuses on adapted parameters.
                adapter.config = config
                    .lora
                    .with_initial(&adapter.config, &model.config.linear_modules())?
                    .converted_for(&model.config)?;
                config.lora = adapter.config.clone();
                Some(adapter)
            }
            None => initial,
        };
        let base = match model.quant {
            Some(spec) => format!("its decoder linears in 4-bit {spec}"),
            None => "16-bit".to_string(),
        };
        log::info!(
            "base {} ({} layers), {base}; {}",
            model.config.model_type(),
            model.config.num_layers,
            config.describe()
        );
        let model_section = json!({
            "architecture": model.config.model_type(),
            "layers": model.config.num_layers,
            "hidden_size": model.config.hidden_size,
            "weights": format!("{:016x}", model.fingerprint()),
            "quant": model.quant.map(|q| q.to_string()),
        });
        let data_section = json!({
            "examples": examples,
            "tokens": format!("{data_digest:016x}"),
        });
        let mut extra = json!({
            "max_length": config.max_length, "loss_on": config.loss_on,
            "packing": options.packing, "eval_split": options.eval_split,
        });
        if options.packing_strategy != crate::cpu::PackingStrategy::Bfd {
            extra["packing_strategy"] = json!(options.packing_strategy);
        }
        // Absent at their defaults, as in runs recorded before the options.
        if config.loss_type != train::LossType::Nll {
            extra["loss_type"] = json!(config.loss_type);
        }
        if let Some(alpha) = config.neftune_noise_alpha {
            extra["neftune_noise_alpha"] = json!(alpha);
        }
        if config.truncation == train::Truncation::KeepEnd {
            extra["truncation_mode"] = json!(config.truncation);
        }
        // Absent without one, as in runs recorded before the option.
        if let Some(choice) = &options.chat_template {
            let mut digest = crate::rng::Fnv1a::new();
            digest.write(choice.default.as_bytes());
            extra["chat_template"] = format!("{:016x}", digest.finish()).into();
        }
        if options.init_lora != crate::lora::LoraInit::Default {
            if !computed && options.resume.is_none() {
                return Err(Error::Invalid(format!(
                    "--init-lora-weights {}: computed from the model's original weights, which only \
                     `nibble train` from a model folder reads",
                    crate::value_name(options.init_lora)
                )));
            }
            extra["init_lora_weights"] = json!(options.init_lora);
        }
        // A computed start is told by init_lora_weights and the seed: its bits depend on the CPU's
        // summation order, which a resume elsewhere need not share.
        let from_file = init.as_ref().filter(|_| options.init_adapter.is_some());
        let manifest = manifest([model_section, data_section, extra], &config, from_file);
        let mut trainer = Trainer::new(model, config, sequences, init)?;
        trainer.padding_free = options.padding_free();
        trainer.chat_template = options.chat_template.as_ref().map(|c| c.default.clone());
        Ok(Self::around(
            trainer,
            eval_sequences,
            options,
            base_model,
            manifest,
        ))
    }

    /// Sets up a FLUX.2 LoRA run on cached image examples on the CPU executor (see `use_gpu`);
    /// `write_to` gives it its folder. `image_options` are the options that shaped the cache or that
    /// shape the draws (resolution, caption dropout, σ sampling), for run.json.
    pub fn prepare_images(
        work: crate::train::flux2::ImageWork<'m>,
        base_model: &str,
        config: TrainConfig,
        options: RunOptions,
        image_options: serde_json::Value,
        init: Option<LoraAdapter>,
    ) -> Result<Self> {
        if options.packing || options.eval_split.is_some() || options.eval_data.is_some() {
            return Err(Error::Invalid(
                "packing and validation are for language models".into(),
            ));
        }
        let c = &work.model.config;
        let model_section = json!({
            "architecture": "flux2",
            "double_blocks": c.double_blocks,
            "single_blocks": c.single_blocks,
            "hidden_size": c.hidden(),
            "weights": format!("{:016x}", work.model.fingerprint()),
            "quant": work.model.quant.map(|q| q.to_string()),
        });
        let data_section = json!({
            "examples": work.examples.len(),
            "cache": format!("{:016x}", work.digest()),
        });
        let mut config = config;
        if let Some(adapter) = &init {
            config.lora = config
                .lora
                .with_initial(&adapter.config, &work.model.config.block_linears())?;
        }
        let manifest = manifest(
            [model_section, data_section, image_options],
            &config,
            init.as_ref(),
        );
        log::info!("{}", config.describe());
        let trainer = Trainer::for_images(work, config, init)?;
        Ok(Self::around(
            trainer,
            Vec::new(),
            options,
            base_model,
            manifest,
        ))
    }

    fn around(
        trainer: Trainer<'m>,
        eval: Vec<Sequence>,
        options: RunOptions,
        base_model: &str,
        manifest: serde_json::Value,
    ) -> Self {
        let steps_per_epoch = trainer.config.steps_per_epoch(trainer.examples());
        Run {
            trainer,
            eval,
            options,
            steps_per_epoch,
            base_model: base_model.to_string(),
            output: None,
            manifest,
            first_loss: None,
            last_loss: 0.0,
            still: 0,
            stall_reported: false,
            saved_step: None,
            best: None,
            validations_since_best: 0,
            stopped_early: false,
            sample_tokenizer: None,
            #[cfg(not(target_arch = "wasm32"))]
            image_samples: None,
            validated_at_start: false,
        }
    }

    /// The tokenizer for `--sample-prompts`, without which none are answered.
    pub fn sample_with(&mut self, tokenizer: ChatTokenizer) {
        self.sample_tokenizer = Some(tokenizer);
    }

    /// What an image run draws its `--sample-prompts` with, without which it draws none.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn sample_images_with(&mut self, samples: crate::train::flux2::ImageSamples) {
        self.image_samples = Some(samples);
    }

    /// An image run's samples at `step`: PNGs in the run's folder, a line each in samples.jsonl.
    #[cfg(not(target_arch = "wasm32"))]
    fn write_image_samples(
        &mut self,
        step: usize,
        observer: &mut dyn Observer,
    ) -> Result<Option<String>> {
        let (Some(samples), Some(out)) = (&self.image_samples, &self.output) else {
            return Ok(None);
        };
        let Some(forward) = self.trainer.image_forward() else {
            return Ok(None);
        };
        let started = std::time::Instant::now();
        let paths = samples.draw(forward, step, &out.dir, &mut || observer.stop_requested())?;
        let mut lines = String::new();
        for (prompt, path) in samples.prompts.iter().zip(&paths) {
            let image = path.file_name().map(|n| n.to_string_lossy().into_owned());
            let mut line = json!({"step": step, "prompt": prompt.text, "image": image});
            if let Some(control) = &prompt.control {
                line["control"] = control.iter().map(|p| p.display().to_string()).collect();
            }
            lines.push_str(&line.to_string());
            lines.push('\n');
        }
        log::info!(
            "samples at step {step}: {} images in {:.1} s ({})",
            paths.len(),
            started.elapsed().as_secs_f64(),
            crate::train::flux2::sample_image_name(step, 0)
        );
        Ok(Some(lines))
    }

    /// Gives a run set up without an output folder its folder: resumes from `options.resume` when
    /// set, and starts metrics.jsonl and run.json.
    pub fn write_to(&mut self, dir: &Path) -> Result<()> {
        let resume = self.options.resume.clone();
        let restored = match &resume {
            Some(from) => Some(restore_for_resume(
                &mut self.trainer,
                dir,
                from,
                &self.manifest,
            )?),
            None => None,
        };
        if let Some(restored) = &restored {
            carry_history(&restored.checkpoint, dir, self.trainer.step)?;
            // The run folder the checkpoint belongs to (this one, or the one resumed from).
            let run_folder = restored
                .checkpoint
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(dir)
                .to_path_buf();
            self.best_from_metrics(dir, &run_folder)?;
            if self.stopped_early && train::holds_finished_run(&run_folder) {
                return Err(Error::Invalid(format!(
                    "{} holds a run that stopped early (--early-stopping-patience): nothing to \
                     resume; pass --overwrite to train it again",
                    run_folder.display()
                )));
            }
        }
        self.output = Some(open_output(
            self.trainer.step,
            dir,
            restored.as_ref(),
            &self.manifest,
        )?);
        if let Some(record) = &self.options.record {
            let path = dir.join(train::RECORD_FILE);
            let record = match &restored {
                Some(restored) => with_continuations(record, restored),
                None => record.clone(),
            };
            crate::fsutil::write_atomically(&path, |tmp| std::fs::write(tmp, record))?;
        }
        if restored.is_some() {
            self.saved_step = Some(self.trainer.step);
        }
        Ok(())
    }

    /// A resumed run's early-stopping state, from the validations metrics.jsonl recorded up to the
    /// restored step: the best one's adapter is the restored one, or its step's checkpoint where one
    /// was kept; a run that had already stopped early stays stopped.
    fn best_from_metrics(&mut self, dir: &Path, run_folder: &Path) -> Result<()> {
        let Some(patience) = self.options.early_stopping_patience else {
            return Ok(());
        };
        // Read before the metrics are cut back to the restored step (a folder a run resumes into
        // from elsewhere may have none).
        let path = dir.join("metrics.jsonl");
        let text = match path.exists() {
            true => crate::fsutil::read_to_string(&path).map_err(|e| Error::io(&path, e))?,
            false => String::new(),
        };
        let mut off_schedule = Vec::new();
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let (Some(loss), Some(step)) = (v["eval_loss"].as_f64(), v["step"].as_u64()) else {
                continue;
            };
            let step = step as usize;
            // Step 0's is --eval-on-start's, which early stopping does not count.
            if step > self.trainer.step || step == 0 {
                continue;
            }
            // The validation at an earlier run's last step, when not due, is one a run of the
            // new length would not have made (transformers validates only when due): counting it
            // would stop a continued run earlier than the same run trained straight.
            match self.validation_due(step) {
                true => {
                    self.note_validation(step, loss, None);
                }
                false => off_schedule.push(step),
            }
        }
        if !off_schedule.is_empty() {
            log::info!(
                "early stopping leaves out the validations at steps {off_schedule:?} (metrics.jsonl): \
                 off this run's validation schedule, a run of its length straight through makes none there"
            );
        }
        let step = self.trainer.step;
        if let Some(best) = &mut self.best {
            let checkpoint = run_folder.join(format!("{}{}", train::CHECKPOINT_PREFIX, best.step));
            if best.step == step {
                best.adapter = Some(self.trainer.adapter.clone());
            } else if let (Some(_), train::Work::Text { model, .. }) =
                (train::state_file(&checkpoint), &self.trainer.work)
            {
                let files = crate::source::ModelFiles::Dir(checkpoint);
                best.adapter = Some(LoraAdapter::load_peft(&files, &model.config)?);
            }
        }
        if self.validations_since_best >= patience {
            log::info!(
                "the run had stopped early (--early-stopping-patience {patience}): nothing to resume"
            );
            self.stopped_early = true;
        }
        Ok(())
    }

    /// Whether `step` validates on the schedule: every --eval-steps, or at each epoch's end. The run
    /// also validates at its last step, due or not.
    fn validation_due(&self, step: usize) -> bool {
        match self.options.eval_steps {
            0 => step.is_multiple_of(self.steps_per_epoch),
            every => step.is_multiple_of(every),
        }
    }

    /// Records a validation for early stopping: a new best (with its adapter, when known), or one
    /// more without improvement. Returns whether it is a new best.
    fn note_validation(&mut self, step: usize, loss: f64, adapter: Option<LoraAdapter>) -> bool {
        if self.best.as_ref().is_none_or(|b| loss < b.loss) {
            self.best = Some(Best {
                loss,
                step,
                adapter,
            });
            self.validations_since_best = 0;
            true
        } else {
            self.validations_since_best += 1;
            false
        }
    }

    /// After a validation at `step` with loss `loss`: keeps the adapter of a new best, and ends the
    /// run once `--early-stopping-patience` validations in a row have not improved on it.
    async fn early_stopping(&mut self, step: usize, loss: f64) -> Result<()> {
        let Some(patience) = self.options.early_stopping_patience else {
            return Ok(());
        };
        if self.note_validation(step, loss, None) {
            self.trainer.sync_async().await?;
            if let Some(best) = &mut self.best {
                best.adapter = Some(self.trainer.adapter.clone());
            }
        } else if self.validations_since_best >= patience && !self.trainer.done() {
            let best = self.best.as_ref().expect("a validation came before");
            log::info!(
                "the validation loss has not improved on {:.4} (step {}) in {patience} validations: \
                 stopping early at step {step} of {}",
                best.loss,
                best.step,
                self.trainer.total_steps
            );
            let line = json!({"step": step, "stopped_early": true, "best_step": best.step,
                "best_eval_loss": best.loss});
            self.append_metrics(&line)?;
            self.stopped_early = true;
        }
        Ok(())
    }

    /// A validation pass at `step` (in `epoch`), into metrics.jsonl: its loss as training counts it,
    /// None without validation data.
    async fn validate(
        &mut self,
        step: usize,
        epoch: f64,
        observer: &mut dyn Observer,
    ) -> Result<Option<f64>> {
        if self.eval.is_empty() {
            return Ok(None);
        }
        observer.validating(self.eval.len());
        let total = self.trainer.evaluate_async(&self.eval).await?;
        // The loss as training counts it (TRL's eval_loss); the perplexity the model's.
        let targets = total.targets.max(1) as f64;
        let loss = total.sum_of(self.trainer.config.loss_type) / targets;
        let perplexity = (total.loss_sum / targets).exp();
        let predictions = train::TokenMetrics::of_total(&total);
        self.append_metrics(&json!({"step": step, "epoch": epoch,
            "eval_loss": loss, "eval_perplexity": perplexity, "eval_tokens": total.targets,
            "eval_mean_token_accuracy": predictions.mean_token_accuracy,
            "eval_entropy": predictions.entropy}))?;
        observer.evaluated(step, loss);
        Ok(Some(loss))
    }

    /// Answers each sample prompt with the adapter as it is at `step` (an image run draws each):
    /// into the log and samples.jsonl.
    // The page's runs draw no images, so its build leaves `observer` unused.
    #[cfg_attr(target_arch = "wasm32", allow(unused_variables))]
    async fn write_samples(&mut self, step: usize, observer: &mut dyn Observer) -> Result<()> {
        if self.options.sample_prompts.is_empty() {
            return Ok(());
        }
        #[cfg(not(target_arch = "wasm32"))]
        if self.image_samples.is_some() {
            // Samples show the run; one that fails (a full disk, Ctrl-C while drawing) must not
            // cost the checkpoint or the LoRA saved after it.
            let lines = match self.write_image_samples(step, observer) {
                Ok(lines) => lines.unwrap_or_default(),
                Err(e) => {
                    log::warn!("samples at step {step} not drawn: {e}");
                    String::new()
                }
            };
            return self.append_samples(lines);
        }
        let Some(tok) = &self.sample_tokenizer else {
            return Ok(());
        };
        let Some(executor) = self.trainer.executor() else {
            return Ok(());
        };
        let mut lines = String::new();
        for SamplePrompt { text: prompt, .. } in &self.options.sample_prompts {
            let answer = crate::generate::answer_async(executor, tok, prompt, SAMPLE_TOKENS)
                .await?
                .text;
            log::info!("sample at step {step}: {prompt:?} -> {answer:?}");
            lines.push_str(&json!({"step": step, "prompt": prompt, "answer": answer}).to_string());
            lines.push('\n');
        }
        self.append_samples(lines)
    }

    /// Adds `lines` to the run folder's samples.jsonl.
    fn append_samples(&self, lines: String) -> Result<()> {
        if let Some(out) = &self.output {
            let path = out.dir.join(SAMPLES_FILE);
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| Error::io(&path, e))?;
            file.write_all(lines.as_bytes())
                .map_err(|e| Error::io(&path, e))?;
        }
        Ok(())
    }

    /// Moves training to the GPU executor.
    pub fn use_gpu(&mut self, gpu: impl Into<Shared<'m, Gpu>>) -> Result<()> {
        self.trainer.use_gpu(gpu)
    }

    pub fn done(&self) -> bool {
        self.trainer.done() || self.stopped_early
    }

    /// One optimizer step, then what falls due after it: the metrics line, a validation pass, a
    /// checkpoint. A step whose loss is not finite stops the run with the last good checkpoint named.
    pub async fn step_async(&mut self, observer: &mut dyn Observer) -> Result<StepRecord> {
        if self.options.eval_on_start && !self.validated_at_start && self.trainer.step == 0 {
            self.validate(0, 0.0, observer).await?;
            // Samples go with each validation unless --sample-steps times them.
            if self.options.sample_steps == 0 {
                self.write_samples(0, observer).await?;
            }
        }
        self.validated_at_start = true;
        let record = match self.trainer.step_async().await {
            Ok(record) => record,
            Err(e) => return Err(self.failed(e)),
        };
        self.append_metrics(&record.to_json())?;
        observer.stepped(&record);
        let repeated =
            self.first_loss.is_some() && record.loss.to_bits() == self.last_loss.to_bits();
        self.still = if record.grad_norm == 0.0 || repeated {
            self.still + 1
        } else {
            0
        };
        if self.still >= STALL_STEPS && !self.stall_reported {
            self.stall_reported = true;
            let why = if record.grad_norm == 0.0 {
                "the gradients are zero"
            } else {
                "the loss repeats to the bit"
            };
            log::warn!(
                "nothing has been learned for {} steps ({why}): check --lr, the data's labels and \
                 --loss-on",
                self.still
            );
            observer.stalled(self.still, why);
        }
        self.first_loss.get_or_insert(record.loss);
        self.last_loss = record.loss;
        let eval_due = self.validation_due(record.step);
        if (eval_due || self.trainer.done())
            && let Some(loss) = self.validate(record.step, record.epoch, observer).await?
        {
            self.early_stopping(record.step, loss).await?;
        }
        let samples_due = match self.options.sample_steps {
            0 => eval_due,
            every => record.step % every == 0,
        };
        if samples_due || self.done() {
            self.write_samples(record.step, observer).await?;
        }
        // An epoch's end, or where --max-steps ends the last one early (as transformers saves then).
        let epoch_end = record.step % self.steps_per_epoch == 0 || self.done();
        // Every --save-steps and at the end of the run, as transformers' steps strategy saves.
        let steps_due = record.step % self.options.save_steps.max(1) == 0 || self.done();
        let save_due = (self.options.save_steps > 0 && steps_due)
            || (self.options.save_each_epoch && epoch_end);
        if let Some(out) = &self.output
            && save_due
        {
            self.trainer.sync_async().await?;
            let saved =
                self.trainer
                    .save_checkpoint(&out.dir, &self.base_model, Some(&self.manifest))?;
            log::info!("saved {}", saved.display());
            self.saved_step = Some(record.step);
            // The page has no folders to prune (its runs have no output folder).
            #[cfg(not(target_arch = "wasm32"))]
            if let Some(keep) = self.options.save_total_limit {
                // The checkpoint just written is safe: one that cannot be deleted costs disk
                // space, not the run.
                match crate::train::folder::prune_checkpoints(&out.dir, keep) {
                    Ok(removed) => {
                        for removed in removed {
                            log::info!("removed {} (--save-total-limit {keep})", removed.display());
                        }
                    }
                    Err(e) => log::warn!("--save-total-limit {keep}: {e}; the run goes on"),
                }
            }
        }
        Ok(record)
    }

    /// Stops the run between steps: saves a checkpoint of the steps so far (a PEFT adapter folder that
    /// `--resume` continues from) and returns the error that says where it is.
    pub fn interrupt(&mut self) -> Error {
        let step = self.trainer.step;
        let Some(out) = &self.output else {
            return Error::Interrupted(format!("stopped after step {step}"));
        };
        let dir = out.dir.clone();
        let existing = dir.join(format!("{}{step}", train::CHECKPOINT_PREFIX));
        let saved = if step == 0 {
            Ok(None)
        } else if self.saved_step == Some(step) && train::state_file(&existing).is_some() {
            // Saved or restored by this process at this very step.
            Ok(Some(existing))
        } else {
            self.trainer
                .save_checkpoint(&dir, &self.base_model, Some(&self.manifest))
                .map(Some)
        };
        Error::Interrupted(match saved {
            Ok(Some(checkpoint)) => format!(
                "stopped after step {step} of {}: the adapter so far is in {} ({}); continue with \
                 --resume {}",
                self.trainer.total_steps,
                checkpoint.display(),
                self.trainer.work.adapter_kind(),
                dir.display()
            ),
            Ok(None) => "stopped before the first step; nothing to save".to_string(),
            Err(e) => format!("stopped after step {step}, but saving a checkpoint failed: {e}"),
        })
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub fn step(&mut self, observer: &mut dyn Observer) -> Result<StepRecord> {
        pollster::block_on(self.step_async(observer))
    }

    /// Brings the adapter home from the GPU and, with an output folder, saves it as a PEFT folder and
    /// draws the loss curve.
    pub async fn finish_async(&mut self) -> Result<RunSummary> {
        self.trainer.sync_async().await?;
        let mut adapter = &self.trainer.adapter;
        if self.options.early_stopping_patience.is_some()
            && let Some(best) = &self.best
        {
            match &best.adapter {
                Some(kept) => {
                    log::info!(
                        "saving the adapter of step {} (the lowest validation loss, {:.4})",
                        best.step,
                        best.loss
                    );
                    adapter = kept;
                }
                None => log::warn!(
                    "the lowest validation loss ({:.4}) was at step {}, before this run resumed, \
                     and no checkpoint of that step is left: saving the last adapter",
                    best.loss,
                    best.step
                ),
            }
        }
        if let Some(out) = &self.output {
            self.trainer.save_adapter(
                adapter,
                &out.dir,
                &self.base_model,
                crate::train::flux2::LoraForm::Release,
            )?;
            crate::plot::write_loss_curve(&out.metrics_path, &out.dir.join("loss_curve.png"))?;
        }
        Ok(RunSummary {
            first_loss: self.first_loss.unwrap_or(self.last_loss),
            last_loss: self.last_loss,
        })
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub fn finish(&mut self) -> Result<RunSummary> {
        pollster::block_on(self.finish_async())
    }

    /// The PEFT folder's two files of the adapter trained so far (for a caller without files).
    pub async fn peft_files_async(&mut self) -> Result<(Vec<u8>, String)> {
        self.trainer.sync_async().await?;
        train::peft_files(&self.trainer.adapter, &self.base_model)
    }

    fn append_metrics(&mut self, line: &serde_json::Value) -> Result<()> {
        match &mut self.output {
            Some(out) => {
                writeln!(out.metrics, "{line}").map_err(|e| Error::io(&out.metrics_path, e))?;
                out.events.metrics(line)
            }
            None => Ok(()),
        }
    }

    /// A failed step's error, with where the run can be picked up again.
    fn failed(&self, e: Error) -> Error {
        let Some(out) = &self.output else {
            return e;
        };
        let newest = train::newest_checkpoint(&out.dir).ok().flatten();
        let hint = match (newest, matches!(e, Error::Diverged(_))) {
            // Resuming repeats the same steps bit for bit, and refuses another --lr.
            (Some(c), true) => format!(
                "the last good checkpoint is {}, but resuming repeats its steps bit for bit (and \
                 refuses another --lr): train again with a lower --lr or a lower --max-grad-norm, \
                 in another --output (from the start, or from that adapter with --init-adapter {})",
                c.display(),
                c.display()
            ),
            (None, true) => {
                "train again with a lower --lr or a lower --max-grad-norm (--overwrite, or another \
                 --output)"
                    .to_string()
            }
            (Some(c), false) => format!(
                "the last good checkpoint is {}; resume with --resume {}",
                c.display(),
                out.dir.display()
            ),
            (None, false) => "no checkpoint was written (see --save-steps)".to_string(),
        };
        Error::Invalid(format!("{e}; this run saved no adapter; {hint}"))
    }
}

/// What identifies a run: the base model's weights (`model`), the training data (`data`), and every
/// option that shapes its trajectory (the training configuration's and `extra`, the kind of model's
/// own). Options that may change on resume (how often to save or validate, the device, the precision,
/// gradient checkpointing, the validation file) are left out.
fn manifest(
    [model, data, extra]: [serde_json::Value; 3],
    config: &TrainConfig,
    init: Option<&LoraAdapter>,
) -> serde_json::Value {
    let init_digest = init.map(|adapter| {
        let mut digest = crate::rng::Fnv1a::new();
        for (_, pair) in adapter.trained() {
            for f in pair.factors() {
                digest.write(bytemuck::cast_slice(pair.factor(f)));
            }
        }
        format!("{:016x}", digest.finish())
    });
    let lora = &config.lora;
    // Whole epochs as the integers runs recorded before fractions were read (a resume compares them).
    let epochs = match config.epochs.fract() == 0.0 && config.epochs < u64::MAX as f64 {
        true => json!(config.epochs as u64),
        false => json!(config.epochs),
    };
    let mut options = json!({
        "lora_r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
        "use_rslora": lora.use_rslora, "target_modules": lora.targets,
        "lr": config.lr, "weight_decay": config.weight_decay,
        "max_grad_norm": config.max_grad_norm, "lr_scheduler": config.schedule,
        "warmup_steps": config.warmup_steps, "warmup_ratio": config.warmup_ratio,
        "epochs": epochs, "max_steps": config.max_steps,
        "batch_size": config.batch_size, "grad_accum": config.grad_accum,
        "seed": config.seed, "shuffle": config.shuffle, "init_adapter": init_digest,
    });
    // Absent at their defaults, as in runs recorded before the options.
    if config.constant_drops_warmup() {
        // `constant` warmed up before it followed transformers' (which does not): a run from then
        // does not resume on the other curve.
        options["constant_ignores_warmup"] = true.into();
    }
    if !config.schedule_kwargs.is_empty() {
        options["lr_scheduler_kwargs"] = json!(config.schedule_kwargs);
    }
    // As [expression, value] pairs: their order decides where two name one module, and JSON objects
    // compare without it.
    if lora.use_dora {
        options["use_dora"] = true.into();
    }
    if !config.trainable_tokens.is_empty() {
        options["trainable_tokens"] = json!(config.trainable_tokens);
    }
    // Named by the options (an initial adapter's are in its digest), in order of name: PEFT
    // matches them as a set.
    if init.is_none() && !lora.target_parameters.is_empty() {
        let mut named = lora.target_parameters.clone();
        named.sort();
        options["target_parameters"] = json!(named);
    }
    if !lora.rank_pattern.is_empty() {
        options["rank_pattern"] = json!(lora.rank_pattern.entries().collect::<Vec<_>>());
    }
    if !lora.alpha_pattern.is_empty() {
        options["alpha_pattern"] = json!(lora.alpha_pattern.entries().collect::<Vec<_>>());
    }
    let d = TrainConfig::default();
    let adam = [config.adam_beta1, config.adam_beta2, config.adam_epsilon];
    if adam != [d.adam_beta1, d.adam_beta2, d.adam_epsilon] {
        options["adam"] = json!(adam);
    }
    // Exact checkpoints give the same numbers as none; bf16 ones do not (absent when off, as in runs
    // recorded before the option).
    if config.checkpoints.bf16() {
        options["bf16_checkpoints"] = true.into();
    }
    if let (Some(options), serde_json::Value::Object(extra)) = (options.as_object_mut(), extra) {
        options.extend(extra);
    }
    let manifest = json!({"model": model, "data": data, "options": options});
    // As a later run reads it back from run.json: serde_json's parser may round a float's last bit, and
    // an honest resume must compare equal.
    serde_json::from_str(&manifest.to_string()).unwrap_or(manifest)
}

/// A digest of tokenized examples: ids and which of them carry loss.
fn tokens_digest(sequences: &[Sequence]) -> u64 {
    let mut digest = crate::rng::Fnv1a::new();
    for seq in sequences {
        digest.write(&(seq.ids.len() as u64).to_le_bytes());
        for (id, target) in seq.ids.iter().zip(&seq.targets) {
            digest.write(&id.to_le_bytes());
            digest.write(&target.map_or(u64::MAX, u64::from).to_le_bytes());
        }
    }
    digest.finish()
}

/// The options record of a resumed run whose length a resume changed (`restored` now, or earlier, as
/// the record of the checkpoint's run folder notes): the notes take the place of the claim that the
/// record repeats the run.
fn with_continuations(record: &str, restored: &Restored) -> String {
    use crate::train::settings::{RECORD_CONTINUED, RECORD_REPEATS};
    let earlier = restored
        .checkpoint
        .parent()
        .and_then(|run| std::fs::read_to_string(run.join(train::RECORD_FILE)).ok())
        .unwrap_or_default();
    let mut notes: Vec<String> = earlier
        .lines()
        .filter(|l| l.starts_with(RECORD_CONTINUED))
        .map(|l| format!("{l}\n"))
        .collect();
    notes.extend(restored.continued.clone());
    match notes.is_empty() {
        true => record.to_string(),
        false => record.replacen(RECORD_REPEATS, &notes.concat(), 1),
    }
}

/// Warns where the training data holds tokens the base model never learned to read (their embedding
/// rows all but zero) or to write (their output rows), as a base model's chat-template tokens can be:
/// LoRA on the linear layers cannot change what those rows give, so the run would teach the model a
/// format it cannot follow.
#[cfg(not(target_arch = "wasm32"))]
fn warn_of_untrained_tokens(
    model: &Model,
    train: &[Sequence],
    tok: &ChatTokenizer,
    trained: &[u32],
) {
    let read: std::collections::BTreeSet<u32> = train
        .iter()
        .flat_map(|s| s.ids.iter().copied())
        .filter(|id| !trained.contains(id))
        .collect();
    let written: std::collections::BTreeSet<u32> = train
        .iter()
        .flat_map(|s| s.targets.iter().flatten().copied())
        .filter(|id| !trained.contains(id))
        .collect();
    let name = |ids: &[u32]| -> String {
        let shown: Vec<String> = ids
            .iter()
            .take(8)
            .map(|&id| {
                let text = tok.decode(&[id]).unwrap_or_default();
                format!("{text:?} ({id})")
            })
            .collect();
        let more = match ids.len() > 8 {
            true => format!(" and {} more", ids.len() - 8),
            false => String::new(),
        };
        format!("{}{more}", shown.join(", "))
    };
    let unread = model.untrained_rows(&read, false);
    let unwritten = model.untrained_rows(&written, true);
    let mut untrained: Vec<u32> = unread.iter().chain(&unwritten).copied().collect();
    untrained.sort_unstable();
    untrained.dedup();
    let ids: Vec<String> = untrained.iter().map(u32::to_string).collect();
    let remedy = format!(
        "train their rows too (--trainable-tokens {}), start from the model's instruct release, \
         or give a --chat-template whose special tokens the base has trained",
        ids.join(",")
    );
    if !unread.is_empty() {
        log::warn!(
            "the data holds tokens whose embedding rows the base model never trained (all but \
             zero): {}; LoRA on the linear layers cannot teach the model to read them: {remedy}",
            name(&unread)
        );
    }
    if !unwritten.is_empty() {
        log::warn!(
            "the data trains the model to write tokens whose output rows the base model never \
             trained (all but zero, so their logits stay near 0): {}; LoRA on the linear layers \
             cannot teach it to write them: {remedy}",
            name(&unwritten)
        );
    }
}

/// The token ids `--trainable-tokens` names: comma-separated ids, or texts that are one token each to
/// the model's tokenizer (`<|im_end|>`).
#[cfg(not(target_arch = "wasm32"))]
fn trainable_token_ids(spec: &str, tok: &ChatTokenizer) -> Result<Vec<u32>> {
    let bad = |msg: String| Error::Invalid(format!("--trainable-tokens {spec:?}: {msg}"));
    let mut ids = Vec::new();
    for item in spec.split(',').map(str::trim) {
        if item.is_empty() {
            return Err(bad(
                "an empty entry; give token ids or texts between commas".into(),
            ));
        }
        let id = match item.parse::<u32>() {
            Ok(id) => id,
            Err(_) => match tok.token_id(item) {
                Some(id) => id,
                None => match tok.encode(item)?[..] {
                    [id] => id,
                    ref several => {
                        return Err(bad(format!(
                            "`{item}` is {} tokens to the model's tokenizer ({several:?}), not \
                             one: name a single token, or its id",
                            several.len()
                        )));
                    }
                },
            },
        };
        ids.push(id);
    }
    Ok(ids)
}

/// Refuses to resume from a checkpoint made by a different run, naming what differs. A checkpoint from
/// before manifests existed is taken on trust, with a warning.
fn check_manifest(checkpoint: &Path, now: &serde_json::Value) -> Result<()> {
    let path = checkpoint.join(train::MANIFEST);
    let Ok(text) = std::fs::read_to_string(&path) else {
        log::warn!(
            "{} records no run settings ({} is missing): resuming without checking that they match",
            checkpoint.display(),
            train::MANIFEST
        );
        return Ok(());
    };
    let saved: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.clone(),
        msg: format!("not valid JSON: {e}"),
    })?;
    let mut differences = Vec::new();
    for section in ["model", "data", "options"] {
        let empty = serde_json::Map::new();
        let (then, current) = (
            saved[section].as_object().unwrap_or(&empty),
            now[section].as_object().unwrap_or(&empty),
        );
        let mut keys: Vec<&String> = then.keys().chain(current.keys()).collect();
        keys.sort();
        keys.dedup();
        for key in keys {
            let (a, b) = (&then.get(key), &current.get(key));
            // How long the run goes on may change (`Trainer::restore` takes the new count).
            let length = section == "options" && matches!(key.as_str(), "epochs" | "max_steps");
            if a != b && !length {
                let show = |v: &Option<&serde_json::Value>| {
                    v.map_or("absent".to_string(), |v| v.to_string())
                };
                differences.push(format!(
                    "{section}.{key}: {} then, {} now",
                    show(a),
                    show(b)
                ));
            }
        }
    }
    if differences.is_empty() {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "{} was made by a different run: {}. Resume with the same model, data and options, or start a \
         new run in another --output",
        checkpoint.display(),
        differences.join("; ")
    )))
}

/// Where a resume picks the run up: the checkpoint restored, and where it changed the run's length,
/// the note the options record then carries.
struct Restored {
    checkpoint: PathBuf,
    continued: Option<String>,
}

/// A run resumed into another folder than its checkpoint's: the metrics and sample answers its run
/// folder recorded up to `step` start `dir`'s (as transformers' checkpoints carry their log
/// history), so that the loss curve and TensorBoard log cover the whole run. A folder with metrics
/// of its own keeps them.
fn carry_history(checkpoint: &Path, dir: &Path, step: usize) -> Result<()> {
    let from = match checkpoint.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // The same folder however named (relative, through links, not yet created).
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => std::path::absolute(a).ok() == std::path::absolute(b).ok(),
    };
    let ours = dir.join("metrics.jsonl");
    let has_own = std::fs::metadata(&ours).is_ok_and(|m| m.len() > 0);
    if same(from, dir) || has_own || !from.join("metrics.jsonl").is_file() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    for file in ["metrics.jsonl", SAMPLES_FILE] {
        let source = from.join(file);
        if source.is_file() {
            let target = dir.join(file);
            std::fs::copy(&source, &target).map_err(|e| Error::io(&source, e))?;
            truncate_metrics(&target, step)?;
        }
    }
    log::info!(
        "the metrics of {} up to step {step} begin this folder's",
        from.display()
    );
    Ok(())
}

/// Restores the newest checkpoint of `from` into `trainer` for the run folder `dir`, writing nothing:
/// refuses a checkpoint of another run, a finished run asked for no more steps, and, where the run's
/// length changed, checkpoints in `dir` past the restored one (of the earlier schedule, which a later
/// resume would take for this run's).
fn restore_for_resume(
    trainer: &mut Trainer,
    dir: &Path,
    from: &Path,
    manifest: &serde_json::Value,
) -> Result<Restored> {
    let checkpoint = train::newest_checkpoint(from)?.ok_or_else(|| {
        Error::Invalid(format!(
            "{} holds no complete checkpoint to resume from",
            from.display()
        ))
    })?;
    check_manifest(&checkpoint, manifest)?;
    let then = trainer.restore(&checkpoint)?;
    if trainer.done() && train::holds_finished_run(dir) {
        return Err(Error::Invalid(format!(
            "{} holds a finished run ({} at step {} of {}): nothing to resume; ask for more steps \
             (--max-steps, --epochs) to train on from it, or pass --overwrite to train it again",
            dir.display(),
            checkpoint.display(),
            trainer.step,
            trainer.total_steps
        )));
    }
    log::info!(
        "resuming from {} at step {}",
        checkpoint.display(),
        trainer.step
    );
    let now = trainer.total_steps;
    if then == now {
        return Ok(Restored {
            checkpoint,
            continued: None,
        });
    }
    let later: Vec<String> = train::checkpoints(dir)?
        .into_iter()
        .filter(|(step, _)| *step > trainer.step)
        .map(|(_, path)| path.display().to_string())
        .collect();
    if !later.is_empty() {
        return Err(Error::Invalid(format!(
            "{} lies past step {} in a run of {then} steps, now {now}: resume from the newest \
             checkpoint, or move the later ones away",
            later.join(", "),
            trainer.step
        )));
    }
    log::info!(
        "the run had {then} steps and now has {now} (--max-steps, --epochs): it goes on to the new \
         count, its learning-rate schedule drawn over it"
    );
    let continued = format!(
        "{} {} from {then} steps to {now}: the learning rates of the steps before it were drawn \
         over {then}, so these options alone train another run.\n",
        crate::train::settings::RECORD_CONTINUED,
        trainer.step
    );
    Ok(Restored {
        checkpoint,
        continued: Some(continued),
    })
}

/// Creates the output folder and its metrics file, or (resuming from `restored`) keeps the metrics
/// (and sample answers) up to its step.
fn open_output(
    step: usize,
    dir: &Path,
    restored: Option<&Restored>,
    manifest: &serde_json::Value,
) -> Result<RunOutput> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let metrics_path = dir.join("metrics.jsonl");
    let samples = dir.join(SAMPLES_FILE);
    match restored {
        Some(_) => {
            truncate_metrics(&metrics_path, step)?;
            if samples.is_file() {
                truncate_metrics(&samples, step)?;
            }
        }
        None => {
            std::fs::write(&metrics_path, "").map_err(|e| Error::io(&metrics_path, e))?;
            if samples.is_file() {
                std::fs::remove_file(&samples).map_err(|e| Error::io(&samples, e))?;
            }
        }
    }
    let manifest_path = dir.join(train::MANIFEST);
    crate::fsutil::write_atomically(&manifest_path, |tmp| {
        std::fs::write(tmp, manifest.to_string())
    })?;
    let metrics = std::fs::OpenOptions::new()
        .append(true)
        .open(&metrics_path)
        .map_err(|e| Error::io(&metrics_path, e))?;
    // The event file mirrors the metrics kept so far (a resumed run's), then follows them.
    let mut events = train::tensorboard::EventWriter::create(dir)?;
    let kept =
        crate::fsutil::read_to_string(&metrics_path).map_err(|e| Error::io(&metrics_path, e))?;
    for line in kept.lines() {
        if let Ok(line) = serde_json::from_str(line) {
            events.metrics(&line)?;
        }
    }
    Ok(RunOutput {
        dir: dir.to_path_buf(),
        metrics_path,
        metrics,
        events,
    })
}

/// Runs `spec` from its files on the GPU executor when `gpu` is given, else on the CPU executor.
#[cfg(not(target_arch = "wasm32"))]
pub fn run(spec: RunSpec, gpu: Option<&Gpu>, observer: &mut dyn Observer) -> Result<RunSummary> {
    let RunSpec {
        model: path,
        data,
        output,
        quant,
        config,
        options,
    } = spec;
    let folder =
        train::folder::RunFolder::claim(output, options.overwrite, options.resume.as_deref())?;
    let inputs = [
        Some(path),
        options.init_adapter.as_deref(),
        options.eval_data.as_deref(),
    ];
    let inputs: Vec<&Path> = inputs
        .into_iter()
        .flatten()
        .chain(data.iter().map(|file| file.as_path()))
        .collect();
    folder.check_inputs(&inputs)?;
    let source = crate::model::open(path)?;
    if source
        .config
        .moe
        .as_ref()
        .is_some_and(|m| m.output_router_logits)
    {
        log::warn!(
            "{}: config.json sets output_router_logits, with which transformers adds the routers' \
             load-balancing loss (router_aux_loss_coef times it) to the training loss; nibble's \
             loss leaves it out",
            path.display()
        );
    }
    let mut config = config;
    config.max_length = within_positions(config.max_length, &source.config);
    let storage = QuantRequest::planned(quant, source.stored_quant())
        .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    // What an adapter trained on says of itself (read in full, and checked, when the run starts).
    let init_config: Option<serde_json::Value> = options.init_adapter.as_deref().and_then(|dir| {
        let text = std::fs::read_to_string(dir.join("adapter_config.json")).ok()?;
        serde_json::from_str(&text).ok()
    });
    // Training token rows copies the tables they sit in (the run's own, which it changes).
    let init_rows = init_config.as_ref().is_some_and(|v| {
        let indices = &v["trainable_token_indices"];
        !indices.is_null() && indices.as_array().is_none_or(|a| !a.is_empty())
    });
    // The memory plan adapts what that adapter adapts: its target_modules, or where that is a
    // pattern, the modules its weights hold (a mixture of experts' stacks aside); and its
    // target_parameters.
    let planned_parameters = match &init_config {
        Some(v) => crate::lora::targets_of_json(&v["target_parameters"]).unwrap_or_default(),
        None => config.lora.target_parameters.clone(),
    };
    // And at its ranks (its matrices have them).
    let (planned_rank, planned_rank_pattern) = match &init_config {
        Some(v) => (
            v["r"]
                .as_u64()
                .map_or(crate::lora::PEFT_DEFAULT_R, |r| r as usize),
            v.get("rank_pattern")
                .filter(|p| !p.is_null())
                .and_then(|p| crate::lora::Patterns::from_json(p, "a positive rank").ok())
                .unwrap_or_default(),
        ),
        None => (config.lora.r, config.lora.rank_pattern.clone()),
    };
    let planned_targets = match (&init_config, options.init_adapter.as_deref()) {
        (Some(v), Some(dir)) => {
            let modules = match &v["target_modules"] {
                serde_json::Value::Null => Some(Vec::new()),
                targets => crate::lora::targets_of_json(targets),
            };
            modules
                .or_else(|| {
                    let saved = crate::lora::saved_module_paths(dir)?;
                    // The routers' and experts' pairs are its target_parameters'.
                    Some(
                        saved
                            .into_iter()
                            .filter(|p| {
                                !p.contains(".experts") && !crate::config::is_router_path(p)
                            })
                            .collect(),
                    )
                })
                .unwrap_or_else(|| config.lora.targets.clone())
        }
        _ => config.lora.targets.clone(),
    };
    // Targets nothing in the model answers to, and a dropout, DoRA or LoftQ that PEFT refuses on a
    // mixture of experts' adapted parameters, are refused before the weights load.
    crate::lora::resolve_targets(&source.config, &planned_targets, &planned_parameters)?;
    let planned = crate::lora::LoraConfig {
        targets: planned_targets.clone(),
        target_parameters: planned_parameters.clone(),
        ..config.lora.clone()
    }
    .converted_for(&source.config)?;
    // Where PEFT adapts a mixture's experts only when they are named, a run that names none leaves
    // them (most of the model) as they are: said once, with how to train them.
    let names_experts = planned
        .target_parameters
        .iter()
        .any(|p| p.ends_with("gate_up_proj") || p.ends_with("down_proj"));
    // Not where an adapter to continue says what it adapts, nor under LoftQ, which starts linears
    // alone.
    if let Some(m) = &source.config.moe
        && !m.family.peft_converts_targets()
        && !names_experts
        && options.init_adapter.is_none()
        && options.init_lora != crate::lora::LoraInit::Loftq
    {
        log::info!(
            "{}: the experts stay frozen (PEFT adapts {}'s experts only by name): \
             --target-parameters gate_up_proj,down_proj --lora-dropout 0 trains them too",
            path.display(),
            source.config.model_type()
        );
    }
    if options.init_lora == crate::lora::LoraInit::Loftq {
        crate::lowrank::refuse_parameters(&planned.target_parameters)?;
    }
    let tables = match options.trainable_tokens.is_some() || init_rows {
        true => crate::model::planned_table_bytes(&source.config),
        false => 0,
    };
    crate::alloc::check_fits(
        "loading the model",
        crate::model::planned_weight_bytes(&source.config, storage) + tables,
        "; a 4-bit --quant takes about a quarter of 16-bit weights",
    )?;
    if options.init_lora == crate::lora::LoraInit::Loftq {
        check_loftq(&options, &config, source.stored_quant(), storage, path)?;
    }
    // The weights load (reading and quantizing, on the worker threads) while this thread reads the
    // tokenizer and the data.
    let (model, data) = std::thread::scope(|s| {
        let loading = s.spawn(|| source.load(quant));
        let data = (|| -> Result<_> {
            let tok = source.chat_tokenizer()?;
            let tok = match &options.chat_template {
                Some(choice) => {
                    let tok = tok.with_template(choice)?;
                    if crate::generate::turn_end_token(&tok).is_none() {
                        log::warn!(
                            "{}: an assistant turn through this template ends with none of the model's special \
                             tokens (are its turn markers plain text to this tokenizer?): answers will stop \
                             only at the eos token or --max-new-tokens",
                            choice.origin.display()
                        );
                    }
                    tok
                }
                None => tok,
            };
            let tok = match &options.eos_token {
                Some(eos) => tok.with_eos_token(eos)?,
                None => tok,
            };
            let train_config = options.tokenizing(&config);
            if data.len() > 1 {
                log::info!(
                    "reading {} data files one after the other, as one dataset",
                    data.len()
                );
            }
            let mut train = Vec::new();
            for file in data {
                train.extend(tokenize_file(&tok, file, &train_config, options.packing)?);
            }
            let eval = match &options.eval_data {
                Some(file) => tokenize_file(&tok, file, &config, false)?,
                None => Vec::new(),
            };
            Ok((RunData { train, eval }, tok))
        })();
        (loading.join(), data)
    });
    let (data, tokenizer) = data?;
    let model = model.map_err(|_| Error::Invalid("loading the model panicked".into()))??;
    if let Some(spec) = &options.trainable_tokens {
        config.trainable_tokens = trainable_token_ids(spec, &tokenizer)?;
    }
    warn_of_untrained_tokens(&model, &data.train, &tokenizer, &config.trainable_tokens);
    // Only --sample-prompts needs it later; its tables (~50 MB for a 150k vocabulary) go.
    let tokenizer = (!options.sample_prompts.is_empty()).then_some(tokenizer);
    crate::alloc::release_free_memory();
    // Packing fills sequences up to --max-length.
    let longest = data
        .train
        .iter()
        .chain(&data.eval)
        .map(|s| s.ids.len())
        .max()
        .map_or(1, |n| {
            if options.packing {
                config.max_length
            } else {
                n
            }
        });
    let step = format!("a training step of {longest} tokens");
    use crate::graph::checkpoint::Keep;
    let fits = |checkpoint, checkpoints: Keep| -> Result<()> {
        let needs = crate::plan::plan(
            &model.config,
            &crate::plan::PlanInput {
                tokens: longest,
                quant: model.quant,
                lora_rank: planned_rank,
                lora_rank_pattern: (planned_rank_pattern.entries())
                    .map(|(key, rank)| (key.to_string(), rank))
                    .collect(),
                lora_targets: planned_targets.clone(),
                lora_target_parameters: planned_parameters.clone(),
                lora_dropout: config.lora.dropout > 0.0,
                dora: config.lora.use_dora,
                checkpoint,
                checkpoints,
                trainable_tokens: config.trainable_tokens.len(),
            },
        )?;
        // What would need less that this step does not do already.
        let least = match gpu.is_some_and(|g| g.offload_helps()) {
            true => Keep::Bf16Host,
            false => Keep::Bf16,
        };
        let mut remedies = vec!["a smaller --max-length".to_string()];
        if !(checkpoint && checkpoints >= least) {
            remedies.push(match least {
                Keep::Bf16Host => "--offload-checkpoints".into(),
                _ => "--bf16-checkpoints".into(),
            });
        }
        if model.quant.is_none() {
            remedies.push("a 4-bit --quant".into());
        }
        let advice = format!(
            "; {} needs less (`nibble plan` shows how much)",
            remedies.join(" or ")
        );
        match gpu {
            Some(gpu) => {
                if checkpoints == Keep::Bf16Host && !gpu.can_offload() {
                    return Err(Error::Invalid(format!(
                        "--offload-checkpoints: GPU {} cannot keep buffers in host memory (a \
                         native Vulkan, DX12 or Metal device can); use --bf16-checkpoints",
                        gpu.info.name
                    )));
                }
                gpu.check_fits(&step, needs.total, options.gpu_memory, &advice)?;
                // The model, the embedding the GPU reads from included, is loaded by now.
                crate::alloc::check_fits(
                    &format!("{step}'s offloaded checkpoints (host memory)"),
                    needs.host_activations,
                    "; lower --max-length",
                )
            }
            None => crate::alloc::check_fits(&step, needs.cpu_total(), &advice),
        }
    };
    if gpu.is_none() && options.gpu_memory.is_some() {
        log::warn!("--gpu-memory caps a GPU's memory, and this run is on the CPU: ignored");
    }
    // A resumed run keeps the bf16 checkpoints its checkpoint recorded, whatever the device now (they
    // change the numbers).
    let recorded_bf16 = options.fit_checkpointing.is_some_and(Keep::bf16)
        && options
            .resume
            .as_deref()
            .and_then(|from| train::newest_checkpoint(from).ok().flatten())
            .and_then(|c| crate::fsutil::read_to_string(&c.join(train::MANIFEST)).ok())
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .is_some_and(|m| m["options"]["bf16_checkpoints"] == true);
    if recorded_bf16 {
        (config.checkpoint, config.checkpoints) = (true, Keep::Bf16);
    }
    // The CPU executor's memory is the host's: offloading would only copy.
    if gpu.is_none() && config.checkpoints == Keep::Bf16Host {
        config.checkpoints = Keep::Bf16;
    }
    if let Err(e) = fits(config.checkpoint, config.checkpoints) {
        // From the most memory to the least, up to what the flags allow; offloading only from a
        // device with memory of its own.
        let offload = gpu.is_some_and(|g| g.offload_helps());
        let allowed = |most: Keep| {
            Keep::ALL
                .into_iter()
                .filter(move |&k| k <= most && (k != Keep::Bf16Host || offload))
        };
        let fitting = options
            .fit_checkpointing
            .and_then(|most| allowed(most).find(|&k| fits(true, k).is_ok()));
        let Some(checkpoints) = fitting else {
            // The least memory tried is what to report.
            let least = options
                .fit_checkpointing
                .and_then(|most| allowed(most).next_back());
            return Err(least.and_then(|k| fits(true, k).err()).unwrap_or(e));
        };
        let checkpoint = true;
        let how = match checkpoints {
            Keep::F32 => "gradient checkpointing",
            Keep::Bf16 => "gradient checkpointing with bf16 checkpoints",
            Keep::Bf16Host => "gradient checkpointing with bf16 checkpoints in host memory",
        };
        log::info!("{step} needs more memory than there is without it: training with {how}");
        (config.checkpoint, config.checkpoints) = (checkpoint, checkpoints);
    }
    let tokenizer_files =
        train::adapter_tokenizer_files(&source.tokenizer, options.eos_token.as_deref(), path)?;
    let mut options = options;
    if options.init_lora == crate::lora::LoraInit::Loftq && options.resume.is_none() {
        options.initial = Some(loftq_adapter(&model, &source, &config)?);
    }
    // Every step that can fail comes before the earlier run's files are cleared.
    let mut run = Run::prepare((&model).into(), source.label(), config, data, options)?;
    run.trainer.tokenizer_files = Some(tokenizer_files);
    if let Some(tokenizer) = tokenizer {
        run.sample_with(tokenizer);
    }
    run.launch(gpu, folder, output, observer)
}

#[cfg(not(target_arch = "wasm32"))]
impl<'m> Run<'m> {
    /// Moves a prepared run to `gpu` when given, then (nothing else can fail before it) clears the
    /// earlier run's files in the claimed `folder`, opens `output` and drives the run to its end.
    pub fn launch(
        mut self,
        gpu: Option<&'m Gpu>,
        mut folder: train::folder::RunFolder,
        output: &Path,
        observer: &mut dyn Observer,
    ) -> Result<RunSummary> {
        let executor = match gpu {
            Some(gpu) => {
                self.use_gpu(gpu)?;
                format!("GPU executor on {}", gpu.info.name)
            }
            None => format!(
                "CPU executor, {:?} products, {} kernels",
                self.trainer.config.precision,
                crate::ops::isa::active()
            ),
        };
        folder.clear_earlier_run()?;
        self.write_to(output)?;
        folder.take();
        self.drive(&executor, observer)
    }

    /// Steps the run to its end (or until the observer asks it to stop), then saves it.
    pub fn drive(&mut self, executor: &str, observer: &mut dyn Observer) -> Result<RunSummary> {
        let adapter = &self.trainer.adapter;
        let (rows, row_values) = adapter.token_rows().fold((0, 0), |(n, v), (_, p)| {
            (n + p.token_ids.len(), v + p.rows.len())
        });
        let rows = match rows {
            0 => String::new(),
            n => format!(" and {n} token rows of the embedding and output tables"),
        };
        log::info!(
            "training {} LoRA parameters{rows} for {} steps on {} {} ({executor})",
            adapter.parameter_count() - row_values,
            self.trainer.total_steps,
            self.trainer.examples(),
            match self.options.packing {
                true => "packed sequences",
                false => "examples",
            },
        );
        observer.started(&self.trainer);
        while !self.done() {
            if observer.stop_requested() {
                return Err(self.interrupt());
            }
            self.step(observer)?;
        }
        let summary = self.finish()?;
        observer.finished();
        Ok(summary)
    }
}

/// `max_length`, capped at the positions the model was trained for: longer sequences mean nothing to it
/// (and attention over them grows quadratically).
pub fn within_positions(max_length: usize, config: &crate::config::ModelConfig) -> usize {
    let positions = config.trained_positions();
    if max_length > positions {
        log::warn!(
            "--max-length {max_length} is beyond the model's max_position_embeddings {positions}: \
             sequences are cut to {positions} tokens"
        );
    }
    max_length.min(positions)
}

/// What LoftQ's initialisation needs, checked before the model loads: new matrices (no
/// --init-adapter), plain LoRA, and original weights that the run quantizes to 4 bits.
#[cfg(not(target_arch = "wasm32"))]
fn check_loftq(
    options: &RunOptions,
    config: &TrainConfig,
    stored: Option<crate::quant::QuantSpec>,
    storage: Option<crate::quant::QuantSpec>,
    path: &Path,
) -> Result<()> {
    let refuse = |why: String| Err(Error::Invalid(format!("--init-lora-weights loftq: {why}")));
    if options.init_adapter.is_some() {
        return refuse(
            "it starts new LoRA matrices, and --init-adapter gives them: choose one".into(),
        );
    }
    if config.lora.use_dora {
        return refuse(
            "nibble starts DoRA's magnitudes from plain LoRA's initialisation only".into(),
        );
    }
    if stored.is_some() {
        return refuse(format!(
            "{} is already quantized, without the original weights LoftQ approximates: give the \
             model folder it was made from",
            path.display()
        ));
    }
    if storage.is_none() {
        return refuse(
            "--quant none keeps the weights 16-bit, with no quantization error to start from"
                .into(),
        );
    }
    Ok(())
}

/// A new adapter of `config`'s shape whose pairs start at LoftQ's approximation of the 4-bit
/// quantization error of `model`'s weights (`lowrank::loftq`), seeded by --seed.
#[cfg(not(target_arch = "wasm32"))]
fn loftq_adapter(
    model: &Model,
    source: &crate::model::ModelSource,
    config: &TrainConfig,
) -> Result<LoraAdapter> {
    let started = std::time::Instant::now();
    // A stream of its own: the run's other draws stay those of a run without LoftQ.
    let mut rng = crate::rng::Rng::new(config.seed ^ 0x4c6f_6674_5100_0000);
    let mut adapter = LoraAdapter::init(&model.config, config.lora.clone(), &mut rng)?;
    let (remaining, pairs) = crate::lowrank::loftq(&mut adapter, model, source, &mut rng)?;
    log::info!(
        "LoftQ: {} LoRA pairs start at the best rank-r approximation of their weights' 4-bit error, \
         {:.1}% of which remains ({:.1} s)",
        pairs,
        100.0 * remaining,
        started.elapsed().as_secs_f64()
    );
    Ok(adapter)
}

/// Loads a PEFT adapter folder for `base` (the model's label, and the model itself where it is loaded),
/// warning when the adapter was trained on other weights: by the weights' fingerprint in the run.json
/// nibble writes beside its adapters, where the base is loaded in the same storage, else by the name
/// in adapter_config.json's `base_model_name_or_path`. The shapes fitting is not enough: its updates
/// were learned against the other weights.
pub fn load_adapter(
    dir: &Path,
    config: &crate::config::ModelConfig,
    base: (&str, Option<&Model>),
    flag: &str,
) -> Result<LoraAdapter> {
    load_adapter_checked(dir, config, base, flag, false).map(|(adapter, _)| adapter)
}

/// What a run's run.json records of the weights its adapter was trained on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainedOn {
    /// The 4-bit form of the base's linears (None: 16-bit).
    pub quant: Option<crate::quant::QuantSpec>,
    /// Whether the adapter started as LoftQ's approximation of their quantization error.
    pub loftq: bool,
}

/// `recorded_weights`, where the options already `complete` what it would fill in: a run.json that
/// cannot be read is then only warned about.
pub fn recorded_weights_unless(dir: &Path, complete: bool) -> Result<Option<TrainedOn>> {
    match recorded_weights(dir) {
        Err(e) if complete => {
            log::warn!("{e}: ignored, as the options give the weights");
            Ok(None)
        }
        recorded => recorded,
    }
}

/// What the run.json in an adapter folder `dir` records of the weights its run trained on: None
/// where the folder holds no record of nibble's (no run.json, or another tool's). A run.json that
/// cannot be read or parsed, or records no 4-bit form nibble has, is an error naming it.
pub fn recorded_weights(dir: &Path) -> Result<Option<TrainedOn>> {
    let path = dir.join(train::MANIFEST);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&path, e)),
    };
    let bad = |msg: String| Error::Config {
        path: path.clone(),
        msg,
    };
    // An editor's byte-order mark is no reason to refuse the file.
    let value: serde_json::Value = serde_json::from_str(text.trim_start_matches('\u{feff}'))
        .map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let Some(quant) = value.get("model").and_then(|m| m.get("quant")) else {
        return Ok(None);
    };
    let quant = match quant {
        serde_json::Value::Null => None,
        serde_json::Value::String(text) => {
            Some(text.parse().map_err(|e| bad(format!("model.quant: {e}")))?)
        }
        other => {
            return Err(bad(format!(
                "model.quant is {other}, not a 4-bit format such as \"nf4 (group 64)\""
            )));
        }
    };
    let loftq = value["options"]["init_lora_weights"] == json!(crate::lora::LoraInit::Loftq);
    Ok(Some(TrainedOn { quant, loftq }))
}

/// `load_adapter` for running or merging the adapter: with the whole modules it saved
/// (`LoraAdapter::load_peft_with_modules`).
pub fn load_adapter_with_modules(
    dir: &Path,
    config: &crate::config::ModelConfig,
    base: (&str, Option<&Model>),
    flag: &str,
) -> Result<(LoraAdapter, crate::lora::SavedModules)> {
    load_adapter_checked(dir, config, base, flag, true)
}

fn load_adapter_checked(
    dir: &Path,
    config: &crate::config::ModelConfig,
    (base, loaded): (&str, Option<&Model>),
    flag: &str,
    keep_modules: bool,
) -> Result<(LoraAdapter, crate::lora::SavedModules)> {
    let files = crate::source::ModelFiles::Dir(dir.to_path_buf());
    let loaded_adapter = match keep_modules {
        true => LoraAdapter::load_peft_with_modules(&files, config),
        false => LoraAdapter::load_peft(&files, config).map(|a| (a, Default::default())),
    };
    let adapter =
        loaded_adapter.map_err(|e| Error::Invalid(format!("{flag} {}: {e}", dir.display())))?;
    let json = |file: &str| {
        std::fs::read_to_string(dir.join(file)).ok().and_then(|t| {
            // An editor's byte-order mark hides no record.
            serde_json::from_str::<serde_json::Value>(t.trim_start_matches('\u{feff}')).ok()
        })
    };
    let warn = |theirs: &str| {
        log::warn!(
            "{flag} {} was trained on {theirs}, not {base}: the shapes fit, but its updates were \
             learned against other weights",
            dir.display()
        )
    };
    let recorded = json(train::MANIFEST).map(|m| m["model"].clone());
    if let (Some(model), Some(recorded)) = (loaded, recorded)
        && recorded["quant"] == json!(model.quant.map(|q| q.to_string()))
        && let Some(weights) = recorded["weights"].as_str()
    {
        if weights != format!("{:016x}", model.fingerprint()) {
            warn(&format!(
                "other weights (fingerprint {weights} in its {})",
                train::MANIFEST
            ));
        }
        return Ok(adapter);
    }
    let trained_on = json("adapter_config.json")
        .and_then(|v| v["base_model_name_or_path"].as_str().map(str::to_string));
    let name = |p: &str| {
        Path::new(p.trim_end_matches('/'))
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
    };
    // Only names to go by: a copy of the base under another name is the same model.
    if let Some(theirs) = trained_on
        && let (Some(a), Some(b)) = (name(&theirs), name(base))
        && a != b
    {
        log::warn!(
            "{flag} {} was trained on a model named {theirs} (its adapter_config.json), not {base}: \
             unless {base} is a copy of it, the adapter's updates were learned against other weights",
            dir.display()
        );
    }
    Ok(adapter)
}

/// Keeps the metrics of steps up to `step` (complete lines only: a killed run may leave half a line).
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // The lines kept are kept as written: parsed and printed again, a float could come back a
    // digit off (serde_json's parsing is not always correctly rounded) and the keys reordered.
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .is_ok_and(|v| v["step"].as_u64().is_some_and(|s| s as usize <= step))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    crate::fsutil::write_atomically(path, |tmp| std::fs::write(tmp, kept))
}

/// Reads and tokenizes a dataset; errors name the file and example. `packing`: as `tokenize_examples`.
pub fn tokenize_file(
    tok: &ChatTokenizer,
    file: &Path,
    config: &TrainConfig,
    packing: bool,
) -> Result<Vec<Sequence>> {
    let (examples, places) = crate::data::read_examples_placed(file, &config.text_field)?;
    let sequences = tokenize_examples_placed(tok, &examples, &places, config, packing)?;
    if config.loss_on == train::LossOn::Assistant {
        warn_if_never_taught_to_stop(tok, file, &sequences);
    }
    Ok(sequences)
}

/// Whether `ex`, which `cut` left as `seq` without a token that carries loss (`removed` tokens cut
/// off), is a conversation with no assistant turn at all under `--loss-on assistant`: TRL refuses
/// those (where a long prompt that left no room is dropped with a warning).
pub fn lacks_assistant_turn(
    tok: &ChatTokenizer,
    ex: &crate::data::Example,
    loss_on: train::LossOn,
    cut: train::Cut,
    (seq, removed): (&Sequence, usize),
) -> Result<bool> {
    let conversation = matches!(ex, crate::data::Example::Messages(..));
    if loss_on != train::LossOn::Assistant || !conversation || seq.target_count() > 0 {
        return Ok(false);
    }
    if removed == 0 {
        return Ok(true);
    }
    let whole = train::Cut {
        max_length: usize::MAX,
        ..cut
    };
    Ok(train::tokenize_cut(tok, ex, loss_on, whole)?
        .0
        .target_count()
        == 0)
}

/// The error for an example (at `place`) that `lacks_assistant_turn`.
pub fn no_assistant_turn(place: &str) -> Error {
    Error::Invalid(format!(
        "{place}: no assistant turn to learn from (--loss-on assistant), which TRL refuses too"
    ))
}

/// Tokenizes examples read from `origin` as TRL's SFTTrainer prepares them: each cut to --max-length,
/// and those left without a token that carries loss dropped (with a warning naming them), as TRL drops
/// them, except for `packing`, where TRL packs them all (they take room, their rows carry what loss
/// their neighbours give); an error when none is left, and, as TRL's, for a conversation with no
/// assistant token under --loss-on assistant.
pub fn tokenize_examples(
    tok: &ChatTokenizer,
    examples: &[crate::data::Example],
    config: &TrainConfig,
    origin: &str,
    packing: bool,
) -> Result<Vec<Sequence>> {
    let places = crate::data::Places::numbered(origin);
    tokenize_examples_placed(tok, examples, &places, config, packing)
}

/// `tokenize_examples`, its errors naming each example's file and line (`places`).
pub fn tokenize_examples_placed(
    tok: &ChatTokenizer,
    examples: &[crate::data::Example],
    places: &crate::data::Places,
    config: &TrainConfig,
    packing: bool,
) -> Result<Vec<Sequence>> {
    let origin = places.origin();
    let mut sequences = Vec::with_capacity(examples.len());
    let (mut cut, mut unlearnable, mut cut_off) = (0, Vec::new(), 0);
    let at = |i: usize, e: Error| Error::Invalid(format!("{}: {e}", places.of(i)));
    for (i, ex) in examples.iter().enumerate() {
        let (seq, c) =
            train::tokenize_cut(tok, ex, config.loss_on, config.cut()).map_err(|e| at(i, e))?;
        cut += usize::from(c > 0);
        if seq.target_count() == 0 {
            if lacks_assistant_turn(tok, ex, config.loss_on, config.cut(), (&seq, c))
                .map_err(|e| at(i, e))?
            {
                return Err(no_assistant_turn(&places.of(i)));
            }
            unlearnable.push(i + 1);
            cut_off += usize::from(c > 0);
            if !packing {
                continue;
            }
        }
        sequences.push(seq);
    }
    let kept = match config.truncation {
        train::Truncation::KeepStart => "the start is kept",
        train::Truncation::KeepEnd => "the end is kept",
    };
    if cut > 0 {
        log::warn!(
            "{origin}: {} longer than --max-length {} and cut ({kept})",
            match cut {
                1 => "1 example was".to_string(),
                n => format!("{n} examples were"),
            },
            config.max_length
        );
    }
    if !unlearnable.is_empty() {
        let why = match cut_off {
            0 => String::new(),
            n => format!(
                "; --max-length {} cut off the tokens of {n} of them",
                config.max_length
            ),
        };
        let message = format!(
            "{origin}: {} of {} examples have no token that carries loss (--loss-on {}{why}): {}",
            unlearnable.len(),
            examples.len(),
            crate::value_name(config.loss_on),
            places.list(&unlearnable)
        );
        if unlearnable.len() == examples.len() {
            return Err(Error::Invalid(format!(
                "{message}; nothing is left to learn from"
            )));
        }
        match packing {
            true => log::warn!("{message}; they are packed all the same, as TRL packs them"),
            false => log::warn!("{message}; they are left out, as TRL leaves them out"),
        }
    }
    Ok(sequences)
}

/// TRL's warning where the assistant's loss never covers the token that ends its turn: the loss looks
/// healthy, and the model never learns to stop (a template whose `{% generation %}` block leaves the
/// end-of-turn token out, say).
fn warn_if_never_taught_to_stop(tok: &ChatTokenizer, file: &Path, sequences: &[Sequence]) {
    let Some(turn_end) = crate::generate::turn_end_token(tok) else {
        return;
    };
    let taught = sequences
        .iter()
        .flat_map(|s| &s.targets)
        .any(|&target| target == Some(turn_end));
    if !taught {
        log::warn!(
            "{}: with --loss-on assistant no token that carries loss is the end of an assistant turn \
             ({:?}): the model may not learn to stop, which the loss does not show. Put the end-of-turn \
             token inside the template's {{% generation %}} block, or train with --loss-on all",
            file.display(),
            tok.decode(&[turn_end]).unwrap_or_default()
        );
    }
}

/// Moves a seeded random `fraction` of `sequences` (at least one, leaving at least one) into the
/// returned validation set.
fn hold_out(sequences: &mut Vec<Sequence>, fraction: f64, seed: u64) -> Result<Vec<Sequence>> {
    // Drawn among the examples that carry loss (packing keeps the others to pack them).
    let labelled: Vec<usize> = (0..sequences.len())
        .filter(|&i| sequences[i].target_count() > 0)
        .collect();
    let n = labelled.len();
    let held = ((fraction * n as f64).round() as usize).max(1);
    if held >= n {
        return Err(Error::Invalid(format!(
            "--eval-split {fraction} leaves no training examples out of {n} (that carry loss)"
        )));
    }
    let mut rng = crate::rng::Rng::new(seed ^ 0x0E7A_15E7);
    let mut order = labelled;
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

#[cfg(test)]
mod tests {
    use super::within_positions;
    use crate::config::ModelConfig;

    fn config(extra: &str) -> ModelConfig {
        let text = format!(
            r#"{{"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 256, {extra}}}"#
        );
        ModelConfig::from_json_str(&text, std::path::Path::new("config.json")).unwrap()
    }

    /// `--max-length` stops at the positions the model can place: max_position_embeddings, stretched
    /// by linear scaling, or YaRN's factor times its original length where that reaches further.
    #[test]
    fn max_length_stops_where_the_positions_end() {
        let plain = config(r#""max_position_embeddings": 4096"#);
        assert_eq!(within_positions(100_000, &plain), 4096);
        assert_eq!(within_positions(1000, &plain), 1000);
        let linear = config(
            r#""max_position_embeddings": 4096, "rope_scaling": {"type": "linear", "factor": 2.0}"#,
        );
        assert_eq!(within_positions(100_000, &linear), 8192);
        // Qwen3's 128k setting keeps max_position_embeddings at 40,960.
        let yarn = config(
            r#""max_position_embeddings": 40960, "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}"#,
        );
        assert_eq!(within_positions(200_000, &yarn), 131_072);
        // A config whose max_position_embeddings already counts the factor keeps it.
        let counted = config(
            r#""max_position_embeddings": 163840, "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}"#,
        );
        assert_eq!(within_positions(200_000, &counted), 163_840);
    }
}
