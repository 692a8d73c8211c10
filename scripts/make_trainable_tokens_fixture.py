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
import json
import os
import warnings

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM

OUT = "tests/fixtures/trainable_tokens"
IDS = [3, 17, 42, 5, 63, 8, 40, 34]
torch.manual_seed(11)


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


CASES = {
    False: [("list", [3, 5, 40]), ("both", {"embed_tokens": [3, 5], "lm_head": [5, 17, 60]})],
    True: [("list", [3, 5, 40]), ("same", {"embed_tokens": [3, 40], "lm_head": [3, 40]}),
           ("mismatch", {"embed_tokens": [3, 5], "lm_head": [17, 60]}), ("head", {"lm_head": [17, 60]})],
}

for tied, cases in CASES.items():
    model, folder = base(tied)
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
