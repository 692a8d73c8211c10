"""Writes tests/fixtures/rope_scaling.json: the cos and sin tables transformers' rotary embedding gives for
configs with scaled RoPE (YaRN in its variants, llama3 without its own original length), each with the
config.json text that nibble parses, so that tests/ops.rs can compare nibble's tables with them.

Run from the repository root with a virtualenv holding torch and transformers:
    python scripts/make_rope_fixture.py
"""
import json

import torch
import transformers
from transformers import Phi3Config, Qwen3Config
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

common = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=1, head_dim=128)
cases = {
    # Qwen3's suggested 128k setting.
    "yarn": dict(max_position_embeddings=131072, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 32768}),
    # DeepSeek-style mscale pair, no truncation, other betas.
    "yarn_mscale": dict(max_position_embeddings=65536, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 8192,
        "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False}),
    # An explicit attention factor, and the factor left to the ratio of the lengths.
    "yarn_given_factor": dict(max_position_embeddings=32768, rope_parameters={
        "rope_type": "yarn", "rope_theta": 500000.0, "attention_factor": 1.25, "factor": None,
        "original_max_position_embeddings": 4096}),
    # llama3 scaling without its own original length: max_position_embeddings stands in.
    "llama3_default_original": dict(max_position_embeddings=2048, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0}),
}
positions = list(range(32)) + [1000, 5000, 40000, 131071]
out = {"transformers": transformers.__version__, "torch": torch.__version__, "positions": positions, "cases": {}}


def add(name, config, rotary, positions, half, legacy=None):
    x = torch.zeros(1, len(positions), 8)
    cos, sin = rotary(x, torch.tensor([positions]))
    out["cases"][name] = {
        "config": json.loads(config.to_json_string()),
        "positions": positions,
        "cos": cos[0, :, :half].flatten().tolist(),
        "sin": sin[0, :, :half].flatten().tolist(),
        "attention_scaling": rotary.attention_scaling,
    }
    if legacy is not None:
        out["cases"][name]["legacy_config"] = legacy
    print(name, "attention scaling", rotary.attention_scaling)


for name, extra in cases.items():
    config = Qwen3Config(**common, **extra)
    add(name, config, Qwen3RotaryEmbedding(config), positions, config.head_dim // 2)

# Phi-4-mini's LongRoPE (its config.json as released, transformers 4.x spelling): the short factors while
# every position is below the original 4096, the long ones once one is past it; 96 of 128 channels rotate.
with open("tests/fixtures/configs/phi-4-mini-instruct.json") as f:
    legacy = json.load(f)
for name, at in [("longrope_short", list(range(32)) + [1000, 4095]), ("longrope_long", positions)]:
    config = Phi3Config(**{k: v for k, v in legacy.items() if k not in ("auto_map", "_name_or_path")})
    rotated = int(config.hidden_size // config.num_attention_heads * config.partial_rotary_factor)
    add(name, config, Phi3RotaryEmbedding(config), at, rotated // 2, legacy)
with open("tests/fixtures/rope_scaling.json", "w") as f:
    json.dump(out, f)
