//! The `nibble` command: parses the command line and hands each subcommand to its module in `cli/`.

mod cli;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "nibble",
    version,
    about = "QLoRA fine-tuning with a packed 4-bit base model, on any GPU or CPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Architecture, shapes, exact parameter count and the memory the weights take.
    Info(cli::info::Args),
    /// Quantize a model folder's decoder weights to packed 4-bit and save them as one safetensors file.
    Quantize(cli::quantize::Args),
    /// Mean token cross-entropy and perplexity of a model (and optional LoRA adapter) over a JSONL file,
    /// printed as one JSON line.
    Eval(cli::eval::Args),
    /// Fine-tune LoRA adapters on a JSONL dataset and save them as a PEFT adapter folder.
    Train(Box<nibble::train::settings::TrainSettings>),
    /// Fine-tune as `trl sft` does, from its command line and recipe files: TRL's option names and
    /// defaults (a learning rate of 2e-5, batches of 8, 3 epochs, LoRA r 16 / alpha 32).
    Sft(cli::sft::Args),
    /// Answer one prompt (as a user turn through the chat template, or raw text with --raw).
    Generate(cli::generate::GenerateArgs),
    /// Fold a LoRA adapter into the base weights: a model folder (safetensors, config and tokenizer
    /// copied) that transformers loads without peft.
    Merge(cli::merge::Args),
    /// Talk with a model in the terminal: each line is a user turn (/reset starts over, /quit or end of
    /// input quits, /help lists these). The KV cache carries the conversation from turn to turn.
    Chat(cli::generate::ChatArgs),
    /// Sample images from a FLUX.2 [klein] pipeline, with a LoRA or without, as diffusers'
    /// Flux2KleinPipeline does (its scheduler, guidance against the empty prompt).
    Sample(cli::sample::Args),
    /// Show how a JSONL data file reaches the model: each example through the chat template, with the
    /// tokens that carry loss marked (as training labels them).
    Data(cli::data::Args),
    /// Peak memory of a training step for a model, sequence length and LoRA options, computed from the
    /// shapes before anything runs. MODEL may be a folder holding only config.json.
    Plan(cli::plan::Args),
    /// Write a model folder with random weights in a real architecture (config.json, safetensors and the
    /// bundled Qwen2.5 tokenizer), for tests and benchmarks without a download.
    Synth(cli::synth::Args),
    /// Build a small random model with the bundled Qwen2.5 tokenizer and run it through nibble (no download).
    Demo(cli::demo::Args),
}

/// Output that cannot be written (a full disk, a closed pipe) ends the process with an error, not a
/// panic's backtrace: `println!` panics when stdout fails.
fn exit_quietly_when_output_fails() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        // A damaged tokenizer.json can make the tokenizers crate panic; nibble turns that into an
        // error naming the file, so the panic itself is not news.
        if nibble::tokenizer::panics_are_caught() {
            return;
        }
        if message.starts_with("failed printing to std") {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "nibble: error: {message}");
            std::process::exit(1);
        }
        default_hook(info);
    }));
}

/// Vulkan drivers that probe for a Wayland display print "error: XDG_RUNTIME_DIR is invalid or not
/// set in the environment" where the variable is missing (ssh sessions, containers), which reads as
/// nibble failing. There, point it at an empty directory of this process's own: the probe finds no
/// display and says nothing. Returns the directory made (removed when the command ends).
#[cfg(unix)]
fn quiet_display_probe() -> Option<std::path::PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let set = std::env::var_os("XDG_RUNTIME_DIR");
    if set.is_some_and(|d| std::path::Path::new(&d).is_dir()) {
        return None;
    }
    let dir = std::env::temp_dir().join(format!("nibble-runtime-{}", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&dir).ok()?;
    // SAFETY: main calls this before anything starts a thread (the logger, rayon and wgpu start theirs
    // later), so no other thread reads or writes the environment while it changes.
    unsafe { std::env::set_var("XDG_RUNTIME_DIR", &dir) };
    Some(dir)
}

#[cfg(not(unix))]
fn quiet_display_probe() -> Option<std::path::PathBuf> {
    None
}

fn main() {
    exit_quietly_when_output_fails();
    nibble::alloc::keep_freed_memory();
    let mut logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if std::env::var_os("RUST_LOG").is_none() {
        // wgpu warns, on every run on a discrete GPU, that MAPPABLE_PRIMARY_BUFFERS (requested for
        // offloaded checkpoints, which only copy through such buffers) can be slow to use otherwise.
        logger.filter_module("wgpu_core::instance", log::LevelFilter::Error);
    }
    logger.init();
    // `nibble train --help` states each option's default (`settings::document_defaults`).
    let command =
        Cli::command().mut_subcommand("train", nibble::train::settings::document_defaults);
    let args = cli::dashed_flags(std::env::args_os());
    let cli = match Cli::from_arg_matches(&command.get_matches_from(args)) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let runtime_dir = quiet_display_probe();
    // A kernel path this machine cannot take is refused before any work (the kernels themselves would
    // quietly take the detected one).
    if let Err(why) = nibble::ops::isa::requested() {
        eprintln!("error: {why}");
        std::process::exit(2);
    }
    log::debug!(
        "CPU kernels: {} (this CPU's fastest: {})",
        nibble::ops::isa::active(),
        nibble::ops::isa::detected()
    );
    // Commands that write files leave nothing half-written when interrupted; training runs stop
    // at a step's end instead (their own handler).
    if matches!(
        cli.command,
        Command::Quantize(_)
            | Command::Merge(_)
            | Command::Synth(_)
            | Command::Demo(_)
            | Command::Sample(_)
    ) {
        cli::remove_partial_outputs_on_signals();
    }
    let result = match cli.command {
        Command::Info(args) => cli::info::run(args),
        Command::Quantize(args) => cli::quantize::run(args),
        Command::Eval(args) => cli::eval::run(args),
        Command::Train(flags) => cli::train::run(*flags),
        Command::Sft(args) => cli::sft::run(args),
        Command::Generate(args) => cli::generate::generate(args),
        Command::Merge(args) => cli::merge::run(args),
        Command::Chat(args) => cli::generate::chat(args),
        Command::Sample(args) => cli::sample::run(args),
        Command::Plan(args) => cli::plan::run(args),
        Command::Data(args) => cli::data::run(args),
        Command::Synth(args) => cli::synth::run(args),
        Command::Demo(args) => cli::demo::run(args),
    };
    if let Some(dir) = runtime_dir {
        let _ = std::fs::remove_dir(dir);
    }
    if let Some(report) = nibble::exec::profile::report() {
        eprint!("{report}");
    }
    if let Err(e) = result {
        // An interrupted run exits as a signalled process conventionally does.
        if let Some(nibble::Error::Interrupted(why)) = e.downcast_ref::<nibble::Error>() {
            eprintln!("nibble: {why}");
            std::process::exit(130);
        }
        // The signal handler is removing the partial outputs and ends the process itself: what
        // the writer met meanwhile (its folder gone) is no failure to report.
        if nibble::fsutil::interrupted() {
            std::thread::sleep(std::time::Duration::from_secs(5));
            std::process::exit(130);
        }
        eprintln!("nibble: error: {e:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    /// Every option and argument of every command says what it is in `--help` (issue 19); `train`'s
    /// also name their defaults (tests/cli.rs checks those).
    #[test]
    fn every_option_of_every_command_has_a_help_line() {
        let cli = Cli::command();
        let mut missing = Vec::new();
        for command in cli.get_subcommands() {
            for arg in command.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
                if help.trim().is_empty() {
                    missing.push(format!("nibble {} {id}", command.get_name()));
                }
            }
        }
        assert!(
            missing.is_empty(),
            "options without a help line: {missing:#?}"
        );
    }
}
