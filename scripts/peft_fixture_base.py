"""What the PEFT fixture scripts share: a tiny random Qwen2 base and an adapter case saved with
the logits PEFT's model gives (scripts/make_modules_to_save_fixture.py,
scripts/make_trainable_tokens_fixture.py)."""
import json
import os

import peft
import torch
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM


def random_qwen2(tied, out):
    """A tiny Qwen2 (tied or untied embeddings) saved to OUT/tied/model or OUT/untied/model;
    returns it and its case folder."""
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      tie_word_embeddings=tied, torch_dtype="float32")
    model = Qwen2ForCausalLM(cfg)
    # Weights of std 0.1 and more: with transformers' 0.02 every logit is near zero whatever the bug.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.ndim == 1 else 0.15)
    folder = os.path.join(out, "tied" if tied else "untied")
    model.save_pretrained(os.path.join(folder, "model"), safe_serialization=True)
    return model, folder


def save_case(pm, adapter, ids):
    """Saves the PEFT model's adapter to ADAPTER with expected.json: its logits for IDS."""
    pm.eval()
    with torch.no_grad():
        logits = pm(torch.tensor([ids])).logits[0]
    pm.save_pretrained(adapter)
    os.remove(os.path.join(adapter, "README.md"))
    with open(os.path.join(adapter, "expected.json"), "w") as f:
        json.dump({"ids": ids, "logits": logits.flatten().tolist(),
                   "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                "peft": peft.__version__}}, f)
