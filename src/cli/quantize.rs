//! `nibble quantize`: a model folder's decoder weights as one packed 4-bit safetensors file.

use super::{QuantArgs, human_bytes};
use anyhow::{Context, Result, bail};
use nibble::model::{self, QuantRequest};
use nibble::quant::{QuantFormat, QuantSpec};
use std::path::PathBuf;
use std::time::Instant;

/// Quantize a model folder's decoder weights to packed 4-bit and save them as one safetensors file.
#[derive(clap::Args)]
pub struct Args {
    /// The model folder to quantize (config.json and 16-bit or f32 safetensors).
    model: PathBuf,
    /// The quantized safetensors file to write (config and tokenizer travel inside it).
    #[arg(long, short)]
    output: PathBuf,
    /// Replace --output if it exists (written beside it first, so it is never half replaced).
    #[arg(long)]
    overwrite: bool,
    #[command(flatten)]
    quant: QuantArgs,
}

pub fn run(args: Args) -> Result<()> {
    let (path, output, quant) = (args.model.as_path(), args.output.as_path(), args.quant);
    // A folder's config.json names the whole folder as the input.
    let folder = nibble::model::ModelSource::folder_of_config(path);
    let inputs: Vec<&std::path::Path> = std::iter::once(path).chain(folder.as_deref()).collect();
    nibble::fsutil::refuse_overwriting_inputs(output, &inputs, "--output")?;
    if output.is_dir() || output.as_os_str().to_string_lossy().ends_with(['/', '\\']) {
        bail!(
            "--output {} is a folder; name the safetensors file to write",
            output.display()
        );
    }
    if output.exists() && !args.overwrite {
        bail!(
            "--output {} exists; pass --overwrite to replace it",
            output.display()
        );
    }
    if let Some(parent) = output.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.is_dir()
    {
        bail!(
            "--output {}: {} {}",
            output.display(),
            parent.display(),
            match parent.exists() {
                true => "is a file, not a folder",
                false => "does not exist (nibble creates the file, not its folder)",
            }
        );
    }
    let source = model::open(path)?;
    if source.stored_quant().is_some() {
        bail!(
            "{} is already a quantized file; quantize the original model folder",
            path.display()
        );
    }
    // The tokenizer travels inside the file: one that cannot be read would only fail later, where
    // the error could no longer name the folder's file.
    if source.tokenizer.tokenizer_json.is_some() {
        source.chat_tokenizer()?;
    }
    let spec = match quant.request()? {
        None => QuantSpec::new(QuantFormat::Nf4, nibble::quant::DEFAULT_GROUP_SIZE)?,
        Some(QuantRequest::Quantize(s)) => s,
        Some(QuantRequest::Dense) => {
            bail!("--quant none makes no quantized file; choose nf4 or int4")
        }
    };
    // Carried into the file, so read (and refused where it cannot be) before the work.
    let generation = match &source.generation_config {
        Some((Err(e), _)) => bail!("{e}"),
        Some((Ok(text), _)) => Some(text.clone()),
        None => None,
    };
    let start = Instant::now();
    let model = source.load(Some(QuantRequest::Quantize(spec)))?;
    let loaded = start.elapsed();
    model
        .save_quantized(output, (&source.tokenizer, generation.as_deref()))
        .with_context(|| format!("writing {}", output.display()))?;
    let size = std::fs::metadata(output).map(|m| m.len()).unwrap_or(0);
    // What was packed: the linears (routers stay dense) and the stacks of experts.
    let packed = model.layers.iter().map(|l| l.linears.len()).sum::<usize>()
        + model
            .config
            .adaptable_parameters()
            .iter()
            .filter(|p| p.experts > 1)
            .count();
    eprintln!(
        "quantized {packed} decoder weights of {} to {spec} in {:.1}s, wrote {} ({}) in {:.1}s",
        path.display(),
        loaded.as_secs_f64(),
        output.display(),
        human_bytes(size),
        (start.elapsed() - loaded).as_secs_f64()
    );
    Ok(())
}
