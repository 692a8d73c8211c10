"""Writes tests/fixtures/sampling.json: the next-token distributions transformers' `generate` samples
from, after its logits processors (repetition penalty; temperature, top-k, top-p, min-p, in its
order and with its defaults), for random logits and contexts, and the greedy picks with a
repetition penalty. nibble's `generate::distribution` must give the same tokens and probabilities.

Run from the repository root in a virtualenv with torch and transformers:
    python scripts/make_sampling_fixture.py
"""
import json

import torch
import transformers
from transformers import GenerationConfig, LogitsProcessorList
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

torch.manual_seed(3)
VOCAB = 40
CONFIGS = [
    {"temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05},  # Qwen2.5-Instruct's
    {"temperature": 0.6, "top_k": 50, "top_p": 0.95},
    {"temperature": 1.3, "top_k": 0, "top_p": 1.0, "min_p": 0.1},
    {"temperature": 1.0, "top_k": 5, "top_p": 1.0},
    {"temperature": 0.9, "top_k": 0, "top_p": 0.5, "min_p": 0.05, "repetition_penalty": 1.5},
    {"temperature": 2.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 0.8},
]


def processors(c):
    """As GenerationMixin._get_logits_processor builds them for do_sample=True."""
    out = LogitsProcessorList()
    if c.get("repetition_penalty", 1.0) != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(c["repetition_penalty"]))
    if c["temperature"] != 1.0:
        out.append(TemperatureLogitsWarper(c["temperature"]))
    if c["top_k"] != 0:
        out.append(TopKLogitsWarper(top_k=c["top_k"], min_tokens_to_keep=1))
    if c["top_p"] < 1.0:
        out.append(TopPLogitsWarper(top_p=c["top_p"], min_tokens_to_keep=1))
    if c.get("min_p") is not None:
        out.append(MinPLogitsWarper(min_p=c["min_p"], min_tokens_to_keep=1))
    return out


cases = []
for c in CONFIGS:
    for _ in range(3):
        logits = torch.randn(1, VOCAB) * 2.5
        context = torch.randint(0, VOCAB, (1, 12))
        scores = processors(c)(context, logits.clone())
        probs = torch.softmax(scores, dim=-1)[0]
        greedy_scores = RepetitionPenaltyLogitsProcessor(c.get("repetition_penalty", 1.0) or 1.0)(
            context, logits.clone()) if c.get("repetition_penalty", 1.0) != 1.0 else logits
        cases.append({"config": c, "logits": logits[0].tolist(), "context": context[0].tolist(),
                      "probs": probs.tolist(), "greedy": int(greedy_scores[0].argmax())})

# The defaults transformers fills in for a generation_config.json, as `generate` resolves them.
defaults = GenerationConfig._get_default_generation_params()
with open("tests/fixtures/sampling.json", "w") as f:
    json.dump({"cases": cases,
               "defaults": {k: defaults[k] for k in ["do_sample", "temperature", "top_k", "top_p",
                                                      "repetition_penalty"]},
               "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}, f)
