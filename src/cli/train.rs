//! `nibble train`: the library's run with the options layered (preset < TOML file < flags) and a
//! progress bar.

use super::{SAME_INTERRUPTION, progress, rate};
use anyhow::{Context, Result};
use nibble::train::run::{Observer, RunSpec};
use nibble::train::settings::TrainSettings;
use nibble::train::{StepRecord, Trainer};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

pub fn run(flags: TrainSettings) -> Result<()> {
    let settings = TrainSettings::layered(flags)?;
    let need = |v: &Option<PathBuf>, flag: &str| {
        v.clone()
            .with_context(|| format!("--{flag} is required (on the command line or in --config)"))
    };
    let data = settings
        .data
        .clone()
        .filter(|files| !files.is_empty())
        .context("--data is required (on the command line or in --config)")?;
    let (model, output) = (
        need(&settings.model, "model")?,
        need(&settings.output, "output")?,
    );
    if nibble::models::flux2::config_at(&model)?.is_some() {
        let [folder] = data.as_slice() else {
            anyhow::bail!(
                "--data given {} times: a FLUX.2 image run trains on one folder of images",
                data.len()
            );
        };
        return train_klein(settings, &model, folder, &output);
    }
    if let Some((name, _)) = settings.image_options().into_iter().find(|(_, set)| *set) {
        anyhow::bail!(
            "--{} is an option for FLUX.2 image models; {} is a language model",
            name.replace('_', "-"),
            model.display()
        );
    }
    let config = settings.train_config()?;
    let options = nibble::train::run::RunOptions {
        record: Some(settings.record(&config)?),
        ..settings.run_options()?
    };
    if let Some(sample) = options.sample_prompts.iter().find(|p| p.control.is_some()) {
        anyhow::bail!(
            "--sample-prompts: the sample {:?} names control images, which are for FLUX.2 image \
             runs; {} is a language model",
            sample.text,
            model.display()
        );
    }
    let spec = RunSpec {
        model: &model,
        data: &data,
        output: &output,
        quant: settings.quant_request()?,
        config,
        options,
    };
    let device = settings.device.unwrap_or_default();
    let gpu = device.open()?;
    stop_on_signals();
    nibble::train::run::run(spec, gpu.as_ref(), &mut Progress::default())?;
    eprintln!("saved the adapter to {}", output.display());
    Ok(())
}

/// A FLUX.2 [klein] LoRA from a folder of captioned images: the flux2-klein preset under the options
/// given (unless another preset is named).
fn train_klein(
    settings: TrainSettings,
    model: &std::path::Path,
    data: &std::path::Path,
    output: &std::path::Path,
) -> Result<()> {
    let unsupported = [
        ("eval-data", settings.eval_data.is_some()),
        ("eval-split", settings.eval_split.is_some()),
        ("eval-on-start", settings.eval_on_start.is_some()),
        ("trainable-tokens", settings.trainable_tokens.is_some()),
        ("packing", settings.packing.is_some()),
        ("max-length", settings.max_length.is_some()),
        ("loss-on", settings.loss_on.is_some()),
        ("no-shuffle", settings.no_shuffle.is_some()),
        (
            "early-stopping-patience",
            settings.early_stopping_patience.is_some(),
        ),
        ("chat-template", settings.chat_template.is_some()),
        ("eos-token", settings.eos_token.is_some()),
        ("truncation-mode", settings.truncation_mode.is_some()),
        ("dataset-text-field", settings.dataset_text_field.is_some()),
        ("loss-type", settings.loss_type.is_some()),
        (
            "neftune-noise-alpha",
            settings.neftune_noise_alpha.is_some(),
        ),
        ("use-dora", settings.use_dora == Some(true)),
        ("init-lora-weights", settings.init_lora_weights.is_some()),
        ("lora-rank-pattern", settings.lora_rank_pattern.is_some()),
        ("lora-alpha-pattern", settings.lora_alpha_pattern.is_some()),
        ("bf16-checkpoints", settings.bf16_checkpoints.is_some()),
        (
            "offload-checkpoints",
            settings.offload_checkpoints.is_some(),
        ),
    ];
    if let Some((name, _)) = unsupported.iter().find(|(_, set)| *set) {
        anyhow::bail!("--{name} is not supported for FLUX.2 image runs yet");
    }
    let settings = match settings.preset.as_deref() {
        Some("flux2-klein") => settings,
        Some(other) => anyhow::bail!(
            "--preset {other} is for language models; FLUX.2 image runs take --preset flux2-klein \
             (the default for them)"
        ),
        None => settings.over(TrainSettings::preset("flux2-klein")?)?,
    };
    let quant = match settings.quant_request()? {
        Some(nibble::model::QuantRequest::Quantize(spec)) => Some(spec),
        _ => None,
    };
    let spec = nibble::train::flux2::FluxRunSpec {
        model,
        data,
        output,
        quant,
        config: settings.train_config()?,
        resolutions: settings
            .resolution
            .clone()
            .unwrap_or(vec![nibble::train::flux2::DEFAULT_RESOLUTION]),
        trigger: settings.trigger.clone(),
        default_caption: settings.default_caption.clone(),
        flip_x: settings.flip_x.unwrap_or(false),
        controls: settings.control.clone().unwrap_or_default(),
        control_resolution: settings
            .control_resolution
            .unwrap_or(nibble::train::flux2::DEFAULT_CONTROL_RESOLUTION),
        caption_dropout: settings
            .caption_dropout
            .unwrap_or(nibble::train::flux2::DEFAULT_CAPTION_DROPOUT),
        sampling: settings
            .sigma_sampling
            .unwrap_or(nibble::train::flux2::SigmaSampling::Weighted),
        text_tokens: nibble::models::flux2::TEXT_TOKENS,
        options: settings.run_options()?,
        cache_dir: match settings.no_cache {
            Some(true) => None,
            _ => settings
                .cache_dir
                .clone()
                .or_else(nibble::train::feature_cache::FeatureCache::default_dir),
        },
        text_encoder: settings.text_encoder.clone(),
        vae: settings.vae.clone(),
    };
    let gpu = settings.device.unwrap_or_default().open()?;
    stop_on_signals();
    nibble::train::flux2::run(spec, gpu.as_ref(), &mut Progress::default())?;
    eprintln!(
        "saved the LoRA to {}",
        output.join(nibble::train::flux2::LORA_FILE).display()
    );
    Ok(())
}

/// Set by the first Ctrl-C or SIGTERM: the run stops after the step under way, with a checkpoint.
static STOP: AtomicBool = AtomicBool::new(false);

/// Set when the steps begin: before, a run stops where it is (loading, encoding images) instead.
static TRAINING: AtomicBool = AtomicBool::new(false);

/// The first signal asks the run to stop after the current step and save; a second one ends the process
/// at once (the checkpoints already written stay complete: each is renamed into place whole).
fn stop_on_signals() {
    let mut first: Option<std::time::Instant> = None;
    let installed = ctrlc::set_handler(move || match first {
        None => {
            first = Some(std::time::Instant::now());
            STOP.store(true, Ordering::SeqCst);
            match TRAINING.load(Ordering::SeqCst) {
                true => eprintln!(
                    "\nfinishing the current step, then saving a checkpoint (interrupt again to \
                     quit at once)"
                ),
                false => eprintln!(
                    "\nstopping before training starts, as soon as the loading or encoding under \
                     way allows (interrupt again to quit at once)"
                ),
            }
        }
        Some(at) if at.elapsed() < SAME_INTERRUPTION => {}
        Some(_) => {
            nibble::fsutil::remove_partial_outputs();
            eprintln!("\nstopping now; the newest complete checkpoint is kept");
            std::process::exit(130);
        }
    });
    if let Err(e) = installed {
        log::warn!(
            "cannot catch Ctrl-C ({e}): interrupting will lose the steps since the last checkpoint"
        );
    }
}

/// Training progress (`progress::Progress`): a bar with step, loss, tokens/s and a moving ETA on a
/// terminal, log lines and a heartbeat during long steps otherwise.
#[derive(Default)]
struct Progress {
    shown: Option<progress::Progress>,
    total: usize,
}

impl Observer for Progress {
    fn started(&mut self, trainer: &Trainer) {
        TRAINING.store(true, Ordering::SeqCst);
        self.total = trainer.total_steps;
        self.shown = Some(progress::Progress::start(
            "step",
            trainer.step,
            trainer.total_steps,
            true,
        ));
    }

    fn stepped(&mut self, r: &StepRecord) {
        let total = self.total;
        if let Some(shown) = &mut self.shown {
            let message = format!("loss {:.4}  {} tokens/s", r.loss, rate(r.tokens_per_s));
            shown.advanced(r.step, message, || {
                format!(
                    "step {}/{total}  loss {:.4}  lr {:.2e}  grad_norm {:.3}  {} tokens/s",
                    r.step,
                    r.loss,
                    r.lr,
                    r.grad_norm,
                    rate(r.tokens_per_s)
                )
            });
        }
    }

    fn validating(&mut self, examples: usize) {
        if let Some(shown) = &mut self.shown {
            shown.doing(&format!("validating {examples} examples"));
        }
    }

    fn evaluated(&mut self, step: usize, loss: f64) {
        if let Some(shown) = &mut self.shown {
            shown.resume_units();
            shown.println(format!("step {step}: validation loss {loss:.4}"));
        }
    }

    fn stalled(&mut self, steps: usize, why: &str) {
        // Without a bar the run's own warning is the line.
        if let Some(shown) = self.shown.as_ref().filter(|s| s.on_terminal()) {
            shown.println(format!(
                "warning: nothing has been learned for {steps} steps ({why})"
            ));
        }
    }

    fn stop_requested(&mut self) -> bool {
        STOP.load(Ordering::SeqCst)
    }

    fn finished(&mut self) {
        if let Some(shown) = &mut self.shown {
            shown.finish();
        }
    }
}
