//! `nibble synth`: a model folder with random weights in a real architecture.

use super::group_digits;
use anyhow::{Result, bail};
use nibble::config::Arch;
use nibble::synth::{self, ConfigSpelling, SynthSpec};
use std::path::PathBuf;

/// Write a model folder with random weights in a real architecture (config.json, safetensors and the
/// bundled Qwen2.5 tokenizer), for tests and benchmarks without a download.
#[derive(clap::Args)]
pub struct Args {
    /// The architecture and size.
    #[arg(long, value_enum, ignore_case = true, default_value = "tiny-qwen2")]
    preset: Preset,
    /// The folder to write (new, or empty).
    #[arg(long, short)]
    output: PathBuf,
    /// config.json as transformers 4.x (v4) or 5.x (v5) writes it.
    #[arg(long, value_enum, ignore_case = true, default_value = "v4")]
    spelling: Spelling,
    /// Split the weights over this many safetensors shards (with an index file).
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// Seeds the random weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The tokenizer written beside the weights.
    #[arg(long, value_enum, ignore_case = true, default_value = "qwen2.5")]
    tokenizer: Tokenizer,
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum Preset {
    TinyQwen2,
    TinyQwen3,
    /// Qwen3-MoE: 8 experts of width 64, 2 per token (weights renormalised), the second of three
    /// layers a dense MLP.
    TinyQwen3Moe,
    /// Qwen2-MoE: Qwen2's attention, 8 experts of width 64, 2 per token (weights as routed), a
    /// shared expert of width 192, the second of three layers a dense MLP.
    TinyQwen2Moe,
    /// gpt-oss: attention sinks, sliding and full layers, biased experts with the clamped SwiGLU.
    TinyGptOss,
    /// Mixtral: Mistral's attention, 4 experts of width 64 in each of two layers, 2 per token.
    TinyMixtral,
    TinyLlama,
    /// Mistral with a sliding window of 8 tokens and a head_dim of its own.
    TinyMistral,
    /// Ministral: sliding-window and full-attention layers alternating.
    TinyMinistral,
    /// SmolLM3: tied embeddings, the second layer without RoPE.
    #[value(name = "tiny-smollm3")]
    TinySmolLM3,
    /// Phi-3 / Phi-4-mini: fused projections, 3/4 of each head rotated, LongRoPE past 64 positions.
    TinyPhi3,
    /// Ministral 3: YaRN, queries scaled up every 8 positions.
    TinyMinistral3,
    /// Gemma 4 (text): sliding (head 16) and full layers (head 32, values from k_proj, proportional
    /// RoPE) alternating as in 31B, v norms, a scalar per layer, logits capped at 30; and E2B's
    /// per-layer inputs and last two layers sharing the first two's keys and values (double-wide MLPs).
    TinyGemma4,
    /// Gemma 4 with 26B-A4B's experts beside each dense MLP: 4 experts of width 64, 2 per token, in
    /// each of a sliding and a full layer.
    TinyGemma4Moe,
    /// Gemma 3 (text): sliding (window 8, RoPE base 10^4) and full layers (10^6, linear x8) alternating.
    TinyGemma3,
    /// The exact Qwen2.5-0.5B shapes.
    #[value(name = "qwen2.5-0.5b")]
    Qwen25Half,
    /// A FLUX.2 [klein] diffusers pipeline folder (transformer, Qwen3 text encoder, tokenizer, VAE),
    /// small enough for tests.
    #[value(name = "flux2-klein-tiny")]
    KleinTiny,
    /// FLUX.2 [klein] 4B's shapes (about 8 GB of 16-bit weights in the transformer).
    #[value(name = "flux2-klein-4b")]
    Klein4b,
    /// FLUX.2 [klein] 9B's shapes (about 18 GB in the transformer).
    #[value(name = "flux2-klein-9b")]
    Klein9b,
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum Spelling {
    V4,
    V5,
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum Tokenizer {
    /// The bundled Qwen2.5 tokenizer (vocabulary 151,936).
    #[value(name = "qwen2.5")]
    Qwen25,
    /// 256 byte tokens and Qwen's three special tokens with Qwen2.5's chat template (vocabulary 259,
    /// for very small models).
    Byte,
}

pub fn run(args: Args) -> Result<()> {
    let klein = match args.preset {
        Preset::KleinTiny => Some(synth::KleinPreset::Tiny),
        Preset::Klein4b => Some(synth::KleinPreset::B4),
        Preset::Klein9b => Some(synth::KleinPreset::B9),
        _ => None,
    };
    if let Some(preset) = klein {
        let output = &args.output;
        refuse_filled(output)?;
        // Whole or not at all: an interrupted write leaves no half-written folder to refuse later.
        nibble::fsutil::write_folder_atomically(output, |tmp| {
            synth::write_klein_pipeline(tmp, preset, args.seed)
        })?;
        eprintln!(
            "wrote a random FLUX.2 [klein] pipeline ({preset:?}) to {}",
            output.display()
        );
        return Ok(());
    }
    let (tokenizer, vocab) = match args.tokenizer {
        Tokenizer::Qwen25 => (synth::qwen25_tokenizer(), 151936),
        Tokenizer::Byte => (synth::byte_tokenizer(), synth::BYTE_VOCAB),
    };
    let mut spec = match args.preset {
        Preset::TinyQwen2 => SynthSpec::tiny(Arch::Qwen2, vocab),
        Preset::TinyQwen3 => SynthSpec::tiny(Arch::Qwen3, vocab),
        Preset::TinyQwen3Moe => SynthSpec::tiny_qwen3_moe(vocab),
        Preset::TinyQwen2Moe => SynthSpec::tiny_qwen2_moe(vocab),
        Preset::TinyGptOss => SynthSpec::tiny_gpt_oss(vocab),
        Preset::TinyMixtral => SynthSpec::tiny_mixtral(vocab),
        Preset::TinyLlama => SynthSpec::tiny(Arch::Llama, vocab),
        Preset::TinyMistral => SynthSpec::tiny(Arch::Mistral, vocab),
        Preset::TinyMinistral => SynthSpec::tiny(Arch::Ministral, vocab),
        Preset::TinySmolLM3 => SynthSpec::tiny(Arch::SmolLM3, vocab),
        Preset::TinyPhi3 => SynthSpec::tiny(Arch::Phi3, vocab),
        Preset::TinyGemma3 => SynthSpec::tiny(Arch::Gemma3, vocab),
        Preset::TinyMinistral3 => SynthSpec::tiny(Arch::Ministral3, vocab),
        Preset::TinyGemma4 => SynthSpec::tiny(Arch::Gemma4, vocab),
        Preset::TinyGemma4Moe => SynthSpec::tiny_gemma4_moe(vocab),
        Preset::Qwen25Half if vocab == 151936 => SynthSpec::qwen25_05b(),
        Preset::Qwen25Half => {
            bail!("the qwen2.5-0.5b preset keeps Qwen2.5's vocabulary (--tokenizer qwen2.5)")
        }
        Preset::KleinTiny | Preset::Klein4b | Preset::Klein9b => unreachable!("written above"),
    };
    spec.spelling = match args.spelling {
        Spelling::V4 => ConfigSpelling::V4,
        Spelling::V5 => ConfigSpelling::V5,
    };
    let tensors = spec.config().expected_tensors().len();
    if !(1..=tensors).contains(&args.shards) {
        bail!(
            "--shards {}: from 1 to the model's {tensors} tensors (each shard holds whole tensors)",
            args.shards
        );
    }
    spec.shards = args.shards;
    spec.seed = args.seed;
    let output = &args.output;
    refuse_filled(output)?;
    nibble::fsutil::write_folder_atomically(output, |tmp| {
        synth::write_model_folder(tmp, &spec, Some(&tokenizer))
    })?;
    let preset = clap::ValueEnum::to_possible_value(&args.preset)
        .map_or(String::new(), |v| v.get_name().to_string());
    eprintln!(
        "wrote a random {preset} model ({} parameters) to {}",
        group_digits(spec.config().parameter_count()),
        output.display()
    );
    Ok(())
}

/// The output must be new or an empty folder; anything else there is named.
fn refuse_filled(output: &std::path::Path) -> Result<()> {
    match std::fs::symlink_metadata(output) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => bail!("{}: {e}", output.display()),
        Ok(meta) if !meta.is_dir() => bail!(
            "{} is not a folder; give a new folder (or an empty one)",
            output.display()
        ),
        Ok(_) => match std::fs::read_dir(output).map(|mut entries| entries.next().is_none()) {
            Ok(true) => Ok(()),
            Ok(false) => bail!("{} exists and is not empty", output.display()),
            Err(e) => bail!("{}: {e}", output.display()),
        },
    }
}
