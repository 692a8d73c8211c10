"""Writes tests/fixtures/hf_train/qwen2/dora/: DoRA (LoraConfig(use_dora=True)) as PEFT trains it on
the 4-bit base of scripts/make_train_fixtures.py (bitsandbytes NF4, group 64, emulated exactly).

- fresh_magnitudes.json: the magnitude PEFT gives each adapted linear of a fresh DoRA adapter (each
  output row's norm of the dequantized weight, B being zero).
- init_adapter/: a DoRA adapter with random A, B and magnitudes (the magnitudes PEFT computed, each
  scaled by a random factor in [0.8, 1.2], so that m/‖W + s·B·A‖ is far from 1).
- adapter_model.safetensors, expected.json: make_train_fixtures.py's three optimizer steps from it
  (dropout 0, so PEFT's DoRA takes the base layer's result), each step's loss and gradient norm, and
  how far float32 arithmetic alone moves each trained tensor (the same steps in float64).

Run from the repository root with the virtualenv of make_train_fixtures.py:
    python scripts/make_dora_fixture.py
"""
import json
import os
import sys

import peft
import torch
from peft import LoraConfig, get_peft_model
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, os.path.dirname(__file__))
from make_train_fixtures import FAMILIES, OUT, load_base, save_adapter, steps_against_float64  # noqa: E402

FAMILY = "qwen2"
TARGETS = FAMILIES[FAMILY]


def trained(pm):
    """Every trained tensor by the name PEFT saves it under."""
    return {k.replace(".default", "").removesuffix(".weight") if "magnitude" in k else k.replace(".default", ""):
            p.detach().clone() for k, p in pm.named_parameters() if p.requires_grad}


out = os.path.join(OUT, FAMILY)
model_dir = os.path.join(out, "model")
folder = os.path.join(out, "dora")
os.makedirs(folder, exist_ok=True)
config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM",
                    use_dora=True)
pm = get_peft_model(load_base(model_dir, TARGETS), config)
fresh = {name.removeprefix("base_model.model.").removesuffix(".lora_magnitude_vector.default.weight"):
         p.detach().tolist() for name, p in pm.named_parameters() if "magnitude" in name}
with open(os.path.join(folder, "fresh_magnitudes.json"), "w") as f:
    json.dump({"peft": peft.__version__, "magnitudes": fresh}, f)

tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
with open(os.path.join(out, "data.jsonl")) as f:
    rows = [json.loads(line) for line in f]
examples = [torch.tensor(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=False))
            for r in rows]
torch.manual_seed(2)
with torch.no_grad():
    for name, p in pm.named_parameters():
        if "magnitude" in name:
            p.mul_(0.8 + 0.4 * torch.rand_like(p))
        elif "lora_" in name:
            p.copy_(torch.randn_like(p) * 0.1)
init = os.path.join(folder, "init_adapter")
save_adapter(pm, init)
bases = (load_base(model_dir, TARGETS), load_base(model_dir, TARGETS))
losses, norms = steps_against_float64(folder, bases, init, examples, state=trained,
                                      versions={"peft": peft.__version__})
os.remove(os.path.join(folder, "adapter_config.json"))  # the init adapter's, which the run keeps
print("losses", losses, "grad norms", norms)
