"""Writes tests/fixtures/hf_train/qwen2/rank_pattern/: PEFT's per-module ranks and alphas
(LoraConfig(rank_pattern=..., alpha_pattern=...)), checked two ways.

- resolution.json: for several pattern sets (plain names, dotted paths, regular expressions, entries
  that overlap, where the first in order wins), the rank and scaling PEFT gives each module of the
  qwen2 fixture model, with and without rsLoRA.
- init_adapter/, adapter_model.safetensors, expected.json: scripts/make_train_fixtures.py's three
  optimizer steps from an adapter whose modules have ranks 2 to 6 and alphas of their own (random A
  and B), as transformers + peft train it; each step's loss and gradient norm, and how far float32
  arithmetic alone moves each LoRA update (the same steps in float64).

Run from the repository root with the virtualenv of make_train_fixtures.py:
    python scripts/make_rank_pattern_fixture.py
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
PATTERN_SETS = [
    {"rank_pattern": {"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6,
                      "model.layers.0.self_attn.v_proj": 3, "up_proj|gate_proj": 5},
     "alpha_pattern": {"o_proj": 3.0, r"layers\.0\..*_proj": 12}},
    # Overlapping entries: the first that matches wins, in the order written.
    {"rank_pattern": {r"layers\.0\.self_attn\.q_proj": 7, "q_proj": 3, ".*": 5},
     "alpha_pattern": {"mlp\\..*": 2.5}},
    # Names that only look alike: `proj` names no module (the match is of a path's whole end after
    # a dot), `_proj` neither.
    {"rank_pattern": {"proj": 9, "_proj": 9, "k_pro.": 6}, "alpha_pattern": {}},
]

out = os.path.join(OUT, FAMILY)
model_dir = os.path.join(out, "model")
resolution = []
for patterns in PATTERN_SETS:
    for rslora in [False, True]:
        pm = get_peft_model(load_base(model_dir, TARGETS), LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM",
            use_rslora=rslora, **patterns))
        modules = {}
        for name, module in pm.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "scaling", {}):
                path = name.removeprefix("base_model.model.")
                modules[path] = {"rank": module.lora_A["default"].weight.shape[0],
                                 "scaling": module.scaling["default"]}
        resolution.append({**patterns, "use_rslora": rslora, "modules": modules})

folder = os.path.join(out, "rank_pattern")
os.makedirs(folder, exist_ok=True)
with open(os.path.join(folder, "resolution.json"), "w") as f:
    json.dump({"peft": peft.__version__, "r": 4, "lora_alpha": 8, "cases": resolution}, f, indent=1)

tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
with open(os.path.join(out, "data.jsonl")) as f:
    rows = [json.loads(line) for line in f]
examples = [torch.tensor(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=False))
            for r in rows]
torch.manual_seed(1)
pm = get_peft_model(load_base(model_dir, TARGETS), LoraConfig(
    r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM",
    **PATTERN_SETS[0]))
with torch.no_grad():
    for name, p in pm.named_parameters():
        if "lora_" in name:
            p.copy_(torch.randn_like(p) * 0.1)
init = os.path.join(folder, "init_adapter")
save_adapter(pm, init)
# Trained as loaded from the folder: PEFT writes adapter_config.json with its keys sorted, so where two
# expressions name one module (o_proj of layer 0 here) the one first in the file wins on loading,
# whichever came first when the adapter was made. nibble loads as PEFT loads.
bases = (load_base(model_dir, TARGETS), load_base(model_dir, TARGETS))
losses, norms = steps_against_float64(folder, bases, init, examples, versions={"peft": peft.__version__})
os.remove(os.path.join(folder, "adapter_config.json"))  # the init adapter's, which the run keeps
print("losses", losses, "grad norms", norms)
