//! `nibble data`: a data file as training sees it: each example through the model's chat template,
//! its tokens, and which of them carry loss.

use anyhow::{Context, Result};
use nibble::tokenizer::ChatTokenizer;
use nibble::train::LossOn;
use serde_json::json;
use std::io::IsTerminal;
use std::path::PathBuf;

/// Show how a JSONL data file reaches the model: each example rendered through the model's chat
/// template, with the tokens that carry loss marked (as `nibble train` would label them).
#[derive(clap::Args)]
pub struct Args {
    /// The JSONL file (the formats `nibble train --data` reads).
    data: PathBuf,
    /// The model folder or quantized file whose tokenizer and chat template apply (a folder's
    /// config.json and tokenizer files are read; its weights need not be there).
    #[arg(long)]
    model: PathBuf,
    /// The chat template to render conversations with, as `nibble train --chat-template` takes it.
    #[arg(long)]
    chat_template: Option<PathBuf>,
    /// Which tokens carry loss, as `nibble train --loss-on` chooses them.
    #[arg(long, value_enum, ignore_case = true, default_value = "default")]
    loss_on: LossOn,
    #[command(flatten)]
    rows: super::DataArgs,
    /// How many examples to show (the totals count every one).
    #[arg(long, default_value_t = 3)]
    examples: usize,
    /// One JSON object per shown example (its token ids, each token's text and whether it carries
    /// loss), then one with the totals.
    #[arg(long)]
    json: bool,
}

/// One example's tokens in runs of the same labelling: (text, carries loss).
fn runs(tok: &ChatTokenizer, ids: &[u32], labelled: &[bool]) -> Result<Vec<(String, bool)>> {
    let mut out: Vec<(String, bool)> = Vec::new();
    let mut start = 0;
    for end in 1..=ids.len() {
        if end == ids.len() || labelled[end] != labelled[start] {
            out.push((tok.decode(&ids[start..end])?, labelled[start]));
            start = end;
        }
    }
    Ok(out)
}

/// Which tokens of `seq` carry loss: token t + 1 when position t predicts it.
fn labelled_tokens(seq: &nibble::cpu::Sequence) -> Vec<bool> {
    let mut labelled = vec![false; seq.ids.len()];
    for (t, target) in seq.targets.iter().enumerate() {
        if target.is_some() && t + 1 < labelled.len() {
            labelled[t + 1] = true;
        }
    }
    labelled
}

pub fn run(args: Args) -> Result<()> {
    let source = nibble::model::ModelSource::open_text(&args.model)?;
    let tok = super::tokenizer_from(&source, args.chat_template.as_deref(), None)?;
    let tok = args.rows.tokenizer(tok)?;
    let cut = args.rows.cut(&source.config);
    let (examples, places) = args.rows.read(&args.data)?;
    let color = !args.json && std::io::stdout().is_terminal();
    let (open, close) = if color {
        ("\x1b[1;32m", "\x1b[0m")
    } else {
        ("⟦", "⟧")
    };
    if !args.json {
        println!(
            "{}: tokens that carry loss are {}",
            args.data.display(),
            if color {
                "in green"
            } else {
                "between ⟦ and ⟧"
            }
        );
    }
    let (mut tokens, mut labels, mut cut_examples) = (0usize, 0usize, 0usize);
    let mut unlearnable = Vec::new();
    for (i, example) in examples.iter().enumerate() {
        let (seq, removed) = nibble::train::tokenize_cut(&tok, example, args.loss_on, cut)
            .with_context(|| places.of(i))?;
        let labelled = labelled_tokens(&seq);
        let count = labelled.iter().filter(|&&l| l).count();
        tokens += seq.ids.len();
        labels += count;
        cut_examples += usize::from(removed > 0);
        if count == 0 {
            unlearnable.push(i + 1);
        }
        if i >= args.examples {
            continue;
        }
        if args.json {
            let pieces: Vec<String> = seq
                .ids
                .iter()
                .map(|&id| tok.decode(&[id]))
                .collect::<nibble::error::Result<_>>()?;
            let line = json!({"example": i + 1, "ids": seq.ids, "tokens": pieces,
                "labelled": labelled, "cut_tokens": removed});
            println!("{line}");
            continue;
        }
        let cut_note = match removed {
            0 => String::new(),
            n => format!(", {n} cut by --max-length {}", cut.max_length),
        };
        println!(
            "\n── example {} ({} tokens, {count} carry loss{cut_note})",
            i + 1,
            seq.ids.len()
        );
        let mut text = String::new();
        for (piece, carries) in runs(&tok, &seq.ids, &labelled)? {
            match carries {
                true => text.push_str(&format!("{open}{piece}{close}")),
                false => text.push_str(&piece),
            }
        }
        println!("{text}");
    }
    if !unlearnable.is_empty() {
        log::warn!(
            "{}: {} of {} examples have no token that carries loss (--loss-on {}): {}; \
             `nibble train` leaves them out, and refuses a conversation without an assistant turn \
             under --loss-on assistant (as TRL does)",
            args.data.display(),
            unlearnable.len(),
            examples.len(),
            nibble::value_name(args.loss_on),
            places.list(&unlearnable)
        );
    }
    if args.json {
        println!(
            "{}",
            json!({"examples": examples.len(), "tokens": tokens, "labelled_tokens": labels,
                "cut_examples": cut_examples})
        );
    } else {
        println!(
            "\n{} examples, {tokens} tokens, {labels} carry loss ({:.0}%){}",
            examples.len(),
            100.0 * labels as f64 / tokens.max(1) as f64,
            match cut_examples {
                0 => String::new(),
                n => format!("; {n} cut by --max-length {}", cut.max_length),
            }
        );
    }
    Ok(())
}
