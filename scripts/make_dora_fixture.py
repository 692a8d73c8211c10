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
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, os.path.dirname(__file__))
from make_train_fixtures import FAMILIES, OUT, load_base, save_adapter, train  # noqa: E402

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
pm = PeftModel.from_pretrained(load_base(model_dir, TARGETS), init, is_trainable=True)
start = trained(pm)
losses, norms = train(pm, examples)
save_adapter(pm, folder)
os.remove(os.path.join(folder, "adapter_config.json"))  # the init adapter's, which the run keeps
pm64 = PeftModel.from_pretrained(load_base(model_dir, TARGETS).double(), init, is_trainable=True).double()
losses64, norms64 = train(pm64, examples)
ours32, ours64 = trained(pm), trained(pm64)
noise = {k: ((ours32[k].double() - ours64[k]).norm() / (ours64[k] - start[k].double()).norm()).item()
         for k in ours32}
with open(os.path.join(folder, "expected.json"), "w") as f:
    json.dump({"losses": losses, "grad_norms": norms, "update_float32_noise": noise,
               "float64_losses": losses64, "float64_grad_norms": norms64,
               "peft": peft.__version__, "torch": torch.__version__}, f, indent=1)
print("losses", losses, "grad norms", norms, "float64", losses64)
