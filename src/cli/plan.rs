//! `nibble plan`: the memory of a training step, from the shapes alone.

use super::{QuantArgs, group_digits, human_bytes};
use anyhow::{Result, bail};
use nibble::graph::checkpoint::{Asked, Keep};
use nibble::model;
use nibble::quant::QuantSpec;
use nibble::train::settings::{parse_target_parameters, parse_targets};
use std::path::{Path, PathBuf};

/// Peak memory of a training step for a model, sequence length and LoRA options, computed from the
/// shapes before anything runs. MODEL may be a folder holding only config.json.
#[derive(clap::Args)]
pub struct Args {
    /// A model folder (config.json alone is enough) or a file written by `nibble quantize`.
    model: PathBuf,
    /// Tokens per sequence [default: 1024].
    #[arg(long)]
    seq_len: Option<usize>,
    #[command(flatten)]
    quant: QuantArgs,
    /// LoRA rank [default: 8; FLUX.2: the flux2-klein preset's 32].
    #[arg(long)]
    lora_r: Option<usize>,
    /// LoRA dropout (above 0, each adapted linear keeps a dropout mask) [default: 0.05; FLUX.2: 0].
    #[arg(long)]
    lora_dropout: Option<f64>,
    /// Comma-separated module names (q_proj,...,down_proj) or all-linear [default: all-linear].
    #[arg(long)]
    target_modules: Option<String>,
    /// Comma-separated parameters adapted by name, as `nibble train` takes them (a mixture of
    /// experts' gate.weight, gate_up_proj, down_proj) [default: those target_modules convert into].
    #[arg(long)]
    target_parameters: Option<String>,
    /// DoRA (PEFT's use_dora): a magnitude per output, and each adapted linear's rescaled term kept
    /// for the backward.
    #[arg(long)]
    use_dora: bool,
    /// The tokens whose embedding (and untied output) rows train, as `nibble train` takes them
    /// (ids or single-token texts, comma-separated): only how many counts here.
    #[arg(long, alias = "trainable-token-indices")]
    trainable_tokens: Option<String>,
    /// Recompute each layer (block) before its backward (default: on for FLUX.2, off for LLMs).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    gradient_checkpointing: Option<bool>,
    /// Gradient checkpointing with each layer's input kept in bf16 (half the checkpoints' memory).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    bf16_checkpoints: Option<bool>,
    /// bf16 checkpoints kept in host memory, one layer's on the device at a time (GPU executor;
    /// what --budget assumes unless told otherwise).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    offload_checkpoints: Option<bool>,
    /// FLUX.2: image side in pixels (16 pixels per latent token); several (512,768,1024), as
    /// `nibble train` takes them, plan the largest [default: the flux2-klein preset's 512, as
    /// `nibble train` takes it].
    #[arg(long, value_delimiter = ',', value_name = "PIXELS")]
    resolution: Vec<usize>,
    /// FLUX.2: the side in pixels of the control images (`nibble train --control`) beside each
    /// training image (at most `nibble train --control-resolution`, 1024 unless told); give it once
    /// per control folder.
    #[arg(long, value_name = "PIXELS")]
    control_resolution: Vec<usize>,
    /// FLUX.2: caption tokens (the text encoder pads or cuts every caption to 512) [default: 512].
    #[arg(long)]
    text_tokens: Option<usize>,
    /// The memory of the device to train on (11.5GiB, 8GB, 12000MiB): print the longest sequence
    /// whose step fits in it (JSON: `max_seq_len`), with the plan of that step (instead of --seq-len).
    #[arg(long)]
    budget: Option<String>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let Args {
        model: path,
        seq_len: tokens,
        quant,
        lora_r: rank,
        lora_dropout: dropout,
        target_modules: targets,
        target_parameters,
        use_dora: dora,
        trainable_tokens,
        gradient_checkpointing: checkpoint,
        bf16_checkpoints,
        offload_checkpoints,
        resolution,
        control_resolution,
        text_tokens,
        budget,
        json: as_json,
    } = args;
    let budget = budget
        .map(|b| nibble::alloc::parse_size(&b, "--budget"))
        .transpose()?;
    // As training checks it (the f32 it is used as: 0.99999999 is 1 there).
    if let Some(dropout) = dropout.filter(|p| !(0.0..1.0).contains(&(*p as f32))) {
        bail!("--lora-dropout must be a number from 0 to 1 (below 1; got {dropout})");
    }
    let targets = targets.unwrap_or_else(|| "all-linear".into());
    if let Some(c) = nibble::models::flux2::config_at(&path)? {
        // What `nibble train` refuses for FLUX.2 and what only a language model's step takes.
        if dora
            || dropout.is_some_and(|p| p > 0.0)
            || trainable_tokens.is_some()
            || target_parameters.is_some()
        {
            bail!(
                "--use-dora, --lora-dropout, --trainable-tokens and --target-parameters: nibble \
                 trains FLUX.2 with plain LoRA on its block linears, without dropout (as `nibble \
                 train` refuses them there)"
            );
        }
        if tokens.is_some() {
            bail!(
                "--seq-len plans a language model's step; a FLUX.2 step takes --resolution and \
                 --text-tokens"
            );
        }
        // The run `nibble train` makes of it: the flux2-klein preset under the options given.
        let preset = nibble::train::settings::TrainSettings::preset("flux2-klein")?;
        let rank = rank.or(preset.lora_r).expect("the preset's rank");
        let quant = QuantArgs {
            group_size: quant.group_size.or(preset.group_size),
            ..quant
        };
        // A run at several resolutions needs the largest's step.
        let resolution = resolution
            .into_iter()
            .max()
            .or(preset.resolution.and_then(|r| r.into_iter().max()))
            .unwrap_or(512);
        let text_tokens = text_tokens.unwrap_or(512);
        nibble::train::flux2::check_resolution(resolution)?;
        if !(1..=4096).contains(&text_tokens) || !(1..=4096).contains(&rank) {
            bail!(
                "--text-tokens and --lora-r must be from 1 to 4096 (got {text_tokens} and {rank})"
            );
        }
        let checkpoint = checkpoint.unwrap_or(true);
        let spec = quant.planned_spec(None)?;
        let mut reference_tokens = 0;
        for &side in &control_resolution {
            if !(64..=4096).contains(&side) {
                bail!("--control-resolution {side}: from 64 to 4096 pixels");
            }
            let (_, (w, h)) = nibble::images::reference_sizes(side, side, side * side);
            reference_tokens += w * h / 256;
        }
        let step = nibble::models::flux2::Flux2Step {
            reference_tokens,
            ..nibble::models::flux2::Flux2Step::training(resolution, text_tokens, checkpoint)
        };
        let p = nibble::models::flux2::plan(&c, spec, (rank, &parse_targets(&targets)?), step)?;
        let controls = match reference_tokens {
            0 => String::new(),
            n => format!(" + {n} control"),
        };
        let what = format!(
            "training step at {resolution}x{resolution} ({} image{controls} + {text_tokens} text \
             tokens), LoRA r={rank} on {targets} of the {} block linears",
            step.image_tokens,
            c.block_linears().len()
        );
        if bf16_checkpoints.is_some() || offload_checkpoints.is_some() {
            bail!(
                "--bf16-checkpoints and --offload-checkpoints are for language models; FLUX.2 \
                 keeps its checkpoints in f32 on the device"
            );
        }
        if budget.is_some() {
            bail!(
                "--budget finds the longest sequence of a language model; for FLUX.2, compare the \
                 total at each --resolution with your card"
            );
        }
        return print_plan(
            &p,
            &what,
            spec,
            checkpointing(checkpoint, Keep::F32),
            as_json,
        );
    }
    // Left to nibble, a budget is met as `nibble train` meets the least memory on a GPU: with bf16
    // checkpoints in host memory (or the least the flags allow).
    let asked = Keep::from_flags(checkpoint, bf16_checkpoints, offload_checkpoints)
        .map_err(anyhow::Error::msg)?;
    let (checkpoint, keep) = match (asked, budget) {
        (Asked::Fixed { checkpoint, keep }, _) => (checkpoint, keep),
        (Asked::Fit { most }, Some(_)) => (true, most),
        (Asked::Fit { .. }, None) => (false, Keep::F32),
    };
    if !resolution.is_empty() || text_tokens.is_some() || !control_resolution.is_empty() {
        bail!(
            "--resolution, --control-resolution and --text-tokens plan FLUX.2 image steps; a language model's step takes --seq-len or --budget"
        );
    }
    let (tokens, rank) = (tokens.unwrap_or(1024), rank.unwrap_or(8));
    let dropout = dropout.unwrap_or(0.05);
    let (config, stored) = plan_source(&path)?;
    let spec = quant
        .planned_spec(stored)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if let Some(spec) = spec {
        // As training would refuse it.
        config
            .check_group_size(spec.group_size)
            .map_err(|msg| anyhow::anyhow!("{}: {msg}", path.display()))?;
    }
    use nibble::train::settings::{MAX_RANK, MAX_TOKENS};
    if !(1..=MAX_TOKENS).contains(&tokens) || !(1..=MAX_RANK).contains(&rank) {
        bail!(
            "--seq-len must be from 1 to {MAX_TOKENS} and --lora-r from 1 to {MAX_RANK} (got {tokens} and {rank})"
        );
    }
    let mut input = nibble::plan::PlanInput {
        tokens,
        quant: spec,
        lora_rank: rank,
        lora_rank_pattern: Vec::new(),
        lora_targets: parse_targets(&targets)?,
        lora_target_parameters: parse_target_parameters(target_parameters.as_deref())?,
        lora_dropout: dropout > 0.0,
        dora,
        checkpoint,
        checkpoints: keep,
        trainable_tokens: count_trainable_tokens(trainable_tokens.as_deref())?,
    };
    let positions = config.trained_positions();
    let Some(budget) = budget else {
        if tokens > positions {
            log::warn!(
                "--seq-len {tokens} is beyond the {positions} positions the model places: `nibble \
                 train` cuts sequences to {positions} tokens"
            );
        }
        let p = nibble::plan::plan(&config, &input)?;
        let what = format!("training step of {tokens} tokens, LoRA r={rank} on {targets}");
        return print_plan(&p, &what, spec, checkpointing(checkpoint, keep), as_json);
    };
    let Some((longest, p)) = nibble::plan::longest_sequence(&config, &input, budget)? else {
        input.tokens = 1;
        let p = nibble::plan::plan(&config, &input)?;
        bail!(
            "not even a 1-token step fits in {}: the weights and LoRA state alone take {} (a \
             4-bit --quant, a lower --lora-r or fewer --target-modules need less)",
            human_bytes(budget),
            human_bytes(p.weights + p.lora_and_optimizer)
        );
    };
    if as_json {
        let mut value = serde_json::to_value(&p)?;
        value["max_seq_len"] = longest.into();
        value["budget"] = budget.into();
        value["assumed"] = serde_json::json!({
            "quant": spec.map(|s| s.to_string()), "lora_r": rank, "target_modules": targets,
            "lora_dropout": dropout, "gradient_checkpointing": checkpoint,
            "bf16_checkpoints": keep.bf16(), "offload_checkpoints": keep == Keep::Bf16Host,
            "trainable_tokens": input.trainable_tokens,
        });
        println!("{value}");
        return Ok(());
    }
    // The search stops at the model's positions, which training cuts sequences to.
    let cap = match longest == positions {
        true => " (every position the model places: longer ones would be cut)",
        false => "",
    };
    println!(
        "longest sequence in {}: {} tokens{cap}",
        human_bytes(budget),
        group_digits(longest as u64)
    );
    let what = format!("training step of {longest} tokens, LoRA r={rank} on {targets}");
    print_plan(&p, &what, spec, checkpointing(checkpoint, keep), false)
}

/// How many tokens `--trainable-tokens` names (each entry, between commas, names one token to
/// `nibble train`, which reads the tokenizer this plan does without).
fn count_trainable_tokens(spec: Option<&str>) -> Result<usize> {
    let Some(spec) = spec else { return Ok(0) };
    let entries: Vec<&str> = spec.split(',').map(str::trim).collect();
    if entries.iter().any(|e| e.is_empty()) {
        bail!(
            "--trainable-tokens {spec:?}: an empty entry; give token ids or texts between commas"
        );
    }
    Ok(entries.len())
}

/// How the plan's header says the step keeps its checkpoints.
fn checkpointing(on: bool, keep: Keep) -> &'static str {
    match (on, keep) {
        (false, _) => "",
        (true, Keep::F32) => ", gradient checkpointing",
        (true, Keep::Bf16) => ", gradient checkpointing in bf16",
        (true, Keep::Bf16Host) => ", gradient checkpointing in bf16 offloaded to host memory",
    }
}

fn print_plan(
    p: &nibble::plan::Plan,
    what: &str,
    spec: Option<QuantSpec>,
    checkpointing: &str,
    as_json: bool,
) -> Result<()> {
    if as_json {
        println!("{}", serde_json::to_string(p)?);
        return Ok(());
    }
    let weights = spec.map_or("16-bit".to_string(), |s| s.to_string());
    println!("{what}{checkpointing}");
    let row = |label: &str, bytes: u64, note: String| {
        println!("  {label:<26}{:>12}{note}", human_bytes(bytes));
    };
    row(&format!("weights ({weights})"), p.weights, String::new());
    if p.host_weights > 0 {
        let note = "   (a GPU leaves it on the host)".to_string();
        row("embedding (host memory)", p.host_weights, note);
    }
    let note = format!(
        "   ({} trainable parameters)",
        group_digits(p.lora_parameters)
    );
    row("LoRA + AdamW state", p.lora_and_optimizer, note);
    if p.token_tables > 0 {
        let note = "   (the CPU's copy the trained token rows go into)".to_string();
        row("tables (host memory)", p.token_tables, note);
    }
    row("step buffers at peak", p.activations, String::new());
    if p.host_activations > 0 {
        row(
            "checkpoints (host memory)",
            p.host_activations,
            "   (not in the total)".into(),
        );
    }
    row("kernel temporaries", p.workspace, String::new());
    let note = "   (whole buffers shared by activations that are not live at once)";
    row("step on a GPU", p.device_step, note.into());
    let note = format!("   (on a GPU; on the CPU {})", human_bytes(p.cpu_total()));
    row("total", p.total, note);
    Ok(())
}

/// The configuration and stored format of what `nibble plan` was given: a model folder or quantized file,
/// or a folder (or file) with only config.json: whether a model fits is worth knowing before its
/// weights are downloaded.
fn plan_source(path: &Path) -> Result<(nibble::config::ModelConfig, Option<QuantSpec>)> {
    let config_only = if path.is_dir() {
        let has = |name: &str| path.join(name).exists();
        has("config.json") && !has("model.safetensors") && !has("model.safetensors.index.json")
    } else {
        path.file_name().is_some_and(|n| n == "config.json")
    };
    if config_only {
        let file = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        return Ok((nibble::config::ModelConfig::from_file(&file)?, None));
    }
    let source = model::open(path)?;
    Ok((source.config.clone(), source.stored_quant()))
}
