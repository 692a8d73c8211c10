//! Training a FLUX.2 [klein] LoRA on cached latents and caption features: flow matching (x_σ =
//! (1 − σ)·x0 + σ·n, target n − x0, mean squared error), σ and noise drawn on the host from the run's
//! seeded generator (so every executor sees the same draws), clipping and AdamW as for the LLMs.

use crate::error::{Error, Result};
use crate::exec::cpu::{self, Bindings, OptimizerState};
use crate::lora::{LoraAdapter, resolve_among};
use crate::models::decoder::LoraSpec;
use crate::models::flux2::{self, Flux2Inputs, Flux2Model, Flux2Step};
use crate::rng::Rng;
use crate::train::{TrainConfig, cpu_optimizer_step};

/// How each example's σ is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SigmaSampling {
    /// σ = sigmoid(z), z ~ N(0, 1) (logit-normal: most draws mid-way).
    Sigmoid,
    /// σ ~ U(0, 1).
    Uniform,
    /// sigmoid, then shifted towards noise as for high resolutions: σ' = 3σ / (1 + 2σ).
    Shifted,
}

serde_as_value_enum!(SigmaSampling);

/// One cached training example: its packed latents (already normalised) and its caption's features.
#[derive(Clone, Debug, PartialEq)]
pub struct Cached {
    /// [rows · cols, in_channels], row-major over the latent grid.
    pub latents: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
    /// [text tokens, text_dim].
    pub text: Vec<f32>,
}

/// The σ and noise of one example in one step.
#[derive(Clone, Debug, PartialEq)]
pub struct Draw {
    pub sigma: f32,
    pub noise: Vec<f32>,
}

/// σ by `sampling`, then `elements` standard normal noise values, from `rng`.
pub fn draw(rng: &mut Rng, sampling: SigmaSampling, elements: usize) -> Draw {
    let sigmoid = |z: f64| 1.0 / (1.0 + (-z).exp());
    let sigma = match sampling {
        SigmaSampling::Sigmoid => sigmoid(rng.normal()),
        SigmaSampling::Uniform => rng.uniform(),
        SigmaSampling::Shifted => {
            let s = sigmoid(rng.normal());
            3.0 * s / (1.0 + 2.0 * s)
        }
    };
    let noise = (0..elements).map(|_| rng.normal() as f32).collect();
    Draw {
        sigma: sigma as f32,
        noise,
    }
}

/// A LoRA being trained on a klein transformer, on the CPU executor.
pub struct FluxTrainer<'m> {
    pub model: &'m Flux2Model,
    pub config: TrainConfig,
    pub adapter: LoraAdapter,
    m: LoraAdapter,
    v: LoraAdapter,
    /// Optimizer steps taken.
    pub step: usize,
    pub total_steps: usize,
}

impl<'m> FluxTrainer<'m> {
    /// LoRA on `config.lora`'s targets among the block linears (`all-linear`: all of them), freshly
    /// initialised from `config.seed` as PEFT does, or `init`.
    pub fn new(
        model: &'m Flux2Model,
        config: TrainConfig,
        total_steps: usize,
        init: Option<LoraAdapter>,
    ) -> Result<Self> {
        let adapter = match init {
            Some(a) => a,
            None => LoraAdapter::init_among(
                model.config.block_linears(),
                config.lora.clone(),
                &mut Rng::new(config.seed),
            )?,
        };
        // Every target must be a block linear of this model.
        let targets: Vec<String> = adapter.pairs().map(|(p, _)| p.to_string()).collect();
        resolve_among(model.config.block_linears(), &targets)?;
        if config.lora.dropout > 0.0 {
            return Err(Error::Invalid(
                "--lora-dropout is not supported for FLUX.2 yet: use 0".into(),
            ));
        }
        Ok(FluxTrainer {
            model,
            m: adapter.zeros_like(),
            v: adapter.zeros_like(),
            adapter,
            config,
            step: 0,
            total_steps,
        })
    }

    /// One optimizer step over `batch` (each example with its draw): the loss is the mean over the
    /// batch. Returns that loss and the gradients' norm before clipping.
    pub fn step(&mut self, batch: &[(&Cached, &Draw)]) -> Result<(f64, f64)> {
        let c = &self.model.config;
        let spec = LoraSpec::of(&self.adapter);
        let mut grads = self.adapter.zeros_like();
        let mut loss_sum = 0.0;
        for (example, draw) in batch {
            let tokens = example.rows * example.cols;
            let text_tokens = example.text.len() / c.text_dim;
            let step = Flux2Step {
                image_tokens: tokens,
                text_tokens,
                backward: true,
                checkpoint: self.config.checkpoint,
            };
            let noised: Vec<f32> = example
                .latents
                .iter()
                .zip(&draw.noise)
                .map(|(x, n)| (1.0 - draw.sigma) * x + draw.sigma * n)
                .collect();
            let target: Vec<f32> = draw
                .noise
                .iter()
                .zip(&example.latents)
                .map(|(n, x)| n - x)
                .collect();
            let (image_ids, text_ids) =
                flux2::position_ids(example.rows, example.cols, text_tokens);
            let inputs = flux2::inputs(
                c,
                &Flux2Inputs {
                    noised: &noised,
                    text: &example.text,
                    sigma: draw.sigma,
                    image_ids: &image_ids,
                    text_ids: &text_ids,
                    target: &target,
                    grad_scale: 1.0 / batch.len() as f32,
                },
            );
            let graph = flux2::build(c, Some(&spec), step);
            let mut out = cpu::run(
                &graph,
                Bindings {
                    model: self.model,
                    adapter: Some(&self.adapter),
                    grads: Some(&mut grads),
                    cache: None,
                    optimizer: None,
                    inputs: &inputs,
                    precision: self.config.precision,
                },
            )?;
            loss_sum += out.take("loss")[0] as f64;
        }
        let loss = loss_sum / batch.len() as f64;
        if !loss.is_finite() {
            return Err(Error::Invalid(format!(
                "the loss became {loss} at step {}; stopping",
                self.step + 1
            )));
        }
        let state = OptimizerState {
            params: &mut self.adapter,
            m: &mut self.m,
            v: &mut self.v,
        };
        let adamw = self.config.adamw_at(self.step, self.total_steps);
        let grad_norm = cpu_optimizer_step(
            self.model,
            &mut grads,
            state,
            (self.config.max_grad_norm, adamw),
            self.config.precision,
        )?;
        self.step += 1;
        Ok((loss, grad_norm))
    }
}

/// The key prefix of LoRA files for the FLUX.2 transformer that ComfyUI, ai-toolkit and diffusers'
/// Flux2 loader read.
const KEY_PREFIX: &str = "diffusion_model.";

/// `ss_base_model_version` of a klein transformer, by its shape.
pub fn base_model_version(c: &flux2::Flux2Config) -> &'static str {
    match (c.double_blocks, c.single_blocks, c.hidden()) {
        (8, 24, 4096) => "flux2_klein_9b",
        (5, 20, 3072) => "flux2_klein_4b",
        _ => "flux2",
    }
}

/// The LoRA file's bytes: `diffusion_model.<block linear>.lora_A.weight` [r, in] and `.lora_B.weight`
/// [out, r] in bf16, no alpha keys (readers then use scale 1, so B carries the trained scale
/// alpha/r), metadata naming the base model and nibble.
pub fn lora_file(adapter: &LoraAdapter, c: &flux2::Flux2Config) -> Result<Vec<u8>> {
    let scale = adapter.config.scale();
    let bf16 = |v: &[f32], k: f32| -> Vec<u8> {
        v.iter()
            .flat_map(|&x| half::bf16::from_f32(x * k).to_le_bytes())
            .collect()
    };
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = adapter
        .pairs()
        .flat_map(|(path, p)| {
            [
                (
                    format!("{KEY_PREFIX}{path}.lora_A.weight"),
                    vec![p.rank, p.in_features],
                    bf16(&p.a, 1.0),
                ),
                (
                    format!("{KEY_PREFIX}{path}.lora_B.weight"),
                    vec![p.out_features, p.rank],
                    bf16(&p.b, scale),
                ),
            ]
        })
        .collect();
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::BF16,
                shape.clone(),
                bytes,
            )
            .map_err(|e| Error::Invalid(format!("LoRA tensor {name}: {e}")))?;
            Ok((name.clone(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    let r = adapter.config.r.to_string();
    let metadata = std::collections::HashMap::from([
        ("format".to_string(), "pt".to_string()),
        (
            "ss_base_model_version".to_string(),
            base_model_version(c).to_string(),
        ),
        ("ss_network_module".to_string(), "networks.lora".to_string()),
        ("ss_network_dim".to_string(), r.clone()),
        ("ss_network_alpha".to_string(), r),
        (
            "software".to_string(),
            format!("nibble {}", env!("CARGO_PKG_VERSION")),
        ),
    ]);
    safetensors::serialize(views, Some(metadata))
        .map_err(|e| Error::Invalid(format!("the LoRA file: {e}")))
}

/// Writes `lora_file` to `path` atomically.
#[cfg(not(target_arch = "wasm32"))]
pub fn save_lora(
    adapter: &LoraAdapter,
    c: &flux2::Flux2Config,
    path: &std::path::Path,
) -> Result<()> {
    let bytes = lora_file(adapter, c)?;
    crate::fsutil::write_atomically(path, |tmp| std::fs::write(tmp, &bytes))
}

/// Reads a LoRA file for the FLUX.2 transformer `c` (as `lora_file` writes it, or with per-module
/// `.alpha` keys, as kohya-style files have): every key must name a block linear of `c` with the
/// right shape and one rank throughout.
pub fn load_lora(
    file: &crate::source::SafetensorsFile,
    c: &flux2::Flux2Config,
) -> Result<LoraAdapter> {
    let linears = c.block_linears();
    let bad = |name: &str, msg: String| Error::tensor(file.path(), name, msg);
    let known = |name: &str| {
        let Some(rest) = name.strip_prefix(KEY_PREFIX) else {
            return false;
        };
        linears.iter().any(|(p, _, _)| {
            rest.strip_prefix(p.as_str())
                .is_some_and(|r| matches!(r, ".lora_A.weight" | ".lora_B.weight" | ".alpha"))
        })
    };
    if let Some(unknown) = file.tensor_names().find(|n| !known(n)) {
        return Err(bad(
            unknown,
            "is not a LoRA matrix of a block linear of this FLUX.2 transformer (expected \
             diffusion_model.<block linear, such as double_blocks.0.img_attn.qkv>.lora_A.weight \
             and .lora_B.weight)"
                .into(),
        ));
    }
    let mut rank = None;
    let mut alpha = None;
    let mut modules = Vec::new();
    for (path, out, inp) in &linears {
        let key = |which: &str| format!("{KEY_PREFIX}{path}.{which}");
        let (ka, kb) = (key("lora_A.weight"), key("lora_B.weight"));
        match (file.info(&ka).is_some(), file.info(&kb).is_some()) {
            (false, false) => continue,
            (true, true) => {}
            _ => return Err(bad(&ka, "has lora_A or lora_B without the other".into())),
        }
        let (a, b) = (file.read_f32(&ka)?, file.read_f32(&kb)?);
        let r = a.len() / inp;
        if r == 0 || a.len() != r * inp || b.len() != out * r {
            return Err(bad(
                &ka,
                format!("shapes do not fit the linear [{out}, {inp}] at one rank"),
            ));
        }
        if *rank.get_or_insert(r) != r {
            return Err(bad(
                &ka,
                format!("rank {r}, where other modules have {rank:?}"),
            ));
        }
        let shape = |name: &str| file.info(name).map(|i| i.shape.clone()).unwrap_or_default();
        if shape(&ka).len() != 2 || shape(&ka)[1] != *inp || shape(&kb) != [*out, shape(&ka)[0]] {
            return Err(bad(
                &ka,
                format!(
                    "lora_A {:?} and lora_B {:?} do not fit the linear [{out}, {inp}] ([r, {inp}] \
                     and [{out}, r])",
                    shape(&ka),
                    shape(&kb)
                ),
            ));
        }
        if file.info(&key("alpha")).is_some() {
            let value = match file.read_f32(&key("alpha"))?.as_slice() {
                [a] if a.is_finite() && *a > 0.0 => *a as f64,
                _ => return Err(bad(&key("alpha"), "must be one positive number".into())),
            };
            if alpha.is_some_and(|a| a != value) {
                return Err(bad(&key("alpha"), "alphas differ between modules".into()));
            }
            alpha = Some(value);
        }
        let pair = crate::lora::LoraPair {
            rank: r,
            in_features: *inp,
            out_features: *out,
            a,
            b,
        };
        modules.push((path.clone(), pair));
    }
    let Some(r) = rank else {
        return Err(Error::Invalid(format!(
            "{}: no LoRA matrices for this FLUX.2 transformer",
            file.path().display()
        )));
    };
    let targets = modules.iter().map(|(p, _)| p.clone()).collect();
    Ok(LoraAdapter {
        config: crate::lora::LoraConfig {
            r,
            alpha: alpha.unwrap_or(r as f64),
            dropout: 0.0,
            use_rslora: false,
            targets,
        },
        modules,
    })
}

/// The LoRA file a klein run leaves at the top of its output folder.
pub const LORA_FILE: &str = "lora.safetensors";

/// A klein run from files: a diffusers pipeline folder and a folder of captioned images.
#[cfg(not(target_arch = "wasm32"))]
pub struct FluxRunSpec<'a> {
    pub model: &'a std::path::Path,
    pub data: &'a std::path::Path,
    pub output: &'a std::path::Path,
    /// Storage of the transformer's linears (the text encoder runs in NF4 groups of 64 when its widths
    /// allow, else dense).
    pub quant: Option<crate::quant::QuantSpec>,
    pub config: TrainConfig,
    /// Image side in pixels (buckets keep each image's aspect at about this squared).
    pub resolution: usize,
    pub trigger: Option<String>,
    /// Probability of training an example with the empty caption.
    pub caption_dropout: f64,
    pub sampling: SigmaSampling,
    /// Caption tokens (the pipeline's 512).
    pub text_tokens: usize,
    pub overwrite: bool,
}

/// What a klein run reports after each optimizer step.
#[derive(Clone, Debug, PartialEq)]
pub struct FluxStepRecord {
    pub step: usize,
    pub total_steps: usize,
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub seconds: f64,
}

/// Trains a klein LoRA: caption features (the text encoder, then released), image latents (the VAE,
/// then released), then the transformer's steps on the CPU executor; writes metrics.jsonl as it goes
/// and the LoRA file at the end. Returns the last step's record.
#[cfg(not(target_arch = "wasm32"))]
pub fn run_folder(
    spec: FluxRunSpec,
    on_step: &mut dyn FnMut(&FluxStepRecord),
) -> Result<FluxStepRecord> {
    use crate::model::{QuantRequest, TokenizerFiles};
    use crate::quant::{QuantFormat, QuantSpec};
    use std::io::Write;
    let FluxRunSpec {
        model: path,
        data,
        output,
        quant,
        config,
        resolution,
        trigger,
        caption_dropout,
        sampling,
        text_tokens,
        overwrite,
    } = spec;
    if !(0.0..1.0).contains(&caption_dropout) {
        return Err(Error::Invalid(format!(
            "--caption-dropout must be at least 0 and below 1 (got {caption_dropout})"
        )));
    }
    if !(16..=4096).contains(&resolution) {
        return Err(Error::Invalid(format!(
            "--resolution must be from 16 to 4096 pixels (got {resolution})"
        )));
    }
    let mut folder = crate::train::folder::RunFolder::claim(output, overwrite, None)?;
    folder.check_inputs(&[path, data])?;
    let flux = flux2::config_at(path)?.ok_or_else(|| {
        Error::Invalid(format!("{}: not a FLUX.2 pipeline folder", path.display()))
    })?;
    let examples = crate::images::scan_folder(data, trigger.as_deref())?;
    // Everything that can be checked before hours of encoding is checked first.
    let vae = crate::models::vae::load(&path.join("vae"))?;
    if 4 * vae.config.latent_channels != flux.in_channels {
        return Err(Error::Invalid(format!(
            "{}: the VAE's {} latent channels make tokens of {}, and the transformer reads {}",
            path.display(),
            vae.config.latent_channels,
            4 * vae.config.latent_channels,
            flux.in_channels
        )));
    }
    let tokens = |side: usize| (side / 16) * (side / 16);
    let cache = examples.len() as u64
        * 4
        * ((text_tokens * flux.text_dim) + tokens(resolution) * flux.in_channels) as u64;
    let step = Flux2Step::training(resolution, text_tokens, config.checkpoint);
    let needs = flux2::plan(&flux, quant, config.lora.r, step).total + cache;
    crate::alloc::check_fits(
        &format!("training on {} images at {resolution} px", examples.len()),
        needs,
        "; a lower --resolution, fewer images or a 4-bit --quant needs less",
    )?;

    // Caption features, the text encoder held only while they are computed.
    let read = |name: &str| crate::fsutil::read_to_string(&path.join("tokenizer").join(name)).ok();
    let files = TokenizerFiles {
        tokenizer_json: read("tokenizer.json"),
        tokenizer_config_json: read("tokenizer_config.json"),
        chat_template_jinja: read("chat_template.jinja"),
    };
    let tokenizer = crate::tokenizer::ChatTokenizer::from_files(&files, &path.join("tokenizer"))?;
    let (features, empty) = {
        let source = crate::model::open(path.join("text_encoder"))?;
        let nf4 = QuantSpec::new(QuantFormat::Nf4, 64)?;
        let storage = if source.config.hidden_size % 64 == 0 {
            QuantRequest::Quantize(nf4)
        } else {
            QuantRequest::Dense
        };
        let encoder = source.load(Some(storage))?;
        if 3 * encoder.config.hidden_size != flux.text_dim {
            return Err(Error::Invalid(format!(
                "{}: the text encoder's width {} gives features of {}, and the transformer reads {}",
                path.display(),
                encoder.config.hidden_size,
                3 * encoder.config.hidden_size,
                flux.text_dim
            )));
        }
        let encode = |caption: &str| {
            flux2::caption_features(&encoder, &tokenizer, caption, text_tokens, config.precision)
        };
        let features = examples
            .iter()
            .map(|e| encode(&e.caption))
            .collect::<Result<Vec<_>>>()?;
        (features, encode("")?)
    };
    // Latents, then the VAE is released.
    let cached: Vec<Cached> = {
        examples
            .iter()
            .zip(features)
            .map(|(e, text)| {
                let (pixels, w, h) = crate::images::load_pixels(&e.image, resolution)?;
                let latents = crate::models::vae::encode(&vae, &pixels, (h, w))?;
                Ok(Cached {
                    latents,
                    rows: h / 16,
                    cols: w / 16,
                    text,
                })
            })
            .collect::<Result<Vec<_>>>()?
    };
    drop(vae);
    let model = flux2::load_diffusers(path, quant)?;
    let per_step = (config.batch_size * config.grad_accum).max(1);
    let total_steps = config
        .max_steps
        .unwrap_or_else(|| config.epochs.max(1) * cached.len().div_ceil(per_step));
    let seed = config.seed;
    let mut trainer = FluxTrainer::new(&model, config, total_steps, None)?;
    folder.clear_earlier_run()?;
    let metrics_path = output.join("metrics.jsonl");
    let mut metrics =
        std::fs::File::create(&metrics_path).map_err(|e| Error::io(&metrics_path, e))?;
    folder.take();
    let mut order_rng = Rng::new(seed ^ 0x5eed_0001);
    let mut draw_rng = Rng::new(seed ^ 0x5eed_0002);
    let mut order: Vec<usize> = Vec::new();
    let mut last = None;
    while trainer.step < total_steps {
        let start = std::time::Instant::now();
        let mut batch = Vec::with_capacity(per_step);
        for _ in 0..per_step {
            if order.is_empty() {
                order = (0..cached.len()).collect();
                for i in (1..order.len()).rev() {
                    order.swap(i, order_rng.below(i as u64 + 1) as usize);
                }
            }
            let i = order.pop().expect("refilled");
            let dropped = draw_rng.uniform() < caption_dropout;
            let example = &cached[i];
            let draw = draw(&mut draw_rng, sampling, example.latents.len());
            batch.push((i, dropped, draw));
        }
        let with_captions: Vec<Cached> = batch
            .iter()
            .map(|(i, dropped, _)| {
                let mut e = cached[*i].clone();
                if *dropped {
                    e.text = empty.clone();
                }
                e
            })
            .collect();
        let pairs: Vec<(&Cached, &Draw)> = with_captions
            .iter()
            .zip(batch.iter().map(|b| &b.2))
            .collect();
        let lr = trainer.config.lr_at(trainer.step, total_steps);
        let (loss, grad_norm) = trainer.step(&pairs)?;
        let record = FluxStepRecord {
            step: trainer.step,
            total_steps,
            loss,
            grad_norm,
            lr,
            seconds: start.elapsed().as_secs_f64(),
        };
        let line = serde_json::json!({"step": record.step, "loss": loss, "lr": lr,
                                      "grad_norm": grad_norm, "seconds": record.seconds});
        writeln!(metrics, "{line}").map_err(|e| Error::io(&metrics_path, e))?;
        on_step(&record);
        last = Some(record);
    }
    save_lora(&trainer.adapter, &model.config, &output.join(LORA_FILE))?;
    last.ok_or_else(|| Error::Invalid("the run has no steps".into()))
}
