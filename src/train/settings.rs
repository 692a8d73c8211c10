//! The options of a training run as people give them: command-line flags, a TOML file, a named preset,
//! or the browser page's JSON. One struct serves all four, so an option is declared once; an option left
//! out takes the trainer's default (`TrainConfig::default()`, the one place defaults live).

use crate::error::{Error, Result};
use crate::exec::{Device, PrecisionChoice};
use crate::lora::{LoraConfig, Patterns as LoraPatterns};
use crate::model::{QuantChoice, QuantRequest};
use crate::train::run::RunOptions;
use crate::train::{LossOn, Schedule, TrainConfig};
use crate::value_name;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// How the options file a run writes beside its adapter begins (then nibble's version): what tells it
/// from a user's own file of that name.
pub const RECORD_HEADER: &str = "# The options of the run in this folder, as nibble";

/// The record's claim that it repeats the run: true until a resume changes the run's length
/// (`train::run`), whose notes then take its place.
pub const RECORD_REPEATS: &str =
    "# `nibble train --config nibble_config.toml --output NEW_FOLDER` runs it again.\n";

/// How each such note begins.
pub const RECORD_CONTINUED: &str = "# Continued at step";

/// Named recipes, written as option files: `--preset NAME` reads as if its file were given, below the
/// `--config` file and the flags.
const PRESETS: &[(&str, &str)] = &[
    (
        "demo",
        // `nibble demo` and the browser page's example: a tiny random model learns the demo chats in
        // 96 steps (8 chats, 12 epochs) with a learning rate a real model would not take. In f32, so
        // that every machine trains the same adapter: at that rate the greedy answers after 96 steps
        // follow the rounding of the products (bf16 products on AMX tiles ended with another answer
        // than the dot kernel's on the same CPU, BENCHMARKS.md session 32), and the tiny model costs
        // little more in f32.
        r#"
precision = "f32"
lora_r = 16
lora_alpha = 32.0
lora_dropout = 0.0
lr = 3e-3
lr_scheduler = "constant"
epochs = 12
max_length = 256
"#,
    ),
    (
        "qwen2.5-cpu",
        // The small Qwen recipe of transformers + peft + trl.
        r#"
quant = "nf4"
lora_r = 8
lora_alpha = 16.0
lora_dropout = 0.05
target_modules = "all-linear"
lr = 2e-4
batch_size = 1
grad_accum = 4
epochs = 2
"#,
    ),
    (
        "flux2-klein",
        // ai-toolkit's FLUX.2 [klein] LoRA defaults (3000 steps, rank 32, lr 1e-4, "weighted"
        // timesteps), with nibble's 4-bit groups of 128.
        r#"
max_steps = 3000
quant = "nf4"
group_size = 128
lora_r = 32
lora_alpha = 32.0
lora_dropout = 0.0
lr = 1e-4
weight_decay = 1e-4
lr_scheduler = "constant"
gradient_checkpointing = true
resolution = 512
caption_dropout = 0.05
sigma_sampling = "weighted"
"#,
    ),
];

/// `data` as one path or a list of them in an options file (one is written as one path, as before
/// lists were read).
mod one_or_several {
    use serde::{Deserializer, Serializer};
    use std::path::PathBuf;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<PathBuf>>, D::Error> {
        let paths = super::strings(d, "a file or folder path, or a list of them")?;
        Ok(paths.map(|paths| paths.into_iter().map(PathBuf::from).collect()))
    }

    pub fn serialize<S: Serializer>(paths: &Option<Vec<PathBuf>>, s: S) -> Result<S::Ok, S::Error> {
        match paths.as_deref() {
            None => s.serialize_none(),
            Some([one]) => s.serialize_some(one),
            Some(several) => s.serialize_some(several),
        }
    }
}

/// `resolution` as one number or a list of them in an options file (one is written as one number,
/// as before lists were read).
mod one_number_or_several {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<usize>>, D::Error> {
        use serde_json::Value;
        let number = |v: &Value| v.as_u64().and_then(|n| usize::try_from(n).ok());
        let v = Value::deserialize(d)?;
        let numbers = match &v {
            Value::Null => return Ok(None),
            Value::Array(a) => a.iter().map(number).collect(),
            one => number(one).map(|n| vec![n]),
        };
        numbers.map(Some).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "{v}: expected a number of pixels, or a list of them"
            ))
        })
    }

    pub fn serialize<S: Serializer>(numbers: &Option<Vec<usize>>, s: S) -> Result<S::Ok, S::Error> {
        match numbers.as_deref() {
            None => s.serialize_none(),
            Some([one]) => s.serialize_some(one),
            Some(several) => s.serialize_some(several),
        }
    }
}

/// `target_modules` as PEFT writes it, a list of names, or as the flag takes it, one string of them
/// separated by commas (or all-linear); kept as that string.
mod names_or_list {
    use serde::Deserializer;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        let names = super::strings(d, "module names separated by commas, or a list of them")?;
        Ok(names.map(|names| names.join(",")))
    }
}

/// Token ids or texts: one string (comma-separated), or a list of ids and texts as PEFT's
/// `trainable_token_indices` lists them.
mod tokens_or_list {
    use serde::{Deserialize, Deserializer};
    use serde_json::Value;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        let item = |v: &Value| match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => n.as_u64().map(|n| n.to_string()),
            _ => None,
        };
        let v = Value::deserialize(d)?;
        let items = match &v {
            Value::Null => return Ok(None),
            Value::Array(a) => a.iter().map(item).collect(),
            one => item(one).map(|i| vec![i]),
        };
        items.map(|i| Some(i.join(","))).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "{v}: expected token ids or texts, separated by commas or in a list"
            ))
        })
    }
}

/// One string or a list of strings (TOML, YAML and JSON write both), refused as `expected` says
/// otherwise; None for a null.
fn strings<'de, D: serde::Deserializer<'de>>(
    d: D,
    expected: &'static str,
) -> Result<Option<Vec<String>>, D::Error> {
    struct Strings(&'static str);
    impl<'de> serde::de::Visitor<'de> for Strings {
        type Value = Option<Vec<String>>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str(self.0)
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(vec![v.to_string()]))
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(self)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(item) = seq.next_element::<serde_json::Value>()? {
                match item {
                    serde_json::Value::String(s) => out.push(s),
                    other => {
                        return Err(serde::de::Error::custom(format!(
                            "{other} in a list: expected {}",
                            self.0
                        )));
                    }
                }
            }
            Ok(Some(out))
        }
    }
    d.deserialize_any(Strings(expected))
}

/// `nibble train`'s options. Each can also come from a TOML file (`--config`, keys as the flags with
/// underscores) or a preset; a flag given on the command line wins over the file, and the file over
/// the preset. Options transformers and TRL name otherwise also answer to their names there
/// (`learning_rate`, `num_train_epochs`, `per_device_train_batch_size`, ...), as flags and as keys.
#[derive(clap::Args, Deserialize, Serialize, Default, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct TrainSettings {
    /// A TOML file of options (keys as the flags, with underscores; relative paths in it are read from
    /// the file's folder), or a TRL recipe (.yaml or .yml, as `trl sft --config` reads it: TRL's
    /// defaults where it is silent, paths read from where nibble runs).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// A known recipe: qwen2.5-cpu (NF4, LoRA r=8 alpha=16 dropout 0.05 on all seven linears, lr 2e-4,
    /// batch 1, gradient accumulation 4, 2 epochs), or demo (what `nibble demo` trains with).
    #[arg(long)]
    pub preset: Option<String>,
    /// The base model: a Hugging Face folder, a file from `nibble quantize`, or a FLUX.2 transformer.
    #[arg(long, aliases = ["model-name-or-path"])]
    #[serde(alias = "model_name_or_path")]
    pub model: Option<PathBuf>,
    /// The training data: a JSONL file (messages, prompt/completion or text rows) or a folder of
    /// images with captions (FLUX.2). Given more than once (a list in an options file), the files
    /// are one dataset, read one after the other (TRL's mixture of datasets).
    #[arg(long, aliases = ["dataset-name"])]
    #[serde(alias = "dataset_name", default, with = "one_or_several")]
    pub data: Option<Vec<PathBuf>>,
    /// The folder the adapter, metrics.jsonl and checkpoints are written to.
    #[arg(long, short, aliases = ["output-dir"])]
    #[serde(alias = "output_dir")]
    pub output: Option<PathBuf>,
    /// Storage of the decoder's linear weights.
    #[arg(long, value_enum, ignore_case = true)]
    pub quant: Option<QuantChoice>,
    /// Weights per scale, along the input dimension: 32, 64 or 128.
    #[arg(long)]
    pub group_size: Option<usize>,
    /// Where the steps run.
    #[arg(long, value_enum, ignore_case = true)]
    pub device: Option<Device>,
    /// The arithmetic of the products.
    #[arg(long, value_enum, ignore_case = true)]
    pub precision: Option<PrecisionChoice>,
    /// The peak learning rate.
    #[arg(long, aliases = ["learning-rate"])]
    #[serde(alias = "learning_rate")]
    pub lr: Option<f64>,
    /// How the learning rate moves over the run, by transformers' names (lr_scheduler_type).
    #[arg(long, value_enum, ignore_case = true, aliases = ["lr-scheduler-type"])]
    #[serde(alias = "lr_scheduler_type")]
    pub lr_scheduler: Option<Schedule>,
    /// The schedule's own parameters as a JSON object (transformers' lr_scheduler_kwargs), such as
    /// '{"min_lr_rate": 0.1}' for cosine_with_min_lr or '{"num_decay_steps": 100}' for
    /// warmup_stable_decay; in an options file, a table.
    #[arg(long, value_parser = crate::train::ScheduleKwargs::parse)]
    pub lr_scheduler_kwargs: Option<crate::train::ScheduleKwargs>,
    /// Optimizer steps over which the learning rate rises from 0; below 1, a fraction of all steps
    /// (rounded up), as transformers 5 reads it. Wins over --warmup-ratio.
    #[arg(long)]
    pub warmup_steps: Option<f64>,
    /// Warmup as a fraction of all steps (used when --warmup-steps is not given).
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    /// AdamW's decoupled weight decay.
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// AdamW's β₁: the decay of its running mean of gradients.
    #[arg(long)]
    pub adam_beta1: Option<f64>,
    /// AdamW's β₂: the decay of its running mean of squared gradients.
    #[arg(long)]
    pub adam_beta2: Option<f64>,
    /// AdamW's ε, added to the root of the squared gradients' mean.
    #[arg(long)]
    pub adam_epsilon: Option<f64>,
    /// Gradients are clipped to this global norm (0: no clipping).
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// Passes over the data; a fraction (0.5) stops within the last pass, as transformers'
    /// num_train_epochs does.
    #[arg(long, aliases = ["num-train-epochs"])]
    #[serde(alias = "num_train_epochs")]
    pub epochs: Option<f64>,
    /// Stop after this many optimizer steps, whatever --epochs says.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Examples per micro-batch.
    #[arg(long, aliases = ["per-device-train-batch-size"])]
    #[serde(alias = "per_device_train_batch_size")]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long, aliases = ["gradient-accumulation-steps"])]
    #[serde(alias = "gradient_accumulation_steps")]
    pub grad_accum: Option<usize>,
    /// The LoRA rank.
    #[arg(long)]
    pub lora_r: Option<usize>,
    /// LoRA's alpha: the update is scaled by alpha / r (alpha / √r with --use-rslora).
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Dropout on the LoRA branch's input.
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// Scale LoRA updates by alpha / √r (rsLoRA) instead of alpha / r.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub use_rslora: Option<bool>,
    /// DoRA (PEFT's use_dora): each adapted linear's output rescaled row by row to a trained
    /// magnitude; the adapter folder holds the magnitudes as PEFT does.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub use_dora: Option<bool>,
    /// Train these tokens' rows of the embedding and of the output projection (one table in a
    /// tied model) beside the LoRA matrices, as PEFT's trainable_token_indices: comma-separated
    /// token ids or single-token texts (`<|im_start|>,<|im_end|>`). What teaches a model special
    /// tokens its base never trained, such as a base model's chat-template markers. An untied model
    /// trains both tables' rows (PEFT's map of embed_tokens and lm_head; PEFT's list would train the
    /// embedding's alone).
    #[arg(long, aliases = ["trainable-token-indices"])]
    #[serde(
        alias = "trainable_token_indices",
        default,
        deserialize_with = "tokens_or_list::deserialize"
    )]
    pub trainable_tokens: Option<String>,
    /// Comma-separated module names or all-linear (in an options file, a list of names too).
    #[arg(long, aliases = ["lora-target-modules"])]
    #[serde(
        alias = "lora_target_modules",
        default,
        deserialize_with = "names_or_list::deserialize"
    )]
    pub target_modules: Option<String>,
    /// Comma-separated parameters adapted by name (PEFT's target_parameters): a mixture of experts'
    /// routers (gate.weight) and stacked experts (gate_up_proj, down_proj), where target_modules
    /// does not reach them (Qwen2-MoE; Qwen3-MoE's and Mixtral's all-linear does).
    #[arg(long, aliases = ["lora-target-parameters"])]
    #[serde(
        alias = "lora_target_parameters",
        default,
        deserialize_with = "names_or_list::deserialize"
    )]
    pub target_parameters: Option<String>,
    /// Ranks of their own for some modules (PEFT's rank_pattern), as a JSON object of regular
    /// expressions to ranks, such as '{"mlp.down_proj": 16}'; the first expression that matches a
    /// module path's end after a dot wins. In an options file, a table.
    #[arg(long, value_parser = LoraPatterns::parse_ranks, aliases = ["rank-pattern"])]
    #[serde(alias = "rank_pattern")]
    pub lora_rank_pattern: Option<LoraPatterns<usize>>,
    /// Alphas of their own for some modules (PEFT's alpha_pattern), as --lora-rank-pattern.
    #[arg(long, value_parser = LoraPatterns::parse_alphas, aliases = ["alpha-pattern"])]
    #[serde(alias = "alpha_pattern")]
    pub lora_alpha_pattern: Option<LoraPatterns<f64>>,
    /// Examples are cut to this many tokens.
    #[arg(long, aliases = ["max-seq-length"])]
    #[serde(alias = "max_seq_length")]
    pub max_length: Option<usize>,
    /// Which end of a longer example --max-length keeps (TRL's truncation_mode); examples left with
    /// no token that carries loss are left out, as TRL leaves them out (packed all the same under
    /// --packing, which keeps the start).
    #[arg(long, value_enum, ignore_case = true)]
    pub truncation_mode: Option<crate::train::Truncation>,
    /// The column that holds the text of text rows (TRL's dataset_text_field).
    #[arg(long)]
    pub dataset_text_field: Option<String>,
    /// Seeds the LoRA initialisation, shuffling, dropout and --eval-split; up to 2^63 - 1.
    #[arg(long, value_parser = clap::value_parser!(u64).range(..=i64::MAX as u64))]
    pub seed: Option<u64>,
    /// Keep the data in file order.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub no_shuffle: Option<bool>,
    /// Which tokens carry loss: all, assistant (the assistant turns of conversations) or completion
    /// (the completion of prompt/completion rows); the default is TRL's: all tokens, or the completion
    /// for prompt/completion rows.
    #[arg(long, value_enum, ignore_case = true)]
    pub loss_on: Option<LossOn>,
    /// How each token's loss counts (TRL's loss_type): nll, or dft (dynamic fine-tuning: each
    /// token's loss weighted by the probability the model gives its label, the weight held constant in
    /// the backward).
    #[arg(long, value_enum, ignore_case = true)]
    pub loss_type: Option<crate::train::LossType>,
    /// NEFTune (transformers' neftune_noise_alpha): noise uniform in ±α/√(length·hidden) added to the
    /// token embeddings of each training step (not to validation or generation); the paper uses 5.
    #[arg(long)]
    pub neftune_noise_alpha: Option<f64>,
    /// The chat template to render conversations with instead of the model's (TRL's
    /// chat_template_path): a Jinja file, or a tokenizer folder or tokenizer_config.json whose template
    /// to take. For a base model without one, or a template with {% generation %} blocks marking what
    /// --loss-on assistant trains on. The adapter folder keeps it as chat_template.jinja.
    #[arg(long, aliases = ["chat-template-path"])]
    #[serde(alias = "chat_template_path")]
    pub chat_template: Option<PathBuf>,
    /// The token text rows and completions end with, and chat templates see as eos_token, in place of
    /// the tokenizer's (TRL's eos_token, such as '<|im_end|>' for a base model trained on ChatML); one
    /// of the tokenizer's tokens.
    #[arg(long)]
    pub eos_token: Option<String>,
    /// Start from this PEFT adapter folder (its r, alpha and target modules apply).
    #[arg(long)]
    pub init_adapter: Option<PathBuf>,
    /// How new LoRA matrices start (PEFT's init_lora_weights): default (A random, B zero) or loftq
    /// (B·A approximates each weight's 4-bit quantization error, so training starts from the
    /// original weights; needs a 4-bit --quant of a 16-bit model folder).
    #[arg(long, value_enum, ignore_case = true)]
    pub init_lora_weights: Option<crate::lora::LoraInit>,
    /// A held-out JSONL file for validation loss.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Hold out this fraction of --data (chosen with --seed) for validation loss instead.
    #[arg(long)]
    pub eval_split: Option<f64>,
    /// Evaluate every N optimizer steps (default: at the end of each epoch and of the run).
    #[arg(long)]
    pub eval_steps: Option<usize>,
    /// Validate before the first step too (the untrained adapter's loss, at step 0; early stopping
    /// does not count it). Needs --eval-data or --eval-split.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub eval_on_start: Option<bool>,
    /// Stop once N validations in a row have not lowered the validation loss, and save the adapter
    /// of the best validation (also when the run ends without stopping). Needs --eval-data or
    /// --eval-split.
    #[arg(long)]
    pub early_stopping_patience: Option<usize>,
    /// A text file of prompts, one per line, each answered greedily (up to 64 tokens, as a user turn
    /// through the chat template) as the run goes: into the log and samples.jsonl. An image run
    /// draws each; a line `{"prompt": ..., "control": IMAGE or [IMAGES]}` names the control images
    /// an edit LoRA's sample is drawn on.
    #[arg(long)]
    pub sample_prompts: Option<PathBuf>,
    /// Answer --sample-prompts every N optimizer steps (and at the end of the run).
    #[arg(long)]
    pub sample_steps: Option<usize>,
    /// Keep each layer's input only and recompute the rest in the backward (less memory, a third more
    /// compute).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub gradient_checkpointing: Option<bool>,
    /// Gradient checkpointing with each layer's input kept in bf16: half the memory of the
    /// checkpoints, which dominate long sequences (the gradients then differ from f32 checkpoints'
    /// by a few tenths of a percent: the first loss is the same, later ones drift a little).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub bf16_checkpoints: Option<bool>,
    /// bf16 checkpoints kept in host memory between the forward and each layer's backward (GPU
    /// executor): the device then holds one layer's checkpoints at a time, for two copies over the
    /// bus per layer and step; the numbers are those of --bf16-checkpoints. Chosen by nibble when a
    /// step fits no other way and no checkpointing flag is given (`false` keeps nibble from it).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub offload_checkpoints: Option<bool>,
    /// Pack several examples into each sequence of up to --max-length tokens (attention stays inside
    /// each example; positions restart at each).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub packing: Option<bool>,
    /// How --packing fills sequences (TRL's packing_strategy): bfd (whole examples, cut to
    /// --max-length), bfd_split (longer examples split into pieces, each packed as an example) or
    /// wrapped (the examples end to end, cut every --max-length tokens; attention and loss cross
    /// examples).
    #[arg(long, value_enum, ignore_case = true)]
    pub packing_strategy: Option<crate::cpu::PackingStrategy>,
    /// Replace a finished run in the output folder.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub overwrite: Option<bool>,
    /// Write checkpoint-N/ (adapter, optimizer state, RNG state, data position) every N steps.
    #[arg(long)]
    pub save_steps: Option<usize>,
    /// When checkpoints are written (transformers' save_strategy): steps (every --save-steps), epoch
    /// (at the end of each epoch) or no.
    #[arg(long, value_enum, ignore_case = true)]
    pub save_strategy: Option<SaveStrategy>,
    /// Keep only the N newest checkpoints, deleting older ones as new ones are written.
    #[arg(long)]
    pub save_total_limit: Option<usize>,
    /// Continue a run from the newest complete checkpoint in this folder (or this checkpoint).
    #[arg(long, aliases = ["resume-from-checkpoint"])]
    #[serde(alias = "resume_from_checkpoint")]
    pub resume: Option<PathBuf>,
    /// The GPU memory this run may use, such as 11.5GiB or 8000MB, where less than the driver reports
    /// free (a shared GPU); a run planned to need more is refused before loading.
    #[arg(long)]
    pub gpu_memory: Option<String>,
    /// FLUX.2: image side in pixels; each image keeps its aspect at about this squared (sides
    /// multiples of 16). Several (512,768,1024) train each image at each, as ai-toolkit's list does.
    #[arg(long, value_delimiter = ',', value_name = "PIXELS")]
    #[serde(default, with = "one_number_or_several")]
    pub resolution: Option<Vec<usize>>,
    /// FLUX.2: a folder of control images (an edit LoRA's "before"): each training image's
    /// same-name image there is given to the transformer beside it. Given more than once, each
    /// image takes one from every folder, in order.
    #[arg(long, value_name = "DIR")]
    #[serde(default, with = "one_or_several")]
    pub control: Option<Vec<PathBuf>>,
    /// FLUX.2: control images larger than this side squared (in pixels) are scaled down to about
    /// that area (1024: the pipeline's; 512 takes a quarter of the tokens, for 12 GB cards).
    #[arg(long, value_name = "PIXELS")]
    pub control_resolution: Option<usize>,
    /// FLUX.2: a word put into every caption (where it says [trigger], else first).
    #[arg(long)]
    pub trigger: Option<String>,
    /// FLUX.2: the caption of images without a .txt beside them or with an empty one (ai-toolkit's
    /// `default_caption`; "" trains them uncaptioned, the trigger word alone where one is given).
    #[arg(long, value_name = "TEXT")]
    pub default_caption: Option<String>,
    /// FLUX.2: train each image mirrored left to right as well (ai-toolkit's `flip_x`), its control
    /// images mirrored with it.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub flip_x: Option<bool>,
    /// FLUX.2: the probability of training an image with the empty caption.
    #[arg(long)]
    pub caption_dropout: Option<f64>,
    /// FLUX.2: how each step's noise level σ is drawn.
    #[arg(long, value_enum, ignore_case = true)]
    pub sigma_sampling: Option<crate::train::flux2::SigmaSampling>,
    /// FLUX.2: where caption features and image latents are kept for later runs (default:
    /// $NIBBLE_CACHE_DIR, $XDG_CACHE_HOME/nibble or ~/.cache/nibble).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// FLUX.2: the Qwen3 text encoder folder, its tokenizer.json in it or in a `tokenizer/` folder
    /// beside it, or ComfyUI's one-file qwen_3_4b/qwen_3_8b.safetensors (a pipeline folder has its
    /// own; a transformer outside one needs one).
    #[arg(long)]
    pub text_encoder: Option<PathBuf>,
    /// FLUX.2: the VAE, as BFL's single file (flux2-vae.safetensors) or a diffusers
    /// AutoencoderKLFlux2 folder (a pipeline folder has its own).
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// FLUX.2: compute caption features and latents afresh and keep none.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub no_cache: Option<bool>,
}

/// What each option of `nibble train` is when left out, as `--help` states it: read off the values a
/// run takes (`TrainConfig::default()`, the run options of no flags), so the help cannot drift from
/// what nibble does. FLUX.2 runs start from the flux2-klein preset instead (`--preset`).
pub fn defaults_for_help() -> Vec<(&'static str, String)> {
    let d = TrainConfig::default();
    let run = TrainSettings::default()
        .run_options()
        .expect("no options are valid options");
    let none = || "none".to_string();
    let flag = |on: bool| on.to_string();
    let count = |n: usize, zero: &str| match n {
        0 => zero.to_string(),
        n => n.to_string(),
    };
    vec![
        ("config", none()),
        ("preset", none()),
        ("model", "required".into()),
        ("data", "required".into()),
        ("output", "required".into()),
        (
            "quant",
            "nf4 for a 16-bit folder, the stored format for a quantized file".into(),
        ),
        ("group_size", crate::quant::DEFAULT_GROUP_SIZE.to_string()),
        ("device", "auto".into()),
        ("precision", "default".into()),
        ("lr", d.lr.to_string()),
        ("lr_scheduler", value_name(d.schedule)),
        (
            "lr_scheduler_kwargs",
            "none: the schedule's defaults".into(),
        ),
        ("warmup_steps", d.warmup_steps.to_string()),
        ("warmup_ratio", d.warmup_ratio.to_string()),
        ("weight_decay", d.weight_decay.to_string()),
        ("adam_beta1", d.adam_beta1.to_string()),
        ("adam_beta2", d.adam_beta2.to_string()),
        ("adam_epsilon", d.adam_epsilon.to_string()),
        ("max_grad_norm", d.max_grad_norm.to_string()),
        ("epochs", d.epochs.to_string()),
        (
            "max_steps",
            d.max_steps
                .map_or_else(|| "none: --epochs decide".into(), |n| n.to_string()),
        ),
        ("batch_size", d.batch_size.to_string()),
        ("grad_accum", d.grad_accum.to_string()),
        ("lora_r", d.lora.r.to_string()),
        ("lora_alpha", d.lora.alpha.to_string()),
        ("lora_dropout", d.lora.dropout.to_string()),
        ("use_rslora", flag(d.lora.use_rslora)),
        ("use_dora", flag(d.lora.use_dora)),
        (
            "trainable_tokens",
            "none: only the LoRA matrices train".into(),
        ),
        ("target_modules", d.lora.targets.join(",")),
        (
            "target_parameters",
            "none: those target_modules convert into".into(),
        ),
        (
            "lora_rank_pattern",
            "none: --lora-r for every module".into(),
        ),
        (
            "lora_alpha_pattern",
            "none: --lora-alpha for every module".into(),
        ),
        ("max_length", d.max_length.to_string()),
        ("truncation_mode", value_name(d.truncation)),
        ("dataset_text_field", d.text_field.clone()),
        ("seed", d.seed.to_string()),
        ("no_shuffle", flag(!d.shuffle)),
        ("loss_on", value_name(d.loss_on)),
        ("loss_type", value_name(d.loss_type)),
        ("neftune_noise_alpha", "none: no noise".into()),
        ("chat_template", "the model's".into()),
        ("eos_token", "none: the tokenizer's".into()),
        ("init_adapter", "none: A random, B zero, as PEFT".into()),
        ("init_lora_weights", value_name(run.init_lora)),
        ("eval_data", none()),
        ("eval_split", none()),
        (
            "eval_steps",
            count(run.eval_steps, "0: at the end of each epoch and of the run"),
        ),
        ("eval_on_start", flag(run.eval_on_start)),
        ("early_stopping_patience", "none: every step runs".into()),
        ("sample_prompts", none()),
        (
            "sample_steps",
            "with each validation (each epoch without validation data)".into(),
        ),
        (
            "gradient_checkpointing",
            "off, turned on by nibble where a step would not fit".into(),
        ),
        (
            "bf16_checkpoints",
            "off, chosen by nibble where a step would not fit otherwise".into(),
        ),
        (
            "offload_checkpoints",
            "off, chosen by nibble where a step would not fit otherwise".into(),
        ),
        ("packing", flag(run.packing)),
        ("packing_strategy", value_name(run.packing_strategy)),
        ("overwrite", flag(run.overwrite)),
        ("save_steps", count(run.save_steps, "0: no checkpoints")),
        (
            "save_strategy",
            "steps where --save-steps is given, else no".into(),
        ),
        ("save_total_limit", "none: every checkpoint is kept".into()),
        ("resume", none()),
        ("gpu_memory", "what the driver reports free".into()),
        (
            "resolution",
            crate::train::flux2::DEFAULT_RESOLUTION.to_string(),
        ),
        ("control", "none: text-to-image".into()),
        (
            "control_resolution",
            "1024, as the pipeline caps reference images".into(),
        ),
        ("trigger", none()),
        (
            "default_caption",
            "none: an image without its caption is an error".into(),
        ),
        ("flip_x", "false".into()),
        (
            "caption_dropout",
            crate::train::flux2::DEFAULT_CAPTION_DROPOUT.to_string(),
        ),
        (
            "sigma_sampling",
            "weighted (the flux2-klein preset's)".into(),
        ),
        (
            "cache_dir",
            "$NIBBLE_CACHE_DIR, $XDG_CACHE_HOME/nibble or ~/.cache/nibble".into(),
        ),
        ("text_encoder", "the pipeline folder's".into()),
        ("vae", "the pipeline folder's".into()),
        ("no_cache", flag(false)),
    ]
}

/// When a run writes checkpoints (transformers' `save_strategy`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveStrategy {
    No,
    Steps,
    Epoch,
}

serde_as_value_enum!(SaveStrategy);

/// `command` (nibble train's) with each option's help ending in its default (`defaults_for_help`).
pub fn document_defaults(command: clap::Command) -> clap::Command {
    defaults_for_help()
        .into_iter()
        .fold(command, |command, (id, default)| {
            command.mut_arg(id, |arg| {
                let note = match default.as_str() {
                    "required" => " [required]".to_string(),
                    _ => format!(" [default: {default}]"),
                };
                let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
                // -h shows `help`; --help shows `long_help` where a doc comment has one.
                let long = arg.get_long_help().map(|h| format!("{h}{note}"));
                let arg = arg.help(format!("{help}{note}"));
                match long {
                    Some(long) => arg.long_help(long),
                    None => arg,
                }
            })
        })
}

/// `--config` files ending in .yaml or .yml are TRL's recipes (`trl sft --config`); others are TOML.
#[cfg(not(target_arch = "wasm32"))]
fn is_trl_recipe(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"))
}

impl TrainSettings {
    /// The flags over the `--config` file over the preset (named by either).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn layered(flags: TrainSettings) -> Result<TrainSettings> {
        let with_file = match flags.config.clone() {
            Some(path) => {
                let text = crate::fsutil::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
                let folder = path.parent().unwrap_or(Path::new(""));
                let file = if is_trl_recipe(&path) {
                    // Paths in TRL's recipes are read from where the command runs, as TRL reads them.
                    let recipe = crate::train::trl_config::read(&text, &path, &flags)?;
                    for note in &recipe.notes {
                        log::warn!("{}: {note}", path.display());
                    }
                    recipe.settings
                } else {
                    Self::parse_toml(&text, &path)?.paths_from(folder)
                };
                flags.over(file)?
            }
            None => flags,
        };
        with_file.with_preset()
    }

    /// Every file or folder the options name.
    #[cfg(not(target_arch = "wasm32"))]
    fn paths_mut(&mut self) -> Vec<&mut PathBuf> {
        [
            &mut self.sample_prompts,
            &mut self.chat_template,
            &mut self.model,
            &mut self.output,
            &mut self.init_adapter,
            &mut self.eval_data,
            &mut self.resume,
            &mut self.cache_dir,
            &mut self.text_encoder,
            &mut self.vae,
        ]
        .into_iter()
        .flatten()
        .chain(self.data.iter_mut().flatten())
        .chain(self.control.iter_mut().flatten())
        .collect()
    }

    /// The file and folder options given as relative paths read from `folder` (an options file's own
    /// folder, so that a file means the same wherever nibble is run from).
    #[cfg(not(target_arch = "wasm32"))]
    fn paths_from(mut self, folder: &Path) -> TrainSettings {
        for path in self.paths_mut() {
            if path.is_relative() {
                *path = folder.join(&*path);
            }
        }
        self
    }

    /// The run these options make, as an options file that `--config` takes back: the layered options
    /// with every training default filled in from `config` (what the run takes), paths made absolute (the
    /// file lives in the output folder), and nibble's version on top. Leaves out what only concerns this
    /// invocation (`--resume`, `--overwrite`, `--config`, the preset already applied).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn record(&self, config: &TrainConfig) -> Result<String> {
        let mut s = self.clone();
        (s.config, s.preset, s.resume, s.overwrite) = (None, None, None, None);
        s.lr = Some(config.lr);
        s.lr_scheduler = Some(config.schedule);
        s.lr_scheduler_kwargs =
            Some(config.schedule_kwargs.clone()).filter(|kwargs| !kwargs.is_empty());
        s.adam_beta1 = Some(config.adam_beta1);
        s.adam_beta2 = Some(config.adam_beta2);
        s.adam_epsilon = Some(config.adam_epsilon);
        s.warmup_steps = Some(config.warmup_steps as f64);
        s.warmup_ratio = Some(config.warmup_ratio);
        s.weight_decay = Some(config.weight_decay);
        s.max_grad_norm = Some(config.max_grad_norm);
        s.epochs = Some(config.epochs);
        s.max_steps = config.max_steps;
        s.batch_size = Some(config.batch_size);
        s.grad_accum = Some(config.grad_accum);
        s.lora_r = Some(config.lora.r);
        s.lora_alpha = Some(config.lora.alpha);
        // The f32 probability as its shortest decimal (0.05, not 0.05000000074505806).
        s.lora_dropout = config.lora.dropout.to_string().parse().ok();
        s.use_rslora = Some(config.lora.use_rslora);
        s.use_dora = Some(config.lora.use_dora);
        s.target_modules = Some(config.lora.targets.join(","));
        s.target_parameters =
            Some(config.lora.target_parameters.join(",")).filter(|p| !p.is_empty());
        s.lora_rank_pattern = Some(config.lora.rank_pattern.clone()).filter(|p| !p.is_empty());
        s.lora_alpha_pattern = Some(config.lora.alpha_pattern.clone()).filter(|p| !p.is_empty());
        s.max_length = Some(config.max_length);
        s.truncation_mode = Some(config.truncation);
        s.dataset_text_field = Some(config.text_field.clone());
        s.seed = Some(config.seed);
        s.no_shuffle = Some(!config.shuffle);
        s.loss_on = Some(config.loss_on);
        s.loss_type = Some(config.loss_type);
        s.neftune_noise_alpha = config.neftune_noise_alpha;
        s.precision = Some(self.precision.unwrap_or_default());
        let here = std::env::current_dir().map_err(|e| Error::io(".", e))?;
        for path in s.paths_mut() {
            *path = std::fs::canonicalize(&*path).unwrap_or_else(|_| here.join(&*path));
        }
        let body = toml::to_string(&s)
            .map_err(|e| Error::Invalid(format!("writing the options down: {e}")))?;
        Ok(format!(
            "{RECORD_HEADER} {} took them (defaults filled in).\n{RECORD_REPEATS}{body}",
            env!("CARGO_PKG_VERSION")
        ))
    }

    /// These options over the preset they name, if any.
    pub fn with_preset(self) -> Result<TrainSettings> {
        match self.preset.clone() {
            Some(name) => self.over(Self::preset(&name)?),
            None => Ok(self),
        }
    }

    /// A preset's options.
    pub fn preset(name: &str) -> Result<TrainSettings> {
        let (_, text) = PRESETS.iter().find(|(n, _)| *n == name).ok_or_else(|| {
            let known: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
            Error::Invalid(format!(
                "unknown preset `{name}` (known: {})",
                known.join(", ")
            ))
        })?;
        Self::parse_toml(text, Path::new(&format!("preset {name}")))
    }

    /// Options from TOML text; errors name `origin` and the line.
    pub fn parse_toml(text: &str, origin: &Path) -> Result<TrainSettings> {
        toml::from_str(text).map_err(|e| {
            let mut msg = e.to_string();
            if msg.contains("duplicate field") {
                msg.push_str(
                    "\n(an option and its transformers or TRL name, such as lr and learning_rate, are one option: give it once)",
                );
            }
            Error::Config {
                path: origin.to_path_buf(),
                msg,
            }
        })
    }

    /// Options from the browser page's JSON object.
    pub fn parse_json(text: &str) -> Result<TrainSettings> {
        if text.trim().is_empty() {
            return Ok(TrainSettings::default());
        }
        serde_json::from_str(text).map_err(|e| Error::Invalid(format!("options: {e}")))
    }

    /// Each option set here, else `lower`'s. Works on the serialized form (TOML, which keeps NaN and
    /// infinities for the range checks to refuse) so that no field list is repeated here.
    pub fn over(self, lower: TrainSettings) -> Result<TrainSettings> {
        let config = self.config.clone().or(lower.config.clone());
        let as_table = |s: &TrainSettings| {
            toml::Table::try_from(s).map_err(|e| {
                Error::Invalid(format!(
                    "options: {e} (whole numbers go up to 9223372036854775807 here)"
                ))
            })
        };
        let mut merged = as_table(&lower)?;
        merged.extend(as_table(&self)?);
        let mut out: TrainSettings = merged
            .try_into()
            .map_err(|e| Error::Invalid(format!("merging options: {e}")))?;
        out.config = config;
        Ok(out)
    }

    /// The options set here that a browser page cannot use: those naming files or folders, and those
    /// fixed when its session opened (the model's storage, the device), and offloading (WebGPU cannot).
    pub fn outside_the_page(&self) -> Vec<&'static str> {
        let named = [
            ("model", self.model.is_some()),
            ("data", self.data.is_some()),
            ("output", self.output.is_some()),
            ("init_adapter", self.init_adapter.is_some()),
            // Named by the model's tokenizer, which the page's runs read after their options.
            ("trainable_tokens", self.trainable_tokens.is_some()),
            ("eval_data", self.eval_data.is_some()),
            ("sample_prompts", self.sample_prompts.is_some()),
            ("chat_template", self.chat_template.is_some()),
            ("resume", self.resume.is_some()),
            ("save_steps", self.save_steps.is_some()),
            ("save_strategy", self.save_strategy.is_some()),
            ("save_total_limit", self.save_total_limit.is_some()),
            ("overwrite", self.overwrite.is_some()),
            ("quant", self.quant.is_some()),
            ("group_size", self.group_size.is_some()),
            ("device", self.device.is_some()),
            ("gpu_memory", self.gpu_memory.is_some()),
            // WebGPU has no buffers the device copies to host memory.
            ("offload_checkpoints", self.offload_checkpoints.is_some()),
        ];
        named
            .into_iter()
            .chain(self.image_options())
            .filter(|(_, set)| *set)
            .map(|(n, _)| n)
            .collect()
    }

    /// The FLUX.2 options that were given (by their names in option files).
    pub fn image_options(&self) -> Vec<(&'static str, bool)> {
        vec![
            ("resolution", self.resolution.is_some()),
            ("control", self.control.is_some()),
            ("control_resolution", self.control_resolution.is_some()),
            ("trigger", self.trigger.is_some()),
            ("default_caption", self.default_caption.is_some()),
            ("flip_x", self.flip_x.is_some()),
            ("caption_dropout", self.caption_dropout.is_some()),
            ("sigma_sampling", self.sigma_sampling.is_some()),
            ("cache_dir", self.cache_dir.is_some()),
            ("no_cache", self.no_cache.is_some()),
            ("text_encoder", self.text_encoder.is_some()),
            ("vae", self.vae.is_some()),
        ]
    }

    pub fn quant_request(&self) -> Result<Option<QuantRequest>> {
        QuantRequest::from_options(self.quant, self.group_size)
    }

    /// The training configuration: each option given, else the trainer's default.
    pub fn train_config(&self) -> Result<TrainConfig> {
        let d = TrainConfig::default();
        let lora = LoraConfig {
            r: self.lora_r.unwrap_or(d.lora.r),
            alpha: self.lora_alpha.unwrap_or(d.lora.alpha),
            dropout: self.lora_dropout.map_or(d.lora.dropout, |p| p as f32),
            use_rslora: self.use_rslora.unwrap_or(d.lora.use_rslora),
            use_dora: self.use_dora.unwrap_or(d.lora.use_dora),
            targets: match &self.target_modules {
                Some(list) => parse_targets(list)?,
                None => d.lora.targets,
            },
            target_parameters: parse_target_parameters(self.target_parameters.as_deref())?,
            rank_pattern: self.lora_rank_pattern.clone().unwrap_or_default(),
            alpha_pattern: self.lora_alpha_pattern.clone().unwrap_or_default(),
        };
        if let Some((key, _)) = lora
            .rank_pattern
            .entries()
            .find(|&(_, r)| !(1..=MAX_RANK).contains(&r))
        {
            return Err(Error::Invalid(format!(
                "--lora-rank-pattern: `{key}`: ranks must be from 1 to {MAX_RANK}"
            )));
        }
        // As --lora-alpha: an alpha of 0 would train a branch that changes nothing.
        if let Some((key, a)) = lora
            .alpha_pattern
            .entries()
            .find(|&(_, a)| !(a.is_finite() && a > 0.0))
        {
            return Err(Error::Invalid(format!(
                "--lora-alpha-pattern: `{key}`: alphas must be finite numbers > 0 (got {a})"
            )));
        }
        use crate::graph::checkpoint::Asked;
        let (checkpoint, checkpoints) = match self.checkpointing()? {
            Asked::Fixed { checkpoint, keep } => (checkpoint, keep),
            Asked::Fit { .. } => (d.checkpoint, d.checkpoints),
        };
        // transformers 5 takes a fraction of the steps as warmup_steps below 1 (and whole steps,
        // rounded down, from 1 up), in place of warmup_ratio.
        let (warmup_steps, warmup_ratio) = match (self.warmup_steps, self.warmup_ratio) {
            (Some(v), _) if !(v.is_finite() && v >= 0.0) => {
                return Err(Error::Invalid(format!(
                    "--warmup-steps must be a finite number >= 0: steps, or a fraction of them below 1 (got {v})"
                )));
            }
            (Some(v), ratio) if v >= 1.0 || v == 0.0 => {
                (v as usize, ratio.unwrap_or(d.warmup_ratio))
            }
            (Some(fraction), _) => (0, fraction),
            (None, ratio) => (d.warmup_steps, ratio.unwrap_or(d.warmup_ratio)),
        };
        let config = TrainConfig {
            lora,
            lr: self.lr.unwrap_or(d.lr),
            weight_decay: self.weight_decay.unwrap_or(d.weight_decay),
            max_grad_norm: self.max_grad_norm.unwrap_or(d.max_grad_norm),
            schedule: self.lr_scheduler.unwrap_or(d.schedule),
            schedule_kwargs: self.lr_scheduler_kwargs.clone().unwrap_or_default(),
            adam_beta1: self.adam_beta1.unwrap_or(d.adam_beta1),
            adam_beta2: self.adam_beta2.unwrap_or(d.adam_beta2),
            adam_epsilon: self.adam_epsilon.unwrap_or(d.adam_epsilon),
            warmup_steps,
            warmup_ratio,
            epochs: self.epochs.unwrap_or(d.epochs),
            max_steps: self.max_steps.or(d.max_steps),
            batch_size: self.batch_size.unwrap_or(d.batch_size),
            grad_accum: self.grad_accum.unwrap_or(d.grad_accum),
            max_length: self.max_length.unwrap_or(d.max_length),
            truncation: self.truncation_mode.unwrap_or(d.truncation),
            text_field: self.dataset_text_field.clone().unwrap_or(d.text_field),
            seed: self.seed.unwrap_or(d.seed),
            shuffle: self.no_shuffle.map_or(d.shuffle, |no| !no),
            loss_on: self.loss_on.unwrap_or(d.loss_on),
            loss_type: self.loss_type.unwrap_or(d.loss_type),
            neftune_noise_alpha: self.neftune_noise_alpha.or(d.neftune_noise_alpha),
            // Resolved by the model's tokenizer once it is read (`RunOptions::trainable_tokens`).
            trainable_tokens: Vec::new(),
            checkpoint,
            checkpoints,
            precision: self.precision.unwrap_or_default().cpu(),
        };
        check_ranges(&config)?;
        if let Some(alpha) = config.neftune_noise_alpha
            && !(alpha.is_finite() && alpha > 0.0)
        {
            return Err(Error::Invalid(format!(
                "--neftune-noise-alpha must be a finite number > 0 (got {alpha})"
            )));
        }
        config.schedule.check(&config.schedule_kwargs, config.lr)?;
        if config.constant_drops_warmup() {
            log::warn!(
                "--lr-scheduler constant keeps the peak rate from the first step, as transformers' constant does: \
                 the warmup asked for does not apply (constant_with_warmup warms up)"
            );
        }
        Ok(config)
    }

    /// The checkpointing the flags ask for, or how far nibble may go choosing it.
    fn checkpointing(&self) -> Result<crate::graph::checkpoint::Asked> {
        crate::graph::checkpoint::Keep::from_flags(
            self.gradient_checkpointing,
            self.bf16_checkpoints,
            self.offload_checkpoints,
        )
        .map_err(Error::Invalid)
    }

    /// What the run does beyond the training configuration.
    pub fn run_options(&self) -> Result<RunOptions> {
        if self.eval_data.is_some() && self.eval_split.is_some() {
            return Err(Error::Invalid(
                "give --eval-data or --eval-split, not both".into(),
            ));
        }
        if let Some(f) = self.eval_split
            && !(f > 0.0 && f < 1.0)
        {
            return Err(Error::Invalid(format!(
                "--eval-split must lie strictly between 0 and 1 (got {f})"
            )));
        }
        if self.packing_strategy.is_some() && self.packing != Some(true) {
            return Err(Error::Invalid(
                "--packing-strategy says how --packing packs: give --packing too".into(),
            ));
        }
        if self.packing == Some(true)
            && self.truncation_mode == Some(crate::train::Truncation::KeepEnd)
        {
            return Err(Error::Invalid(
                "--truncation-mode keep_end does not apply with --packing: packing keeps each example's start (as TRL's does)"
                    .into(),
            ));
        }
        let (save_steps, save_each_epoch) = match (self.save_strategy, self.save_steps) {
            (None, steps) => (steps.unwrap_or(0), false),
            (Some(SaveStrategy::Steps), Some(n)) if n > 0 => (n, false),
            (Some(SaveStrategy::Steps), _) => {
                return Err(Error::Invalid(
                    "--save-strategy steps writes a checkpoint every --save-steps N: give N".into(),
                ));
            }
            (Some(strategy), Some(n)) if n > 0 && strategy != SaveStrategy::Steps => {
                // As transformers does: its configs carry save_steps whatever the strategy.
                log::warn!(
                    "--save-steps {n} does not apply to --save-strategy {}: ignored",
                    value_name(strategy)
                );
                (0, strategy == SaveStrategy::Epoch)
            }
            (Some(SaveStrategy::Epoch), _) => (0, true),
            (Some(SaveStrategy::No), _) => (0, false),
        };
        if self.save_total_limit.is_some() && save_steps == 0 && !save_each_epoch {
            // transformers ignores it alike, where a recipe keeps it beside save_strategy: no.
            log::warn!(
                "--save-total-limit keeps the newest checkpoints, and this run writes none (give \
                 --save-steps or --save-strategy epoch): ignored"
            );
        }
        Ok(RunOptions {
            overwrite: self.overwrite.unwrap_or(false),
            save_steps,
            save_each_epoch,
            // The command line adds it (`record`); other callers write none.
            record: None,
            save_total_limit: match self.save_total_limit {
                Some(0) => {
                    return Err(Error::Invalid(
                        "--save-total-limit must be at least 1 (the newest checkpoint is always kept)"
                            .into(),
                    ));
                }
                limit => limit,
            },
            resume: self.resume.clone(),
            init_adapter: self.init_adapter.clone(),
            init_lora: self.init_lora_weights.unwrap_or_default(),
            initial: None,
            eval_data: self.eval_data.clone(),
            eval_split: self.eval_split,
            eval_steps: match self.eval_steps {
                Some(_) if self.eval_data.is_none() && self.eval_split.is_none() => {
                    return Err(Error::Invalid(
                        "--eval-steps says when to validate: give --eval-data or --eval-split too"
                            .into(),
                    ));
                }
                steps => steps.unwrap_or(0),
            },
            trainable_tokens: self.trainable_tokens.clone(),
            eval_on_start: match self.eval_on_start {
                Some(true) if self.eval_data.is_none() && self.eval_split.is_none() => {
                    return Err(Error::Invalid(
                        "--eval-on-start validates before the first step: give --eval-data or \
                         --eval-split too"
                            .into(),
                    ));
                }
                on => on.unwrap_or(false),
            },
            early_stopping_patience: match self.early_stopping_patience {
                Some(0) => {
                    return Err(Error::Invalid(
                        "--early-stopping-patience must be at least 1 (validations without improvement)"
                            .into(),
                    ));
                }
                Some(_) if self.eval_data.is_none() && self.eval_split.is_none() => {
                    return Err(Error::Invalid(
                        "--early-stopping-patience watches the validation loss: give --eval-data or --eval-split"
                            .into(),
                    ));
                }
                patience => patience,
            },
            sample_prompts: match &self.sample_prompts {
                Some(path) => read_prompts(path)?,
                None if self.sample_steps.is_some() => {
                    return Err(Error::Invalid(
                        "--sample-steps says when to answer --sample-prompts: give that file too"
                            .into(),
                    ));
                }
                None => Vec::new(),
            },
            sample_steps: self.sample_steps.unwrap_or(0),
            chat_template: self
                .chat_template
                .as_deref()
                .map(crate::tokenizer::TemplateChoice::read)
                .transpose()?,
            eos_token: self.eos_token.clone(),
            packing: self.packing.unwrap_or(false),
            packing_strategy: self.packing_strategy.unwrap_or_default(),
            fit_checkpointing: match self.checkpointing()? {
                crate::graph::checkpoint::Asked::Fit { most } => Some(most),
                crate::graph::checkpoint::Asked::Fixed { .. } => None,
            },
            gpu_memory: self
                .gpu_memory
                .as_deref()
                .map(|text| crate::alloc::parse_size(text, "--gpu-memory"))
                .transpose()?,
        })
    }
}

/// `--sample-prompts`: a prompt per non-empty line, or a JSON object with a `prompt` per line,
/// `{"prompt": TEXT, "control": IMAGE or [IMAGES]}`, naming the control images (relative to the
/// file) an image run draws that prompt's sample from; any other line, JSON or not, is a prompt as
/// it is.
fn read_prompts(path: &Path) -> Result<Vec<crate::train::run::SamplePrompt>> {
    use crate::train::run::SamplePrompt;
    use serde_json::Value;
    let text = crate::fsutil::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        let bad = |why: String| Error::Invalid(format!("{} line {}: {why}", path.display(), i + 1));
        let object = match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(object)) if object.contains_key("prompt") => object,
            _ if line.is_empty() => continue,
            _ => {
                prompts.push(SamplePrompt {
                    text: line.to_string(),
                    control: None,
                });
                continue;
            }
        };
        if let Some(key) = object
            .keys()
            .find(|k| !["prompt", "control"].contains(&k.as_str()))
        {
            return Err(bad(format!(
                "unknown key `{key}` (a sample is {{\"prompt\": TEXT, \"control\": IMAGE or \
                 [IMAGES]}})"
            )));
        }
        let text = object
            .get("prompt")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("a sample's `prompt` is missing or not text".into()))?;
        let names = match object.get("control") {
            None => None,
            Some(Value::String(one)) => Some(vec![one.as_str()]),
            Some(Value::Array(many)) => Some(
                many.iter()
                    .map(|v| v.as_str())
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| bad("`control` holds something other than file names".into()))?,
            ),
            Some(_) => return Err(bad("`control` is a file name or a list of them".into())),
        };
        let control = names
            .map(|names| {
                names
                    .into_iter()
                    .map(|name| {
                        let image = base.join(name);
                        match image.is_file() {
                            true => Ok(image),
                            false => Err(bad(format!("no control image {}", image.display()))),
                        }
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .transpose()?;
        prompts.push(SamplePrompt {
            text: text.to_string(),
            control,
        });
    }
    if prompts.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no prompts (one per line)",
            path.display()
        )));
    }
    Ok(prompts)
}

pub use crate::lora::MAX_RANK;

/// The longest sequence, in tokens.
pub const MAX_TOKENS: usize = 1 << 24;

/// Each numeric option inside its valid range (NaN never is), with the range in the message: nonsense
/// would otherwise train quietly or land in adapter_config.json, which PEFT then cannot load.
fn check_ranges(config: &TrainConfig) -> Result<()> {
    let positive = |v: f64| v.is_finite() && v > 0.0;
    let non_negative = |v: f64| v.is_finite() && v >= 0.0;
    let fraction = |v: f64| (0.0..1.0).contains(&v);
    let checks = [
        (
            "--lr",
            config.lr,
            non_negative(config.lr),
            "a finite number >= 0",
        ),
        (
            "--weight-decay",
            config.weight_decay,
            non_negative(config.weight_decay),
            "a finite number >= 0",
        ),
        (
            "--adam-beta1",
            config.adam_beta1,
            fraction(config.adam_beta1),
            "in [0, 1)",
        ),
        (
            "--adam-beta2",
            config.adam_beta2,
            fraction(config.adam_beta2),
            "in [0, 1)",
        ),
        (
            "--adam-epsilon",
            config.adam_epsilon,
            non_negative(config.adam_epsilon),
            "a finite number >= 0",
        ),
        (
            // 0 turns clipping off, as in transformers.
            "--max-grad-norm",
            config.max_grad_norm,
            non_negative(config.max_grad_norm),
            "a finite number >= 0",
        ),
        (
            "--warmup-ratio",
            config.warmup_ratio,
            fraction(config.warmup_ratio),
            "in [0, 1)",
        ),
        (
            "--lora-alpha",
            config.lora.alpha,
            positive(config.lora.alpha),
            "a finite number > 0",
        ),
        (
            "--lora-dropout",
            f64::from(config.lora.dropout),
            fraction(f64::from(config.lora.dropout)),
            "in [0, 1)",
        ),
        (
            "--lora-r",
            config.lora.r as f64,
            (1..=MAX_RANK).contains(&config.lora.r),
            "a whole number from 1 to 65536",
        ),
        (
            "--epochs",
            config.epochs,
            config.epochs > 0.0 && config.epochs.is_finite(),
            "a number > 0 (0.5: half an epoch)",
        ),
        (
            "--max-steps",
            config.max_steps.unwrap_or(1) as f64,
            config.max_steps != Some(0),
            "a whole number >= 1",
        ),
        (
            "--batch-size",
            config.batch_size as f64,
            config.batch_size > 0,
            "a whole number >= 1",
        ),
        (
            "--grad-accum",
            config.grad_accum as f64,
            config.grad_accum > 0,
            "a whole number >= 1",
        ),
        (
            "--max-length",
            config.max_length as f64,
            (2..=MAX_TOKENS).contains(&config.max_length),
            "a whole number from 2 to 16777216",
        ),
    ];
    match checks.iter().find(|(_, _, ok, _)| !ok) {
        Some((flag, value, _, range)) => Err(Error::Invalid(format!(
            "{flag} must be {range} (got {value})"
        ))),
        None => Ok(()),
    }
}

/// `--target-modules`: PEFT's `target_modules`, comma-separated (module names such as q_proj, longer path
/// suffixes, or all-linear); checked against the model when the adapter is made.
pub fn parse_targets(list: &str) -> Result<Vec<String>> {
    parse_names(list, "--target-modules", "q_proj,v_proj or all-linear")
}

/// `--target-parameters`: PEFT's `target_parameters`, comma-separated; an empty list (TRL's
/// `lora_target_parameters: []`) names none, as one left out.
pub fn parse_target_parameters(list: Option<&str>) -> Result<Vec<String>> {
    match list {
        Some(list) if !list.trim().is_empty() => {
            parse_names(list, "--target-parameters", "gate_up_proj,down_proj")
        }
        _ => Ok(Vec::new()),
    }
}

/// Comma-separated names; none is an error naming `option` and an `example`.
fn parse_names(list: &str, option: &str, example: &str) -> Result<Vec<String>> {
    let names: Vec<String> = list
        .split(',')
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .collect();
    if names.is_empty() {
        return Err(Error::Invalid(format!(
            "{option} names nothing (e.g. {example})"
        )));
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Args;

    /// Every option of `nibble train` has a default in `defaults_for_help` and no entry there names
    /// an option that does not exist (clap's `mut_arg` would panic on it at every start).
    #[test]
    fn every_train_option_has_a_stated_default() {
        let command = TrainSettings::augment_args(clap::Command::new("train"));
        let options: Vec<String> = command
            .get_arguments()
            .map(|a| a.get_id().to_string())
            .filter(|id| id != "help")
            .collect();
        let documented: Vec<&str> = defaults_for_help().iter().map(|(id, _)| *id).collect();
        for id in &options {
            assert!(
                documented.contains(&id.as_str()),
                "--{id} has no default in defaults_for_help"
            );
        }
        for id in &documented {
            assert!(
                options.iter().any(|o| o == id),
                "defaults_for_help names --{id}, which does not exist"
            );
        }
        let command = document_defaults(command);
        for arg in command.get_arguments().filter(|a| a.get_id() != "help") {
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            let (text, default) = help
                .rsplit_once(" [")
                .unwrap_or_else(|| panic!("--{}: {help}", arg.get_id()));
            assert!(
                !text.trim().is_empty(),
                "--{} has no description",
                arg.get_id()
            );
            assert!(
                default.starts_with("default: ") || default == "required]",
                "--{}: {help}",
                arg.get_id()
            );
        }
    }

    /// The defaults the help states are the ones a run with no options takes.
    #[test]
    fn stated_defaults_are_the_ones_runs_take() {
        let given = TrainSettings::default().train_config().unwrap();
        let stated: std::collections::HashMap<&str, String> =
            defaults_for_help().into_iter().collect();
        for (id, value) in [
            ("lr", given.lr.to_string()),
            ("epochs", given.epochs.to_string()),
            ("batch_size", given.batch_size.to_string()),
            ("grad_accum", given.grad_accum.to_string()),
            ("lora_r", given.lora.r.to_string()),
            ("lora_alpha", given.lora.alpha.to_string()),
            ("lora_dropout", given.lora.dropout.to_string()),
            ("max_length", given.max_length.to_string()),
            ("seed", given.seed.to_string()),
            ("max_grad_norm", given.max_grad_norm.to_string()),
            ("weight_decay", given.weight_decay.to_string()),
            ("target_modules", given.lora.targets.join(",")),
        ] {
            assert_eq!(stated[id], value, "--{id}");
        }
        // The issue's numbers: lr 2e-4, one epoch, batch 1, no accumulation, 1024 tokens, seed 42.
        assert_eq!(
            [
                "lr",
                "epochs",
                "batch_size",
                "grad_accum",
                "max_length",
                "seed"
            ]
            .map(|id| stated[id].as_str()),
            ["0.0002", "1", "1", "1", "1024", "42"]
        );
        let quant = TrainSettings::default().quant_request().unwrap();
        assert!(
            quant.is_none(),
            "no --quant: the source decides (nf4 for a folder)"
        );
        let none_kept = TrainSettings {
            save_total_limit: Some(0),
            ..Default::default()
        };
        let e = none_kept.run_options().unwrap_err().to_string();
        assert!(e.contains("--save-total-limit must be at least 1"), "{e}");
        // Early stopping watches a validation loss; samples need their prompts.
        for (settings, says) in [
            (
                TrainSettings {
                    early_stopping_patience: Some(2),
                    ..Default::default()
                },
                "give --eval-data or --eval-split",
            ),
            (
                TrainSettings {
                    eval_steps: Some(5),
                    ..Default::default()
                },
                "--eval-steps says when to validate: give --eval-data or --eval-split too",
            ),
            (
                TrainSettings {
                    early_stopping_patience: Some(0),
                    eval_split: Some(0.2),
                    ..Default::default()
                },
                "--early-stopping-patience must be at least 1",
            ),
            (
                TrainSettings {
                    sample_steps: Some(5),
                    ..Default::default()
                },
                "give that file too",
            ),
        ] {
            let e = settings.run_options().unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
    }

    /// `--sample-prompts`: plain lines are prompts as they are, JSON among them; a JSON object
    /// with a `prompt` is a sample, its control images read from the file's folder.
    #[test]
    fn sample_prompts_are_lines_or_samples() {
        use crate::train::run::SamplePrompt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("street.png"), b"read later").unwrap();
        let file = dir.path().join("prompts.txt");
        std::fs::write(
            &file,
            "a fox\n\n{\"name\": \"Bob\"}\n{\"prompt\": \"make it night\", \"control\": \
             \"street.png\"}\n{\"prompt\": \"a tree\", \"control\": []}\n",
        )
        .unwrap();
        let plain = |text: &str| SamplePrompt {
            text: text.into(),
            control: None,
        };
        assert_eq!(
            read_prompts(&file).unwrap(),
            [
                plain("a fox"),
                plain("{\"name\": \"Bob\"}"),
                SamplePrompt {
                    text: "make it night".into(),
                    control: Some(vec![dir.path().join("street.png")]),
                },
                SamplePrompt {
                    text: "a tree".into(),
                    control: Some(Vec::new()),
                },
            ]
        );
    }

    /// `resolution` in an options file: one number (the preset's, as written before lists) or a
    /// list, as ai-toolkit's configs give it; written back as it was given.
    #[test]
    fn resolution_is_one_number_or_a_list() {
        let dir = tempfile::tempdir().unwrap();
        for (text, want) in [
            ("resolution = 768\n", vec![768]),
            ("resolution = [512, 768, 1024]\n", vec![512, 768, 1024]),
        ] {
            let file = dir.path().join("run.toml");
            std::fs::write(&file, text).unwrap();
            let flags = TrainSettings {
                config: Some(file),
                ..Default::default()
            };
            let s = TrainSettings::layered(flags).unwrap();
            assert_eq!(s.resolution.as_deref(), Some(&want[..]), "{text}");
            let written = serde_json::to_value(&s).unwrap();
            let given = text[13..].trim().replace(' ', "");
            assert_eq!(written["resolution"].to_string(), given, "{text}");
        }
        let file = dir.path().join("run.toml");
        std::fs::write(&file, "resolution = \"512\"\n").unwrap();
        let flags = TrainSettings {
            config: Some(file),
            ..Default::default()
        };
        let e = TrainSettings::layered(flags).unwrap_err().to_string();
        assert!(e.contains("a number of pixels"), "{e}");
        let preset = TrainSettings::preset("flux2-klein").unwrap();
        assert_eq!(preset.resolution, Some(vec![512]));
    }

    /// Relative paths in an options file are read from the file's folder; flags' from where nibble
    /// runs; absolute ones stay (issue 19).
    #[test]
    fn an_options_file_reads_its_paths_from_its_own_folder() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("recipes");
        std::fs::create_dir_all(&folder).unwrap();
        let file = folder.join("run.toml");
        std::fs::write(
            &file,
            "model = \"../models/m\"\ndata = \"chats.jsonl\"\noutput = \"/abs/out\"\n\
             control = [\"before\", \"/abs/masks\"]\n",
        )
        .unwrap();
        let flags = TrainSettings {
            config: Some(file),
            eval_data: Some(PathBuf::from("held.jsonl")),
            ..Default::default()
        };
        let s = TrainSettings::layered(flags).unwrap();
        assert_eq!(s.model, Some(folder.join("../models/m")));
        assert_eq!(s.data, Some(vec![folder.join("chats.jsonl")]));
        assert_eq!(s.output, Some(PathBuf::from("/abs/out")));
        assert_eq!(s.eval_data, Some(PathBuf::from("held.jsonl")));
        assert_eq!(
            s.control,
            Some(vec![folder.join("before"), PathBuf::from("/abs/masks")])
        );
    }
}
