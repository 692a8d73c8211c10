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
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, os.path.dirname(__file__))
from make_train_fixtures import FAMILIES, OUT, load_base, steps_against_float64  # noqa: E402

# Qwen2, and Gemma 4 for its capped logits (the weight is the capped distribution's probability).
CHOSEN = ["qwen2", "gemma4_text"]


def dft(logits, labels):
    """TRL's dynamic fine-tuning loss: each token's negative log-likelihood times its label's
    probability, detached, summed."""
    log_probs = torch.log_softmax(logits, dim=-1).gather(-1, labels[:, None])[:, 0]
    return (-log_probs * log_probs.exp().detach()).sum()


for family in sys.argv[1:] or CHOSEN:
    out = os.path.join(OUT, family)
    model_dir, init = os.path.join(out, "model"), os.path.join(out, "init_adapter")
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    with open(os.path.join(out, "data.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    examples = [torch.tensor(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=False))
                for r in rows]
    bases = (load_base(model_dir, FAMILIES[family]), load_base(model_dir, FAMILIES[family]))
    losses, norms = steps_against_float64(os.path.join(out, "dft"), bases, init, examples, dft,
                                          versions={"trl": trl.__version__})
    print(family, "dft losses", losses, "grad norms", norms)
