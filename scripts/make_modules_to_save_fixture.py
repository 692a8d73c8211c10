"""Writes tests/fixtures/modules_to_save/: PEFT adapters that save the embedding and/or the output
projection whole (LoraConfig(modules_to_save=...)), with the logits the PEFT model gives, on tiny
random Qwen2 models (one with tied embeddings, one without).

Cases (each a folder with the adapter and expected.json):
- untied/both: an untied base, modules_to_save [embed_tokens, lm_head];
- tied/embed: a tied base, [embed_tokens] (PEFT leaves the output projection the base's embedding);
- tied/embed_tying: the same with ensure_weight_tying=True (the projection follows the new
  embedding; PEFT saves lm_head.weight too, unlisted);
- tied/head: a tied base, [lm_head] (the embedding stays the base's).

Run from the repository root in a virtualenv with torch, transformers and peft:
    python scripts/make_modules_to_save_fixture.py
"""
import os
import sys
import warnings

import torch
from peft import LoraConfig, get_peft_model

sys.path.insert(0, os.path.dirname(__file__))
from peft_fixture_base import random_qwen2, save_case  # noqa: E402

OUT = "tests/fixtures/modules_to_save"
IDS = [3, 17, 42, 5, 63, 8, 21, 34]
torch.manual_seed(7)


for tied, cases in [(False, [("both", ["embed_tokens", "lm_head"], False)]),
                    (True, [("embed", ["embed_tokens"], False), ("embed_tying", ["embed_tokens"], True),
                            ("head", ["lm_head"], False)])]:
    model, folder = random_qwen2(tied, OUT)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name, modules, tying in cases:
        model.load_state_dict(state)
        extra = {"ensure_weight_tying": True} if tying else {}
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                            modules_to_save=modules, **extra)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = get_peft_model(model, config)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n or "modules_to_save" in n:
                    p.add_(torch.randn_like(p) * 0.2)
        save_case(pm, os.path.join(folder, name), IDS)
        model = pm.unload()
