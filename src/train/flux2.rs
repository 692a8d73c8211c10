//! Training a FLUX.2 [klein] LoRA on cached latents and caption features: flow matching (x_σ =
//! (1 − σ)·x0 + σ·n, target n − x0, mean squared error), σ and noise drawn on the host from the run's
//! seeded generator (so every executor sees the same draws), clipping and AdamW as for the LLMs.

use crate::error::{Error, Result};
use crate::exec::cpu::{self, Bindings};
use crate::lora::{LoraAdapter, resolve_among};
use crate::models::decoder::LoraSpec;
use crate::models::flux2::{self, Flux2Inputs, Flux2Model, Flux2Step};
use crate::rng::Rng;
use crate::shared::Shared;

/// The image side when none is asked for (`--resolution`).
pub const DEFAULT_RESOLUTION: usize = 512;

/// Control images' side when none is asked for (`--control-resolution`): their area is capped at
/// this squared, as Flux2KleinPipeline caps reference images.
pub const DEFAULT_CONTROL_RESOLUTION: usize = 1024;

/// The probability of the empty caption when none is asked for (`--caption-dropout`).
pub const DEFAULT_CAPTION_DROPOUT: f64 = 0.05;

/// How each example's σ is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SigmaSampling {
    /// σ = sigmoid(z), z ~ N(0, 1) (logit-normal: most draws mid-way).
    Sigmoid,
    /// σ ~ U(0, 1).
    Uniform,
    /// sigmoid, then shifted towards noise as for high resolutions: σ' = 3σ / (1 + 2σ).
    Shifted,
    /// ai-toolkit's `timestep_type: weighted` (its klein preset): σ = t/1000 for t drawn uniformly
    /// from 1000, 999, ..., 2 (its index i below 999, as `torch.randint(0, 999)` draws it), the
    /// example's loss weighted by ai-toolkit's measured weight of index i (0.44 to 1.52, mean 1:
    /// highest at t ≈ 876, mostly noise; about 0.72 from t = 250 to 100; lowest near the image).
    Weighted,
}

serde_as_value_enum!(SigmaSampling);

/// One cached training example: its packed latents (already normalised) and its caption's features.
#[derive(Clone, Debug, PartialEq)]
pub struct Cached {
    /// [rows · cols, in_channels], row-major over the latent grid.
    pub latents: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
    /// [text tokens, text_dim], shared by the examples with one caption (25 MB each for 9B).
    pub text: std::sync::Arc<Vec<f32>>,
    /// Control images (`--control`: what an edit LoRA learns to change), clean beside the noised
    /// latents at every step; shared by an image's examples at each resolution.
    pub references: std::sync::Arc<Vec<flux2::Reference>>,
}

/// The σ, loss weight and noise of one example in one step.
#[derive(Clone, Debug, PartialEq)]
pub struct Draw {
    pub sigma: f32,
    /// What the example's loss (and so its gradients) is multiplied by: 1 but for `Weighted`.
    pub loss_weight: f32,
    pub noise: Vec<f32>,
}

/// ai-toolkit's timestep grid: 1000 timesteps, of which `torch.randint(0, 999)` reaches the first 999.
const WEIGHTED_TIMESTEPS: u64 = 999;

/// σ by `sampling`, then `elements` standard normal noise values, from `rng`.
pub fn draw(rng: &mut Rng, sampling: SigmaSampling, elements: usize) -> Draw {
    let sigmoid = |z: f64| 1.0 / (1.0 + (-z).exp());
    let (sigma, loss_weight) = match sampling {
        SigmaSampling::Sigmoid => (sigmoid(rng.normal()) as f32, 1.0),
        SigmaSampling::Uniform => (rng.uniform() as f32, 1.0),
        SigmaSampling::Shifted => {
            let s = sigmoid(rng.normal());
            ((3.0 * s / (1.0 + 2.0 * s)) as f32, 1.0)
        }
        SigmaSampling::Weighted => {
            let index = rng.below(WEIGHTED_TIMESTEPS) as usize;
            // In f32 as ai-toolkit divides its f32 timesteps.
            let sigma = (1000 - index) as f32 / 1000.0;
            (
                sigma,
                super::timestep_weights::AI_TOOLKIT_TIMESTEP_WEIGHTS[index],
            )
        }
    };
    let noise = (0..elements).map(|_| rng.normal() as f32).collect();
    Draw {
        sigma,
        loss_weight,
        noise,
    }
}

/// What a FLUX.2 LoRA trains on: the frozen transformer and the cached examples, with how each
/// example's caption and noise are drawn.
pub struct ImageWork<'a> {
    pub model: Shared<'a, Flux2Model>,
    pub examples: Vec<Cached>,
    /// The empty caption's features (what a dropped caption trains with).
    pub empty_caption: Vec<f32>,
    pub sampling: SigmaSampling,
    /// Probability of training an example with the empty caption.
    pub caption_dropout: f64,
}

/// `--resolution`, as training and `nibble plan` take it: each bucket's sides round down to
/// multiples of 16.
pub fn check_resolution(resolution: usize) -> Result<()> {
    if !(16..=4096).contains(&resolution) {
        return Err(Error::Invalid(format!(
            "--resolution must be from 16 to 4096 pixels (got {resolution})"
        )));
    }
    Ok(())
}

/// `--caption-dropout` is a probability below 1 (1 would never show a caption).
fn check_caption_dropout(p: f64) -> Result<()> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::Invalid(format!(
            "--caption-dropout must be at least 0 and below 1 (got {p})"
        )));
    }
    Ok(())
}

/// LoRA options a klein transformer can be trained with: targets among its block linears, no
/// dropout, one rank and alpha, no DoRA. Checked before any caption or image is encoded.
fn check_lora_options(lora: &crate::lora::LoraConfig, c: &flux2::Flux2Config) -> Result<()> {
    if lora.dropout > 0.0 {
        return Err(Error::Invalid(
            "--lora-dropout is not supported for FLUX.2 yet: use 0".into(),
        ));
    }
    // The LoRA file's formats carry one alpha and no magnitudes.
    if lora.use_dora || lora.has_patterns() {
        return Err(Error::Invalid(
            "DoRA and per-module ranks or alphas are not supported for FLUX.2 yet".into(),
        ));
    }
    if !lora.target_parameters.is_empty() {
        return Err(Error::Invalid(
            "--target-parameters: a FLUX.2 transformer's LoRA adapts its block linears \
             (--target-modules); it has no parameters adapted by name"
                .into(),
        ));
    }
    resolve_among(c.block_linears(), &lora.targets).map(|_| ())
}

/// One example of an optimizer step: which, whether its caption is dropped, its σ and noise.
#[derive(Clone, Debug, PartialEq)]
pub struct ImagePick {
    pub example: usize,
    pub caption_dropped: bool,
    pub draw: Draw,
}

impl ImagePick {
    /// The loss the step minimises for this pick, of its graph's mean squared error.
    pub fn weighted(&self, mse: f64) -> f64 {
        self.draw.loss_weight as f64 * mse
    }
}

impl ImageWork<'_> {
    /// Checks that the examples fit the transformer and that an adapter can be trained on it.
    pub fn check(&self, lora: &crate::lora::LoraConfig) -> Result<()> {
        let c = &self.model.config;
        if self.examples.is_empty() {
            return Err(Error::Invalid("the image dataset is empty".into()));
        }
        check_lora_options(lora, c)?;
        check_caption_dropout(self.caption_dropout)?;
        let text_tokens = self.empty_caption.len() / c.text_dim;
        for (i, e) in self.examples.iter().enumerate() {
            if e.rows * e.cols == 0
                || e.latents.len() != e.rows * e.cols * c.in_channels
                || e.text.len() != text_tokens * c.text_dim
                || text_tokens == 0
            {
                return Err(Error::Invalid(format!(
                    "cached example {}: {} latent values for a {}x{} grid of {} channels and {} \
                     caption values for {text_tokens} tokens of {}: they do not fit this transformer",
                    i + 1,
                    e.latents.len(),
                    e.rows,
                    e.cols,
                    c.in_channels,
                    e.text.len(),
                    c.text_dim
                )));
            }
            if let Some(r) = e
                .references
                .iter()
                .find(|r| r.rows * r.cols == 0 || r.tokens.len() != r.rows * r.cols * c.in_channels)
            {
                return Err(Error::Invalid(format!(
                    "cached example {}: a control image of {} latent values for a {}x{} grid of {} \
                     channels",
                    i + 1,
                    r.tokens.len(),
                    r.rows,
                    r.cols,
                    c.in_channels
                )));
            }
        }
        Ok(())
    }

    /// A fresh adapter on `lora`'s targets among the block linears (`all-linear`: all of them),
    /// initialised as PEFT does; or `init`, whose targets must be block linears.
    pub fn adapter(
        &self,
        lora: &crate::lora::LoraConfig,
        rng: &mut Rng,
        init: Option<LoraAdapter>,
    ) -> Result<LoraAdapter> {
        let linears = self.model.config.block_linears();
        let adapter = match init {
            Some(a) => a,
            None => LoraAdapter::init_among(linears.clone(), lora.clone(), rng)?,
        };
        let targets: Vec<String> = adapter.pairs().map(|(p, _)| p.to_string()).collect();
        resolve_among(linears, &targets)?;
        Ok(adapter)
    }

    /// Example `example`'s caption dropout and draw, from `rng`.
    pub fn pick(&self, example: usize, rng: &mut Rng) -> ImagePick {
        let caption_dropped = rng.uniform() < self.caption_dropout;
        let draw = draw(rng, self.sampling, self.examples[example].latents.len());
        ImagePick {
            example,
            caption_dropped,
            draw,
        }
    }

    /// Latent tokens of a pick.
    pub fn tokens(&self, pick: &ImagePick) -> usize {
        let e = &self.examples[pick.example];
        e.rows * e.cols
    }

    /// The forward and backward graph of one pick (its output `loss` is the example's mean squared
    /// error; the gradients are those of grad_scale times its weighted loss) and its inputs.
    pub fn graph(
        &self,
        pick: &ImagePick,
        spec: &LoraSpec,
        grad_scale: f32,
        checkpoint: bool,
    ) -> (crate::graph::Graph, crate::graph::StepInputs) {
        let c = &self.model.config;
        let example = &self.examples[pick.example];
        let text = if pick.caption_dropped {
            &self.empty_caption
        } else {
            &example.text
        };
        let text_tokens = text.len() / c.text_dim;
        let reference_tokens = example.references.iter().map(|r| r.rows * r.cols).sum();
        let step = Flux2Step {
            image_tokens: example.rows * example.cols,
            reference_tokens,
            text_tokens,
            backward: true,
            checkpoint,
        };
        let (sigma, noise) = (pick.draw.sigma, &pick.draw.noise);
        let noised: Vec<f32> = example
            .latents
            .iter()
            .zip(noise)
            .map(|(x, n)| (1.0 - sigma) * x + sigma * n)
            .collect();
        let target: Vec<f32> = noise
            .iter()
            .zip(&example.latents)
            .map(|(n, x)| n - x)
            .collect();
        let (image_ids, text_ids) = flux2::position_ids(example.rows, example.cols, text_tokens);
        let noised = flux2::with_reference_tokens(&noised, &example.references);
        let image_ids = flux2::with_reference_ids(&image_ids, &example.references);
        let inputs = flux2::inputs(
            c,
            &Flux2Inputs {
                noised: &noised,
                text,
                sigma,
                image_ids: &image_ids,
                text_ids: &text_ids,
                target: &target,
                grad_scale: grad_scale * pick.draw.loss_weight,
            },
        );
        (flux2::build(c, Some(spec), step), inputs)
    }

    /// Forward and backward of `picks` on the CPU executor, each weighted 1/len, adding into `grads`.
    /// Returns the sum of their losses.
    pub fn cpu_forward_backward(
        &self,
        picks: &[ImagePick],
        adapter: &LoraAdapter,
        grads: &mut LoraAdapter,
        (checkpoint, precision): (bool, crate::ops::Precision),
    ) -> Result<f64> {
        let spec = LoraSpec::of(adapter);
        let mut loss_sum = 0.0;
        for pick in picks {
            let (graph, inputs) = self.graph(pick, &spec, 1.0 / picks.len() as f32, checkpoint);
            let mut out = cpu::run(
                &graph,
                Bindings {
                    model: &*self.model,
                    adapter: Some(adapter),
                    grads: Some(grads),
                    cache: None,
                    optimizer: None,
                    inputs: &inputs,
                    precision,
                },
            )?;
            loss_sum += pick.weighted(out.take("loss")[0] as f64);
        }
        Ok(loss_sum)
    }

    /// A digest of the cached examples (latents, grids and caption features) for run.json.
    pub fn digest(&self) -> u64 {
        let mut digest = crate::rng::Fnv1a::new();
        for e in self.examples.iter() {
            digest.write(&(e.rows as u64).to_le_bytes());
            digest.write(&(e.cols as u64).to_le_bytes());
            digest.write(bytemuck::cast_slice(&e.latents));
            digest.write(bytemuck::cast_slice(&e.text));
            // Nothing for runs without control images, whose digests stay as they were.
            for r in e.references.iter() {
                digest.write(&(r.rows as u64).to_le_bytes());
                digest.write(&(r.cols as u64).to_le_bytes());
                digest.write(bytemuck::cast_slice(&r.tokens));
            }
        }
        digest.write(bytemuck::cast_slice(&self.empty_caption));
        digest.finish()
    }
}

/// Denoising steps and guidance of the images a run samples as it goes (`--sample-prompts`), as
/// ai-toolkit's sample settings commonly have them; `nibble sample` takes any.
pub const SAMPLE_DENOISE_STEPS: usize = 20;
pub const SAMPLE_GUIDANCE: f32 = 4.0;

/// Where an image run's sample `k` (from 0) of `step` goes in its folder: `sample-STEP-K.png`.
pub fn sample_image_name(step: usize, k: usize) -> String {
    format!("sample-{step}-{}.png", k + 1)
}

/// Whether `name` is one of `sample_image_name`'s.
pub fn is_sample_image(name: &str) -> bool {
    let numbers = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    name.strip_prefix("sample-")
        .and_then(|n| n.strip_suffix(".png"))
        .and_then(|n| n.split_once('-'))
        .is_some_and(|(step, k)| numbers(step) && numbers(k))
}

/// The images an image run samples as it goes: its prompts' features and the empty prompt's, the
/// VAE's decoder, the scheduler, at the run's (largest) resolution, each prompt from the same noise every time
/// (the run's seed + k) so that the images show what training changed.
#[cfg(not(target_arch = "wasm32"))]
pub struct ImageSamples {
    pub prompts: Vec<crate::train::run::SamplePrompt>,
    pub features: Vec<std::sync::Arc<Vec<f32>>>,
    /// Each prompt's encoded control images, where it names its own.
    pub references: Vec<Option<Vec<flux2::Reference>>>,
    pub vae: crate::models::vae::Vae,
    pub scheduler: crate::models::flux2_sampler::FlowScheduler,
    pub resolution: usize,
    pub seed: u64,
    /// `SAMPLE_GUIDANCE`, or none for a distilled transformer.
    pub guidance: f32,
}

#[cfg(not(target_arch = "wasm32"))]
impl ImageSamples {
    /// Each prompt's image with the adapter as it is at `step` (the transformer on the run's
    /// executor, the decoder on the CPU: the GPU holds the run), as PNGs in `dir`; the paths.
    /// `stop_requested` ends the drawing between denoising steps (Ctrl-C).
    pub fn draw(
        &self,
        (work, executor, adapter): (&ImageWork, crate::exec::Forward, crate::exec::AdapterCopies),
        step: usize,
        dir: &std::path::Path,
        stop_requested: &mut dyn FnMut() -> bool,
    ) -> Result<Vec<std::path::PathBuf>> {
        use crate::models::flux2_sampler::{SampleSpec, denoise, seeded_noise};
        let side = self.resolution / 16;
        let channels = work.model.config.in_channels;
        let sigmas = self.scheduler.sigmas(SAMPLE_DENOISE_STEPS, side * side);
        let mut written = Vec::new();
        for (k, text) in self.features.iter().enumerate() {
            let noise = seeded_noise(self.seed.wrapping_add(k as u64), side * side * channels);
            let spec = SampleSpec {
                text,
                negative: &work.empty_caption,
                rows: side,
                cols: side,
                noise,
                sigmas: &sigmas,
                train_timesteps: self.scheduler.num_train_timesteps,
                guidance: self.guidance,
                // An edit LoRA is shown on the prompt's control images, or else on the first
                // training image's.
                references: match &self.references[k] {
                    Some(own) => own,
                    None => &work.examples[0].references,
                },
            };
            let mut progress = |_| match stop_requested() {
                true => Err(Error::Interrupted("stopped while drawing samples".into())),
                false => Ok(()),
            };
            let latents = denoise(&work.model, (executor, Some(adapter)), spec, &mut progress)?;
            let cpu = crate::exec::Forward::Cpu(crate::ops::Precision::F32);
            let image = crate::models::vae::decode(&self.vae, cpu, &latents, (side, side))?;
            let path = dir.join(sample_image_name(step, k));
            image.write_png(&path)?;
            written.push(path);
        }
        Ok(written)
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

/// How a LoRA file holds the matrices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraForm {
    /// bf16 with the trained scale alpha/r folded into B and no alpha keys (readers then use scale
    /// 1): the file people load.
    Release,
    /// f32 as trained, with each module's `.alpha`: a checkpoint that resumes bit for bit (and that
    /// kohya-style readers load as well).
    Exact,
}

/// The LoRA file's bytes: `diffusion_model.<block linear>.lora_A.weight` [r, in] and `.lora_B.weight`
/// [out, r] in `form`, metadata naming the base model and nibble.
pub fn lora_file(adapter: &LoraAdapter, c: &flux2::Flux2Config, form: LoraForm) -> Result<Vec<u8>> {
    let scale = adapter.config.scale();
    let (dtype, b_scale) = match form {
        LoraForm::Release => (safetensors::Dtype::BF16, scale),
        LoraForm::Exact => (safetensors::Dtype::F32, 1.0),
    };
    let bytes = |v: &[f32], k: f32| -> Vec<u8> {
        match form {
            LoraForm::Release => v
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x * k).to_le_bytes())
                .collect(),
            LoraForm::Exact => bytemuck::cast_slice(v).to_vec(),
        }
    };
    // The alpha that gives the trained scale at rank r (rsLoRA's alpha/√r included), as readers take
    // alpha/r.
    let effective_alpha = adapter.config.scale() as f64 * adapter.config.r as f64;
    let alpha = [effective_alpha as f32];
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = adapter
        .pairs()
        .flat_map(|(path, p)| {
            let mut keys = vec![
                (
                    format!("{KEY_PREFIX}{path}.lora_A.weight"),
                    vec![p.rank, p.in_features],
                    bytes(&p.a, 1.0),
                ),
                (
                    format!("{KEY_PREFIX}{path}.lora_B.weight"),
                    vec![p.out_features, p.rank],
                    bytes(&p.b, b_scale),
                ),
            ];
            if form == LoraForm::Exact {
                keys.push((
                    format!("{KEY_PREFIX}{path}.alpha"),
                    vec![],
                    bytes(&alpha, 1.0),
                ));
            }
            keys
        })
        .collect();
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            let dtype = if name.ends_with(".alpha") {
                safetensors::Dtype::F32
            } else {
                dtype
            };
            let view = safetensors::tensor::TensorView::new(dtype, shape.clone(), bytes)
                .map_err(|e| Error::Invalid(format!("LoRA tensor {name}: {e}")))?;
            Ok((name.clone(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    let r = adapter.config.r.to_string();
    let network_alpha = match form {
        LoraForm::Release => r.clone(),
        LoraForm::Exact => effective_alpha.to_string(),
    };
    let metadata = std::collections::HashMap::from([
        ("format".to_string(), "pt".to_string()),
        (
            "ss_base_model_version".to_string(),
            base_model_version(c).to_string(),
        ),
        ("ss_network_module".to_string(), "networks.lora".to_string()),
        ("ss_network_dim".to_string(), r.clone()),
        ("ss_network_alpha".to_string(), network_alpha),
        (
            "software".to_string(),
            format!("nibble {}", env!("CARGO_PKG_VERSION")),
        ),
    ]);
    safetensors::serialize(views, Some(metadata))
        .map_err(|e| Error::Invalid(format!("the LoRA file: {e}")))
}

/// Writes `lora_file` to `path` atomically.
pub fn save_lora(
    adapter: &LoraAdapter,
    c: &flux2::Flux2Config,
    form: LoraForm,
    path: &std::path::Path,
) -> Result<()> {
    let bytes = lora_file(adapter, c, form)?;
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
    // The first module without an `.alpha` key: kohya's and ComfyUI's readers take its alpha as its
    // rank (a scale of 1).
    let mut without_alpha = None;
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
        } else {
            without_alpha.get_or_insert_with(|| key("alpha"));
        }
        let pair = crate::lora::LoraPair {
            rank: r,
            in_features: *inp,
            out_features: *out,
            experts: 1,
            a,
            b,
            magnitude: Vec::new(),
            token_ids: Vec::new(),
            rows: Vec::new(),
            peft_interleaved: false,
        };
        modules.push((path.clone(), pair));
    }
    let Some(r) = rank else {
        return Err(Error::Invalid(format!(
            "{}: no LoRA matrices for this FLUX.2 transformer",
            file.path().display()
        )));
    };
    if let (Some(alpha), Some(missing)) = (alpha, &without_alpha)
        && alpha != r as f64
    {
        return Err(bad(
            missing,
            format!(
                "missing, so its scale is 1 (alpha = rank {r}) where other modules' alpha {alpha} \
                 gives {}: nibble trains FLUX.2 at one scale throughout",
                alpha / r as f64
            ),
        ));
    }
    let targets = modules.iter().map(|(p, _)| p.clone()).collect();
    Ok(LoraAdapter {
        config: crate::lora::LoraConfig {
            r,
            alpha: alpha.unwrap_or(r as f64),
            dropout: 0.0,
            use_rslora: false,
            targets,
            ..Default::default()
        },
        modules,
    })
}

/// `load_lora` of a checkpoint of the run training `like`: the same rank, scale and modules, or an
/// error naming the file; the run's own configuration (its targets as given) stays.
pub fn load_lora_like(
    file: &crate::source::SafetensorsFile,
    c: &flux2::Flux2Config,
    like: &LoraAdapter,
) -> Result<LoraAdapter> {
    let loaded = load_lora(file, c)?;
    let count = loaded.pairs().count();
    let (then, now) = (loaded.config.scale(), like.config.scale());
    let rank = loaded.config.r;
    let mut by_path: std::collections::HashMap<String, crate::lora::LoraPair> =
        loaded.modules.into_iter().collect();
    // In the run's order.
    let modules: Vec<(String, crate::lora::LoraPair)> = like
        .pairs()
        .filter_map(|(path, _)| Some((path.to_string(), by_path.remove(path)?)))
        .collect();
    // Scales compared within the f32 rounding of the alpha the file stores.
    let same = rank == like.config.r
        && (then - now).abs() <= 1e-6 * now.abs()
        && modules.len() == count
        && count == like.pairs().count();
    if !same {
        return Err(Error::Invalid(format!(
            "{}: the checkpoint's LoRA (rank {rank}, scale {then}, {count} modules) is not this run's \
             (rank {}, scale {now}, {} modules)",
            file.path().display(),
            like.config.r,
            like.pairs().count()
        )));
    }
    Ok(LoraAdapter {
        config: like.config.clone(),
        modules,
    })
}

/// The LoRA file a klein run leaves at the top of its output folder.
pub const LORA_FILE: &str = "lora.safetensors";

/// `load_lora` from a LoRA file, or from the `lora.safetensors` in a folder (a run's output or one of
/// its checkpoints).
#[cfg(not(target_arch = "wasm32"))]
pub fn read_lora(path: &std::path::Path, c: &flux2::Flux2Config) -> Result<LoraAdapter> {
    let file = if path.is_dir() {
        path.join(LORA_FILE)
    } else {
        path.to_path_buf()
    };
    if path.is_dir() && !file.exists() {
        let peft = path.join("adapter_config.json").exists();
        return Err(Error::Invalid(format!(
            "{}: {}no {LORA_FILE}; a FLUX.2 run starts from a LoRA file of the transformer (a klein \
             run's {LORA_FILE}, or a ComfyUI/diffusers LoRA file named itself)",
            path.display(),
            match peft {
                true =>
                    "a PEFT adapter folder (of a language model, by its adapter_config.json) with ",
                false => "",
            }
        )));
    }
    load_lora(&crate::source::SafetensorsFile::open(&file)?, c)
}

/// A klein run from files: a diffusers pipeline folder and a folder of captioned images.
#[cfg(not(target_arch = "wasm32"))]
pub struct FluxRunSpec<'a> {
    pub model: &'a std::path::Path,
    pub data: &'a std::path::Path,
    pub output: &'a std::path::Path,
    /// Storage of the transformer's linears (the text encoder runs in NF4 groups of 64 when its widths
    /// allow, else dense).
    pub quant: Option<crate::quant::QuantSpec>,
    pub config: crate::train::TrainConfig,
    /// Image sides in pixels (buckets keep each image's aspect at about each squared): every
    /// image is trained at each, as ai-toolkit's list of resolutions trains it.
    pub resolutions: Vec<usize>,
    pub trigger: Option<String>,
    /// The caption of images without one (a missing or empty .txt); None: a missing one is an error.
    pub default_caption: Option<String>,
    /// Each image (and its control images) mirrored left to right as well.
    pub flip_x: bool,
    /// Folders of control images: each training image's same-name image in each, as references.
    pub controls: Vec<std::path::PathBuf>,
    /// Control images are scaled down to about this side squared where larger.
    pub control_resolution: usize,
    /// Probability of training an example with the empty caption.
    pub caption_dropout: f64,
    pub sampling: SigmaSampling,
    /// Caption tokens (the pipeline's 512).
    pub text_tokens: usize,
    /// Overwriting, checkpoints, resuming, the GPU memory cap (packing and validation are refused).
    pub options: crate::train::run::RunOptions,
    /// Where caption features and latents are kept between runs (None: computed every run).
    pub cache_dir: Option<std::path::PathBuf>,
    /// The Qwen3 text encoder folder (with its tokenizer), where not the pipeline's
    /// `text_encoder/` and `tokenizer/`.
    pub text_encoder: Option<std::path::PathBuf>,
    /// The VAE folder (diffusers' AutoencoderKLFlux2), where not the pipeline's `vae/`.
    pub vae: Option<std::path::PathBuf>,
}

/// Where the tokenizer of the text encoder in `text_encoder` is: that folder, or the `tokenizer/`
/// folder beside it when only that one holds a tokenizer.json (a diffusers pipeline's layout).
#[cfg(not(target_arch = "wasm32"))]
fn tokenizer_folder(text_encoder: &std::path::Path) -> std::path::PathBuf {
    if text_encoder.is_file() {
        // A lone file's tokenizer is the bundled Qwen3 one.
        return text_encoder.to_path_buf();
    }
    let beside = text_encoder
        .parent()
        .map(|pipeline| pipeline.join("tokenizer"));
    match beside {
        Some(beside)
            if !text_encoder.join("tokenizer.json").exists()
                && beside.join("tokenizer.json").is_file() =>
        {
            beside
        }
        _ => text_encoder.to_path_buf(),
    }
}

/// The VAE's latents in 2x2 patches must be the transformer's tokens.
#[cfg(not(target_arch = "wasm32"))]
fn check_latent_channels(
    vae: &crate::models::vae::Vae,
    path: &std::path::Path,
    flux: &flux2::Flux2Config,
) -> Result<()> {
    let latent = vae.config.latent_channels;
    if 4 * latent != flux.in_channels {
        return Err(Error::Invalid(format!(
            "{}: the VAE's {latent} latent channels make tokens of {}, and the transformer reads {}",
            path.display(),
            4 * latent,
            flux.in_channels
        )));
    }
    Ok(())
}

/// Where a pipeline's text encoder, tokenizer and VAE are.
#[cfg(not(target_arch = "wasm32"))]
struct Parts {
    text_dir: std::path::PathBuf,
    tokenizer_dir: std::path::PathBuf,
    vae: std::path::PathBuf,
}

#[cfg(not(target_arch = "wasm32"))]
impl Parts {
    /// A pipeline folder holds the text encoder, tokenizer and VAE; a transformer outside one needs
    /// them named (`text_encoder`, `vae`), which also stand in for a pipeline's own.
    fn of(
        path: &std::path::Path,
        text_encoder: Option<std::path::PathBuf>,
        vae: Option<std::path::PathBuf>,
    ) -> Result<Self> {
        let pipeline = flux2::pipeline_folder(path);
        let pipeline_part = |part: &str| match &pipeline {
            Some(folder) => Ok(folder.join(part)),
            None => Err(Error::Invalid(format!(
                "{} is a FLUX.2 transformer outside a pipeline folder: give --text-encoder DIR \
                 (Qwen3 with its tokenizer) and --vae FILE (flux2-vae.safetensors, or a diffusers \
                 AutoencoderKLFlux2 folder); a pipeline folder has its own",
                path.display()
            ))),
        };
        let (text_dir, tokenizer_dir) = match &text_encoder {
            Some(dir) => (dir.clone(), tokenizer_folder(dir)),
            None => (pipeline_part("text_encoder")?, pipeline_part("tokenizer")?),
        };
        let vae = match vae {
            Some(vae) => vae,
            None => pipeline_part("vae")?,
        };
        Ok(Parts {
            text_dir,
            tokenizer_dir,
            vae,
        })
    }
}

/// Whether the pipeline around `path` says its transformer is step-distilled (`is_distilled` in
/// model_index.json): Flux2KleinPipeline then samples without guidance whatever scale it is given.
#[cfg(not(target_arch = "wasm32"))]
fn is_distilled(path: &std::path::Path) -> Result<bool> {
    let Some(index) = flux2::pipeline_folder(path).map(|p| p.join("model_index.json")) else {
        return Ok(false);
    };
    let text = crate::fsutil::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: index.clone(),
        msg: format!("not valid JSON: {e}"),
    })?;
    Ok(value
        .get("is_distilled")
        .and_then(|v| v.as_bool())
        .unwrap_or(false))
}

/// The guidance a pipeline samples with: none for a distilled transformer, as diffusers ignores it.
#[cfg(not(target_arch = "wasm32"))]
fn effective_guidance(path: &std::path::Path, guidance: f32) -> Result<f32> {
    if guidance > 1.0 && is_distilled(path)? {
        log::warn!(
            "{}: the pipeline is step-distilled (is_distilled): sampling without guidance, as \
             diffusers does, instead of {guidance}",
            path.display()
        );
        return Ok(1.0);
    }
    Ok(guidance)
}

/// What decoding a `rows` x `cols` token grid holds at once: the decoder's weights and its buffers.
#[cfg(not(target_arch = "wasm32"))]
fn decoder_bytes(vae: &crate::models::vae::Vae, (rows, cols): (usize, usize)) -> u64 {
    let graph = crate::models::vae::decoder_graph(&vae.config, 2 * rows, 2 * cols);
    crate::model::FrozenWeights::tensor_bytes(vae) + crate::graph::pool::device_step_bytes(&graph)
}

/// The image side `nibble sample` draws at where neither a size nor a reference image is given
/// (the pipeline's default).
pub const DEFAULT_SAMPLE_SIDE: usize = 1024;
/// Denoising steps where none are asked for: the pipeline's default, and what the step-distilled
/// klein models are made for.
pub const DEFAULT_SAMPLE_STEPS: usize = 50;
pub const DISTILLED_SAMPLE_STEPS: usize = 4;

/// Where `sample` is: denoising step `step` (from 1) of `steps` of image `image` (from 0) is done.
#[derive(Clone, Copy, Debug)]
pub struct SampleProgress {
    pub image: usize,
    pub step: usize,
    pub steps: usize,
}

/// The reference images' latent tokens, encoded (posterior mean, 2x2 patches, BatchNorm statistics)
/// by the VAE's encoder on `gpu` when given, else the CPU; the encoder is released after. Its memory
/// at the largest reference is checked first.
#[cfg(not(target_arch = "wasm32"))]
fn encode_references(
    vae_path: &std::path::Path,
    flux: &flux2::Flux2Config,
    pixels: &[(Vec<f32>, usize, usize)],
    gpu: Option<&crate::gpu::Gpu>,
) -> Result<Vec<crate::models::flux2_sampler::Reference>> {
    use crate::models::vae;
    if pixels.is_empty() {
        return Ok(Vec::new());
    }
    let encoder = vae::load(vae_path, vae::Half::Encoder)?;
    check_latent_channels(&encoder, vae_path, flux)?;
    let largest = pixels
        .iter()
        .map(|&(_, w, h)| (h, w))
        .max_by_key(|(h, w)| h * w);
    let (h, w) = largest.expect("some");
    let graph = vae::encoder_graph(&encoder.config, h, w);
    let needs = crate::model::FrozenWeights::tensor_bytes(&encoder)
        + crate::graph::pool::device_step_bytes(&graph);
    let what = format!("encoding a {w}x{h} reference image");
    let on_gpu = match gpu {
        Some(gpu) => {
            gpu.check_fits(&what, needs, None, "; a smaller reference image needs less")?;
            let weights = crate::gpu::weights::GpuWeights::upload(gpu, &encoder)?;
            gpu.check_errors()?;
            Some((gpu, weights))
        }
        None => {
            crate::alloc::check_fits(&what, needs, "; a smaller reference image needs less")?;
            None
        }
    };
    let executor = match &on_gpu {
        Some((gpu, weights)) => crate::exec::Forward::Gpu(gpu, weights),
        None => crate::exec::Forward::Cpu(crate::ops::Precision::F32),
    };
    let references = pixels
        .iter()
        .map(|(pixels, w, h)| {
            Ok(crate::models::flux2_sampler::Reference {
                tokens: vae::encode(&encoder, executor, pixels, (*h, *w))?,
                rows: h / 16,
                cols: w / 16,
            })
        })
        .collect();
    // The encoder's buffers go back to the device before the transformer is loaded.
    if let Some((gpu, weights)) = on_gpu {
        drop(weights);
        gpu.release_scratch();
    }
    references
}

/// Images to sample from a klein pipeline (`nibble sample`).
#[cfg(not(target_arch = "wasm32"))]
pub struct SampleRunSpec<'a> {
    pub model: &'a std::path::Path,
    /// A LoRA file (or a run folder holding one) applied to the transformer.
    pub lora: Option<&'a std::path::Path>,
    pub prompts: &'a [String],
    /// Image sides; where not given, the first reference's (as the pipeline takes them), else 1024.
    pub width: Option<usize>,
    pub height: Option<usize>,
    /// Denoising steps; where not given, 4 for a step-distilled pipeline, else the pipeline's 50.
    pub steps: Option<usize>,
    pub guidance: f32,
    /// Reference images (the pipeline's `image=`: what to edit, or what to take a subject or
    /// style from), every prompt sampled with all of them.
    pub references: &'a [std::path::PathBuf],
    /// Prompt k starts from the noise of seed + k.
    pub seed: u64,
    pub quant: Option<crate::quant::QuantSpec>,
    pub precision: crate::ops::Precision,
    pub text_encoder: Option<std::path::PathBuf>,
    pub vae: Option<std::path::PathBuf>,
}

/// Samples one image per prompt as Flux2KleinPipeline does (its scheduler, classifier-free guidance
/// against the empty prompt above a guidance of 1, none for a distilled transformer): the prompts'
/// features (the text encoder, then released), the denoised latents (the transformer with the LoRA,
/// then released), then the VAE's decoder (read first, to refuse a wrong file early), each image
/// handed to `deliver` as it is decoded. Reference images join every prompt's steps. On `gpu` when
/// given, else the CPU executor; `progress` hears of each step and may stop the run with an error.
#[cfg(not(target_arch = "wasm32"))]
pub fn sample(
    spec: SampleRunSpec,
    gpu: Option<&crate::gpu::Gpu>,
    progress: &mut dyn FnMut(SampleProgress) -> Result<()>,
    deliver: &mut dyn FnMut(usize, crate::models::vae::Image) -> Result<()>,
) -> Result<()> {
    use crate::exec::Forward;
    use crate::models::flux2_sampler::{FlowScheduler, SampleSpec, denoise, seeded_noise};
    let SampleRunSpec {
        model: path,
        lora,
        prompts,
        width,
        height,
        steps,
        guidance,
        references,
        seed,
        quant,
        precision,
        text_encoder,
        vae,
    } = spec;
    let flux = flux2::config_at(path)?.ok_or_else(|| {
        Error::Invalid(format!("{}: not a FLUX.2 pipeline folder", path.display()))
    })?;
    // Read (and refused where unfit) before any model is.
    let reference_pixels = references
        .iter()
        .map(|p| crate::images::load_reference(p, crate::images::REFERENCE_MAX_AREA))
        .collect::<Result<Vec<_>>>()?;
    let first = reference_pixels.first().map(|&(_, w, h)| (w, h));
    let width = width.or(first.map(|f| f.0)).unwrap_or(DEFAULT_SAMPLE_SIDE);
    let height = height.or(first.map(|f| f.1)).unwrap_or(DEFAULT_SAMPLE_SIDE);
    let steps = match steps {
        Some(steps) => steps,
        None if is_distilled(path)? => DISTILLED_SAMPLE_STEPS,
        None => DEFAULT_SAMPLE_STEPS,
    };
    for (name, side) in [("--width", width), ("--height", height)] {
        if side == 0 || side % 16 != 0 || side > 4096 {
            return Err(Error::Invalid(format!(
                "{name} {side}: a positive multiple of 16 pixels, at most 4096"
            )));
        }
    }
    if !(1..=1000).contains(&steps) {
        return Err(Error::Invalid(format!("--steps {steps}: 1 to 1000")));
    }
    if !guidance.is_finite() || guidance < 0.0 {
        return Err(Error::Invalid(format!(
            "--guidance {guidance}: 0 or more (1 or less samples without guidance)"
        )));
    }
    if prompts.is_empty() {
        return Err(Error::Invalid("no --prompt given".into()));
    }
    let parts = Parts::of(path, text_encoder, vae)?;
    let scheduler = FlowScheduler::of_pipeline(flux2::pipeline_folder(path).as_deref())?;
    let guidance = effective_guidance(path, guidance)?;
    let adapter = lora.map(|file| read_lora(file, &flux)).transpose()?;
    // The decoder (a tenth of the transformer's size) is read first: a wrong file is refused
    // before the text encoder and the transformer run.
    let vae = crate::models::vae::load(&parts.vae, crate::models::vae::Half::Decoder)?;
    check_latent_channels(&vae, &parts.vae, &flux)?;
    let (rows, cols) = (height / 16, width / 16);
    let text_tokens = flux2::TEXT_TOKENS;
    let reference_tokens: usize = reference_pixels.iter().map(|(_, w, h)| w * h / 256).sum();
    let step = Flux2Step {
        image_tokens: rows * cols,
        reference_tokens,
        text_tokens,
        backward: false,
        checkpoint: false,
    };
    let (rank, targets) = match &adapter {
        Some(a) => (a.config.r, a.config.targets.clone()),
        None => (0, Vec::new()),
    };
    let planned = flux2::plan(&flux, quant, (rank, &targets), step)?;
    let what = format!("sampling {width}x{height} images");
    // The decoder runs after the transformer is released, at the image's full size.
    let decoding = format!("decoding a {width}x{height} image");
    let decoder_needs = decoder_bytes(&vae, (rows, cols));
    let advice = "; a smaller image or a 4-bit --quant needs less";
    match gpu {
        Some(gpu) => {
            gpu.check_fits(&what, planned.total, None, advice)?;
            let graph = crate::models::vae::decoder_graph(&vae.config, 2 * rows, 2 * cols);
            let limit = gpu.device_binding_limit();
            if let Some((name, bytes)) =
                crate::exec::gpu::widest_binding(&graph).filter(|(_, bytes)| *bytes > limit)
            {
                return Err(Error::Invalid(format!(
                    "{decoding} needs a buffer of {bytes} bytes ({name}), over this GPU's storage \
                     binding limit of {limit} bytes: a smaller image, or --device cpu"
                )));
            }
            gpu.check_fits(
                &decoding,
                decoder_needs,
                None,
                "; a smaller image needs less",
            )?;
        }
        None => {
            crate::alloc::check_fits(&what, planned.cpu_total(), advice)?;
            crate::alloc::check_fits(&decoding, decoder_needs, "; a smaller image needs less")?;
        }
    }
    let (empty, features) = caption_features(
        (&parts.text_dir, &parts.tokenizer_dir),
        &flux,
        prompts.iter().map(String::as_str),
        (text_tokens, precision),
        None,
        (gpu, None),
        &mut || false,
    )?;
    let references = encode_references(&parts.vae, &flux, &reference_pixels, gpu)?;
    drop(reference_pixels);
    let model = flux2::load(path, quant)?;
    let sigmas = scheduler.sigmas(steps, rows * cols);
    let on_gpu = match gpu {
        Some(gpu) => {
            let weights = crate::gpu::weights::GpuWeights::upload(gpu, &model)?;
            let lora = adapter
                .as_ref()
                .map(|a| crate::gpu::weights::GpuLora::upload(gpu, a));
            gpu.check_errors()?;
            Some((gpu, weights, lora))
        }
        None => None,
    };
    let executor = match &on_gpu {
        Some((gpu, weights, _)) => Forward::Gpu(gpu, weights),
        None => Forward::Cpu(precision),
    };
    let copies = adapter
        .as_ref()
        .map(|a| (a, on_gpu.as_ref().and_then(|(_, _, lora)| lora.as_ref())));
    let mut latents = Vec::with_capacity(prompts.len());
    for (k, text) in features.iter().enumerate() {
        let noise = seeded_noise(seed.wrapping_add(k as u64), rows * cols * flux.in_channels);
        let spec = SampleSpec {
            text,
            negative: &empty,
            rows,
            cols,
            noise,
            sigmas: &sigmas,
            train_timesteps: scheduler.num_train_timesteps,
            guidance,
            references: &references,
        };
        latents.push(denoise(&model, (executor, copies), spec, &mut |step| {
            progress(SampleProgress {
                image: k,
                step,
                steps,
            })
        })?);
    }
    drop(on_gpu);
    drop(model);
    if let Some(gpu) = gpu {
        gpu.release_scratch();
    }
    let vae_on_gpu = match gpu {
        Some(gpu) => Some((gpu, crate::gpu::weights::GpuWeights::upload(gpu, &vae)?)),
        None => None,
    };
    let decoder = match &vae_on_gpu {
        Some((gpu, weights)) => Forward::Gpu(gpu, weights),
        None => Forward::Cpu(crate::ops::Precision::F32),
    };
    for (k, l) in latents.iter().enumerate() {
        deliver(
            k,
            crate::models::vae::decode(&vae, decoder, l, (rows, cols))?,
        )?;
    }
    Ok(())
}

/// Trains a klein LoRA: caption features (the text encoder, then released), image latents (the VAE,
/// then released), then the transformer's steps on the GPU executor when `gpu` is given, else on the
/// CPU executor; metrics.jsonl, checkpoints and `--resume` as for language models, and the LoRA file
/// at the top of the output folder at the end.
#[cfg(not(target_arch = "wasm32"))]
pub fn run(
    spec: FluxRunSpec,
    gpu: Option<&crate::gpu::Gpu>,
    observer: &mut dyn crate::train::run::Observer,
) -> Result<crate::train::run::RunSummary> {
    let FluxRunSpec {
        model: path,
        data,
        output,
        quant,
        config,
        resolutions,
        trigger,
        default_caption,
        flip_x,
        controls,
        control_resolution,
        caption_dropout,
        sampling,
        text_tokens,
        options,
        cache_dir,
        text_encoder,
        vae: vae_path,
    } = spec;
    check_caption_dropout(caption_dropout)?;
    for (i, &r) in resolutions.iter().enumerate() {
        check_resolution(r)?;
        // Buckets' sides round down to 16s: 512 and 520 would train every image twice alike.
        if let Some(same) = resolutions[..i].iter().find(|&&o| o / 16 == r / 16) {
            return Err(Error::Invalid(format!(
                "--resolution {r} gives the images the sizes {same} gives them (sides are \
                 multiples of 16)"
            )));
        }
    }
    // The largest is what the memory checks plan for and what samples are drawn at.
    let resolution = *resolutions
        .iter()
        .max()
        .ok_or_else(|| Error::Invalid("--resolution: no image size given".into()))?;
    let sizes = resolutions
        .iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    if !(64..=4096).contains(&control_resolution) {
        return Err(Error::Invalid(format!(
            "--control-resolution must be from 64 to 4096 pixels (got {control_resolution})"
        )));
    }
    let control_area = control_resolution * control_resolution;
    let folder = crate::train::folder::RunFolder::claim(
        output,
        options.overwrite,
        options.resume.as_deref(),
    )?;
    let Parts {
        text_dir,
        tokenizer_dir,
        vae: vae_path,
    } = Parts::of(path, text_encoder, vae_path)?;
    let inputs = [
        Some(path),
        Some(data),
        options.init_adapter.as_deref(),
        Some(&text_dir),
        Some(&vae_path),
    ];
    let inputs = inputs
        .into_iter()
        .flatten()
        .chain(controls.iter().map(|c| c.as_path()));
    folder.check_inputs(&inputs.collect::<Vec<_>>())?;
    let flux = flux2::config_at(path)?.ok_or_else(|| {
        Error::Invalid(format!("{}: not a FLUX.2 pipeline folder", path.display()))
    })?;
    let examples =
        crate::images::scan_folder(data, (trigger.as_deref(), default_caption.as_deref()))?;
    // Each example's control images with their token grids, read off their headers.
    let image_paths: Vec<&std::path::Path> = examples.iter().map(|e| e.image.as_path()).collect();
    let control_images = crate::images::control_images(&image_paths, &controls, control_area)?;
    let sample_prompts = options.sample_prompts.clone();
    // The control images samples name, checked and sized as the training images' are.
    let sample_controls: Vec<Option<Vec<crate::images::ControlImage>>> = sample_prompts
        .iter()
        .map(|p| {
            p.control
                .iter()
                .map(|paths| {
                    paths
                        .iter()
                        .map(|path| crate::images::reference_image(path.clone(), control_area))
                        .collect::<Result<Vec<_>>>()
                })
                .next()
                .transpose()
        })
        .collect::<Result<_>>()?;
    let all_controls = || {
        control_images
            .iter()
            .chain(sample_controls.iter().flatten())
    };
    let tokens_of = |c: &Vec<crate::images::ControlImage>| {
        c.iter().map(|(_, (w, h))| w * h / 256).sum::<usize>()
    };
    // A training step holds the largest example's control tokens; the samples' are held once, on
    // the host.
    let reference_tokens = control_images.iter().map(tokens_of).max().unwrap_or(0);
    let sample_reference_tokens: usize = sample_controls.iter().flatten().map(tokens_of).sum();
    // Everything that can be checked before hours of encoding is checked first.
    check_lora_options(&config.lora, &flux)?;
    let init = match &options.init_adapter {
        Some(file) => Some(read_lora(file, &flux)?),
        None => None,
    };
    let vae = crate::models::vae::load(&vae_path, crate::models::vae::Half::Encoder)?;
    check_latent_channels(&vae, &vae_path, &flux)?;
    let sample_decoder = match sample_prompts.is_empty() {
        true => None,
        false => Some(crate::models::vae::load(
            &vae_path,
            crate::models::vae::Half::Decoder,
        )?),
    };
    let scheduler = crate::models::flux2_sampler::FlowScheduler::of_pipeline(
        flux2::pipeline_folder(path).as_deref(),
    )?;
    let sample_guidance = match sample_decoder {
        Some(_) => effective_guidance(path, SAMPLE_GUIDANCE)?,
        None => SAMPLE_GUIDANCE,
    };
    // Samples are decoded on the host beside the run.
    let sample_bytes = sample_decoder.as_ref().map_or(0, |vae| {
        let side = resolution / 16;
        decoder_bytes(vae, (side, side))
    });
    let tokens = |side: usize| (side / 16) * (side / 16);
    let captions: std::collections::HashSet<&str> = examples
        .iter()
        .map(|e| e.caption.as_str())
        .chain([""])
        .collect();
    let image_tokens: usize = resolutions.iter().map(|&r| tokens(r)).sum();
    let mirrors: &[bool] = match flip_x {
        true => &[false, true],
        false => &[false],
    };
    let cache = 4
        * (captions.len() * text_tokens * flux.text_dim
            + (mirrors.len() * examples.len() * (image_tokens + reference_tokens)
                + sample_reference_tokens)
                * flux.in_channels) as u64;
    let step = Flux2Step {
        reference_tokens,
        ..Flux2Step::training(resolution, text_tokens, config.checkpoint)
    };
    let planned = flux2::plan(&flux, quant, (config.lora.r, &config.lora.targets), step)?;
    let what = format!("training on {} images at {sizes} px", examples.len());
    match gpu {
        // The cache stays in host memory; the step is on the device, as is the VAE before it.
        Some(gpu) => {
            crate::alloc::check_fits(
                &what,
                cache + sample_bytes,
                "; fewer images or a lower --resolution",
            )?;
            let advice = "; a lower --resolution or a 4-bit --quant needs less (`nibble plan` \
                          shows how much)";
            gpu.check_fits(&what, planned.total, options.gpu_memory, advice)?;
            let (h, w) = crate::images::bucket(resolution, resolution, resolution);
            // Control images are encoded at their own sizes (up to about 1024²).
            let (h, w) = all_controls()
                .flatten()
                .map(|&(_, (cw, ch))| (ch, cw))
                .chain([(h, w)])
                .max_by_key(|(h, w)| h * w)
                .expect("some");
            let step = crate::models::vae::encoder_graph(&vae.config, h, w);
            let needs = crate::model::FrozenWeights::tensor_bytes(&vae)
                + crate::graph::pool::device_step_bytes(&step);
            let advice = "; a lower --resolution needs less, or --device cpu";
            gpu.check_fits("the VAE encoder", needs, options.gpu_memory, advice)?;
        }
        None => crate::alloc::check_fits(
            &what,
            planned.cpu_total() + cache + sample_bytes,
            "; a lower --resolution, fewer images or a 4-bit --quant needs less",
        )?,
    }

    let cache = match &cache_dir {
        Some(dir) => match crate::train::feature_cache::FeatureCache::open(dir) {
            Ok(cache) => Some(cache),
            Err(e) => {
                log::warn!("not caching caption features and latents: {e}");
                None
            }
        },
        None => None,
    };
    let (empty_caption, mut features) = caption_features(
        (&text_dir, &tokenizer_dir),
        &flux,
        examples
            .iter()
            .map(|e| e.caption.as_str())
            .chain(sample_prompts.iter().map(|p| p.text.as_str())),
        (text_tokens, config.precision),
        cache.as_ref(),
        (gpu, options.gpu_memory),
        &mut || observer.stop_requested(),
    )?;
    let sample_features = features.split_off(examples.len());
    // Latents (on the GPU when the run trains there, uploaded only when some image misses the
    // cache), then the VAE is released.
    use crate::train::feature_cache::{file_digest, model_digest};
    let vae_digest = cache.as_ref().and_then(|c| {
        c.describe(|| {
            let executor = match gpu {
                Some(gpu) => format!("GPU executor on {}", gpu.info.name),
                None => "CPU executor".into(),
            };
            Ok(format!("{}\n{executor}", model_digest(&vae_path)?))
        })
    });
    // The examples: each image at each resolution in turn, then all of them mirrored (--flip-x),
    // as (resolution, image index, mirrored).
    let count = examples.len();
    let trained: Vec<(usize, usize, bool)> = mirrors
        .iter()
        .flat_map(|&m| {
            resolutions
                .iter()
                .flat_map(move |&r| (0..count).map(move |e| (r, e, m)))
        })
        .collect();
    // Their images at their buckets, then each image's control images (resolution None: at their
    // own size, up to --control-resolution), mirrored too where the images are, then the samples'.
    let jobs: Vec<(&std::path::Path, Option<usize>, bool)> = trained
        .iter()
        .map(|&(r, e, m)| (examples[e].image.as_path(), Some(r), m))
        .chain(mirrors.iter().flat_map(|&m| {
            control_images
                .iter()
                .flatten()
                .map(move |(p, _)| (p.as_path(), None, m))
        }))
        .chain(
            sample_controls
                .iter()
                .flatten()
                .flatten()
                .map(|(p, _)| (p.as_path(), None, false)),
        )
        .collect();
    let keyed: Vec<Option<String>> = jobs
        .iter()
        .map(|&(image, resolution, mirrored)| {
            let (c, vae) = cache.as_ref().zip(vae_digest.as_ref())?;
            c.describe(|| {
                // The last line names how pixels are made (sessions before 36 resized, then cropped).
                let pixels = match resolution {
                    None => format!(
                        "reference: scaled to at most {control_resolution}² pixels, centre \
                             cropped to 16s"
                    ),
                    Some(resolution) => {
                        format!("resolution {resolution}\npixels centre cropped, then resized")
                    }
                };
                // Unmirrored entries keep the keys they had before --flip-x.
                let mirrored = match mirrored {
                    true => "\nmirrored left to right",
                    false => "",
                };
                Ok(format!(
                    "vae {vae}\nimage {}\n{pixels}{mirrored}",
                    file_digest(image)?
                ))
            })
        })
        .collect();
    let hits: Vec<Option<(Vec<f32>, usize, usize)>> = keyed
        .iter()
        .map(|description| {
            let entry = cache.as_ref().zip(description.as_ref())?;
            let entry = entry.0.get("latents", entry.1)?;
            match entry.shape[..] {
                [rows, cols, channels] if channels == flux.in_channels => {
                    Some((entry.values, rows, cols))
                }
                _ => None,
            }
        })
        .collect();
    let encoded = hits.iter().filter(|h| h.is_none()).count();
    let vae_on_gpu = match gpu {
        Some(gpu) if encoded > 0 => {
            let weights = crate::gpu::weights::GpuWeights::upload(gpu, &vae)?;
            gpu.check_errors()?;
            Some((gpu, weights))
        }
        _ => None,
    };
    let vae_executor = match &vae_on_gpu {
        Some((gpu, weights)) => crate::exec::Forward::Gpu(gpu, weights),
        None => crate::exec::Forward::Cpu(crate::ops::Precision::F32),
    };
    let mut encoded_latents = jobs
        .iter()
        .zip(hits.into_iter().zip(&keyed))
        .map(|(&(image, resolution, mirrored), (hit, description))| {
            if let Some(hit) = hit {
                return Ok(hit);
            }
            if observer.stop_requested() {
                return Err(stopped_before_training("encoding images"));
            }
            let (mut pixels, w, h) = match resolution {
                None => crate::images::load_reference(image, control_area)?,
                Some(resolution) => crate::images::load_pixels(image, resolution)?,
            };
            if mirrored {
                crate::images::mirror(&mut pixels, w);
            }
            let latents = crate::models::vae::encode(&vae, vae_executor, &pixels, (h, w))?;
            let (rows, cols) = (h / 16, w / 16);
            if let Some((c, description)) = cache.as_ref().zip(description.as_ref()) {
                let entry = crate::train::feature_cache::Entry {
                    values: latents.clone(),
                    shape: vec![rows, cols, flux.in_channels],
                };
                c.put("latents", description, &entry);
            }
            Ok((latents, rows, cols))
        })
        .collect::<Result<Vec<_>>>()?
        .into_iter();
    let targets: Vec<_> = encoded_latents.by_ref().take(trained.len()).collect();
    let mut references = |count: usize| -> Vec<flux2::Reference> {
        encoded_latents
            .by_ref()
            .take(count)
            .map(|(tokens, rows, cols)| flux2::Reference { tokens, rows, cols })
            .collect()
    };
    // Each image's control images, unmirrored then mirrored, by image.
    let example_references: Vec<Vec<std::sync::Arc<Vec<flux2::Reference>>>> = mirrors
        .iter()
        .map(|_| {
            control_images
                .iter()
                .map(|c| references(c.len()).into())
                .collect()
        })
        .collect();
    // Each example with its image's caption features and control images.
    let cached: Vec<Cached> = targets
        .into_iter()
        .zip(&trained)
        .map(|((latents, rows, cols), &(_, e, m))| Cached {
            latents,
            rows,
            cols,
            text: features[e].clone(),
            references: example_references[usize::from(m)][e].clone(),
        })
        .collect();
    drop(example_references);
    let sample_references: Vec<Option<Vec<flux2::Reference>>> = sample_controls
        .iter()
        .map(|c| c.as_ref().map(|c| references(c.len())))
        .collect();
    if let Some((gpu, weights)) = vae_on_gpu {
        drop(weights);
        gpu.release_scratch();
    }
    drop(vae);
    log::info!(
        "latents: {encoded} images encoded, {} from the cache",
        jobs.len() - encoded
    );
    if observer.stop_requested() {
        return Err(stopped_before_training("loading the transformer"));
    }
    let model = flux2::load(path, quant)?;
    let work = ImageWork {
        model: (&model).into(),
        examples: cached,
        empty_caption,
        sampling,
        caption_dropout,
    };
    let mut image_options = serde_json::json!({
        "resolution": match resolutions[..] {
            [one] => serde_json::json!(one),
            _ => serde_json::json!(resolutions),
        },
        "caption_dropout": caption_dropout, "sigma_sampling": sampling,
        "text_tokens": text_tokens,
    });
    if flip_x {
        image_options["flip_x"] = true.into();
    }
    if !controls.is_empty() {
        image_options["control_folders"] = controls.len().into();
        image_options["control_resolution"] = control_resolution.into();
    }
    let label = path.display().to_string();
    let seed = config.seed;
    let mut run =
        crate::train::run::Run::prepare_images(work, &label, config, options, image_options, init)?;
    if let Some(vae) = sample_decoder {
        run.sample_images_with(ImageSamples {
            prompts: sample_prompts,
            features: sample_features,
            references: sample_references,
            vae,
            scheduler,
            resolution,
            seed,
            guidance: sample_guidance,
        });
    }
    run.launch(gpu, folder, output, observer)
}

/// A stop asked for (Ctrl-C) while the run prepared `what`: it ends there, its folder left as found.
#[cfg(not(target_arch = "wasm32"))]
fn stopped_before_training(what: &str) -> Error {
    Error::Interrupted(format!(
        "stopped while {what}, before the first step; nothing to save"
    ))
}

/// The features of the empty caption, and of each caption (shared with the examples that use it).
#[cfg(not(target_arch = "wasm32"))]
type CaptionFeatures = (Vec<f32>, Vec<std::sync::Arc<Vec<f32>>>);

/// The features of the empty caption and of each of `captions`: from `cache` where it holds them,
/// else through the text encoder (NF4 groups of 64 where its widths allow, else dense; on `gpu` when
/// given), which is loaded only when some caption misses and released before returning.
#[cfg(not(target_arch = "wasm32"))]
fn caption_features<'c>(
    (text_dir, tokenizer_dir): (&std::path::Path, &std::path::Path),
    flux: &flux2::Flux2Config,
    captions: impl Iterator<Item = &'c str>,
    (text_tokens, precision): (usize, crate::ops::Precision),
    cache: Option<&crate::train::feature_cache::FeatureCache>,
    (gpu, gpu_memory): (Option<&crate::gpu::Gpu>, Option<u64>),
    stop_requested: &mut dyn FnMut() -> bool,
) -> Result<CaptionFeatures> {
    use crate::model::{QuantRequest, TokenizerFiles};
    use crate::quant::{QuantFormat, QuantSpec};
    use crate::train::feature_cache::{Entry, model_digest};
    // A lone file (ComfyUI's qwen_3_*b.safetensors) carries no config or tokenizer: both are
    // Qwen3's, the config read off its shapes.
    let lone_file = text_dir.is_file();
    let source = match lone_file {
        true => crate::model::ModelSource::open_qwen3_file(text_dir)?,
        false => crate::model::open(text_dir)?,
    };
    if 3 * source.config.hidden_size != flux.text_dim {
        return Err(Error::Invalid(format!(
            "{}: the text encoder's width {} gives features of {}, and the transformer reads {}",
            text_dir.display(),
            source.config.hidden_size,
            3 * source.config.hidden_size,
            flux.text_dim
        )));
    }
    let read = |name: &str| crate::fsutil::read_to_string(&tokenizer_dir.join(name)).ok();
    let files = match lone_file {
        true => source.tokenizer.clone(),
        false => TokenizerFiles {
            tokenizer_json: read("tokenizer.json"),
            tokenizer_config_json: read("tokenizer_config.json"),
            chat_template_jinja: read("chat_template.jinja"),
        },
    };
    let tokenizer = crate::tokenizer::ChatTokenizer::from_files(&files, tokenizer_dir)?;
    let storage = if source.config.hidden_size % 64 == 0 {
        QuantRequest::Quantize(QuantSpec::new(
            QuantFormat::Nf4,
            crate::quant::DEFAULT_GROUP_SIZE,
        )?)
    } else {
        QuantRequest::Dense
    };
    // What the features are computed from and by (the executors round differently).
    let executor = match gpu {
        Some(gpu) => format!("GPU executor on {}", gpu.info.name),
        None => format!("CPU executor, {precision:?}"),
    };
    let encoder_digest = cache.and_then(|c| {
        c.describe(|| {
            Ok(format!(
                "text encoder {}\ntokenizer {}\nstorage {storage:?}\n{executor}\ntokens {text_tokens}",
                model_digest(text_dir)?,
                model_digest(tokenizer_dir)?
            ))
        })
    });
    // Each distinct caption once (datasets often give many images one caption); the empty one first.
    let mut all: Vec<&str> = vec![""];
    let mut slot_of = std::collections::HashMap::from([("", 0usize)]);
    let index: Vec<usize> = captions
        .map(|caption| {
            *slot_of.entry(caption).or_insert_with(|| {
                all.push(caption);
                all.len() - 1
            })
        })
        .collect();
    let mut features: Vec<Option<Vec<f32>>> = Vec::with_capacity(all.len());
    let mut descriptions = Vec::with_capacity(all.len());
    for caption in &all {
        let description = encoder_digest
            .as_ref()
            .map(|digest| format!("{digest}\ncaption {caption}"));
        let hit = cache
            .zip(description.as_ref())
            .and_then(|(c, d)| c.get("text", d))
            .filter(|e| e.shape == [text_tokens, flux.text_dim]);
        features.push(hit.map(|e| e.values));
        descriptions.push(description);
    }
    let missing = features.iter().filter(|f| f.is_none()).count();
    log::info!(
        "caption features: {missing} to encode, {} from the cache",
        all.len() - missing
    );
    if missing > 0 {
        let encoder = source.load(Some(storage))?;
        let on_gpu = match gpu {
            Some(gpu) => {
                let graph = crate::models::decoder::hidden_states(
                    &source.config,
                    &flux2::TEXT_LAYERS,
                    text_tokens,
                    true,
                );
                let needs = crate::model::planned_weight_bytes(&source.config, encoder.quant)
                    + crate::graph::pool::device_step_bytes(&graph);
                let advice = "; --device cpu runs it (and training) on the CPU";
                gpu.check_fits("the text encoder", needs, gpu_memory, advice)?;
                let weights = crate::gpu::weights::GpuModel::upload(gpu, &encoder)?;
                gpu.check_errors()?;
                Some((gpu, weights))
            }
            None => None,
        };
        let executor = match &on_gpu {
            Some((gpu, weights)) => crate::exec::Forward::Gpu(gpu, weights),
            None => crate::exec::Forward::Cpu(precision),
        };
        for ((caption, slot), description) in all.iter().zip(&mut features).zip(&descriptions) {
            if slot.is_none() {
                if stop_requested() {
                    return Err(stopped_before_training("encoding captions"));
                }
                let values =
                    flux2::caption_features(&encoder, executor, &tokenizer, caption, text_tokens)?;
                if let Some((c, description)) = cache.zip(description.as_ref()) {
                    let entry = Entry {
                        values: values.clone(),
                        shape: vec![text_tokens, flux.text_dim],
                    };
                    c.put("text", description, &entry);
                }
                *slot = Some(values);
            }
        }
        if let Some((gpu, weights)) = on_gpu {
            drop(weights);
            gpu.release_scratch();
        }
    }
    let features: Vec<std::sync::Arc<Vec<f32>>> = features
        .into_iter()
        .map(|f| std::sync::Arc::new(f.expect("each caption encoded")))
        .collect();
    let each = index.iter().map(|&i| features[i].clone()).collect();
    Ok((features[0].to_vec(), each))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Weighted draws land on ai-toolkit's grid t = 1000, ..., 2 (σ = t/1000), each index about
    /// equally often, with the weight ai-toolkit gives that index (values from its
    /// default_weighing_scheme.py: the first, the largest at index 124, the last two).
    #[test]
    fn weighted_draws_take_ai_toolkits_grid_and_weights() {
        let weights = &crate::train::timestep_weights::AI_TOOLKIT_TIMESTEP_WEIGHTS;
        for (index, weight) in [
            (0, 0.905706524848938),
            (124, 1.5226575136184692),
            (998, 0.4453802704811096),
            (999, 0.4472601115703583),
        ] {
            assert_eq!(weights[index], weight as f32, "index {index}");
        }
        let mean = weights.iter().map(|&w| w as f64).sum::<f64>() / 1000.0;
        assert!((mean - 1.0).abs() < 1e-6, "mean weight {mean}");
        let mut rng = Rng::new(7);
        let mut counts = [0usize; 999];
        let draws = 99_900;
        for _ in 0..draws {
            let d = draw(&mut rng, SigmaSampling::Weighted, 3);
            let t = (d.sigma * 1000.0).round();
            assert!(
                t / 1000.0 == d.sigma && (2.0..=1000.0).contains(&t),
                "σ {}",
                d.sigma
            );
            let index = 1000 - t as usize;
            assert_eq!(d.loss_weight, weights[index]);
            assert_eq!(d.noise.len(), 3);
            counts[index] += 1;
        }
        // 100 draws expected per index; in tenths of the grid, 10,000 each (σ about 95).
        for (tenth, chunk) in counts.chunks(100).take(9).enumerate() {
            let n: usize = chunk.iter().sum();
            assert!((9_500..10_500).contains(&n), "tenth {tenth}: {n} draws");
        }
        assert!(counts[0] > 0 && counts[998] > 0);
        // The other samplings leave the loss unweighted.
        for sampling in [
            SigmaSampling::Sigmoid,
            SigmaSampling::Uniform,
            SigmaSampling::Shifted,
        ] {
            let d = draw(&mut rng, sampling, 1);
            assert_eq!(d.loss_weight, 1.0);
            assert!(d.sigma > 0.0 && d.sigma < 1.0);
        }
    }
}
