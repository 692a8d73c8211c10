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
import json
import os
import warnings

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM

OUT = "tests/fixtures/modules_to_save"
IDS = [3, 17, 42, 5, 63, 8, 21, 34]
torch.manual_seed(7)


def base(tied):
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      tie_word_embeddings=tied, torch_dtype="float32")
    model = Qwen2ForCausalLM(cfg)
    # Weights of std 0.1 and more: with transformers' 0.02 every logit is near zero whatever the bug.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.ndim == 1 else 0.15)
    folder = os.path.join(OUT, "tied" if tied else "untied")
    model.save_pretrained(os.path.join(folder, "model"), safe_serialization=True)
    return model, folder


for tied, cases in [(False, [("both", ["embed_tokens", "lm_head"], False)]),
                    (True, [("embed", ["embed_tokens"], False), ("embed_tying", ["embed_tokens"], True),
                            ("head", ["lm_head"], False)])]:
    model, folder = base(tied)
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
        pm.eval()
        with torch.no_grad():
            logits = pm(torch.tensor([IDS])).logits[0]
        adapter = os.path.join(folder, name)
        pm.save_pretrained(adapter)
        os.remove(os.path.join(adapter, "README.md"))
        with open(os.path.join(adapter, "expected.json"), "w") as f:
            json.dump({"ids": IDS, "logits": logits.flatten().tolist(),
                       "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                    "peft": peft.__version__}}, f)
        model = pm.unload()
