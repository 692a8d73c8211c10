//! `nibble merge`: an adapter folded into the base weights.

use anyhow::{Context, Result};
use nibble::model;
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
        dtype,
    )?;
    let whole: Vec<&str> = [
        (&saved.embed, "the embedding"),
        (&saved.head, "the output projection"),
    ]
    .into_iter()
    .filter(|(module, _)| module.is_some())
    .map(|(_, what)| what)
    .collect();
    let whole = match whole.is_empty() {
        true => String::new(),
        false => format!(" (and the adapter's {})", whole.join(" and ")),
    };
    eprintln!(
        "merged {} LoRA pairs{whole} into {}",
        lora.pairs().count(),
        args.output.display()
    );
    Ok(())
}
