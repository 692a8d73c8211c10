"""TRL's `trl sft --config recipe.yaml`, as nibble's `--config recipe.yaml` reads it.

Writes two files:
- src/train/trl_fields.json: every option `trl sft` takes (TRL's ScriptArguments, SFTConfig with
  transformers' TrainingArguments, ModelConfig, DatasetMixtureConfig) with its default (whether its
  command line takes a list, and the type argparse gives a value), so that nibble
  can tell an option TRL has from a typo, and a value left at TRL's default from one that asks for
  something nibble does not do;
- tests/fixtures/trl_config/expected.json: for each recipe in tests/fixtures/trl_config/*.yaml, what
  TRL's own parser (the one `trl sft` runs) makes of it: the training arguments, the PEFT LoraConfig
  (`get_peft_config`), the quantization (`get_quantization_config`), with PEFT's default target modules
  for a Qwen2 model where the recipe names none; and for each recipe in refused/, the error TRL's
  parser raises on it.

Run from the repository root with a virtualenv holding trl, transformers and peft:
    python scripts/make_trl_config_fixture.py
"""
import contextlib
import dataclasses
import enum
import io
import glob
import json
import os

import peft
import transformers
import trl
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS
from trl import get_peft_config, get_quantization_config
from trl.scripts.sft import make_parser

FIXTURES = "tests/fixtures/trl_config"


def plain(value):
    """A default as JSON: enums by value, anything else JSON has no word for as its text."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def field_default(field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def value_kind(convert):
    """The type argparse gives a command-line value of an option: bool, int, float or str (None: its
    own conversion, such as a choice or JSON)."""
    if convert in (str, int, float):
        return convert.__name__
    if getattr(convert, "__name__", "") == "string_to_bool":
        return "bool"
    return None


parser = make_parser()
# Options the command line takes as lists (`--lora_target_modules q_proj v_proj`): one value is a
# list of one there.
lists = {action.dest for action in parser._actions if action.nargs in ("+", "*")}
kinds = {}
for action in parser._actions:
    if action.type is not None:
        kinds.setdefault(action.dest, value_kind(action.type))
fields = {}
for dc in parser.dataclass_types:
    for field in dataclasses.fields(dc):
        if field.name.startswith("_") or not field.init:
            continue
        entry = {"in": dc.__name__, "default": plain(field_default(field))}
        kind = kinds.get(field.name)
        if kind is not None:
            entry["type"] = kind
        if field.name in lists:
            entry["list"] = True
        fields.setdefault(field.name, entry)
with open("src/train/trl_fields.json", "w") as f:
    json.dump({"trl": trl.__version__, "transformers": transformers.__version__, "fields": fields}, f,
              indent=0, sort_keys=True)
    f.write("\n")

cases = {}
for path in sorted(glob.glob(f"{FIXTURES}/*.yaml")):
    # A parser of its own: reading a config sets the parser's defaults, for every later parse too.
    # use_cpu: SFTConfig turns bf16 on by default, which it refuses on a machine without a GPU.
    script, args, model, _ = make_parser().parse_args_and_config(["--config", path, "--use_cpu", "true"])
    lora = get_peft_config(model)
    quant = get_quantization_config(model)
    targets = lora.target_modules if lora is not None else None
    if targets is None:
        targets = PEFT_TARGETS["qwen2"]  # the model the test makes is a Qwen2
    cases[os.path.basename(path)] = {
        "model_name_or_path": model.model_name_or_path,
        "dataset_name": script.dataset_name,
        "output_dir": args.output_dir,
        "learning_rate": args.learning_rate,
        "num_train_epochs": args.num_train_epochs,
        "max_steps": args.max_steps,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "lr_scheduler_type": plain(args.lr_scheduler_type),
        "lr_scheduler_kwargs": args.lr_scheduler_kwargs or {},
        "warmup_steps": args.warmup_steps,
        "warmup_steps_of_100": args.get_warmup_steps(100),
        "weight_decay": args.weight_decay,
        "adam_beta1": args.adam_beta1,
        "adam_beta2": args.adam_beta2,
        "adam_epsilon": args.adam_epsilon,
        "max_grad_norm": args.max_grad_norm,
        "seed": args.seed,
        "max_length": args.max_length,
        "truncation_mode": args.truncation_mode,
        "packing": args.packing,
        "packing_strategy": args.packing_strategy,
        "dataset_text_field": args.dataset_text_field,
        "neftune_noise_alpha": args.neftune_noise_alpha,
        "loss_type": args.loss_type,
        "completion_only_loss": args.completion_only_loss,
        "assistant_only_loss": args.assistant_only_loss,
        "gradient_checkpointing": args.gradient_checkpointing,
        "save_strategy": plain(args.save_strategy),
        "save_steps": args.save_steps,
        "save_total_limit": args.save_total_limit,
        "eval_strategy": plain(args.eval_strategy),
        "eval_steps": args.eval_steps,
        "chat_template_path": args.chat_template_path,
        "eos_token": args.eos_token,
        "lora": None if lora is None else {
            "r": lora.r,
            "lora_alpha": lora.lora_alpha,
            "lora_dropout": lora.lora_dropout,
            "target_modules": sorted(targets) if not isinstance(targets, str) else targets,
            "use_rslora": lora.use_rslora,
            "use_dora": lora.use_dora,
        },
        "load_in_4bit": bool(quant is not None and quant.load_in_4bit),
        "bnb_4bit_quant_type": quant.bnb_4bit_quant_type if quant is not None else None,
    }
# PEFT's modules for a LoraConfig without target_modules, for each model_type nibble trains (None:
# PEFT has none and refuses).
MODEL_TYPES = ["qwen2", "qwen3", "llama", "mistral", "mistral3", "ministral", "ministral3", "smollm3", "phi3",
               "gemma3", "gemma3_text", "gemma4", "gemma4_text"]
peft_defaults = {t: PEFT_TARGETS.get(t) for t in MODEL_TYPES}
refused = {}
for path in sorted(glob.glob(f"{FIXTURES}/refused/*.yaml")):
    # argparse reports a bad value on stderr and exits.
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            make_parser().parse_args_and_config(["--config", path, "--use_cpu", "true"])
    except SystemExit:
        refused[os.path.basename(path)] = err.getvalue().strip().splitlines()[-1]
    else:
        raise AssertionError(f"TRL's parser took {path}")
with open(f"{FIXTURES}/expected.json", "w") as f:
    json.dump({"trl": trl.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
               "cases": cases, "peft_default_targets": peft_defaults, "refused": refused}, f, indent=1,
              sort_keys=True)
    f.write("\n")
print(json.dumps(cases, indent=1, sort_keys=True))
