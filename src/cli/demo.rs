//! `nibble demo`: a small random model learns the built-in chats through the library's run, with no
//! download.

use super::{QuantArgs, rate};
use anyhow::{Context, Result, bail};
use nibble::model;
use nibble::synth::{self, SynthSpec};
use nibble::tokenizer::ChatTokenizer;
use nibble::train::run::Observer;
use nibble::train::{StepRecord, Trainer};
use std::path::{Path, PathBuf};

/// Build a small random model with the bundled Qwen2.5 tokenizer and run it through nibble (no download).
#[derive(clap::Args)]
pub struct Args {
    /// Keep the generated model in this folder instead of a temporary one.
    #[arg(long)]
    keep: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let keep = args.keep;
    if let Some(file) = keep.as_deref().and_then(nibble::fsutil::file_in_the_way) {
        bail!(
            "--keep {}: {} is a file, not a folder",
            keep.as_ref().expect("found in it").display(),
            file.display()
        );
    }
    if let Some(dir) = &keep
        && std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some())
    {
        bail!(
            "--keep {} exists and is not empty; give a new folder",
            dir.display()
        );
    }
    let dir = match &keep {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("nibble-demo-{}", std::process::id())),
    };
    // The temporary folder inside the system's, which is not made where it is missing.
    if keep.is_none() {
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // What the demo made is removed when it fails or is interrupted, and at its end unless kept (a
    // folder that was there, empty, stays).
    let made = std::fs::symlink_metadata(&dir).is_err() || keep.is_none();
    let partial = made.then(|| nibble::fsutil::Partial::folder(&dir));
    let result = run_demo(&dir, keep.is_some());
    if made && (keep.is_none() || result.is_err()) {
        let _ = std::fs::remove_dir_all(&dir);
    }
    drop(partial);
    result
}

/// The demo: a tiny random model with the real Qwen2.5 tokenizer learns the built-in chats (short answers
/// in a fixed voice, so that it visibly learns them), asked a question before and after.
fn run_demo(dir: &Path, kept: bool) -> Result<()> {
    let spec = SynthSpec::demo();
    println!(
        "== a random Qwen2.5-architecture model with the bundled Qwen2.5 tokenizer, in {}",
        dir.display()
    );
    synth::write_model_folder(dir, &spec, Some(&synth::qwen25_tokenizer()))?;
    super::info::show(dir, QuantArgs::default(), false)?;

    let source = model::open(dir)?;
    let tok = ChatTokenizer::from_files(&source.tokenizer, dir)?;
    let model = source.load(None)?;
    let chats = dir.join("chats.jsonl");
    std::fs::write(&chats, nibble::data::demo_jsonl())
        .with_context(|| format!("writing {}", chats.display()))?;
    let question = nibble::data::DEMO_CHATS[0].0;
    let answer = |adapter: Option<&nibble::lora::LoraAdapter>| {
        let executor = nibble::generate::Executor::Cpu {
            model: &model,
            adapter,
        };
        nibble::generate::answer(executor, &tok, question, 16).map(|a| a.text)
    };
    println!(
        "\n== before fine-tuning, asked \"{question}\":\n{:?}",
        answer(None)?
    );

    // The demo preset, which the browser page's example starts from too.
    let config = nibble::train::settings::TrainSettings::preset("demo")?.train_config()?;
    // The best device present: a real GPU when there is one (a software Vulkan device would be slower
    // than the CPU executor).
    let gpu = nibble::exec::Device::Auto.open()?;
    let executor = match &gpu {
        Some(gpu) => format!("the GPU executor on {}", gpu.info.name),
        None => "the CPU executor".to_string(),
    };
    let out = dir.join("adapter");
    let spec = nibble::train::run::RunSpec {
        model: dir,
        data: std::slice::from_ref(&chats),
        output: &out,
        quant: None,
        config,
        options: Default::default(),
    };
    nibble::train::run::run(spec, gpu.as_ref(), &mut DemoProgress { executor, total: 0 })?;
    let adapter = nibble::train::run::load_adapter(
        &out,
        &model.config,
        (&model.source, Some(&model)),
        "the demo's adapter",
    )?;
    println!(
        "\n== after fine-tuning, asked \"{question}\":\n{:?}",
        answer(Some(&adapter))?
    );
    match kept {
        true => println!("\nThe adapter is a PEFT folder: {}", out.display()),
        false => println!(
            "\nThe adapter was a PEFT folder in {}, removed now: `nibble demo --keep DIR` keeps \
             the model, data and adapter",
            dir.display()
        ),
    }
    Ok(())
}

/// The demo's account of its training run: a line for the start and one every 8 steps.
struct DemoProgress {
    executor: String,
    total: usize,
}

impl Observer for DemoProgress {
    fn started(&mut self, trainer: &Trainer) {
        self.total = trainer.total_steps;
        println!(
            "\n== fine-tuning {} LoRA parameters (r=16 on all seven linears, NF4 base) for {} steps on {} chats, on {}",
            trainer.adapter.parameter_count(),
            trainer.total_steps,
            trainer.examples(),
            self.executor
        );
    }

    fn stepped(&mut self, r: &StepRecord) {
        if r.step == 1 || r.step.is_multiple_of(8) || r.step == self.total {
            println!(
                "  step {:>3}  loss {:.4}  {} tokens/s",
                r.step,
                r.loss,
                rate(r.tokens_per_s)
            );
        }
    }
}
