"""Writes tests/fixtures/hf_train/<family>/metrics.json: for the three optimizer steps of
scripts/make_train_fixtures.py (its model, initial adapter and data, already in the fixture folder), what
TRL's SFTTrainer logs beside the loss at each step: `mean_token_accuracy` (the share of labelled tokens
whose logit is the first largest, torch's argmax) and `entropy` (the mean entropy of the predicted
distribution at those tokens, in nats), each a micro-batch's ratio averaged over the step's micro-batches
(batch 1, so one example each), from the logits the step's forward computes.

Run from the repository root with the virtualenv of make_train_fixtures.py:
    python scripts/make_train_metrics_fixtures.py [family ...]
"""
import json
import os
import sys

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, os.path.dirname(__file__))
from make_train_fixtures import ACCUM, FAMILIES, LR, MAX_NORM, OUT, STEPS, load_base  # noqa: E402


def steps_with_metrics(pm, examples):
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    accuracy, entropy, losses, cursor = [], [], [], 0
    for _ in range(STEPS):
        batch = [examples[(cursor + k) % len(examples)] for k in range(ACCUM)]
        cursor += ACCUM
        items = sum(len(ids) - 1 for ids in batch)
        opt.zero_grad()
        total, ratios = 0.0, []
        for ids in batch:
            logits = pm(input_ids=ids[None]).logits[0, :-1]
            labels = ids[1:]
            loss = F.cross_entropy(logits, labels, reduction="sum") / items
            loss.backward()
            total += loss.item()
            with torch.no_grad():
                logp = torch.log_softmax(logits.double(), dim=-1)
                token_entropy = -(logp.exp() * logp).sum(-1)
                correct = (logits.argmax(-1) == labels).double()
                ratios.append((correct.mean().item(), token_entropy.mean().item()))
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        opt.step()
        losses.append(total)
        accuracy.append(sum(r[0] for r in ratios) / len(ratios))
        entropy.append(sum(r[1] for r in ratios) / len(ratios))
    return losses, accuracy, entropy


for family in sys.argv[1:] or list(FAMILIES):
    out = os.path.join(OUT, family)
    model_dir = os.path.join(out, "model")
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    with open(os.path.join(out, "data.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    examples = [torch.tensor(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=False))
                for r in rows]
    pm = PeftModel.from_pretrained(load_base(model_dir, FAMILIES[family]), os.path.join(out, "init_adapter"),
                                   is_trainable=True)
    losses, accuracy, entropy = steps_with_metrics(pm, examples)
    with open(os.path.join(out, "expected.json")) as f:
        recorded = json.load(f)["losses"]
    # The same steps as the fixture's: the losses repeat.
    assert all(abs(a - b) <= 1e-6 * abs(b) for a, b in zip(losses, recorded)), (losses, recorded)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump({"mean_token_accuracy": accuracy, "entropy": entropy}, f, indent=1)
    print(family, "accuracy", accuracy, "entropy", entropy)
