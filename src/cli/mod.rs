//! The command line: one module per subcommand (its clap arguments and a `run`), and what several of
//! them share. The work itself is the library's.

pub mod data;
pub mod demo;
pub mod eval;
pub mod generate;
pub mod info;
pub mod merge;
pub mod plan;
pub mod progress;
pub mod quantize;
pub mod sample;
pub mod sft;
pub mod synth;
pub mod train;

use anyhow::{Context, Result};
use nibble::exec::{Device, PrecisionChoice};
use nibble::generate::Placed;
use nibble::model::{QuantChoice, QuantRequest};
use nibble::quant::QuantSpec;
use nibble::tokenizer::{ChatTokenizer, TemplateChoice};
use std::path::Path;

#[derive(clap::Args, Clone, Copy, Default)]
pub struct QuantArgs {
    /// Storage of the decoder's linear weights: nf4, int4, or none (keep them 16-bit) [default: as
    /// an --adapter's run.json records its run's; else nf4 for a model folder; a quantized file as
    /// it is stored].
    #[arg(long, value_enum, ignore_case = true)]
    pub quant: Option<QuantChoice>,
    /// Weights per scale, along the input dimension: 32, 64 or 128 [default: an --adapter's run's;
    /// else 64; a quantized file's own].
    #[arg(long)]
    pub group_size: Option<usize>,
}

impl QuantArgs {
    /// None leaves the choice to the source: a quantized file stays as stored, a folder becomes NF4 g64.
    pub fn request(self) -> Result<Option<QuantRequest>> {
        Ok(QuantRequest::from_options(self.quant, self.group_size)?)
    }

    /// The request with what an adapter's run recorded (`recorded`: Some(None) for 16-bit weights)
    /// filling in what the options leave out: both left out, the recorded weights; one given, the
    /// other half from the record.
    pub fn with_recorded(
        self,
        recorded: Option<Option<QuantSpec>>,
    ) -> Result<Option<QuantRequest>> {
        let Some(recorded) = recorded else {
            return self.request();
        };
        Ok(match (self.quant, self.group_size, recorded) {
            (None, None, Some(spec)) => Some(QuantRequest::Quantize(spec)),
            (None, None, None) => Some(QuantRequest::Dense),
            (Some(QuantChoice::None), _, _) | (_, _, None) => self.request()?,
            (format, group, Some(spec)) => {
                let format = match format {
                    Some(QuantChoice::Int4) => nibble::quant::QuantFormat::Int4,
                    Some(_) => nibble::quant::QuantFormat::Nf4,
                    None => spec.format,
                };
                let group = group.unwrap_or(spec.group_size);
                Some(QuantRequest::Quantize(
                    QuantSpec::new(format, group).context("--group-size")?,
                ))
            }
        })
    }

    /// The storage to report memory for: the one asked for, else the source's own (`stored`; None for
    /// a 16-bit folder), else NF4 group 64.
    pub fn planned_spec(self, stored: Option<QuantSpec>) -> Result<Option<QuantSpec>> {
        Ok(QuantRequest::planned(self.request()?, stored)?)
    }
}

/// A model with its tokenizer and an optional `--adapter`, placed on `device`. Chats render through
/// `template` (`--chat-template`), else the adapter's, else the model's (`TemplateChoice::chosen`).
pub fn open_placed(
    model: &Path,
    quant: QuantArgs,
    adapter: Option<&Path>,
    template: Option<&Path>,
    device: Device,
) -> Result<(ChatTokenizer, Placed)> {
    let source = nibble::model::open(model)?;
    let tok = tokenizer_of(&source, template, adapter)?;
    let complete = quant.quant == Some(QuantChoice::None)
        || (quant.quant.is_some() && quant.group_size.is_some());
    let recorded = match adapter {
        Some(dir) => {
            nibble::train::run::recorded_weights_unless(dir, complete)?.map(|r| (dir, r.quant))
        }
        None => None,
    };
    // A quantized file cannot be quantized again: it loads as stored, the options only checked
    // against it; a folder takes what the options leave out from the record.
    let request = match source.stored_quant() {
        Some(_) => quant.request()?,
        None => quant.with_recorded(recorded.map(|(_, q)| q))?,
    };
    // An adapter runs on the weights its run trained on, where its run.json says which: the
    // options given change what they name, and a difference is said.
    if let Some((dir, trained)) = recorded {
        let manifest = dir.join(nibble::train::MANIFEST);
        let form = |q: Option<QuantSpec>| q.map_or("16-bit".to_string(), |q| q.to_string());
        let loading = nibble::model::QuantRequest::planned(request, source.stored_quant())
            .map_err(|e| anyhow::anyhow!("{}: {e}", source.label()))?;
        if loading != trained {
            log::warn!(
                "{} records the adapter trained on {} weights; the model loads as {}",
                manifest.display(),
                form(trained),
                form(loading)
            );
        } else if quant.quant.is_none() && quant.group_size.is_none() {
            log::info!(
                "{}: the model loads as the adapter's run trained on it, {} (--quant chooses \
                 otherwise)",
                manifest.display(),
                form(trained)
            );
        }
        // Said of the record where the group size came from it (the options' own are `load`'s
        // to refuse).
        if let Some(spec) = loading
            && quant.group_size.is_none()
            && let Err(e) = source.config.check_group_size(spec.group_size)
        {
            anyhow::bail!(
                "{} (as {} records it): {e}",
                source.label(),
                manifest.display()
            );
        }
    }
    let mut model = source.load(request)?;
    if let (None, None, Some(spec)) = (request, source.stored_quant(), model.quant) {
        log::info!(
            "{}: decoder linears quantized to {spec} as they load (--quant none keeps them 16-bit)",
            source.label()
        );
    }
    let adapter = match adapter {
        Some(dir) => {
            let (adapter, saved) = nibble::train::run::load_adapter_with_modules(
                dir,
                &model.config,
                (&model.source, Some(&model)),
                "--adapter",
            )?;
            model.put_saved_modules(&saved);
            Some(adapter)
        }
        None => None,
    };
    let gpu = device.open()?;
    Ok((tok, Placed::new(model, adapter, gpu)?))
}

/// `source`'s tokenizer, rendering chats through the template `TemplateChoice::chosen` picks, with the
/// eos token the adapter was trained with (`adapter_eos_token`) where it records one.
pub fn tokenizer_of(
    source: &nibble::model::ModelSource,
    template: Option<&Path>,
    adapter: Option<&Path>,
) -> Result<ChatTokenizer> {
    with_choices(
        source.chat_tokenizer()?,
        &source.tokenizer,
        template,
        adapter,
    )
}

/// `tokenizer_of` for a model's text alone (`ModelSource::open_text`).
pub fn tokenizer_from(
    text: &nibble::model::ModelText,
    template: Option<&Path>,
    adapter: Option<&Path>,
) -> Result<ChatTokenizer> {
    with_choices(text.chat_tokenizer()?, &text.tokenizer, template, adapter)
}

/// `tok` (read from `files`) with the template and eos token `tokenizer_of` chooses.
fn with_choices(
    tok: ChatTokenizer,
    files: &nibble::model::TokenizerFiles,
    template: Option<&Path>,
    adapter: Option<&Path>,
) -> Result<ChatTokenizer> {
    let own = TemplateChoice::of_model(files);
    let tok = match TemplateChoice::chosen(template, adapter, own.as_deref())? {
        Some(choice) => tok.with_template(&choice)?,
        None => tok,
    };
    let trained_eos = adapter
        .map(nibble::tokenizer::adapter_eos_token)
        .transpose()?
        .flatten();
    Ok(match trained_eos {
        Some((eos, origin)) if tok.eos_token.as_deref() != Some(eos.as_str()) => {
            log::info!(
                "{}: text ends at `{eos}`, the eos token the adapter was trained with",
                origin.display()
            );
            tok.with_eos_token(&eos)
                .with_context(|| format!("the eos token {} names", origin.display()))?
        }
        _ => tok,
    })
}

/// Where the work runs, and in which arithmetic.
#[derive(clap::Args, Clone, Copy)]
pub struct ExecArgs {
    /// Where the work runs: auto takes a real GPU when one is present, else the CPU.
    #[arg(long, value_enum, ignore_case = true, default_value = "auto")]
    pub device: Device,
    /// default: the fastest arithmetic that keeps the loss within 1e-3 of float32 (16-bit integer
    /// products on most x86 CPUs, bf16 ones on Intel's AMX, AMD's AVX512-BF16 and ARM BF16); f32: float32
    /// everywhere.
    #[arg(long, value_enum, ignore_case = true, default_value = "default")]
    pub precision: PrecisionChoice,
}

/// The command line with each flag's name in dashes: `--learning_rate 2e-4`, as TRL's command line
/// and Hugging Face's scripts spell flags, is `--learning-rate 2e-4`. Values and everything after a
/// bare `--` stay as given.
pub fn dashed_flags(args: impl IntoIterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let mut options_end = false;
    args.into_iter()
        .map(|arg| {
            let Some(text) = arg.to_str().filter(|t| t.starts_with("--") && !options_end) else {
                return arg;
            };
            if text == "--" {
                options_end = true;
                return arg;
            }
            let (name, value) = text.split_at(text.find('=').unwrap_or(text.len()));
            format!("{}{value}", name.replace('_', "-")).into()
        })
        .collect()
}

/// How rows become examples and examples are cut, as `nibble train` takes them.
#[derive(clap::Args, Clone)]
pub struct DataArgs {
    /// Longer examples are cut to this many tokens, as in training (from 2, as training takes it).
    #[arg(long, default_value_t = nibble::train::TrainConfig::default().max_length,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new()
              .range(2..=nibble::train::settings::MAX_TOKENS as u64))]
    pub max_length: usize,
    /// Which end of a longer example is kept, as `nibble train --truncation-mode` keeps it.
    #[arg(long, value_enum, ignore_case = true, default_value = "keep_start")]
    pub truncation_mode: nibble::train::Truncation,
    /// The column that holds the text of text rows (TRL's dataset_text_field).
    #[arg(long, default_value = nibble::data::TEXT_FIELD)]
    pub dataset_text_field: String,
    /// The token text rows and completions end with, in place of the tokenizer's, as `nibble train
    /// --eos-token` (TRL's eos_token) sets it [default: the tokenizer's].
    #[arg(long)]
    pub eos_token: Option<String>,
}

impl DataArgs {
    /// The examples of `path`, read as these options say, and where each was read.
    pub fn read(
        &self,
        path: &std::path::Path,
    ) -> nibble::error::Result<(Vec<nibble::data::Example>, nibble::data::Places)> {
        nibble::data::read_examples_placed(path, &self.dataset_text_field)
    }

    /// `tok` with --eos-token's token as its eos, where given.
    pub fn tokenizer(&self, tok: ChatTokenizer) -> nibble::error::Result<ChatTokenizer> {
        match &self.eos_token {
            Some(eos) => tok.with_eos_token(eos),
            None => Ok(tok),
        }
    }

    /// The cut, with --max-length capped at the model's positions.
    pub fn cut(&self, config: &nibble::config::ModelConfig) -> nibble::train::Cut {
        nibble::train::Cut {
            max_length: nibble::train::run::within_positions(self.max_length, config),
            keep: self.truncation_mode,
        }
    }
}

/// A second signal this soon after the first is the same interruption delivered twice, not a second
/// request: `timeout -s INT` signals the process and then its whole group, and a supervisor may signal
/// the process and its group alike, all within microseconds; a person interrupting again takes longer.
pub(crate) const SAME_INTERRUPTION: std::time::Duration = std::time::Duration::from_millis(500);

/// For a command that writes files: Ctrl-C or SIGTERM ends it as they would, but first removes what
/// it was writing (`fsutil::Partial`: temporary files and folders a model's size, hidden by a dot).
pub fn remove_partial_outputs_on_signals() {
    let installed = ctrlc::set_handler(|| {
        for path in nibble::fsutil::remove_partial_outputs() {
            eprintln!("\ninterrupted: removed the partial {}", path.display());
        }
        std::process::exit(130);
    });
    if let Err(e) = installed {
        log::warn!("cannot catch Ctrl-C ({e}): an interruption may leave partial files behind");
    }
}

/// A rate for people: whole numbers, and three decimals below 10 (a software GPU's step of
/// the 0.5B model runs at 0.27 tokens/s, which whole numbers print as 0).
pub fn rate(per_s: f64) -> String {
    if per_s >= 10.0 {
        format!("{per_s:.0}")
    } else {
        format!("{per_s:.3}")
    }
}

pub fn group_digits(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn human_count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n => format!("{:.1}K", n as f64 / 1e3),
    }
}

pub use nibble::alloc::human_bytes;
