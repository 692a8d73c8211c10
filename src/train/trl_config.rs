//! TRL's recipe files: what `trl sft --config recipe.yaml` runs, read as nibble's options.
//!
//! A TRL recipe is a YAML mapping of the options of TRL's `sft` script (its ScriptArguments, SFTConfig
//! with transformers' TrainingArguments, ModelConfig and DatasetMixtureConfig), every option left out
//! at TRL's default. So the recipe means TRL's defaults where it is silent (a learning rate of 2e-5,
//! batches of 8, three epochs, r 16 / alpha 32 on PEFT's default modules for the model type, a
//! checkpoint every 500 steps), not nibble's. Each option is either taken (nibble has it: by TRL's
//! name or nibble's own), ignored with a note (it changes nothing nibble computes or writes: logging,
//! the Hub, dtypes of a GPU run), or refused by name (nibble would train something else than TRL).
//! An option neither TRL nor nibble knows is refused too, as `trl sft` refuses it.
//! `src/train/trl_fields.json` lists TRL's options, their defaults and types, written by
//! `scripts/make_trl_config_fixture.py` from the TRL it names.

use crate::error::{Error, Result};
use crate::train::settings::TrainSettings;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use yaml_rust2::Yaml;

/// A recipe read: the options it sets (a file layer, below the command line's flags) and what the
/// reader should be told about it.
pub struct Recipe {
    pub settings: TrainSettings,
    pub notes: Vec<String>,
    /// Where the options came from (the recipe file, or `nibble sft`), and nibble's flag for each
    /// option the recipe names otherwise (`--lr`, `learning_rate`): what an error about the flag
    /// should name.
    pub origin: String,
    pub named: Vec<(String, String)>,
}

impl Recipe {
    /// Where `message`, an error about one of nibble's flags, came from in the recipe: "recipe.yaml:
    /// `learning_rate` (nibble's --lr)", for the flag it names; None where it names none of them.
    pub fn where_named(&self, message: &str) -> Option<String> {
        // Where the message first names the flag (an error about one option may name another as
        // advice after it).
        let first_named = |flag: &str| {
            message.match_indices(flag).map(|(at, _)| at).find(|&at| {
                let next = message[at + flag.len()..].chars().next();
                !next.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            })
        };
        let (_, flag, key) = self
            .named
            .iter()
            .filter_map(|(flag, key)| Some((first_named(flag)?, flag, key)))
            .min()?;
        Some(format!("{}: `{key}` (nibble's {flag})", self.origin))
    }
}

/// TRL's options that change nothing nibble computes or writes: their values are ignored (with a
/// note where one differs from TRL's default).
const WITHOUT_EFFECT: &[&str] = &[
    "accelerator_config",
    "activation_checkpointing_kwargs",
    "activation_offloading",
    "attn_implementation",
    "auto_find_batch_size",
    "average_tokens_across_devices",
    "batch_eval_metrics",
    "bf16",
    "bf16_full_eval",
    "bnb_4bit_quant_storage",
    "dataloader_in_order",
    "dataloader_multiprocessing_context",
    "dataloader_num_workers",
    "dataloader_persistent_workers",
    "dataloader_pin_memory",
    "dataloader_prefetch_factor",
    "dataset_num_proc",
    "ddp_backend",
    "ddp_broadcast_buffers",
    "ddp_bucket_cap_mb",
    "ddp_find_unused_parameters",
    "ddp_static_graph",
    "ddp_timeout",
    "debug",
    "deepspeed",
    "disable_tqdm",
    "do_eval",
    "do_predict",
    "do_train",
    "dtype",
    "enable_jit_checkpoint",
    "eval_accumulation_steps",
    "eval_delay",
    "eval_do_concat_batches",
    "eval_packing",
    "eval_use_gather_object",
    "fp16",
    "fp16_full_eval",
    "fsdp",
    "fsdp_config",
    "full_determinism",
    "gradient_checkpointing_kwargs",
    "greater_is_better",
    "hub_always_push",
    "hub_model_id",
    "hub_private_repo",
    "hub_revision",
    "hub_strategy",
    "hub_token",
    "ignore_bias_buffers",
    "include_for_metrics",
    "include_num_input_tokens_seen",
    "label_names",
    "length_column_name",
    "liger_kernel_config",
    "local_rank",
    "log_level",
    "log_level_replica",
    "log_on_each_node",
    "logging_first_step",
    "logging_nan_inf_filter",
    "logging_strategy",
    "metric_for_best_model",
    "model_revision",
    "pad_to_multiple_of",
    "pad_token",
    "padding_free",
    "parallelism_config",
    "per_device_eval_batch_size",
    "prediction_loss_only",
    "project",
    "push_to_hub",
    "remove_unused_columns",
    "report_to",
    "restore_callback_states_from_checkpoint",
    "router_aux_loss_coef",
    "run_name",
    "save_on_each_node",
    "save_only_model",
    "skip_memory_metrics",
    "tf32",
    "torch_compile",
    "torch_compile_backend",
    "torch_compile_mode",
    "torch_empty_cache_steps",
    "trackio_bucket_id",
    "trackio_space_id",
    "trackio_static_space_id",
    "trust_remote_code",
    "use_cache",
    "use_cpu",
    "use_liger_kernel",
];

/// Names older TRL and transformers releases gave options, as recipes written for them still spell
/// them: the name each now has (None: an option without effect here).
const OLDER_NAMES: &[(&str, Option<&str>)] = &[
    ("torch_dtype", None),
    ("evaluation_strategy", Some("eval_strategy")),
    ("gradient_checkpointing_use_reentrant", None),
    ("use_mps_device", None),
];

/// `trl sft`'s own launcher options (accelerate's), which it takes beside the training's: those that
/// change nothing for one process on one device.
const LAUNCHER: &[&str] = &[
    "accelerate_config",
    "dynamo_backend",
    "gpu_ids",
    "machine_rank",
    "main_process_ip",
    "main_process_port",
    "mixed_precision",
    "num_machines",
];

/// Options of TRL that nibble reads in a way of their own (rather than as one of its options by the
/// same name, or not at all).
const READ_APART: &[&str] = &[
    "activation_checkpointing",
    "assistant_only_loss",
    "bnb_4bit_quant_type",
    "completion_only_loss",
    "data_seed",
    "dataset_test_split",
    "dataset_train_split",
    "datasets",
    "env",
    "eval_steps",
    "eval_strategy",
    "load_in_4bit",
    "load_in_8bit",
    "logging_steps",
    "loss_type",
    "lora_modules_to_save",
    "lora_target_modules",
    "lora_task_type",
    "lr_scheduler_kwargs",
    "max_steps",
    "model_init_kwargs",
    "num_train_epochs",
    "optim",
    "overwrite_output_dir",
    "max_length",
    "packing_strategy",
    "resume_from_checkpoint",
    "shuffle_dataset",
    "test_split_size",
    "train_sampling_strategy",
    "truncation_mode",
    "use_bnb_nested_quant",
    "use_peft",
];

/// TRL's options whose defaults differ from nibble's, taken where a recipe leaves them out (with
/// `num_train_epochs` and `lora_target_modules`, read apart). Every other option of TRL that nibble
/// has defaults to what nibble's does (a test holds the two tables to that), except these, which
/// nibble leaves to itself: `gradient_checkpointing` (TRL's default is on; it changes how a step is
/// computed, not what, and nibble turns it on where a step would not fit) and `output_dir`.
const TRL_DEFAULTS_TAKEN: &[&str] = &[
    "learning_rate",
    "per_device_train_batch_size",
    "lora_r",
    "lora_alpha",
    "save_strategy",
    "save_steps",
];
pub const DEFAULTS_LEFT_TO_NIBBLE: &[&str] = &["gradient_checkpointing", "output_dir"];

/// Options read apart whose defaults the reading itself settles (TRL's epochs, its max_steps of -1,
/// PEFT's modules by model type, eval_steps by eval_strategy).
const DEFAULTS_READ_APART: &[&str] = &[
    "num_train_epochs",
    "max_steps",
    "lora_target_modules",
    "eval_steps",
];

struct TrlField {
    dataclass: String,
    default: Value,
    /// Whether TRL's command line takes a list (`--lora_target_modules q_proj v_proj`).
    list: bool,
    /// The type argparse gives its command-line values: bool, int, float or str (None: its own).
    kind: Option<String>,
}

struct TrlFields {
    version: String,
    fields: HashMap<String, TrlField>,
}

/// TRL's options that nibble has by the same name or an alias and whose defaults the reader leaves
/// to nibble, with TRL's default for each: (TRL's name, nibble's option, TRL's default).
pub fn options_taken_as_they_are() -> Vec<(String, String, Value)> {
    let mut taken: Vec<(String, String, Value)> = trl_fields()
        .fields
        .iter()
        .filter(|(name, _)| !DEFAULTS_READ_APART.contains(&name.as_str()))
        .filter(|(name, _)| !TRL_DEFAULTS_TAKEN.contains(&name.as_str()))
        .filter(|(name, _)| !DEFAULTS_LEFT_TO_NIBBLE.contains(&name.as_str()))
        .filter_map(|(name, f)| {
            let id = nibble_options().get(name)?;
            Some((name.clone(), id.clone(), f.default.clone()))
        })
        .collect();
    taken.sort_by(|a, b| a.0.cmp(&b.0));
    taken
}

fn trl_fields() -> &'static TrlFields {
    static FIELDS: OnceLock<TrlFields> = OnceLock::new();
    FIELDS.get_or_init(|| {
        let raw: Value = serde_json::from_str(include_str!("trl_fields.json"))
            .expect("trl_fields.json is JSON (a test reads it)");
        let fields = raw["fields"]
            .as_object()
            .expect("trl_fields.json has fields")
            .iter()
            .map(|(name, f)| {
                let field = TrlField {
                    dataclass: f["in"].as_str().unwrap_or_default().to_string(),
                    default: f["default"].clone(),
                    list: f["list"].as_bool().unwrap_or(false),
                    kind: f["type"].as_str().map(String::from),
                };
                (name.clone(), field)
            })
            .collect();
        TrlFields {
            version: raw["trl"].as_str().unwrap_or_default().to_string(),
            fields,
        }
    })
}

/// nibble's option names (each flag's long name and aliases, with underscores) to the option.
fn nibble_options() -> &'static HashMap<String, String> {
    static OPTIONS: OnceLock<HashMap<String, String>> = OnceLock::new();
    OPTIONS.get_or_init(|| {
        let command = <TrainSettings as clap::Args>::augment_args(clap::Command::new("train"));
        let mut names = HashMap::new();
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str().to_string();
            let spellings = arg
                .get_long()
                .into_iter()
                .chain(arg.get_all_aliases().unwrap_or_default());
            for name in spellings {
                names.insert(name.replace('-', "_"), id.clone());
            }
        }
        names
    })
}

fn yaml_to_json(y: &Yaml) -> std::result::Result<Value, String> {
    Ok(match y {
        Yaml::Real(text) => {
            let x = y
                .as_f64()
                .ok_or_else(|| format!("`{text}` is not a number"))?;
            Value::from(
                serde_json::Number::from_f64(x)
                    .ok_or_else(|| format!("`{text}` is not a finite number"))?,
            )
        }
        Yaml::Integer(i) => Value::from(*i),
        Yaml::String(s) => Value::from(s.clone()),
        Yaml::Boolean(b) => Value::from(*b),
        Yaml::Null => Value::Null,
        Yaml::Array(items) => Value::Array(
            items
                .iter()
                .map(yaml_to_json)
                .collect::<std::result::Result<_, _>>()?,
        ),
        Yaml::Hash(h) => {
            let mut map = Map::new();
            for (k, v) in h {
                map.insert(yaml_key(k)?, yaml_to_json(v)?);
            }
            Value::Object(map)
        }
        Yaml::Alias(_) | Yaml::BadValue => return Err("a value YAML could not resolve".into()),
    })
}

fn yaml_key(k: &Yaml) -> std::result::Result<String, String> {
    match k {
        Yaml::String(s) => Ok(s.clone()),
        Yaml::Integer(i) => Ok(i.to_string()),
        Yaml::Boolean(b) => Ok(b.to_string()),
        other => Err(format!("a key that is not a name ({other:?})")),
    }
}

/// What to say of an option neither nibble nor TRL has (`trl sft` refuses it too).
fn unknown_option(key: &str) -> String {
    let hint = closest(key).map_or(String::new(), |c| format!(" (did you mean `{c}`?)"));
    format!(
        "`{key}` is an option of neither nibble train nor TRL {}'s sft{hint}",
        trl_fields().version
    )
}

fn is_known(key: &str) -> bool {
    READ_APART.contains(&key)
        || LAUNCHER.contains(&key)
        || key == "num_processes"
        || key == "config"
        || nibble_options().contains_key(key)
        || OLDER_NAMES.iter().any(|(old, _)| *old == key)
        || trl_fields().fields.contains_key(key)
}

/// The option names closest to `key` (for a typo's error).
fn closest(key: &str) -> Option<String> {
    let candidates = nibble_options()
        .keys()
        .chain(trl_fields().fields.keys())
        .map(String::as_str);
    candidates
        .map(|c| (edit_distance(key, c), c))
        .filter(|(d, c)| *d <= 2.max(key.len() / 4) && *d < c.len())
        .min()
        .map(|(_, c)| c.to_string())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(above + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

/// JSON values equal as a recipe means them (2 and 2.0 are one number).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
        }
        _ => a == b,
    }
}

fn shown(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A split of a dataset folder, as `load_dataset` finds it: a folder `datasets` saved (one folder per
/// split, beside dataset_dict.json), or a folder laid out as a Hub dataset repository (read as
/// `FOLDER/SPLIT`, `tables::repository_splits`).
fn split_path(root: &Path, split: &str) -> Option<PathBuf> {
    if root.join("dataset_dict.json").is_file() {
        return Some(root.join(split)).filter(|p| p.is_dir());
    }
    let splits = crate::tables::repository_splits(root).ok().flatten()?;
    splits
        .iter()
        .any(|(s, _)| s == split)
        .then(|| root.join(split))
}

/// The modules PEFT adapts when a LoraConfig names none (its table of defaults per `model_type`),
/// for the families nibble trains; None where PEFT has no default and refuses.
pub fn peft_default_targets(model_type: &str) -> Option<&'static str> {
    match model_type {
        "qwen2" | "qwen3" | "llama" | "mistral" | "gemma3_text" => Some("q_proj,v_proj"),
        // A regular expression over the language model's q_proj and v_proj: nibble adapts only
        // the language model of a multimodal folder.
        "gemma4" => Some("q_proj,v_proj"),
        _ => None,
    }
}

/// Reads a TRL recipe (`origin` names it in errors). `flags` are the command line's options, which
/// win over the recipe's: the recipe's defaults that depend on another option (PEFT's modules on the
/// model, resuming on the output folder, validation on the data) look there first.
pub fn read(text: &str, origin: &Path, flags: &TrainSettings) -> Result<Recipe> {
    read_given(parse_yaml(text, origin)?, origin, flags)
}

/// A recipe's options in file order, by their current names.
fn parse_yaml(text: &str, origin: &Path) -> Result<Vec<(String, Value)>> {
    let fail = |msg: String| Error::Config {
        path: origin.to_path_buf(),
        msg,
    };
    let docs = crate::tables::yaml_without_aliases(text)
        .map_err(|e| fail(format!("not YAML nibble reads: {e}")))?;
    let root = match docs.as_slice() {
        [Yaml::Hash(root)] => root,
        _ => {
            return Err(fail(
                "a recipe is one YAML mapping of options, as `trl sft --config` reads it".into(),
            ));
        }
    };
    let mut given: Vec<(String, Value)> = Vec::new();
    for (k, v) in root {
        let key = current_name(yaml_key(k).map_err(fail)?);
        let mut value = yaml_to_json(v).map_err(|m| fail(format!("`{key}`: {m}")))?;
        // TRL's switches. A switch written as text (`"true"`, or a quoted `"on"`, which PyYAML
        // keeps as text) is one too where transformers' `string_to_bool` takes it: argparse hands
        // TRL's string defaults to it.
        let switch = trl_fields()
            .fields
            .get(&key)
            .is_some_and(|f| f.default.is_boolean());
        if switch && let Some(text) = value.as_str() {
            value = scalar(text, Some("bool"));
        }
        given.push((key, value));
    }
    Ok(given)
}

fn current_name(key: String) -> String {
    match OLDER_NAMES.iter().find(|(old, _)| *old == key) {
        Some((_, Some(new))) => new.to_string(),
        _ => key,
    }
}

/// `trl sft`'s command line (what follows `nibble sft`): `--config recipe.yaml` and TRL's flags over
/// it, each `--name value`, `--name=value`, a bare `--name` (true) or, for the options TRL's command
/// line takes as lists, `--name a b c`. Values read as TRL's argparse reads them: numbers, true/false,
/// or text. Errors name `nibble sft`, or the recipe file for what is in it.
pub fn read_command_line(args: &[String]) -> Result<Recipe> {
    let origin = Path::new("nibble sft");
    let fail = |msg: String| Error::Config {
        path: origin.to_path_buf(),
        msg,
    };
    let mut flags: Vec<(String, Value)> = Vec::new();
    let mut config: Option<PathBuf> = None;
    let mut i = 0;
    while i < args.len() {
        // `-o DIR`, as `nibble train` takes it: TRL's output_dir.
        let short = (args[i] == "-o").then_some("output_dir");
        let Some(name) = short.or(args[i].strip_prefix("--").filter(|n| !n.is_empty())) else {
            return Err(fail(format!(
                "`{}`: options are given as --name value (as trl sft takes them)",
                args[i]
            )));
        };
        let (name, inline) = match name.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (name, None),
        };
        let name = current_name(name.replace('-', "_"));
        let mut values: Vec<String> = inline.into_iter().collect();
        i += 1;
        if values.is_empty() {
            // Values run up to the next flag; "-1" is a value, "--x" a flag.
            while i < args.len() && !args[i].starts_with("--") && args[i] != "-o" {
                values.push(args[i].clone());
                i += 1;
            }
        }
        // HfArgumentParser's `--no_NAME` for a switch that is on by default.
        let switch_off = name
            .strip_prefix("no_")
            .filter(|_| !is_known(&name) && values.is_empty())
            .and_then(|rest| trl_fields().fields.get(rest).map(|f| (rest, f)))
            .filter(|(_, f)| f.default == Value::Bool(true));
        if let Some((rest, _)) = switch_off {
            flags.push((rest.to_string(), Value::Bool(false)));
            continue;
        }
        if !is_known(&name) {
            return Err(fail(unknown_option(&name)));
        }
        if name == "config" {
            match values.as_slice() {
                [path] => config = Some(PathBuf::from(path)),
                _ => return Err(fail("--config takes one file".into())),
            }
            continue;
        }
        let field = trl_fields().fields.get(&name);
        let is_list = field.is_some_and(|f| f.list);
        let scalar = |text: &String| scalar(text, field.and_then(|f| f.kind.as_deref()));
        let kind = field.and_then(|f| f.kind.as_deref());
        let value = match (values.len(), is_list) {
            // argparse refuses a bare flag for an option that takes a value.
            (0, _) if is_list || kind.is_some_and(|k| k != "bool") => {
                return Err(fail(format!(
                    "--{name} takes {}, and was given none",
                    if is_list {
                        "one value or more"
                    } else {
                        "a value"
                    }
                )));
            }
            (0, _) => Value::Bool(true),
            (_, true) => Value::Array(values.iter().map(scalar).collect()),
            (1, false) => scalar(&values[0]),
            (_, false) => {
                return Err(fail(format!(
                    "--{name} takes one value, given {}: {}",
                    values.len(),
                    values.join(" ")
                )));
            }
        };
        flags.push((name, value));
    }
    let (mut given, origin) = match &config {
        Some(path) => {
            let text = crate::fsutil::read_to_string(path).map_err(|e| Error::io(path, e))?;
            (parse_yaml(&text, path)?, path.as_path())
        }
        None => (Vec::new(), origin),
    };
    // The command line wins over the recipe, as TRL's does, whichever of an option's names each
    // gives it by (TRL's learning_rate, nibble's lr); two names of one option on the command line
    // are refused, as a recipe's are.
    let id_of = |name: &str| -> String {
        // The recipe's keys read apart into an option of nibble's other name.
        match name {
            "num_train_epochs" => "epochs".into(),
            "lora_target_modules" => "target_modules".into(),
            "overwrite_output_dir" => "overwrite".into(),
            "datasets" => "data".into(),
            "test_split_size" => "eval_split".into(),
            "train_sampling_strategy" => "no_shuffle".into(),
            _ => nibble_options()
                .get(name)
                .cloned()
                .unwrap_or_else(|| name.to_string()),
        }
    };
    let mut named: HashMap<String, String> = HashMap::new();
    for (name, value) in flags {
        let id = id_of(&name);
        if let Some(earlier) = named.insert(id.clone(), name.clone())
            && earlier != name
        {
            return Err(fail(format!(
                "--{earlier} and --{name} are one option: give it once"
            )));
        }
        given.retain(|(n, _)| id_of(n) != id);
        given.push((name, value));
    }
    read_given(given, origin, &TrainSettings::default())
}

/// A command-line value as argparse types it for the option (`kind`: TRL's bool, int, float or str):
/// a switch's yes/no words (transformers' `string_to_bool`), a number, text kept as text; for an
/// option of its own conversion (or nibble's), a number, true or false, else the text. A value that
/// is not of its type stays text, for the option's reading to refuse by name.
fn scalar(text: &str, kind: Option<&str>) -> Value {
    let lower = text.to_ascii_lowercase();
    let number = || -> Option<Value> {
        if let Ok(i) = text.parse::<i64>() {
            return Some(Value::from(i));
        }
        text.parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::from)
    };
    match kind {
        Some("bool") => match lower.as_str() {
            "true" | "yes" | "t" | "y" | "1" => Value::Bool(true),
            "false" | "no" | "f" | "n" | "0" => Value::Bool(false),
            _ => Value::from(text),
        },
        Some("str") => Value::from(text),
        Some(_) => number().unwrap_or_else(|| Value::from(text)),
        None => number().unwrap_or_else(|| match lower.as_str() {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => Value::from(text),
        }),
    }
}

fn read_given(given: Vec<(String, Value)>, origin: &Path, flags: &TrainSettings) -> Result<Recipe> {
    let fail = |msg: String| Error::Config {
        path: origin.to_path_buf(),
        msg,
    };
    let recipe = Reader {
        fail: &fail,
        flags,
        apart: Map::new(),
        out: Map::new(),
        source: HashMap::new(),
        notes: Vec::new(),
        ignored: Vec::new(),
        splits: None,
    }
    .read(given)?;
    Ok(Recipe {
        origin: origin.display().to_string(),
        ..recipe
    })
}

struct Reader<'a> {
    fail: &'a dyn Fn(String) -> Error,
    flags: &'a TrainSettings,
    /// The options read apart (READ_APART), by TRL's names.
    apart: Map<String, Value>,
    /// nibble's options, by their own names.
    out: Map<String, Value>,
    /// Each of nibble's options, by the name the recipe gave it.
    source: HashMap<String, String>,
    notes: Vec<String>,
    ignored: Vec<String>,
    /// The recipe's `datasets` folder of several splits, if it names one.
    splits: Option<PathBuf>,
}

impl Reader<'_> {
    fn err(&self, msg: String) -> Error {
        (self.fail)(msg)
    }

    fn read(mut self, given: Vec<(String, Value)>) -> Result<Recipe> {
        let trl = trl_fields();
        for (key, value) in given {
            if READ_APART.contains(&key.as_str()) {
                self.apart.insert(key, value);
            } else if key == "config" {
                return Err(self.err("a recipe cannot name another options file (`config`)".into()));
            } else if let Some(id) = nibble_options().get(&key) {
                self.set(id, value, &key)?;
            } else if OLDER_NAMES.iter().any(|(old, _)| *old == key)
                || LAUNCHER.contains(&key.as_str())
            {
                self.ignored.push(key);
            } else if key == "num_processes" {
                if value.as_f64() != Some(1.0) {
                    return Err(self.err(format!(
                        "`num_processes: {}`: nibble trains in one process (to see as many \
                         examples per step, multiply gradient_accumulation_steps)",
                        shown(&value)
                    )));
                }
            } else if let Some(field) = trl.fields.get(&key) {
                if same(&value, &field.default) {
                    continue;
                }
                if WITHOUT_EFFECT.contains(&key.as_str()) {
                    if key == "push_to_hub" && value == Value::Bool(true) {
                        self.notes.push(
                            "push_to_hub: nibble never uploads; the adapter stays in the output folder"
                                .into(),
                        );
                    } else {
                        self.ignored.push(key);
                    }
                    continue;
                }
                return Err(self.err(format!(
                    "`{key}: {}` (TRL {}'s {}.{key}) asks for what nibble does not do; remove it \
                     or give TRL's default ({})",
                    shown(&value),
                    trl.version,
                    field.dataclass,
                    shown(&field.default)
                )));
            } else {
                return Err(self.err(unknown_option(&key)));
            }
        }
        if self.apart.contains_key("env") {
            self.notes.push(
                "env: nibble sets no environment variables from a recipe (set them in the shell)"
                    .into(),
            );
        }
        self.peft()?;
        self.quantization()?;
        self.schedule()?;
        self.loss()?;
        self.sequences()?;
        self.data()?;
        self.evaluation()?;
        self.checkpoints()?;
        self.trl_defaults();
        if !self.ignored.is_empty() {
            self.notes.push(format!(
                "ignored, as they change nothing nibble computes or writes: {}",
                self.ignored.join(", ")
            ));
        }
        let settings: TrainSettings = serde_json::from_value(Value::Object(self.out.clone()))
            .map_err(|e| self.err(format!("options: {e}")))?;
        let mut named: Vec<(String, String)> = self
            .source
            .iter()
            .map(|(id, key)| (format!("--{}", id.replace('_', "-")), key.clone()))
            .filter(|(flag, key)| flag[2..] != *key)
            .collect();
        named.sort();
        Ok(Recipe {
            settings,
            notes: self.notes,
            origin: String::new(),
            named,
        })
    }

    /// Sets nibble's option `id` from the recipe's `key`, checked alone so that a bad value's error
    /// names the key it came from.
    fn set(&mut self, id: &str, value: Value, key: &str) -> Result<()> {
        if value.is_null() {
            // TRL's own default where that is none; otherwise null asks for something of TRL's
            // (no truncation for max_length) that nibble has no word for.
            let default = trl_fields().fields.get(key).map(|f| &f.default);
            if default.is_none_or(Value::is_null) {
                return Ok(());
            }
            return Err(self.err(format!(
                "`{key}: null`: give a value (nibble has no `none` for this option)"
            )));
        }
        if let Some(earlier) = self.source.get(id) {
            return Err(self.err(format!(
                "`{earlier}` and `{key}` are one option: give it once"
            )));
        }
        let alone = Value::Object(Map::from_iter([(id.to_string(), value.clone())]));
        serde_json::from_value::<TrainSettings>(alone).map_err(|e| {
            let fraction = value.as_f64().is_some_and(|v| v.fract() != 0.0);
            let whole = e.to_string().contains("expected usize");
            match fraction && whole {
                // transformers reads a float below 1 in its *_steps options as a share of the
                // run's steps.
                true => self.err(format!(
                    "`{key}: {}`: a whole number of steps (nibble takes no fraction of the run)",
                    shown(&value)
                )),
                false => self.err(format!("`{key}: {}`: {e}", shown(&value))),
            }
        })?;
        self.source.insert(id.to_string(), key.to_string());
        self.out.insert(id.to_string(), value);
        Ok(())
    }

    fn has(&self, id: &str) -> bool {
        self.out.contains_key(id)
    }

    fn apart(&self, key: &str) -> Option<&Value> {
        self.apart.get(key).filter(|v| !v.is_null())
    }

    fn flag(&self, key: &str) -> Result<Option<bool>> {
        match self.apart(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            // Text as argparse hands it to `string_to_bool`.
            Some(other @ Value::String(s)) => match scalar(s, Some("bool")) {
                Value::Bool(b) => Ok(Some(b)),
                _ => Err(self.err(format!("`{key}: {}`: true or false", shown(other)))),
            },
            Some(other) => Err(self.err(format!("`{key}: {}`: true or false", shown(other)))),
        }
    }

    fn text(&self, key: &str) -> Result<Option<String>> {
        match self.apart(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(self.err(format!("`{key}: {}`: a name", shown(other)))),
        }
    }

    fn number(&self, key: &str) -> Result<Option<f64>> {
        match self.apart(key) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(other) => Err(self.err(format!("`{key}: {}`: a number", shown(other)))),
        }
    }

    /// A path option: the command line's, else the recipe's.
    fn path(&self, id: &str, flag: &Option<PathBuf>) -> Option<PathBuf> {
        flag.clone()
            .or_else(|| self.out.get(id).and_then(Value::as_str).map(PathBuf::from))
    }

    fn peft(&mut self) -> Result<()> {
        match self.flag("use_peft")? {
            Some(true) => {}
            Some(false) => {
                return Err(self.err(
                    "`use_peft: false` fine-tunes every weight of the model; nibble trains LoRA \
                     adapters (use_peft: true)"
                        .into(),
                ));
            }
            None => self.notes.push(
                "without `use_peft: true`, trl sft fine-tunes every weight; nibble trains LoRA \
                 adapters, as with use_peft: true"
                    .into(),
            ),
        }
        let task = self.text("lora_task_type")?;
        if let Some(task) = task.filter(|t| !t.eq_ignore_ascii_case("CAUSAL_LM")) {
            return Err(self.err(format!(
                "`lora_task_type: {task}`: nibble trains causal language models (CAUSAL_LM)"
            )));
        }
        let key = "lora_modules_to_save";
        let asked = self
            .apart(key)
            .filter(|v| v.as_array().is_none_or(|a| !a.is_empty()));
        if let Some(v) = asked {
            return Err(self.err(format!(
                "`{key}: {}`: nibble trains LoRA pairs, not fully trained modules",
                shown(v)
            )));
        }
        let targets = match self.apart("lora_target_modules").cloned() {
            Some(Value::Array(names)) => {
                let names: Option<Vec<&str>> = names.iter().map(Value::as_str).collect();
                match names {
                    Some(names) if !names.is_empty() => names.join(","),
                    _ => {
                        return Err(self.err(
                            "`lora_target_modules`: a list of module names, such as [q_proj, v_proj]"
                                .into(),
                        ));
                    }
                }
            }
            Some(Value::String(s)) if s == "all-linear" => s,
            Some(Value::String(s)) => {
                return Err(self.err(format!(
                    "`lora_target_modules: {s}`: PEFT reads one string as a regular expression over \
                     whole module paths; list the modules instead ([q_proj, v_proj]) or write all-linear"
                )));
            }
            Some(other) => {
                return Err(self.err(format!(
                    "`lora_target_modules: {}`: a list of module names",
                    shown(&other)
                )));
            }
            None if self.has("target_modules") || self.flags.target_modules.is_some() => {
                return Ok(());
            }
            None => match self.peft_default_targets()? {
                Some(targets) => targets,
                None => return Ok(()),
            },
        };
        // PEFT's own default for Gemma 4 keeps to the language model.
        let multimodal = ["gemma3", "mistral3", "gemma4"];
        let named = self.apart("lora_target_modules").is_some();
        let model_type = self.model_type().filter(|_| named);
        if let Some(model_type) = model_type.filter(|t| multimodal.contains(&t.as_str())) {
            self.notes.push(format!(
                "{model_type} is multimodal: PEFT would match {targets} in its vision tower too; \
                 nibble adapts the language model's"
            ));
        }
        self.set(
            "target_modules",
            Value::from(targets),
            "lora_target_modules",
        )
    }

    /// The model folder's `model_type` (the command line's model, else the recipe's).
    fn model_type(&self) -> Option<String> {
        let config = self.path("model", &self.flags.model)?.join("config.json");
        let text = crate::fsutil::read_to_string(&config).ok()?;
        let v = serde_json::from_str::<Value>(&text).ok()?;
        v["model_type"].as_str().map(str::to_string)
    }

    /// PEFT's modules for a LoraConfig that names none, read off the model's type.
    fn peft_default_targets(&mut self) -> Result<Option<String>> {
        let model = self.path("model", &self.flags.model);
        if model.as_ref().is_none_or(|m| !m.exists()) {
            // Loading it fails first, saying what the path looks like, or that none is given.
            return Ok(None);
        }
        let config = model.as_ref().map(|m| m.join("config.json"));
        let Some(model_type) = self.model_type() else {
            return Err(self.err(format!(
                "no `lora_target_modules`: PEFT then picks modules by the model's type, which nibble \
                 reads from the model folder's config.json ({}); name them instead (all-linear, or \
                 a list such as [q_proj, v_proj])",
                config.map_or("no model given".into(), |c| format!("{} unreadable", c.display()))
            )));
        };
        let targets = peft_default_targets(&model_type).ok_or_else(|| {
            self.err(format!(
                "no `lora_target_modules`, and PEFT has no default modules for model type \
                 `{model_type}` (trl sft would stop there): name them (all-linear, or a list such as \
                 [q_proj, v_proj])"
            ))
        })?;
        self.notes.push(format!(
            "no lora_target_modules: PEFT's default for {model_type}, {targets} (nibble's own is \
             all-linear)"
        ));
        Ok(Some(targets.to_string()))
    }

    fn quantization(&mut self) -> Result<()> {
        let four = self.flag("load_in_4bit")?.unwrap_or(false);
        let eight = self.flag("load_in_8bit")?.unwrap_or(false);
        if four && eight {
            return Err(self.err(
                "`load_in_4bit` and `load_in_8bit` are both true; trl sft refuses that too".into(),
            ));
        }
        if eight {
            return Err(self.err(
                "`load_in_8bit: true`: nibble keeps the base in 4 bits (load_in_4bit: true, NF4 or \
                 INT4) or unquantized (quant: none)"
                    .into(),
            ));
        }
        let kind = self.text("bnb_4bit_quant_type")?.unwrap_or("nf4".into());
        if self.has("quant") || self.flags.quant.is_some() {
            return Ok(());
        }
        if !four {
            self.notes.push(
                "the recipe loads the base model in 16 bits (no load_in_4bit: true); nibble keeps it \
                 in NF4 all the same (quant: none, or --quant none, keeps it unquantized)"
                    .into(),
            );
            return Ok(());
        }
        if kind != "nf4" {
            return Err(self.err(format!(
                "`bnb_4bit_quant_type: {kind}`: nibble's 4-bit formats are nf4 and int4 (quant: int4)"
            )));
        }
        if self.flag("use_bnb_nested_quant")? == Some(true) {
            self.notes.push(
                "use_bnb_nested_quant: nibble keeps each group's scale in f32 rather than quantizing \
                 the scales again (the same 4-bit codes)"
                    .into(),
            );
        }
        self.set("quant", Value::from("nf4"), "load_in_4bit")
    }

    fn schedule(&mut self) -> Result<()> {
        let trl_epochs = || trl_fields().fields["num_train_epochs"].default.as_f64();
        let epochs = match self.number("num_train_epochs")? {
            Some(n) => Some(n),
            None if self.has("epochs") => None,
            None => trl_epochs(),
        };
        let max_steps = self.number("max_steps")?.filter(|n| *n > 0.0);
        if let Some(epochs) = epochs {
            if max_steps.is_some() || self.flags.max_steps.is_some() {
                // transformers runs max_steps whatever num_train_epochs says; nibble's epochs only
                // need to let it.
                let whole = epochs.ceil().max(1.0) as u64;
                self.set("epochs", Value::from(whole), "num_train_epochs")?;
            } else if !(epochs > 0.0 && epochs.is_finite()) {
                return Err(self.err(format!(
                    "`num_train_epochs: {epochs}`: a number of epochs > 0"
                )));
            } else {
                // A fraction stops within the last epoch, after ceil(epochs · steps per epoch)
                // steps, as transformers counts them.
                self.set("epochs", Value::from(epochs), "num_train_epochs")?;
            }
        }
        // transformers' -1 (its default) and 0: the epochs decide.
        if let Some(steps) = self.number("max_steps")? {
            if steps.fract() != 0.0 {
                return Err(self.err(format!("`max_steps: {steps}`: a whole number")));
            }
            if steps > 0.0 {
                self.set("max_steps", Value::from(steps as u64), "max_steps")?;
            }
        }
        match self.apart("lr_scheduler_kwargs").cloned() {
            // transformers also takes the kwargs as JSON text.
            Some(Value::String(text)) => {
                let kwargs: Value = serde_json::from_str(&text).map_err(|e| {
                    self.err(format!(
                        "`lr_scheduler_kwargs: {text}`: not a JSON object: {e}"
                    ))
                })?;
                self.set("lr_scheduler_kwargs", kwargs, "lr_scheduler_kwargs")?;
            }
            Some(kwargs) => self.set("lr_scheduler_kwargs", kwargs, "lr_scheduler_kwargs")?,
            None => {}
        }
        if let Some(optim) = self.text("optim")? {
            match optim.as_str() {
                // AdamW, as nibble steps it (paged: where the moments live, not what they are).
                "adamw_torch" | "adamw_torch_fused" | "adamw_hf" | "paged_adamw_32bit"
                | "adamw_apex_fused" => {}
                "adamw_8bit" | "adamw_bnb_8bit" | "paged_adamw_8bit" | "adamw_torch_8bit"
                | "adamw_torch_4bit" | "adamw_anyprecision" => {
                    self.notes.push(format!(
                        "optim: {optim}: nibble's AdamW keeps its moments in f32, not in fewer bits"
                    ));
                }
                _ => {
                    return Err(self.err(format!(
                        "`optim: {optim}`: nibble's optimizer is AdamW (adamw_torch and the like)"
                    )));
                }
            }
        }
        match self.text("train_sampling_strategy")?.as_deref() {
            None | Some("random") => {}
            Some("sequential") => {
                self.set("no_shuffle", Value::Bool(true), "train_sampling_strategy")?
            }
            Some(other) => {
                return Err(self.err(format!(
                    "`train_sampling_strategy: {other}`: nibble draws examples in random order \
                     (random) or keeps the file's (sequential)"
                )));
            }
        }
        if let Some(seed) = self.number("data_seed")? {
            let recipe_seed = self.out.get("seed").and_then(Value::as_f64);
            let model_seed = (self.flags.seed.map(|s| s as f64))
                .or(recipe_seed)
                .unwrap_or(42.0);
            if seed != model_seed {
                return Err(self.err(format!(
                    "`data_seed: {seed}`: nibble draws the data's order from `seed` too; give one seed"
                )));
            }
        }
        let checkpointing = self.flag("activation_checkpointing")?;
        if let Some(on) = checkpointing.filter(|_| !self.has("gradient_checkpointing")) {
            self.set(
                "gradient_checkpointing",
                Value::Bool(on),
                "activation_checkpointing",
            )?;
        }
        if let Some(v) = self.apart("model_init_kwargs").cloned() {
            // TRL's command line takes the dict as JSON text, as for lr_scheduler_kwargs.
            let v = match v {
                Value::String(text) => serde_json::from_str(&text).map_err(|e| {
                    self.err(format!(
                        "`model_init_kwargs: {text}`: not a JSON object: {e}"
                    ))
                })?,
                other => other,
            };
            let v = &v;
            const LOADING_ONLY: &[&str] = &[
                "dtype",
                "torch_dtype",
                "attn_implementation",
                "device_map",
                "trust_remote_code",
                "use_cache",
                "low_cpu_mem_usage",
                "revision",
            ];
            let keys: Vec<&String> = v
                .as_object()
                .map(|o| o.keys().collect())
                .unwrap_or_default();
            match keys.iter().find(|k| !LOADING_ONLY.contains(&k.as_str())) {
                None if v.is_object() => self.ignored.push("model_init_kwargs".into()),
                _ => {
                    return Err(self.err(format!(
                        "`model_init_kwargs: {}`: nibble reads the model folder as it is; it \
                         takes only options of how a model is loaded ({}), and ignores them",
                        shown(v),
                        LOADING_ONLY.join(", ")
                    )));
                }
            }
        }
        Ok(())
    }

    fn loss(&mut self) -> Result<()> {
        let completion = self.flag("completion_only_loss")?;
        let assistant = self.flag("assistant_only_loss")?.unwrap_or(false);
        let loss_on = match (assistant, completion) {
            (true, Some(false)) => {
                return Err(self.err(
                    "`assistant_only_loss: true` with `completion_only_loss: false` (the assistant's \
                     turns within prompts too) is not something nibble does; assistant_only_loss \
                     alone trains on the completion's assistant turns"
                        .into(),
                ));
            }
            (true, _) => "assistant",
            (false, Some(false)) => "all",
            // TRL's default: the completion of prompt/completion rows, every token of others.
            (false, _) => return Ok(()),
        };
        let key = if assistant {
            "assistant_only_loss"
        } else {
            "completion_only_loss"
        };
        self.set("loss_on", Value::from(loss_on), key)
    }

    /// `trl sft` trains on the `dataset_train_split` split of what `dataset_name` names (a folder
    /// `datasets` saved with several splits, or a folder of one data file per split, as
    /// `load_dataset` splits it), or on a mixture of local datasets (`datasets`).
    fn data(&mut self) -> Result<()> {
        self.mixture()?;
        if self.flags.data.is_some() {
            // The command line's data is nibble's --data: a file, or one split's folder.
            return Ok(());
        }
        let split = self.text("dataset_train_split")?.unwrap_or("train".into());
        let Some(data) = self
            .out
            .get("data")
            .and_then(Value::as_str)
            .map(PathBuf::from)
        else {
            return Ok(());
        };
        if let Some(path) = split_path(&data, &split) {
            self.splits = Some(data);
            let path = path.to_string_lossy().into_owned();
            self.out.insert("data".into(), Value::from(path));
        } else if split != "train" {
            return Err(self.err(format!(
                "`dataset_train_split: {split}`: {} holds no such split (as `datasets` splits a saved \
                 folder or a Hub repository's)",
                data.display()
            )));
        }
        Ok(())
    }

    /// TRL's `datasets` (DatasetMixtureConfig): local datasets, such as `[{path: json, data_files:
    /// chats.jsonl}]`, read one after the other as one dataset (as TRL concatenates them), and its
    /// `test_split_size` as a held-out fraction of them.
    fn mixture(&mut self) -> Result<()> {
        let entries = match self.apart("datasets").cloned() {
            None => Vec::new(),
            Some(Value::Array(entries)) => entries,
            Some(other) => {
                return Err(self.err(format!("`datasets: {}`: a list of datasets", shown(&other))));
            }
        };
        let held_out = self.number("test_split_size")?;
        if entries.is_empty() {
            if held_out.is_some() {
                self.ignored.push("test_split_size".into());
            }
            return Ok(());
        }
        let mut files = Vec::new();
        for entry in &entries {
            files.extend(self.mixture_files(entry, entries.len())?);
        }
        if let Some(earlier) = self.source.get("data").cloned() {
            self.notes.push(format!(
                "`datasets` and `{earlier}` both name data: the mixture is read, as trl sft reads it"
            ));
            self.source.remove("data");
            self.out.remove("data");
        }
        let data = match <[String; 1]>::try_from(files) {
            Ok([one]) => Value::from(one),
            Err(several) => Value::from(several),
        };
        self.set("data", data, "datasets")?;
        if let Some(fraction) = held_out {
            if !(fraction > 0.0 && fraction < 1.0) {
                return Err(self.err(format!(
                    "`test_split_size: {fraction}`: nibble holds out a fraction of the data (0 to 1)"
                )));
            }
            self.set("eval_split", Value::from(fraction), "test_split_size")?;
        }
        Ok(())
    }

    /// The data files of one dataset of a mixture of `count`.
    fn mixture_files(&self, entry: &Value, count: usize) -> Result<Vec<String>> {
        let entry = entry
            .as_object()
            .ok_or_else(|| self.err(format!("`datasets`: {} is not a dataset", shown(entry))))?;
        let field = |k: &str| entry.get(k).filter(|v| !v.is_null());
        for (k, v) in entry {
            let known = matches!(k.as_str(), "path" | "data_files" | "split" | "fraction");
            if !known && !v.is_null() {
                return Err(self.err(format!(
                    "`datasets`: `{k}: {}` is not read by nibble (path, data_files and split are)",
                    shown(v)
                )));
            }
        }
        // One dataset's share is all of it; several take the first rows of each in their shares.
        if let Some(fraction) = field("fraction").filter(|_| count > 1) {
            return Err(self.err(format!(
                "`datasets`: `fraction: {}` in a mixture of {count}: nibble reads every row of each \
                 dataset (leave fraction out, or cut the files to the rows to train on)",
                shown(fraction)
            )));
        }
        let path = field("path").and_then(Value::as_str).ok_or_else(|| {
            self.err("`datasets`: each dataset has a `path` (such as json, with data_files)".into())
        })?;
        let split = field("split").and_then(Value::as_str).unwrap_or("train");
        if split.contains(['[', '+', '%']) {
            return Err(self.err(format!(
                "`datasets`: `split: {split}` takes part of the rows or several splits, which nibble \
                 does not (name one split, and cut its file to the rows to train on)"
            )));
        }
        let unkeyed = field("data_files").is_some_and(|files| !files.is_object());
        if unkeyed && split != "train" {
            // data_files given as a file or a list are the train split alone, to datasets too.
            return Err(self.err(format!(
                "`datasets`: `split: {split}` with data_files that are not keyed by split: those \
                 files are the split train (as `datasets` reads them, which refuses {split})"
            )));
        }
        // A file, or a list of them (one dataset, as load_dataset reads them).
        let listed = |v: &Value| -> Option<Vec<String>> {
            match v {
                Value::String(file) => Some(vec![file.clone()]),
                Value::Array(list) if !list.is_empty() => {
                    list.iter().map(|f| f.as_str().map(String::from)).collect()
                }
                _ => None,
            }
        };
        Ok(match field("data_files") {
            // One file is one split, train, to datasets too.
            None if split != "train" && std::path::Path::new(path).is_file() => {
                return Err(self.err(format!(
                    "`datasets`: `split: {split}` of the file {path}: a single file is the split \
                     train (as `datasets` reads it, which refuses {split}); name a folder of \
                     splits, or leave split out"
                )));
            }
            // A repository folder's other split, as FOLDER/SPLIT names it.
            None if split != "train" => vec![format!("{}/{split}", path.trim_end_matches('/'))],
            None => vec![path.to_string()],
            Some(files) if matches!(path, "json" | "parquet" | "arrow") => {
                let chosen = match files {
                    Value::Object(by_split) => by_split.get(split),
                    other => Some(other),
                };
                chosen.and_then(listed).ok_or_else(|| {
                    self.err(format!(
                        "`datasets`: data_files {} for split {split}: a file name or a list of them",
                        shown(files)
                    ))
                })?
            }
            Some(_) => {
                return Err(self.err(format!(
                    "`datasets`: data_files with path `{path}`: nibble reads json, parquet and arrow \
                     files (path: json)"
                )));
            }
        })
    }

    /// Options of how examples become sequences, where TRL reads them otherwise than nibble's
    /// checks would: what only applies under packing (or only without it) is ignored where it does
    /// not apply, as TRL ignores it.
    fn sequences(&mut self) -> Result<()> {
        if let Some(v) = self.apart.get("max_length").cloned() {
            self.set("max_length", v, "max_length")?;
        }
        let packing = self
            .flags
            .packing
            .or(self.out.get("packing").and_then(Value::as_bool));
        let packing = packing.unwrap_or(false);
        let (applies, ignored) = match packing {
            true => ("packing_strategy", "truncation_mode"),
            false => ("truncation_mode", "packing_strategy"),
        };
        if let Some(v) = self.apart(applies).cloned() {
            self.set(applies, v, applies)?;
        }
        let default = &trl_fields().fields[ignored].default;
        if self.apart(ignored).is_some_and(|v| !same(v, default)) {
            self.ignored.push(ignored.into());
        }
        match self.text("loss_type")?.as_deref() {
            None => {}
            // A name TRL keeps for nll.
            Some("chunked_nll") => self.set("loss_type", Value::from("nll"), "loss_type")?,
            Some(other) => self.set("loss_type", Value::from(other), "loss_type")?,
        }
        if self.flag("shuffle_dataset")? == Some(true) {
            let ordered = self
                .flags
                .no_shuffle
                .or(self.out.get("no_shuffle").and_then(Value::as_bool));
            if ordered == Some(true) {
                return Err(self.err(
                    "`shuffle_dataset: true` with the examples in file order: nibble either shuffles \
                     every epoch or keeps the file's order"
                        .into(),
                ));
            }
            // nibble shuffles every epoch anyway.
            self.ignored.push("shuffle_dataset".into());
        }
        Ok(())
    }

    fn evaluation(&mut self) -> Result<()> {
        let strategy = self.text("eval_strategy")?;
        let steps = self.number("eval_steps")?;
        let logging_steps = self.number("logging_steps")?;
        let has_data = |r: &Self| {
            r.has("eval_data")
                || r.has("eval_split")
                || r.flags.eval_data.is_some()
                || r.flags.eval_split.is_some()
        };
        let explicit = strategy.is_some();
        let strategy = match strategy {
            Some(s) => s,
            // nibble's own recipe style: validation data and eval_steps, no strategy.
            None if steps.is_some() && has_data(self) => "steps".into(),
            None => "no".into(),
        };
        // transformers evaluates every logging_steps when eval_steps is not given; nibble logs
        // every step whatever logging_steps says.
        let logging_used = strategy == "steps" && steps.is_none();
        if logging_steps.is_some() && !logging_used {
            self.ignored.push("logging_steps".into());
        }
        match strategy.as_str() {
            // trl sft never validates then, where nibble would at each epoch's end.
            "no" if explicit && has_data(self) => {
                return Err(self.err(
                    "`eval_strategy: no` with validation data (eval_data, eval_split): trl sft \
                     would not validate; leave out one or the other"
                        .into(),
                ));
            }
            "no" => return Ok(()),
            "steps" => {
                // transformers: eval_steps unset or 0 means every logging_steps.
                let steps = steps.filter(|n| *n != 0.0);
                let logging_default = trl_fields().fields["logging_steps"].default.as_f64();
                let n = steps.or(logging_steps).or(logging_default).unwrap_or(10.0);
                let key = if steps.is_some() {
                    "eval_steps"
                } else {
                    "logging_steps"
                };
                if n < 1.0 || n.fract() != 0.0 {
                    return Err(self.err(format!(
                        "`{key}: {n}`: validation every {key} needs a whole number of steps (nibble \
                         takes no fraction of the run)"
                    )));
                }
                self.set("eval_steps", Value::from(n as u64), "eval_steps")?;
            }
            "epoch" => {}
            other => {
                return Err(self.err(format!("`eval_strategy: {other}`: no, steps or epoch")));
            }
        }
        if has_data(self) {
            return Ok(());
        }
        // trl sft evaluates on the `dataset_test_split` split of the dataset.
        let split = self.text("dataset_test_split")?.unwrap_or("test".into());
        let folder = self
            .splits
            .as_ref()
            .and_then(|root| split_path(root, &split));
        match folder {
            Some(folder) => {
                let folder = folder.to_string_lossy().into_owned();
                self.set("eval_data", Value::from(folder), "dataset_test_split")
            }
            None => Err(self.err(format!(
                "`eval_strategy: {strategy}` needs validation data: trl sft would take the \
                 `{split}` split of a datasets folder; give eval_data (a file) or eval_split (a \
                 fraction of the data), in the recipe or as --eval-data / --eval-split"
            ))),
        }
    }

    fn checkpoints(&mut self) -> Result<()> {
        if let Some(on) = self.flag("overwrite_output_dir")? {
            self.set("overwrite", Value::Bool(on), "overwrite_output_dir")?;
        }
        match self.apart("resume_from_checkpoint").cloned() {
            // transformers: the newest checkpoint in the output folder.
            Some(Value::Bool(true)) => {
                let output = self.path("output", &self.flags.output).ok_or_else(|| {
                    self.err("`resume_from_checkpoint: true` resumes from output_dir, which is not given".into())
                })?;
                let output = output.to_string_lossy().into_owned();
                self.set("resume", Value::from(output), "resume_from_checkpoint")?;
            }
            Some(Value::Bool(false)) | None => {}
            Some(path) => self.set("resume", path, "resume_from_checkpoint")?,
        }
        Ok(())
    }

    /// What TRL takes for each option the recipe leaves out, where nibble's default differs.
    fn trl_defaults(&mut self) {
        for name in TRL_DEFAULTS_TAKEN {
            let id = &nibble_options()[*name];
            if !self.has(id) {
                self.out
                    .insert(id.clone(), trl_fields().fields[*name].default.clone());
            }
        }
        // TRL's checkpoint every save_steps, where checkpoints go by steps at all.
        let strategy = match self.flags.save_strategy {
            Some(s) => crate::value_name(s),
            None => self.out.get("save_strategy").map(shown).unwrap_or_default(),
        };
        if strategy != "steps" && !self.source.contains_key("save_steps") {
            self.out.remove("save_steps");
        }
    }
}
