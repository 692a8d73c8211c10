//! `nibble merge`: an adapter folded into the base weights.

use anyhow::{Context, Result};
use nibble::merge::MergeBase;
use nibble::model::{self, QuantChoice};
use nibble::quant::{QuantFormat, QuantSpec};
use nibble::source::FloatDtype;
use std::path::PathBuf;

/// Fold a LoRA adapter into the base weights: a model folder (safetensors, config and tokenizer
/// copied) that transformers loads without peft.
#[derive(clap::Args)]
pub struct Args {
    /// The base model folder the adapter was trained on.
    #[arg(long)]
    model: PathBuf,
    /// The PEFT adapter folder to fold in (adapter_config.json and adapter_model.safetensors).
    #[arg(long)]
    adapter: PathBuf,
    /// The merged model folder to write (it must not exist yet).
    #[arg(long, short)]
    output: PathBuf,
    /// The merged weights' dtype (default: the checkpoint's own).
    #[arg(long, value_enum, ignore_case = true)]
    dtype: Option<Dtype>,
    /// The weights the adapter is added to: the checkpoint's own (as PEFT's merge_and_unload on a
    /// 16-bit base), or the 4-bit ones it was trained against, dequantized: the model exactly as
    /// trained, without the quantization error the original weights add back (needed for a LoftQ
    /// adapter, which starts at that error). Exact for nibble's own runs; an adapter trained with
    /// bitsandbytes' double quantization saw scales rounded to 8 bits, which nibble does not round.
    /// Default: original, or quantized where a 4-bit --quant or a --group-size is given or the
    /// adapter's run.json records a LoftQ start.
    #[arg(long, value_enum, ignore_case = true)]
    base_weights: Option<BaseWeights>,
    /// With --base-weights quantized: the 4-bit format training used (default: the one the adapter
    /// folder's run.json records).
    #[arg(long, value_enum, ignore_case = true)]
    quant: Option<QuantChoice>,
    /// With --base-weights quantized: weights per scale, 32, 64 or 128 (default: run.json's, else 64).
    #[arg(long)]
    group_size: Option<usize>,
    /// The largest weights file (transformers' max_shard_size, and its default: 50GB, the Hub's
    /// largest file); more weights go into numbered shards with model.safetensors.index.json.
    #[arg(long, value_name = "SIZE")]
    max_shard_size: Option<String>,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
enum BaseWeights {
    Original,
    Quantized,
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum Dtype {
    Bf16,
    F16,
    F32,
}

pub fn run(args: Args) -> Result<()> {
    let dtype = args.dtype.map(|d| match d {
        Dtype::Bf16 => FloatDtype::BF16,
        Dtype::F16 => FloatDtype::F16,
        Dtype::F32 => FloatDtype::F32,
    });
    let base = merge_base(&args)?;
    let max_shard_bytes = match &args.max_shard_size {
        Some(size) => nibble::alloc::parse_size(size, "--max-shard-size")?,
        None => nibble::merge::DEFAULT_MAX_SHARD_BYTES,
    };
    let source = model::open(&args.model)?;
    let (lora, saved) = nibble::train::run::load_adapter_with_modules(
        &args.adapter,
        &source.config,
        (source.label(), None),
        "--adapter",
    )?;
    // The merged model chats the way the adapter was trained to, and ends text where it was trained
    // to, as TRL's saved tokenizer and generation config would.
    let mut chat = nibble::merge::MergedChat::default();
    let own = nibble::tokenizer::TemplateChoice::of_model(&source.tokenizer);
    let template =
        nibble::tokenizer::TemplateChoice::chosen(None, Some(&args.adapter), own.as_deref())?;
    // The adapter's eos, where it records one and the model folder has a tokenizer to find it in (a
    // folder without one merges into one without one).
    let recorded = nibble::tokenizer::adapter_eos_token(&args.adapter)?
        .filter(|_| source.tokenizer.tokenizer_json.is_some());
    if template.is_some() || recorded.is_some() {
        let base = super::tokenizer_of(&source, None, None)?;
        if let Some((eos, origin)) =
            recorded.filter(|(eos, _)| base.eos_token.as_ref() != Some(eos))
        {
            let id = base.token_id(&eos).with_context(|| {
                format!(
                    "{}: eos_token `{eos}` is not a token of {}",
                    origin.display(),
                    args.model.display()
                )
            })?;
            chat.eos = Some((eos, id));
        }
        if let Some(choice) = template {
            let tok = base.with_template(&choice)?;
            chat.turn_end = nibble::generate::turn_end_token(&tok);
            chat.template = Some(choice.default);
        }
    }
    nibble::merge::merge(
        &source,
        &args.model,
        (&lora, &saved),
        &chat,
        &args.output,
        (dtype, base, max_shard_bytes),
    )?;
    let whole: Vec<&str> = [
        (saved.embed.is_some(), "embedding"),
        (saved.head.is_some(), "output projection"),
        (saved.embed_rows.is_some(), "embedding rows"),
        (saved.head_rows.is_some(), "output projection rows"),
    ]
    .into_iter()
    .filter(|(present, _)| *present)
    .map(|(_, what)| what)
    .collect();
    let whole = match whole.is_empty() {
        true => String::new(),
        false => format!(" (and the adapter's {})", whole.join(" and ")),
    };
    let onto = match base {
        MergeBase::Original => String::new(),
        MergeBase::Quantized(spec) => format!(" onto the {spec} weights"),
    };
    eprintln!(
        "merged {} LoRA pairs{whole}{onto} into {}",
        lora.pairs().count(),
        args.output.display()
    );
    Ok(())
}

/// The weights to merge into, from the options and what the adapter folder's run.json records.
fn merge_base(args: &Args) -> Result<MergeBase> {
    let format = match args.quant {
        Some(QuantChoice::Nf4) => Some(QuantFormat::Nf4),
        Some(QuantChoice::Int4) => Some(QuantFormat::Int4),
        Some(QuantChoice::None) => None,
        None => None,
    };
    let asked = format.is_some() || args.group_size.is_some();
    if args.quant == Some(QuantChoice::None) {
        match (args.base_weights, args.group_size) {
            (Some(BaseWeights::Quantized), _) => anyhow::bail!(
                "--base-weights quantized needs a 4-bit --quant (nf4 or int4), not none"
            ),
            (_, Some(_)) => anyhow::bail!(
                "--group-size says how the 4-bit weights are grouped; --quant none merges into the \
                 checkpoint's own weights"
            ),
            _ => return Ok(MergeBase::Original),
        }
    }
    if args.base_weights == Some(BaseWeights::Original) {
        if asked {
            anyhow::bail!(
                "--quant and --group-size say which 4-bit weights to merge into; --base-weights \
                 original merges into the checkpoint's own"
            );
        }
        return Ok(MergeBase::Original);
    }
    let manifest = args.adapter.join(nibble::train::MANIFEST);
    // Options that say everything leave the record to a warning.
    let recorded = nibble::train::run::recorded_weights_unless(
        &args.adapter,
        format.is_some() && args.group_size.is_some(),
    )?;
    if args.base_weights.is_none() && !asked {
        match recorded {
            // LoftQ's adapter starts at the quantization error: merged into the original weights
            // it would count it twice.
            Some(nibble::train::run::TrainedOn {
                quant: Some(spec),
                loftq: true,
            }) => {
                log::info!(
                    "{}: a LoftQ adapter, merged into the {spec} weights it was trained against \
                     (--base-weights original merges into the checkpoint's own)",
                    args.adapter.display()
                );
                return Ok(MergeBase::Quantized(spec));
            }
            // PEFT's way, and the default: said where the adapter's run records 4-bit weights.
            Some(nibble::train::run::TrainedOn {
                quant: Some(spec), ..
            }) => log::info!(
                "{} was trained against {spec} weights: merged into the original ones, the model \
                 differs from the one trained by their quantization error (--base-weights \
                 quantized merges into the 4-bit ones)",
                args.adapter.display()
            ),
            _ => {}
        }
        return Ok(MergeBase::Original);
    }
    let trained = match recorded.map(|r| r.quant) {
        Some(Some(spec)) => Some(spec),
        Some(None) if !asked => anyhow::bail!(
            "{}: the adapter was trained on 16-bit weights (--quant none); merge it into the \
             original weights (leave out --base-weights quantized)",
            manifest.display()
        ),
        Some(None) => None,
        None if !asked => anyhow::bail!(
            "--base-weights quantized: {} records no 4-bit weights the adapter was trained on (a \
             run.json of nibble's holds them); give them with --quant nf4|int4 and --group-size",
            args.adapter.display()
        ),
        None => None,
    };
    let spec = QuantSpec::new(
        format
            .or(trained.map(|t| t.format))
            .unwrap_or(QuantFormat::Nf4),
        args.group_size
            .or(trained.map(|t| t.group_size))
            .unwrap_or(nibble::quant::DEFAULT_GROUP_SIZE),
    )
    .context("--group-size")?;
    if let Some(recorded) = recorded
        && recorded.quant != Some(spec)
    {
        let trained = recorded
            .quant
            .map_or("16-bit".to_string(), |t| t.to_string());
        log::warn!(
            "{} records the adapter trained on {trained} weights; merging into {spec} ones, as \
             asked",
            manifest.display()
        );
    }
    Ok(MergeBase::Quantized(spec))
}
