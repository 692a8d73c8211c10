"""Writes tests/fixtures/trainable_tokens/: PEFT LoRA adapters that also replace some rows of the
embedding and/or the output projection (LoraConfig(trainable_token_indices=...)), with the logits
the PEFT model gives, on tiny random Qwen2 models (one with tied embeddings, one without).

Cases (each a folder with the adapter and expected.json):
- untied/list: an untied base, indices as a list (the embedding's rows only);
- untied/both: {embed_tokens: [...], lm_head: [...]}, each module its own rows;
- tied/list: a tied base, a list (the projection reads the new rows too: PEFT ties them);
- tied/same: {embed_tokens: I, lm_head: I} (tied, only the embedding's rows saved);
- tied/mismatch: {embed_tokens: I, lm_head: J} (no longer tied: the projection's rows replace J
  in the base embedding);
- tied/head: {lm_head: J} (the embedding stays the base's).

Run from the repository root in a virtualenv with torch, transformers and peft:
    python scripts/make_trainable_tokens_fixture.py
"""
import os
import sys
import warnings

import torch
from peft import LoraConfig, get_peft_model

sys.path.insert(0, os.path.dirname(__file__))
from peft_fixture_base import random_qwen2, save_case  # noqa: E402

OUT = "tests/fixtures/trainable_tokens"
IDS = [3, 17, 42, 5, 63, 8, 40, 34]
torch.manual_seed(11)


CASES = {
    False: [("list", [3, 5, 40]), ("both", {"embed_tokens": [3, 5], "lm_head": [5, 17, 60]})],
    True: [("list", [3, 5, 40]), ("same", {"embed_tokens": [3, 40], "lm_head": [3, 40]}),
           ("mismatch", {"embed_tokens": [3, 5], "lm_head": [17, 60]}), ("head", {"lm_head": [17, 60]})],
}

for tied, cases in CASES.items():
    model, folder = random_qwen2(tied, OUT)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name, indices in cases:
        model.load_state_dict(state)
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                            trainable_token_indices=indices)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = get_peft_model(model, config)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n or "trainable_tokens_delta" in n:
                    p.add_(torch.randn_like(p) * 0.3)
        save_case(pm, os.path.join(folder, name), IDS)
        model = pm.unload()
