//! `nibble eval`: loss and perplexity of a model (and adapter) over a dataset, on the tokens training
//! would put the loss on.

use super::{ExecArgs, QuantArgs, open_placed};
use anyhow::{Context, Result, bail};
use nibble::train::LossOn;
use serde_json::json;
use std::path::PathBuf;

/// Mean token cross-entropy and perplexity of a model (and optional LoRA adapter) over a JSONL file,
/// printed as one JSON line.
#[derive(clap::Args)]
pub struct Args {
    /// The model: a Hugging Face folder (config.json, safetensors, tokenizer) or a file written by
    /// `nibble quantize`.
    #[arg(long)]
    model: PathBuf,
    /// The dataset: JSONL rows ({"messages": [...]}, {"prompt": ..., "completion": ...}, {"text": ...},
    /// ShareGPT, Alpaca), or a Parquet or Arrow file or a folder saved by `datasets`.
    #[arg(long)]
    data: PathBuf,
    /// A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[command(flatten)]
    quant: QuantArgs,
    #[command(flatten)]
    exec: ExecArgs,
    /// The chat template to render conversations with (as `nibble train --chat-template`) [default:
    /// the adapter's chat_template.jinja where it keeps one, else the model's].
    #[arg(long)]
    chat_template: Option<PathBuf>,
    /// Which tokens count, as `nibble train --loss-on` chooses those that carry loss (the default:
    /// every token, or the completion of prompt/completion rows, as TRL's eval_loss counts them).
    #[arg(long, value_enum, ignore_case = true, default_value = "default")]
    loss_on: LossOn,
    #[command(flatten)]
    rows: super::DataArgs,
}

pub fn run(args: Args) -> Result<()> {
    let data = evaluated_split(&args.data)?;
    let (examples, places) = args.rows.read(&data)?;
    let (tok, placed) = open_placed(
        &args.model,
        args.quant,
        args.adapter.as_deref(),
        args.chat_template.as_deref(),
        args.exec.device,
    )?;
    let tok = args.rows.tokenizer(tok)?;
    let cut = args.rows.cut(&placed.model.config);
    let executor = placed.executor();
    log::info!(
        "evaluating {} examples on {}",
        examples.len(),
        executor.describe()
    );
    let mut total = nibble::cpu::StepLoss::default();
    let mut cut_examples = 0usize;
    // (example, whether the cut took its tokens) of those with no token to predict.
    let mut empty: Vec<(usize, bool)> = Vec::new();
    let mut shown = super::progress::Progress::start("example", 0, examples.len(), false);
    let started = std::time::Instant::now();
    for (i, example) in examples.iter().enumerate() {
        let (seq, removed) = nibble::train::tokenize_cut(&tok, example, args.loss_on, cut)
            .with_context(|| places.of(i))?;
        cut_examples += usize::from(removed > 0);
        if seq.target_count() == 0 {
            // TRL refuses such an evaluation set as it refuses a training set.
            if nibble::train::run::lacks_assistant_turn(
                &tok,
                example,
                args.loss_on,
                cut,
                (&seq, removed),
            )? {
                return Err(nibble::train::run::no_assistant_turn(&places.of(i)).into());
            }
            empty.push((i + 1, removed > 0));
        }
        let loss = executor.loss(&seq, args.exec.precision.cpu())?;
        total += loss;
        let (loss_sum, tokens) = (total.loss_sum, total.targets);
        let per_s = tokens as f64 / started.elapsed().as_secs_f64().max(1e-9);
        let mean = loss_sum / tokens.max(1) as f64;
        let message = format!("loss {mean:.4}  {} tokens/s", super::rate(per_s));
        let eta = shown.eta();
        shown.advanced(i + 1, message, || {
            let eta = eta.map_or(String::new(), |s| {
                format!(", eta {}", super::progress::duration(s))
            });
            format!(
                "evaluated {}/{} examples, loss so far {mean:.4}{eta}",
                i + 1,
                examples.len()
            )
        });
    }
    shown.finish();
    if cut_examples > 0 {
        log::warn!(
            "{} longer than {} tokens (--max-length {}, within the model's positions) and cut",
            match cut_examples {
                1 => "1 example was".to_string(),
                n => format!("{n} examples were"),
            },
            cut.max_length,
            args.rows.max_length
        );
    }
    if !empty.is_empty() && total.targets > 0 {
        let numbers: Vec<usize> = empty.iter().map(|(i, _)| *i).collect();
        let cut_off = empty.iter().filter(|(_, cut)| *cut).count();
        let why = match cut_off {
            0 => String::new(),
            n => format!(
                "; --max-length {} cut off the tokens of {n} of them",
                args.rows.max_length
            ),
        };
        log::warn!(
            "{}: {} of {} examples have no token to predict (--loss-on {}{why}): {}; they are \
             left out of the loss",
            data.display(),
            empty.len(),
            examples.len(),
            nibble::value_name(args.loss_on),
            places.list(&numbers)
        );
    }
    if total.targets == 0 {
        bail!("{}: no example has a token to predict", data.display());
    }
    let mean = total.loss_sum / total.targets as f64;
    if !mean.is_finite() {
        bail!("the loss is {mean}: the model or adapter produces non-finite values");
    }
    let predictions = nibble::train::TokenMetrics::of_total(&total);
    if !mean.exp().is_finite() {
        // JSON has no infinity: the field is null, and this says why.
        log::warn!("the perplexity, e^{mean}, is beyond an f64's range: printed as null");
    }
    println!(
        "{}",
        json!({"loss": mean, "perplexity": mean.exp(), "tokens": total.targets,
               "mean_token_accuracy": predictions.mean_token_accuracy,
               "entropy": predictions.entropy})
    );
    Ok(())
}

/// The split a dataset folder is evaluated on: its test split, else its validation split, else its
/// train split (as `datasets` names them), said on stderr; `FOLDER/SPLIT` or a file as given.
/// (Reading the train split, as training does, would report a training loss as a held-out one.)
fn evaluated_split(data: &std::path::Path) -> Result<PathBuf> {
    if !data.is_dir() {
        return Ok(data.to_path_buf());
    }
    let Some(splits) = nibble::tables::repository_splits(data)? else {
        return Ok(data.to_path_buf());
    };
    let named: Vec<&str> = splits.iter().map(|(name, _)| name.as_str()).collect();
    let Some(split) = ["test", "validation", "train"]
        .into_iter()
        .find(|s| named.contains(s))
    else {
        return Ok(data.to_path_buf());
    };
    log::info!(
        "evaluating the {split} split of {} (of {}; {}/SPLIT picks another)",
        data.display(),
        named.join(", "),
        data.display()
    );
    Ok(data.join(split))
}
