"""Writes tests/fixtures/config_defaults.json: what transformers' config classes make of a config.json that
gives a family's dimensions and nothing else (every other field left to the class's defaults), for each
text family nibble reads: the RMSNorm epsilon, the head size, each layer's attention window, RoPE's
resolved parameters (the full layers' where they differ by layer type) and the rotary embedding's
attention scaling, the query scale's beta (Ministral 3), and whether the embedding is tied.
tests/hf_parity.rs parses the same JSON with nibble and compares.

Each layer's window is its attention module's `sliding_window` where the module keeps one; Mistral's,
Mixtral's, Ministral 3's and Phi-3's modules pass `config.sliding_window` to every layer's attention
instead (modeling_mistral.py: `sliding_window=getattr(self.config, "sliding_window", None)`), Qwen2-MoE's
keep it on the sliding layers alone, and Llama's never slide.

Run from the repository root with a virtualenv holding torch and transformers:
    python scripts/make_config_defaults_fixture.py
"""
import json

import torch
import transformers
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

DIMS = dict(vocab_size=131072, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
            num_attention_heads=4, num_key_value_heads=2)
# Ministral (8B) has no usable default RoPE base in its class; Gemma 4 nibble defaults on its own
# (tests/hf_parity.rs), and its class refuses a global head_dim.
TYPES = ["qwen2", "qwen3", "llama", "mistral", "ministral3", "smollm3", "phi3", "gemma3_text", "qwen3_moe",
         "qwen2_moe", "mixtral", "gpt_oss"]
EVERY_LAYER = ("mistral", "mixtral", "ministral3", "phi3")

cases = {}
for model_type in TYPES:
    config = CONFIG_MAPPING[model_type](**DIMS)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    windows = []
    for i, layer in enumerate(model.model.layers):
        if model_type in EVERY_LAYER:
            windows.append(config.sliding_window)
        elif model_type == "llama":
            windows.append(None)
        elif hasattr(layer.self_attn, "sliding_window"):
            windows.append(layer.self_attn.sliding_window)
        else:
            sliding = config.layer_types[i] == "sliding_attention"
            windows.append(config.sliding_window if sliding else None)
    rope = config.rope_parameters
    if "full_attention" in rope:
        rope = rope["full_attention"]
    rotary = model.model.rotary_emb
    scaling = getattr(rotary, "attention_scaling", None)
    if scaling is None:
        scaling = rotary.full_attention_attention_scaling
    cases[model_type] = {
        "config": {"model_type": model_type, **DIMS},
        "rms_norm_eps": config.rms_norm_eps,
        "head_dim": model.model.layers[0].self_attn.head_dim,
        "windows": windows,
        "rope_theta": rope["rope_theta"],
        "rope_type": rope.get("rope_type", rope.get("type")),
        "rope_factor": rope.get("factor"),
        "rope": rope,
        "attention_scaling": scaling,
        "tie_word_embeddings": config.tie_word_embeddings,
    }
    print(model_type, cases[model_type])
with open("tests/fixtures/config_defaults.json", "w") as f:
    json.dump({"transformers": transformers.__version__, "cases": cases}, f, indent=1)
