use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use nibble::config::{LinearKind, RopeScaling};
use nibble::model::{self, QuantRequest};
use nibble::quant::{QuantFormat, QuantSpec};
use nibble::synth::{self, SynthSpec};
use nibble::tokenizer::{ChatTokenizer, Message};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

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

#[derive(clap::Args, Clone, Copy)]
struct QuantArgs {
    /// Storage of the decoder's linear weights: nf4, int4, or none (keep them 16-bit).
    #[arg(long, value_enum)]
    quant: Option<QuantChoice>,
    /// Weights per scale, along the input dimension: 32, 64 or 128.
    #[arg(long)]
    group_size: Option<usize>,
}

impl QuantArgs {
    /// The storage to report memory for: the one asked for, else the source's own (`stored`; None for
    /// a 16-bit folder), else NF4 group 64.
    fn planned_spec(self, stored: Option<QuantSpec>) -> Result<Option<QuantSpec>> {
        Ok(match self.request()? {
            Some(QuantRequest::Quantize(s)) => Some(s),
            Some(QuantRequest::Dense) => None,
            None => Some(stored.unwrap_or(QuantSpec::new(QuantFormat::Nf4, 64)?)),
        })
    }

    /// None leaves the choice to the source: a quantized file stays as stored, a folder becomes NF4 g64.
    fn request(self) -> Result<Option<QuantRequest>> {
        Ok(match (self.quant, self.group_size) {
            (None, None) => None,
            (Some(QuantChoice::None), _) => Some(QuantRequest::Dense),
            (choice, group) => {
                let format = match choice {
                    Some(QuantChoice::Int4) => QuantFormat::Int4,
                    _ => QuantFormat::Nf4,
                };
                Some(QuantRequest::Quantize(QuantSpec::new(
                    format,
                    group.unwrap_or(64),
                )?))
            }
        })
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum DeviceChoice {
    /// A real GPU if one is present, otherwise the CPU.
    Auto,
    Cpu,
    Gpu,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Precision {
    /// The executor's fastest mode that keeps the loss within 1e-3 of float32 (bf16 products on CPUs
    /// with AVX512-BF16; float32 elsewhere and on the GPU).
    Default,
    /// Exact float32 everywhere, for parity checks.
    F32,
}

#[derive(clap::Args, Clone, Copy)]
struct ExecArgs {
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceChoice,
    #[arg(long, value_enum, default_value = "default")]
    precision: Precision,
}

impl ExecArgs {
    /// Opens the executor: `auto` takes a real GPU when one is present and the CPU otherwise; `gpu` also
    /// accepts a software Vulkan device (useful for testing), and fails when there is none.
    /// The CPU executor's arithmetic for the frozen-weight products.
    fn cpu_precision(self) -> nibble::ops::Precision {
        match self.precision {
            Precision::F32 => nibble::ops::Precision::F32,
            Precision::Default => nibble::ops::Precision::fastest(),
        }
    }

    fn open(self) -> Result<Option<nibble::gpu::Gpu>> {
        match self.device {
            DeviceChoice::Cpu => Ok(None),
            DeviceChoice::Gpu => Ok(Some(nibble::gpu::Gpu::new(true).context("--device gpu")?)),
            DeviceChoice::Auto => match nibble::gpu::Gpu::new(false) {
                Ok(gpu) => Ok(Some(gpu)),
                Err(e) => {
                    log::info!("using the CPU executor: {e}");
                    Ok(None)
                }
            },
        }
    }
}

/// What `generate` and `chat` share: the model, an adapter, and how to pick tokens.
#[derive(clap::Args)]
struct GenArgs {
    #[arg(long)]
    model: PathBuf,
    /// A PEFT LoRA adapter folder.
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[command(flatten)]
    quant: QuantArgs,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where decoding runs: `auto` takes a real GPU when one is present.
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceChoice,
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum QuantChoice {
    Nf4,
    Int4,
    None,
}

/// `nibble train`'s options. Each can also come from a TOML file (`--config`, keys as the flags with
/// underscores) or a preset; a flag given on the command line wins over the file, and the file over
/// the preset.
#[derive(clap::Args, serde::Deserialize, Default, Clone, Debug)]
#[serde(deny_unknown_fields)]
struct TrainArgs {
    /// A TOML file of options.
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// A known recipe: qwen2.5-cpu (NF4, LoRA r=8 alpha=16 dropout 0.05 on all seven linears, lr 2e-4,
    /// batch 1, gradient accumulation 4, 2 epochs).
    #[arg(long)]
    preset: Option<String>,
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long)]
    data: Option<PathBuf>,
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// nf4, int4 or none.
    #[arg(long)]
    quant: Option<String>,
    #[arg(long)]
    group_size: Option<usize>,
    /// auto, cpu or gpu.
    #[arg(long)]
    device: Option<String>,
    /// default or f32.
    #[arg(long)]
    precision: Option<String>,
    #[arg(long)]
    lr: Option<f64>,
    /// constant, linear (default) or cosine.
    #[arg(long)]
    lr_scheduler: Option<String>,
    #[arg(long)]
    warmup_steps: Option<usize>,
    /// Warmup as a fraction of all steps (used when --warmup-steps is not given).
    #[arg(long)]
    warmup_ratio: Option<f64>,
    #[arg(long)]
    weight_decay: Option<f64>,
    #[arg(long)]
    max_grad_norm: Option<f64>,
    #[arg(long)]
    epochs: Option<usize>,
    #[arg(long)]
    max_steps: Option<usize>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    grad_accum: Option<usize>,
    #[arg(long)]
    lora_r: Option<usize>,
    #[arg(long)]
    lora_alpha: Option<f64>,
    #[arg(long)]
    lora_dropout: Option<f64>,
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    use_rslora: Option<bool>,
    /// Comma-separated module names or all-linear.
    #[arg(long)]
    target_modules: Option<String>,
    #[arg(long)]
    max_length: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    no_shuffle: Option<bool>,
    /// all, assistant (the assistant turns of conversations) or completion (the completion of
    /// prompt/completion rows); the default is TRL's: all tokens, or the completion for prompt/completion rows.
    #[arg(long)]
    loss_on: Option<String>,
    /// Start from this PEFT adapter folder (its r, alpha and target modules apply).
    #[arg(long)]
    init_adapter: Option<PathBuf>,
    /// A held-out JSONL file for validation loss.
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// Hold out this fraction of --data (chosen with --seed) for validation loss instead.
    #[arg(long)]
    eval_split: Option<f64>,
    /// Evaluate every N optimizer steps (default: at the end of each epoch and of the run).
    #[arg(long)]
    eval_steps: Option<usize>,
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    gradient_checkpointing: Option<bool>,
    /// Pack several examples into each sequence of up to --max-length tokens (attention stays inside
    /// each example; positions restart at each).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    packing: Option<bool>,
    /// Replace a finished run in the output folder.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    overwrite: Option<bool>,
    /// Write checkpoint-N/ (adapter, optimizer state, RNG state, data position) every N steps.
    #[arg(long)]
    save_steps: Option<usize>,
    /// Continue a run from the newest complete checkpoint in this folder (or this checkpoint).
    #[arg(long)]
    resume: Option<PathBuf>,
}

/// Field by field: `a`'s value where it has one, `b`'s otherwise.
macro_rules! merge_options {
    ($a:expr, $b:expr, $($field:ident),*) => {
        TrainArgs { config: $a.config.or($b.config), $($field: $a.$field.or($b.$field)),* }
    };
}

impl TrainArgs {
    fn or(self, other: TrainArgs) -> TrainArgs {
        merge_options!(
            self,
            other,
            preset,
            model,
            data,
            output,
            quant,
            group_size,
            device,
            precision,
            lr,
            lr_scheduler,
            warmup_steps,
            warmup_ratio,
            weight_decay,
            max_grad_norm,
            epochs,
            max_steps,
            batch_size,
            grad_accum,
            lora_r,
            lora_alpha,
            lora_dropout,
            use_rslora,
            target_modules,
            max_length,
            seed,
            no_shuffle,
            loss_on,
            init_adapter,
            eval_data,
            eval_split,
            eval_steps,
            gradient_checkpointing,
            packing,
            overwrite,
            save_steps,
            resume
        )
    }

    fn preset(name: &str) -> Result<TrainArgs> {
        match name {
            "qwen2.5-cpu" => Ok(TrainArgs {
                quant: Some("nf4".into()),
                lora_r: Some(8),
                lora_alpha: Some(16.0),
                lora_dropout: Some(0.05),
                target_modules: Some("all-linear".into()),
                lr: Some(2e-4),
                batch_size: Some(1),
                grad_accum: Some(4),
                epochs: Some(2),
                ..Default::default()
            }),
            other => bail!("unknown preset `{other}` (known: qwen2.5-cpu)"),
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Architecture, shapes, exact parameter count and the memory the weights take.
    Info {
        /// A Hugging Face model folder or a file written by `nibble quantize`.
        model: PathBuf,
        #[command(flatten)]
        quant: QuantArgs,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Quantize a model folder's decoder weights to packed 4-bit and save them as one safetensors file.
    Quantize {
        model: PathBuf,
        #[arg(long, short)]
        output: PathBuf,
        #[command(flatten)]
        quant: QuantArgs,
    },
    /// Mean token cross-entropy and perplexity of a model (and optional LoRA adapter) over a JSONL file,
    /// printed as one JSON line.
    Eval {
        #[arg(long)]
        model: PathBuf,
        /// JSONL rows: {"messages": [...]}, {"prompt": ..., "completion": ...} or {"text": ...}.
        #[arg(long)]
        data: PathBuf,
        /// A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors).
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[command(flatten)]
        quant: QuantArgs,
        #[command(flatten)]
        exec: ExecArgs,
        /// Longer examples are cut to this many tokens (the start is kept).
        #[arg(long, default_value_t = 2048)]
        max_length: usize,
    },
    /// Fine-tune LoRA adapters on a JSONL dataset and save them as a PEFT adapter folder.
    Train(Box<TrainArgs>),
    /// Answer one prompt (as a user turn through the chat template, or raw text with --raw).
    Generate {
        #[command(flatten)]
        generation: GenArgs,
        #[arg(long)]
        prompt: String,
        /// A system message before the prompt.
        #[arg(long)]
        system: Option<String>,
        /// Continue the prompt text as it is, without the chat template.
        #[arg(long)]
        raw: bool,
    },
    /// Fold a LoRA adapter into the base weights: a model folder (safetensors, config and tokenizer
    /// copied) that transformers loads without peft.
    Merge {
        /// The base model folder the adapter was trained on.
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        adapter: PathBuf,
        #[arg(long, short)]
        output: PathBuf,
        /// bf16, f16 or f32 (default: the checkpoint's own dtype).
        #[arg(long)]
        dtype: Option<String>,
    },
    /// Talk with a model in the terminal: each line is a user turn (/reset starts over, end of input
    /// quits). The KV cache carries the conversation from turn to turn.
    Chat {
        #[command(flatten)]
        generation: GenArgs,
        #[arg(long)]
        system: Option<String>,
    },
    /// Peak memory of a training step for a model, sequence length and LoRA options, computed from the
    /// shapes before anything runs. MODEL may be a folder holding only config.json.
    Plan {
        model: PathBuf,
        /// Tokens per sequence.
        #[arg(long, default_value_t = 1024)]
        seq_len: usize,
        #[command(flatten)]
        quant: QuantArgs,
        #[arg(long, default_value_t = 8)]
        lora_r: usize,
        #[arg(long, default_value_t = 0.05)]
        lora_dropout: f64,
        /// Comma-separated module names (q_proj,...,down_proj) or all-linear.
        #[arg(long, default_value = "all-linear")]
        target_modules: String,
        #[arg(long)]
        gradient_checkpointing: bool,
        #[arg(long)]
        json: bool,
    },
    /// Write a model folder with random weights in a real architecture (config.json, safetensors and the
    /// bundled Qwen2.5 tokenizer), for tests and benchmarks without a download.
    Synth {
        /// tiny-qwen2, tiny-qwen3, tiny-llama, or qwen2.5-0.5b (the exact Qwen2.5-0.5B shapes).
        #[arg(long, default_value = "tiny-qwen2")]
        preset: String,
        #[arg(long, short)]
        output: PathBuf,
        /// config.json as transformers 4.x (v4) or 5.x (v5) writes it.
        #[arg(long, default_value = "v4")]
        spelling: String,
        /// Split the weights over this many safetensors shards (with an index file).
        #[arg(long, default_value_t = 1)]
        shards: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// qwen2.5 (the bundled Qwen2.5 tokenizer, vocabulary 151,936) or byte (256 byte tokens and Qwen's
        /// three special tokens with Qwen2.5's chat template; vocabulary 259, for very small models).
        #[arg(long, default_value = "qwen2.5")]
        tokenizer: String,
    },
    /// Build a small random model with the bundled Qwen2.5 tokenizer and run it through nibble (no download).
    Demo {
        /// Keep the generated model in this folder instead of a temporary one.
        #[arg(long)]
        keep: Option<PathBuf>,
    },
}

fn main() {
    nibble::alloc::keep_freed_memory();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
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
    let result = match cli.command {
        Command::Info { model, quant, json } => info(&model, quant, json),
        Command::Quantize {
            model,
            output,
            quant,
        } => quantize(&model, &output, quant),
        Command::Demo { keep } => demo(keep),
        Command::Eval {
            model,
            data,
            adapter,
            quant,
            exec,
            max_length,
        } => eval(&model, &data, adapter.as_deref(), quant, exec, max_length),
        Command::Train(args) => train_command(*args),
        Command::Generate {
            generation,
            prompt,
            system,
            raw,
        } => generate_command(&generation, &prompt, system.as_deref(), raw),
        Command::Merge {
            model,
            adapter,
            output,
            dtype,
        } => merge_command(&model, &adapter, &output, dtype.as_deref()),
        Command::Chat { generation, system } => chat_command(&generation, system.as_deref()),
        Command::Plan {
            model,
            seq_len,
            quant,
            lora_r,
            lora_dropout,
            target_modules,
            gradient_checkpointing,
            json,
        } => plan(
            &model,
            seq_len,
            quant,
            lora_r,
            lora_dropout,
            &target_modules,
            gradient_checkpointing,
            json,
        ),
        Command::Synth {
            preset,
            output,
            spelling,
            shards,
            seed,
            tokenizer,
        } => synth_model(&preset, &output, &spelling, shards, seed, &tokenizer),
    };
    if let Err(e) = result {
        eprintln!("nibble: error: {e:#}");
        std::process::exit(1);
    }
}

fn info(path: &Path, quant: QuantArgs, as_json: bool) -> Result<()> {
    let source = model::open(path)?;
    let c = &source.config;
    let spec = quant.planned_spec(source.stored_quant())?;
    let params = c.parameter_count();
    let bytes16 = model::planned_weight_bytes(c, None);
    let bytes4 = spec.map(|s| model::planned_weight_bytes(c, Some(s)));
    let tokenizer = &source.tokenizer;
    let rope = match c.rope_scaling {
        RopeScaling::None => "none".to_string(),
        RopeScaling::Linear { factor } => format!("linear x{factor}"),
        RopeScaling::Llama3 { factor, .. } => format!("llama3 x{factor}"),
    };
    if as_json {
        let v = json!({
            "model": path,
            "architecture": c.arch.model_type(),
            "class": c.arch.class_name(),
            "layers": c.num_layers,
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_heads": c.num_heads,
            "num_kv_heads": c.num_kv_heads,
            "head_dim": c.head_dim,
            "vocab_size": c.vocab_size,
            "tie_word_embeddings": c.tie_word_embeddings,
            "qkv_bias": c.qkv_bias,
            "qk_norm": c.qk_norm,
            "rope_theta": c.rope_theta,
            "rope_scaling": rope,
            "parameters": params,
            "weight_bytes_16bit": bytes16,
            "quant": spec.map(|s| json!({"format": s.format.name(), "group_size": s.group_size})),
            "weight_bytes_quantized": bytes4,
            "stored_quant": source.stored_quant().map(|s| s.to_string()),
            "tokenizer": tokenizer.tokenizer_json.is_some(),
            "chat_template": tokenizer.chat_template_jinja.is_some()
                || tokenizer.tokenizer_config_json.as_deref().is_some_and(|t| t.contains("\"chat_template\"")),
        });
        println!("{v}");
        return Ok(());
    }
    println!("model         {}", path.display());
    if let Some(s) = source.stored_quant() {
        println!("stored as     {s}, quantized from {}", source.label());
    }
    println!(
        "architecture  {} ({})",
        c.arch.model_type(),
        c.arch.class_name()
    );
    println!(
        "shape         {} layers, hidden {}, intermediate {}, vocab {}",
        c.num_layers, c.hidden_size, c.intermediate_size, c.vocab_size
    );
    println!(
        "attention     {} heads, {} kv heads (GQA x{}), head_dim {}{}{}",
        c.num_heads,
        c.num_kv_heads,
        c.num_heads / c.num_kv_heads,
        c.head_dim,
        if c.qkv_bias { ", q/k/v bias" } else { "" },
        if c.qk_norm { ", q/k norm" } else { "" }
    );
    println!("rope          theta {}, scaling {rope}", c.rope_theta);
    println!(
        "embeddings    {}",
        if c.tie_word_embeddings {
            "tied to lm_head"
        } else {
            "untied"
        }
    );
    println!(
        "parameters    {} ({})",
        group_digits(params),
        human_count(params)
    );
    println!("weights       {} at 16-bit", human_bytes(bytes16));
    if let (Some(s), Some(b)) = (spec, bytes4) {
        println!(
            "              {} with decoder linears in {s} ({:.1}x smaller; embeddings stay 16-bit)",
            human_bytes(b),
            bytes16 as f64 / b as f64
        );
    }
    println!(
        "tokenizer     {}",
        if tokenizer.tokenizer_json.is_some() {
            "tokenizer.json present"
        } else {
            "none found"
        }
    );
    Ok(())
}

fn quantize(path: &Path, output: &Path, quant: QuantArgs) -> Result<()> {
    let source = model::open(path)?;
    if source.stored_quant().is_some() {
        bail!(
            "{} is already a quantized file; quantize the original model folder",
            path.display()
        );
    }
    let spec = match quant.request()? {
        None => QuantSpec::new(QuantFormat::Nf4, 64)?,
        Some(QuantRequest::Quantize(s)) => s,
        Some(QuantRequest::Dense) => {
            bail!("--quant none makes no quantized file; choose nf4 or int4")
        }
    };
    let start = Instant::now();
    let model = source.load(Some(QuantRequest::Quantize(spec)))?;
    let loaded = start.elapsed();
    model
        .save_quantized(output, &source.tokenizer)
        .with_context(|| format!("writing {}", output.display()))?;
    let size = std::fs::metadata(output).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "quantized {} decoder linears of {} to {spec} in {:.1}s, wrote {} ({}) in {:.1}s",
        model.config.num_layers * LinearKind::ALL.len(),
        path.display(),
        loaded.as_secs_f64(),
        output.display(),
        human_bytes(size),
        (start.elapsed() - loaded).as_secs_f64()
    );
    Ok(())
}

fn eval(
    path: &Path,
    data: &Path,
    adapter: Option<&Path>,
    quant: QuantArgs,
    exec: ExecArgs,
    max_length: usize,
) -> Result<()> {
    let gpu = exec.open()?;
    let examples = nibble::data::read_jsonl(data)?;
    let source = model::open(path)?;
    let tok = ChatTokenizer::from_files(&source.tokenizer, Path::new(source.label()))?;
    let model = source.load(quant.request()?)?;
    let adapter = adapter
        .map(|dir| nibble::train::run::load_adapter(dir, &model.config, "--adapter"))
        .transpose()?;
    let on_gpu = gpu
        .as_ref()
        .map(|g| -> Result<_> {
            let model = nibble::gpu::weights::GpuModel::upload(g, &model)?;
            let lora = adapter
                .as_ref()
                .map(|a| nibble::gpu::weights::GpuLora::upload(g, a));
            Ok((g, model, lora))
        })
        .transpose()?;
    let device = gpu
        .as_ref()
        .map_or("cpu".to_string(), |g| format!("gpu ({})", g.info.name));
    log::info!("evaluating {} examples on {device}", examples.len());
    let (mut loss_sum, mut tokens, mut cut_examples) = (0f64, 0usize, 0usize);
    for (i, example) in examples.iter().enumerate() {
        let (seq, cut) =
            nibble::train::tokenize(&tok, example, nibble::train::LossOn::All, max_length)
                .with_context(|| format!("{}: example {}", data.display(), i + 1))?;
        cut_examples += usize::from(cut > 0);
        let loss = match &on_gpu {
            Some((g, m, l)) => {
                nibble::exec::gpu::forward_backward(g, m, l.as_ref(), None, &seq, 0.0)?
            }
            None => {
                let options = nibble::cpu::StepOptions {
                    grad_scale: 0.0,
                    checkpoint: false,
                    precision: exec.cpu_precision(),
                };
                nibble::cpu::forward_backward_with(
                    &model,
                    adapter.as_ref(),
                    None,
                    &seq,
                    options,
                    None,
                )?
            }
        };
        loss_sum += loss.loss_sum;
        tokens += loss.targets;
    }
    if cut_examples > 0 {
        log::warn!(
            "{cut_examples} examples were longer than --max-length {max_length} and were cut"
        );
    }
    if tokens == 0 {
        bail!("{}: no example has a token to predict", data.display());
    }
    let mean = loss_sum / tokens as f64;
    println!(
        "{}",
        json!({"loss": mean, "perplexity": mean.exp(), "tokens": tokens})
    );
    Ok(())
}

fn train_command(cli: TrainArgs) -> Result<()> {
    let file = match &cli.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            toml::from_str::<TrainArgs>(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
        None => TrainArgs::default(),
    };
    let merged = cli.or(file);
    let a = match merged.preset.clone() {
        Some(name) => merged.or(TrainArgs::preset(&name)?),
        None => merged,
    };
    let need = |v: Option<PathBuf>, flag: &str| {
        v.with_context(|| format!("--{flag} is required (on the command line or in --config)"))
    };
    let (model, data, output) = (
        need(a.model, "model")?,
        need(a.data, "data")?,
        need(a.output, "output")?,
    );
    let quant = QuantArgs {
        quant: a
            .quant
            .map(|q| {
                <QuantChoice as clap::ValueEnum>::from_str(&q, true)
                    .map_err(|_| anyhow::anyhow!("unknown quant `{q}` (nf4, int4 or none)"))
            })
            .transpose()?,
        group_size: a.group_size,
    };
    let exec = ExecArgs {
        device: match a.device.as_deref().unwrap_or("auto") {
            "auto" => DeviceChoice::Auto,
            "cpu" => DeviceChoice::Cpu,
            "gpu" => DeviceChoice::Gpu,
            other => bail!("unknown device `{other}` (auto, cpu or gpu)"),
        },
        precision: match a.precision.as_deref().unwrap_or("default") {
            "default" => Precision::Default,
            "f32" => Precision::F32,
            other => bail!("unknown precision `{other}` (default or f32)"),
        },
    };
    let schedule = a.lr_scheduler.unwrap_or_else(|| "linear".into());
    let config = nibble::train::TrainConfig {
        lora: nibble::lora::LoraConfig {
            r: a.lora_r.unwrap_or(8),
            alpha: a.lora_alpha.unwrap_or(16.0),
            dropout: a.lora_dropout.unwrap_or(0.05) as f32,
            use_rslora: a.use_rslora.unwrap_or(false),
            targets: parse_targets(a.target_modules.as_deref().unwrap_or("all-linear"))?,
        },
        lr: a.lr.unwrap_or(2e-4),
        weight_decay: a.weight_decay.unwrap_or(0.0),
        max_grad_norm: a.max_grad_norm.unwrap_or(1.0),
        schedule: nibble::train::Schedule::parse(&schedule).with_context(|| {
            format!("unknown --lr-scheduler `{schedule}` (constant, linear or cosine)")
        })?,
        warmup_steps: a.warmup_steps.unwrap_or(0),
        warmup_ratio: a.warmup_ratio.unwrap_or(0.0),
        epochs: a.epochs.unwrap_or(1),
        max_steps: a.max_steps,
        batch_size: a.batch_size.unwrap_or(1),
        grad_accum: a.grad_accum.unwrap_or(1),
        max_length: a.max_length.unwrap_or(1024),
        seed: a.seed.unwrap_or(42),
        shuffle: !a.no_shuffle.unwrap_or(false),
        loss_on: match a.loss_on.as_deref() {
            None => nibble::train::LossOn::Default,
            Some("all") => nibble::train::LossOn::All,
            Some("completion") => nibble::train::LossOn::Completion,
            Some("assistant") => nibble::train::LossOn::Assistant,
            Some(other) => bail!("unknown --loss-on `{other}` (all, assistant or completion)"),
        },
        checkpoint: a.gradient_checkpointing.unwrap_or(false),
        precision: exec.cpu_precision(),
    };
    if a.eval_data.is_some() && a.eval_split.is_some() {
        bail!("give --eval-data or --eval-split, not both");
    }
    if let Some(f) = a.eval_split
        && !(f > 0.0 && f < 1.0)
    {
        bail!("--eval-split must lie strictly between 0 and 1 (got {f})");
    }
    if !(0.0..1.0).contains(&config.warmup_ratio) {
        bail!("--warmup-ratio must lie in [0, 1)");
    }
    let options = nibble::train::run::RunOptions {
        overwrite: a.overwrite.unwrap_or(false),
        save_steps: a.save_steps.unwrap_or(0),
        resume: a.resume,
        init_adapter: a.init_adapter,
        eval_data: a.eval_data,
        eval_split: a.eval_split,
        eval_steps: a.eval_steps.unwrap_or(0),
        packing: a.packing.unwrap_or(false),
    };
    let gpu = exec.open()?;
    let spec = nibble::train::run::RunSpec {
        model: &model,
        data: &data,
        output: &output,
        quant: quant.request()?,
        config,
        options,
    };
    let mut progress = Progress::default();
    nibble::train::run::run(spec, gpu.as_ref(), &mut progress)?;
    eprintln!("saved the adapter to {}", output.display());
    Ok(())
}

/// A rate for people: whole numbers, and three decimals below 10 (a software GPU's step of
/// the 0.5B model runs at 0.27 tokens/s, which whole numbers print as 0).
fn rate(per_s: f64) -> String {
    if per_s >= 10.0 {
        format!("{per_s:.0}")
    } else {
        format!("{per_s:.3}")
    }
}

/// Training progress: a bar with step, loss, tokens/s and ETA on a terminal, plain log lines otherwise.
#[derive(Default)]
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: usize,
}

impl nibble::train::run::Observer for Progress {
    fn started(&mut self, trainer: &nibble::train::Trainer) {
        use std::io::IsTerminal;
        self.total = trainer.total_steps;
        self.bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(trainer.total_steps as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} step {pos}/{len}  {msg}  eta {eta}",
                )
                .expect("valid template"),
            );
            bar.set_position(trainer.step as u64);
            bar
        });
    }

    fn stepped(&mut self, r: &nibble::train::StepRecord) {
        match &self.bar {
            Some(bar) => {
                bar.set_message(format!(
                    "loss {:.4}  {} tokens/s",
                    r.loss,
                    rate(r.tokens_per_s)
                ));
                bar.set_position(r.step as u64);
            }
            None => log::info!(
                "step {}/{}  loss {:.4}  lr {:.2e}  grad_norm {:.3}  {} tokens/s",
                r.step,
                self.total,
                r.loss,
                r.lr,
                r.grad_norm,
                rate(r.tokens_per_s)
            ),
        }
    }

    fn evaluated(&mut self, step: usize, loss: f64) {
        let line = format!("step {step}: validation loss {loss:.4}");
        match &self.bar {
            Some(bar) => bar.println(line),
            None => log::info!("{line}"),
        }
    }

    fn finished(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

fn merge_command(path: &Path, adapter: &Path, output: &Path, dtype: Option<&str>) -> Result<()> {
    let dtype = match dtype {
        None => None,
        Some("bf16") => Some(nibble::source::FloatDtype::BF16),
        Some("f16") => Some(nibble::source::FloatDtype::F16),
        Some("f32") => Some(nibble::source::FloatDtype::F32),
        Some(other) => bail!("unknown --dtype `{other}` (bf16, f16 or f32)"),
    };
    let source = model::open(path)?;
    let lora = nibble::train::run::load_adapter(adapter, &source.config, "--adapter")?;
    nibble::merge::merge(&source, path, &lora, output, dtype)?;
    eprintln!(
        "merged {} LoRA pairs into {}",
        lora.pairs().count(),
        output.display()
    );
    Ok(())
}

/// A model ready to generate: weights, adapter, tokenizer, stop tokens and sampling options.
struct Speaker {
    model: nibble::model::Model,
    adapter: Option<nibble::lora::LoraAdapter>,
    tok: ChatTokenizer,
    stop: Vec<u32>,
    sampling: nibble::generate::Sampling,
    max_new: usize,
    /// The GPU, the model and adapter uploaded to it, when decoding runs there.
    gpu: Option<(
        nibble::gpu::Gpu,
        nibble::gpu::weights::GpuModel,
        Option<nibble::gpu::weights::GpuLora>,
    )>,
    cache: nibble::generate::Cache,
    cached: Vec<u32>,
}

/// Where a speaker's decoding runs.
fn executor<'a>(
    model: &'a nibble::model::Model,
    adapter: Option<&'a nibble::lora::LoraAdapter>,
    gpu: &'a Option<(
        nibble::gpu::Gpu,
        nibble::gpu::weights::GpuModel,
        Option<nibble::gpu::weights::GpuLora>,
    )>,
) -> nibble::generate::Executor<'a> {
    match gpu {
        Some((gpu, model, lora)) => nibble::generate::Executor::Gpu {
            gpu,
            model,
            lora: lora.as_ref(),
        },
        None => nibble::generate::Executor::Cpu { model, adapter },
    }
}

impl Speaker {
    fn open(g: &GenArgs) -> Result<Self> {
        let source = model::open(&g.model)?;
        let tok = ChatTokenizer::from_files(&source.tokenizer, Path::new(source.label()))?;
        let model = source.load(g.quant.request()?)?;
        let adapter = g
            .adapter
            .as_deref()
            .map(|dir| nibble::train::run::load_adapter(dir, &model.config, "--adapter"))
            .transpose()?;
        if !(g.top_p > 0.0 && g.top_p <= 1.0) || g.temperature < 0.0 {
            bail!("--top-p must lie in (0, 1] and --temperature must not be negative");
        }
        let exec = ExecArgs {
            device: g.device,
            precision: Precision::F32,
        };
        let gpu = exec
            .open()?
            .map(|gpu| -> Result<_> {
                let model = nibble::gpu::weights::GpuModel::upload(&gpu, &model)?;
                let lora = adapter
                    .as_ref()
                    .map(|a| nibble::gpu::weights::GpuLora::upload(&gpu, a));
                Ok((gpu, model, lora))
            })
            .transpose()?;
        let executor = executor(&model, adapter.as_ref(), &gpu);
        log::info!("generating on {}", executor.describe());
        let cache = executor.cache();
        Ok(Speaker {
            stop: nibble::generate::stop_tokens(&tok),
            cache,
            gpu,
            model,
            adapter,
            tok,
            sampling: nibble::generate::Sampling {
                temperature: g.temperature,
                top_p: g.top_p,
                seed: g.seed,
            },
            max_new: g.max_new_tokens,
            cached: Vec::new(),
        })
    }

    /// Generates after `text`, printing the answer as it comes; returns it (without the stop token).
    fn answer(&mut self, text: &str) -> Result<String> {
        let prompt = self.tok.encode(text)?;
        if prompt.is_empty() {
            bail!("the prompt is empty");
        }
        let mut answer: Vec<u32> = Vec::new();
        let mut printed = 0;
        let (tok, stop) = (&self.tok, &self.stop);
        let mut out = std::io::stdout();
        let mut failure = None;
        let started = std::time::Instant::now();
        let mut first_token_after = None;
        let mut generated = 0usize;
        // The prompt tokens the cache already holds (earlier turns of a chat) are not fed again.
        let reused = nibble::generate::reusable_prefix(&self.cached, &prompt);
        nibble::generate::generate(
            executor(&self.model, self.adapter.as_ref(), &self.gpu),
            &mut self.cache,
            &mut self.cached,
            &prompt,
            self.max_new,
            stop,
            &self.sampling,
            |t| {
                use std::io::Write;
                generated += 1;
                first_token_after.get_or_insert_with(|| started.elapsed());
                if stop.contains(&t) {
                    return;
                }
                answer.push(t);
                // Decode the whole answer so far: a character may span several tokens.
                match tok.decode(&answer) {
                    Ok(text) if text.len() > printed && !text.ends_with('\u{FFFD}') => {
                        let _ = write!(out, "{}", &text[printed..]);
                        let _ = out.flush();
                        printed = text.len();
                    }
                    Ok(_) => {}
                    Err(e) => failure = Some(e),
                }
            },
        )?;
        if let Some(e) = failure {
            return Err(e.into());
        }
        if let Some(first) = first_token_after {
            let rest = started.elapsed().saturating_sub(first).as_secs_f64();
            let fed = prompt.len() - reused;
            log::info!(
                "{generated} tokens: the first after {:.2} s ({fed} prompt tokens fed), then {:.1} tokens/s",
                first.as_secs_f64(),
                if rest > 0.0 {
                    (generated - 1) as f64 / rest
                } else {
                    0.0
                },
            );
        }
        let text = self.tok.decode(&answer)?;
        println!("{}", text.get(printed..).unwrap_or(""));
        Ok(text)
    }
}

fn with_system(system: Option<&str>) -> Vec<Message> {
    system
        .map(|s| Message::new("system", s))
        .into_iter()
        .collect()
}

fn generate_command(g: &GenArgs, prompt: &str, system: Option<&str>, raw: bool) -> Result<()> {
    let mut speaker = Speaker::open(g)?;
    let text = if raw {
        prompt.to_string()
    } else {
        let mut messages = with_system(system);
        messages.push(Message::new("user", prompt));
        speaker.tok.apply_chat_template(&messages, true)?
    };
    speaker.answer(&text)?;
    Ok(())
}

fn chat_command(g: &GenArgs, system: Option<&str>) -> Result<()> {
    use std::io::{BufRead, Write};
    let mut speaker = Speaker::open(g)?;
    let mut messages = with_system(system);
    eprintln!(
        "chatting with {} (/reset starts over; end of input quits)",
        g.model.display()
    );
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            return Ok(());
        }
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line == "/reset" {
            messages = with_system(system);
            continue;
        }
        messages.push(Message::new("user", line));
        let text = speaker.tok.apply_chat_template(&messages, true)?;
        let answer = speaker.answer(&text)?;
        messages.push(Message::new("assistant", &answer));
    }
}

/// `--target-modules`: PEFT's `target_modules`, comma-separated (module names such as q_proj, longer path
/// suffixes, or all-linear); checked against the model when the adapter is made.
fn parse_targets(list: &str) -> Result<Vec<String>> {
    let names: Vec<String> = list
        .split(',')
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .collect();
    if names.is_empty() {
        bail!("--target-modules names no module (e.g. q_proj,v_proj or all-linear)");
    }
    Ok(names)
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

#[allow(clippy::too_many_arguments)]
fn plan(
    path: &Path,
    tokens: usize,
    quant: QuantArgs,
    rank: usize,
    dropout: f64,
    targets: &str,
    checkpoint: bool,
    as_json: bool,
) -> Result<()> {
    let (config, stored) = plan_source(path)?;
    let spec = quant.planned_spec(stored)?;
    if tokens == 0 || rank == 0 {
        bail!("--seq-len and --lora-r must be positive");
    }
    let input = nibble::plan::PlanInput {
        tokens,
        quant: spec,
        lora_rank: rank,
        lora_targets: parse_targets(targets)?,
        lora_dropout: dropout > 0.0,
        checkpoint,
    };
    let p = nibble::plan::plan(&config, &input)?;
    if as_json {
        println!("{}", serde_json::to_string(&p)?);
        return Ok(());
    }
    let weights = spec.map_or("16-bit".to_string(), |s| s.to_string());
    println!(
        "training step of {} tokens, LoRA r={rank} on {targets}{}",
        tokens,
        if checkpoint {
            ", gradient checkpointing"
        } else {
            ""
        }
    );
    println!("  weights ({weights})      {:>12}", human_bytes(p.weights));
    println!(
        "  LoRA + AdamW state     {:>12}   ({} trainable parameters)",
        human_bytes(p.lora_and_optimizer),
        group_digits(p.lora_parameters)
    );
    println!(
        "  step buffers at peak   {:>12}",
        human_bytes(p.activations)
    );
    println!("  kernel temporaries     {:>12}", human_bytes(p.workspace));
    println!("  total                  {:>12}", human_bytes(p.total));
    Ok(())
}

fn synth_model(
    preset: &str,
    output: &Path,
    spelling: &str,
    shards: usize,
    seed: u64,
    tokenizer: &str,
) -> Result<()> {
    use nibble::config::Arch;
    let (tokenizer, vocab) = match tokenizer {
        "qwen2.5" => (synth::qwen25_tokenizer(), 151936),
        "byte" => (synth::byte_tokenizer(), synth::BYTE_VOCAB),
        other => bail!("unknown tokenizer `{other}` (qwen2.5 or byte)"),
    };
    let mut spec = match preset {
        "tiny-qwen2" => SynthSpec::tiny(Arch::Qwen2, vocab),
        "tiny-qwen3" => SynthSpec::tiny(Arch::Qwen3, vocab),
        "tiny-llama" => SynthSpec::tiny(Arch::Llama, vocab),
        "qwen2.5-0.5b" if vocab == 151936 => SynthSpec::qwen25_05b(),
        "qwen2.5-0.5b" => {
            bail!("the qwen2.5-0.5b preset keeps Qwen2.5's vocabulary (--tokenizer qwen2.5)")
        }
        other => {
            bail!("unknown preset `{other}` (tiny-qwen2, tiny-qwen3, tiny-llama, qwen2.5-0.5b)")
        }
    };
    spec.spelling = match spelling {
        "v4" => synth::ConfigSpelling::V4,
        "v5" => synth::ConfigSpelling::V5,
        other => bail!("unknown config spelling `{other}` (v4 or v5)"),
    };
    spec.shards = shards;
    spec.seed = seed;
    if output.exists() && std::fs::read_dir(output)?.next().is_some() {
        bail!("{} exists and is not empty", output.display());
    }
    synth::write_model_folder(output, &spec, Some(&tokenizer))?;
    eprintln!(
        "wrote a random {preset} model ({} parameters) to {}",
        group_digits(spec.config().parameter_count()),
        output.display()
    );
    Ok(())
}

fn demo(keep: Option<PathBuf>) -> Result<()> {
    let dir = match &keep {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("nibble-demo-{}", std::process::id())),
    };
    let result = run_demo(&dir);
    if keep.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

/// The demo: a tiny random model with the real Qwen2.5 tokenizer learns the built-in chats (short answers
/// in a fixed voice, so that it visibly learns them), asked a question before and after.
fn run_demo(dir: &Path) -> Result<()> {
    let mut spec = SynthSpec::tiny(nibble::config::Arch::Qwen2, 151936);
    spec.hidden_size = 128;
    spec.intermediate_size = 384;
    println!(
        "== a random Qwen2.5-architecture model with the bundled Qwen2.5 tokenizer, in {}",
        dir.display()
    );
    synth::write_model_folder(dir, &spec, Some(&synth::qwen25_tokenizer()))?;
    info(
        dir,
        QuantArgs {
            quant: None,
            group_size: None,
        },
        false,
    )?;

    let source = model::open(dir)?;
    let tok = ChatTokenizer::from_files(&source.tokenizer, dir)?;
    let model = source.load(None)?;
    let chats = dir.join("chats.jsonl");
    std::fs::write(&chats, nibble::data::demo_jsonl())
        .with_context(|| format!("writing {}", chats.display()))?;
    let question = nibble::data::DEMO_CHATS[0].0;
    let prompt = tok.encode(&tok.apply_chat_template(&[Message::new("user", question)], true)?)?;
    let stop = nibble::generate::stop_tokens(&tok);
    let answer = |adapter: Option<&nibble::lora::LoraAdapter>| -> Result<String> {
        let executor = nibble::generate::Executor::Cpu {
            model: &model,
            adapter,
        };
        let ids = nibble::generate::greedy(executor, &prompt, 16, &stop)?;
        let answer: Vec<u32> = ids[prompt.len()..]
            .iter()
            .copied()
            .filter(|t| !stop.contains(t))
            .collect();
        Ok(tok.decode(&answer)?)
    };
    println!(
        "\n== before fine-tuning, asked \"{question}\":\n{:?}",
        answer(None)?
    );

    let config = nibble::train::TrainConfig {
        lora: nibble::lora::LoraConfig {
            r: 16,
            alpha: 32.0,
            dropout: 0.0,
            ..Default::default()
        },
        lr: 3e-3,
        epochs: 12,
        max_length: 256,
        schedule: nibble::train::Schedule::Constant,
        precision: nibble::ops::Precision::fastest(),
        ..Default::default()
    };
    // The best device present: a real GPU when there is one (a software Vulkan device would be slower
    // than the CPU executor).
    let gpu = nibble::gpu::Gpu::new(false).ok();
    let executor = match &gpu {
        Some(gpu) => format!("the GPU executor on {}", gpu.info.name),
        None => "the CPU executor".to_string(),
    };
    let out = dir.join("adapter");
    let spec = nibble::train::run::RunSpec {
        model: dir,
        data: &chats,
        output: &out,
        quant: None,
        config,
        options: Default::default(),
    };
    nibble::train::run::run(spec, gpu.as_ref(), &mut DemoProgress { executor, total: 0 })?;
    let adapter = nibble::train::run::load_adapter(&out, &model.config, "the demo's adapter")?;
    println!(
        "\n== after fine-tuning, asked \"{question}\":\n{:?}",
        answer(Some(&adapter))?
    );
    println!("\nThe adapter is a PEFT folder: {}", out.display());
    Ok(())
}

/// The demo's account of its training run: a line for the start and one every 8 steps.
struct DemoProgress {
    executor: String,
    total: usize,
}

impl nibble::train::run::Observer for DemoProgress {
    fn started(&mut self, trainer: &nibble::train::Trainer) {
        self.total = trainer.total_steps;
        println!(
            "\n== fine-tuning {} LoRA parameters (r=16 on all seven linears, NF4 base) for {} steps on {} chats, on {}",
            trainer.adapter.parameter_count(),
            trainer.total_steps,
            trainer.examples(),
            self.executor
        );
    }

    fn stepped(&mut self, r: &nibble::train::StepRecord) {
        if r.step == 1 || r.step % 8 == 0 || r.step == self.total {
            println!(
                "  step {:>3}  loss {:.4}  {} tokens/s",
                r.step,
                r.loss,
                rate(r.tokens_per_s)
            );
        }
    }
}

fn group_digits(n: u64) -> String {
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

fn human_count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n => format!("{:.1}K", n as f64 / 1e3),
    }
}

fn human_bytes(b: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    if b as f64 >= 1024.0 * MIB {
        format!("{:.2} GiB", b as f64 / (1024.0 * MIB))
    } else {
        format!("{:.1} MiB", b as f64 / MIB)
    }
}
