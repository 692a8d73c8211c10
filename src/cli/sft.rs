//! `nibble sft`: `trl sft`'s command line as it is (TRL's option names and defaults, `--config
//! recipe.yaml` beneath the flags), trained as `nibble train` trains.

use anyhow::Result;

#[derive(clap::Args)]
#[command(after_help = "Each option as `trl sft` takes it, such as:\n  \
    nibble sft --model_name_or_path Qwen2.5-0.5B-Instruct --dataset_name chats.jsonl --use_peft \
    --load_in_4bit --lora_r 8 --lora_alpha 16 --lora_target_modules all-linear --learning_rate 2e-4 \
    --gradient_accumulation_steps 4 --per_device_train_batch_size 1 --num_train_epochs 2 --output_dir out\n\
    nibble train's own options are taken too (--device cpu). See `nibble train --help` for what each does.")]
pub struct Args {
    /// `trl sft`'s options: `--config recipe.yaml`, then `--name value` (or `--name a b` for a list,
    /// a bare `--name` for true), each over the recipe's; left out, TRL's defaults.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0.., value_name = "OPTIONS")]
    pub options: Vec<String>,
}

pub fn run(args: Args) -> Result<()> {
    let recipe = nibble::train::trl_config::read_command_line(&args.options)?;
    for note in &recipe.notes {
        log::warn!("{note}");
    }
    let settings = recipe.settings.clone();
    // Named as trl sft names them (TRL would write to ./trainer_output: nibble asks instead).
    for (missing, option) in [
        (settings.model.is_none(), "--model_name_or_path"),
        (
            settings.data.as_ref().is_none_or(Vec::is_empty),
            "--dataset_name",
        ),
        (settings.output.is_none(), "--output_dir"),
    ] {
        if missing {
            anyhow::bail!("nibble sft: {option} is required (on the command line or in --config)");
        }
    }
    super::train::run(settings).map_err(|e| match recipe.where_named(&format!("{e:#}")) {
        Some(place) => e.context(place),
        None => e,
    })
}
