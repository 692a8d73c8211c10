"""Writes tests/fixtures/hf_train/<family>/dft/: the three optimizer steps of
scripts/make_train_fixtures.py (its model, initial adapter and data, already in the fixture folder) with
TRL's dynamic fine-tuning loss (SFTConfig(loss_type="dft")): each labelled token's negative
log-likelihood times the probability the model gives its label, that probability detached, summed and
divided by the step's label count, as SFTTrainer.compute_loss computes it. Writes the adapter after the
steps (adapter_model.safetensors), and expected.json: each step's loss and gradient norm, and how far
float32 arithmetic alone moves each LoRA update (the same steps in float64).

Run from the repository root with the virtualenv of make_train_fixtures.py:
    python scripts/make_dft_fixture.py [family ...]
"""
import json
import os
import sys

import torch
import trl
from peft import PeftModel
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, os.path.dirname(__file__))
from make_train_fixtures import ACCUM, FAMILIES, LR, MAX_NORM, OUT, STEPS, load_base, lora_state, save_adapter  # noqa: E402,E501

# Qwen2, and Gemma 4 for its capped logits (the weight is the capped distribution's probability).
CHOSEN = ["qwen2", "gemma4_text"]


def train_dft(pm, examples):
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    losses, norms, cursor = [], [], 0
    for _ in range(STEPS):
        batch = [examples[(cursor + k) % len(examples)] for k in range(ACCUM)]
        cursor += ACCUM
        items = sum(len(ids) - 1 for ids in batch)
        opt.zero_grad()
        total = 0.0
        for ids in batch:
            logits = pm(input_ids=ids[None]).logits[0, :-1]
            log_probs = torch.log_softmax(logits, dim=-1).gather(-1, ids[1:, None])[:, 0]
            per_token_loss = -log_probs * log_probs.exp().detach()
            loss = per_token_loss.sum() / items
            loss.backward()
            total += loss.item()
        norms.append(torch.nn.utils.clip_grad_norm_(params, MAX_NORM).item())
        opt.step()
        losses.append(total)
    return losses, norms


for family in sys.argv[1:] or CHOSEN:
    out = os.path.join(OUT, family)
    model_dir, init = os.path.join(out, "model"), os.path.join(out, "init_adapter")
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    with open(os.path.join(out, "data.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    examples = [torch.tensor(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=False))
                for r in rows]
    pm = PeftModel.from_pretrained(load_base(model_dir, FAMILIES[family]), init, is_trainable=True)
    start = lora_state(pm)
    losses, norms = train_dft(pm, examples)
    folder = os.path.join(out, "dft")
    save_adapter(pm, folder)
    pm64 = PeftModel.from_pretrained(load_base(model_dir, FAMILIES[family]).double(), init,
                                     is_trainable=True).double()
    losses64, norms64 = train_dft(pm64, examples)
    ours32, ours64 = lora_state(pm), lora_state(pm64)
    noise = {k: ((ours32[k].double() - ours64[k]).norm() / (ours64[k] - start[k].double()).norm()).item()
             for k in ours32}
    with open(os.path.join(folder, "expected.json"), "w") as f:
        json.dump({"losses": losses, "grad_norms": norms, "update_float32_noise": noise,
                   "float64_losses": losses64, "float64_grad_norms": norms64,
                   "trl": trl.__version__, "torch": torch.__version__}, f, indent=1)
    print(family, "dft losses", losses, "grad norms", norms)
