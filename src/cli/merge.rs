//! `nibble merge`: an adapter folded into the base weights.

use anyhow::Result;
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
    let lora = nibble::train::run::load_adapter(
        &args.adapter,
        &source.config,
        (source.label(), None),
        "--adapter",
    )?;
    // The merged model chats the way the adapter was trained to, as TRL's saved tokenizer would.
    let template = match nibble::tokenizer::TemplateChoice::chosen(None, Some(&args.adapter))? {
        Some(choice) => {
            let tok = super::tokenizer_of(&source, None, None)?.with_template(&choice)?;
            Some(nibble::merge::MergedTemplate {
                turn_end: nibble::generate::turn_end_token(&tok),
                text: choice.default,
            })
        }
        None => None,
    };
    nibble::merge::merge(
        &source,
        &args.model,
        &lora,
        template.as_ref(),
        &args.output,
        dtype,
    )?;
    eprintln!(
        "merged {} LoRA pairs into {}",
        lora.pairs().count(),
        args.output.display()
    );
    Ok(())
}
