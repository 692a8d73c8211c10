//! `nibble sample`: images from a FLUX.2 [klein] pipeline, with a LoRA or without, as diffusers'
//! Flux2KleinPipeline samples them.

use anyhow::{Context, Result, bail};
use nibble::model::{QuantChoice, QuantRequest};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// A FLUX.2 [klein] diffusers pipeline folder (or its transformer, with --text-encoder and --vae).
    #[arg(long)]
    model: PathBuf,
    /// A LoRA file as `nibble train` writes it (or ComfyUI and ai-toolkit read it), or a run folder
    /// holding lora.safetensors.
    #[arg(long)]
    lora: Option<PathBuf>,
    /// What to draw; give it several times for several images.
    #[arg(long, required = true)]
    prompt: Vec<String>,
    /// The PNG to write; with several prompts, NAME-1.png, NAME-2.png, ... beside it.
    #[arg(long)]
    output: PathBuf,
    /// Replace images already there.
    #[arg(long)]
    overwrite: bool,
    /// A reference image (PNG, JPEG, WebP) the transformer sees beside the image it draws: a picture
    /// to edit, or a subject or style to take; give it several times for several (all apply to
    /// every prompt). Scaled down to about 1024x1024 pixels where larger, its centre cropped to
    /// multiples of 16.
    #[arg(long = "image", value_name = "FILE")]
    images: Vec<PathBuf>,
    /// Image width in pixels, a multiple of 16 [default: the first --image's, else 1024].
    #[arg(long)]
    width: Option<usize>,
    /// Image height in pixels, a multiple of 16 [default: the first --image's, else 1024].
    #[arg(long)]
    height: Option<usize>,
    /// Denoising steps [default: 50, the pipeline's; 4 for a step-distilled pipeline, which also
    /// samples without guidance whatever --guidance says, as diffusers does].
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale against the empty prompt (1 or less: none, one transformer
    /// pass per step; the base models' default is 4).
    #[arg(long, default_value_t = 4.0)]
    guidance: f32,
    /// Seeds the starting noise (prompt k takes seed + k - 1).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Storage of the transformer's linears: nf4, int4 or none (16-bit).
    #[arg(long, value_enum, ignore_case = true, default_value = "nf4")]
    quant: QuantChoice,
    /// Weights per 4-bit scale: 32, 64 or 128.
    #[arg(long, default_value_t = 128)]
    group_size: usize,
    #[command(flatten)]
    exec: super::ExecArgs,
    /// The Qwen3 text encoder folder (with its tokenizer), or ComfyUI's one-file
    /// qwen_3_4b/qwen_3_8b.safetensors, where not the pipeline's.
    #[arg(long)]
    text_encoder: Option<PathBuf>,
    /// The VAE (flux2-vae.safetensors, or a diffusers AutoencoderKLFlux2 folder), where not the
    /// pipeline's.
    #[arg(long)]
    vae: Option<PathBuf>,
}

/// Where prompt k of `count` goes.
fn image_path(output: &Path, k: usize, count: usize) -> PathBuf {
    if count == 1 {
        return output.to_path_buf();
    }
    let stem = output
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    output.with_file_name(format!("{stem}-{}.png", k + 1))
}

pub fn run(args: Args) -> Result<()> {
    if args
        .output
        .extension()
        .is_none_or(|e| !e.eq_ignore_ascii_case("png"))
    {
        bail!("--output {}: name a .png file", args.output.display());
    }
    let count = args.prompt.len();
    let paths: Vec<PathBuf> = (0..count)
        .map(|k| image_path(&args.output, k, count))
        .collect();
    for path in &paths {
        if path.is_dir() || (path.exists() && !args.overwrite) {
            bail!("{} exists; give --overwrite to replace it", path.display());
        }
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
        if let Some(parent) = parent.filter(|p| !p.is_dir()) {
            bail!("{}: no such folder", parent.display());
        }
    }
    let quant = match QuantRequest::from_options(Some(args.quant), Some(args.group_size))
        .context("--group-size")?
    {
        Some(QuantRequest::Quantize(spec)) => Some(spec),
        _ => None,
    };
    let gpu = args.exec.device.open()?;
    let spec = nibble::train::flux2::SampleRunSpec {
        model: &args.model,
        lora: args.lora.as_deref(),
        prompts: &args.prompt,
        width: args.width,
        height: args.height,
        steps: args.steps,
        guidance: args.guidance,
        references: &args.images,
        seed: args.seed,
        quant,
        precision: args.exec.precision.cpu(),
        text_encoder: args.text_encoder.clone(),
        vae: args.vae.clone(),
    };
    let started = std::time::Instant::now();
    let mut progress = |p: nibble::train::flux2::SampleProgress| {
        if p.step == p.steps || p.step.is_multiple_of(10) {
            log::info!(
                "image {}/{count}: step {}/{} ({:.1} s)",
                p.image + 1,
                p.step,
                p.steps,
                started.elapsed().as_secs_f64()
            );
        }
        Ok(())
    };
    let mut write = |k: usize, image: nibble::models::vae::Image| {
        image.write_png(&paths[k])?;
        eprintln!("wrote {}", paths[k].display());
        Ok(())
    };
    nibble::train::flux2::sample(spec, gpu.as_ref(), &mut progress, &mut write)?;
    Ok(())
}
