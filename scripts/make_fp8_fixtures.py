"""Writes the FP8 checkpoints of tests/fixtures/hf/ and what transformers + peft compute from them.

Each is an existing fixture (scripts/make_model_fixtures.py) with its decoder's linear weights stored as
8-bit floats (E4M3) and scales beside them, in the three layouts checkpoints are released in:
  qwen3_fp8     transformers' fine-grained FP8 (Qwen3-*-FP8): `weight_scale_inv` per block of 32 x 32
                (`weight_block_size`; the released ones use 128 x 128), scales in float32;
  mistral3_fp8  Ministral 3 as released: the multimodal folder, one bfloat16 `weight_scale_inv` per
                tensor (`weight_block_size` null), static `activation_scale`s, the head and the vision
                tower left unquantized (`modules_to_not_convert`);
  llama_fp8     llm-compressor's compressed-tensors "float-quantized": one `weight_scale` per output
                channel ([rows, 1], bfloat16), the head ignored.
The expected logits, loss and LoRA gradients come from transformers loading each folder with its own
FP8 reader (dequantizing to float32), then peft, exactly as make_model_fixtures.py does for the others
(unquantized, and with NF4 group 64 emulated on the dequantized weights). Also writes
tests/fixtures/fp8_values.json: every byte's value (float32 bits) as torch reads it in E4M3, E5M2 and E8M0.

Run from the repository root with a virtualenv holding torch, transformers, peft, bitsandbytes and
compressed-tensors:
    python scripts/make_fp8_fixtures.py
"""
import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file
from transformers import CompressedTensorsConfig, FineGrainedFP8Config

from make_model_fixtures import OUT, TARGETS, models, write_expected

E4M3_MAX = 448.0


def quantize(w, rows_per_scale, cols_per_scale):
    """E4M3 codes and float32 scales of `w` [rows, cols], one scale per block (each block's largest
    magnitude maps to 448)."""
    r, c = w.shape
    blocks = w.reshape(r // rows_per_scale, rows_per_scale, c // cols_per_scale, cols_per_scale)
    scale = blocks.abs().amax(dim=(1, 3)) / E4M3_MAX
    codes = (blocks / scale[:, None, :, None]).reshape(r, c).to(torch.float8_e4m3fn)
    return codes, scale


def convert(base, name, quantization_config, layout):
    """Copies fixture `base` to `name` with the decoder's linear weights in FP8; `layout(key, w)` gives
    the tensors that replace `key`."""
    src, dst = os.path.join(OUT, base), os.path.join(OUT, name)
    shutil.rmtree(dst, ignore_errors=True)
    os.makedirs(dst)
    state = load_file(os.path.join(src, "model.safetensors"))
    out = {}
    for key, w in state.items():
        linear = key.endswith(".weight") and key.split(".")[-2] in TARGETS and "vision" not in key
        out.update(layout(key, w) if linear else {key: w})
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = quantization_config
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return dst


def fine_grained(key, w):
    codes, scale = quantize(w, 32, 32)
    return {key: codes, key + "_scale_inv": scale}


def per_tensor_static(key, w):
    codes, scale = quantize(w, *w.shape)
    prefix = key[: -len("weight")]
    return {key: codes, key + "_scale_inv": scale.reshape(()).to(torch.bfloat16),
            prefix + "activation_scale": torch.tensor(0.05, dtype=torch.bfloat16)}


def per_channel(key, w):
    # bfloat16 scales as llm-compressor writes them: the codes are taken against the rounded scale.
    scale = (w.abs().amax(dim=1, keepdim=True) / E4M3_MAX).to(torch.bfloat16)
    codes = (w / scale.float()).to(torch.float8_e4m3fn)
    return {key: codes, key[: -len("weight")] + "weight_scale": scale}


variants = [
    ("qwen3", "qwen3_fp8", fine_grained,
     {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [32, 32]},
     dict(quantization_config=FineGrainedFP8Config(dequantize=True))),
    ("mistral3", "mistral3_fp8", per_tensor_static,
     {"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": None, "dequantize": False,
      "modules_to_not_convert": ["model.vision_tower", "model.multi_modal_projector", "lm_head"]},
     dict(quantization_config=FineGrainedFP8Config(dequantize=True))),
    ("llama", "llama_fp8", per_channel,
     {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
      "config_groups": {"group_0": {
          "targets": ["Linear"], "format": "float-quantized",
          "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel", "dynamic": False},
          "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token",
                                "dynamic": True}}},
      "ignore": ["lm_head"], "kv_cache_scheme": None, "sparsity_config": {}},
     dict(quantization_config=CompressedTensorsConfig(run_compressed=False))),
]

if __name__ == "__main__":
    for index, (base, name, layout, quantization_config, load) in enumerate(variants):
        torch.manual_seed(100 + index)
        folder = convert(base, name, quantization_config, layout)
        cls, config = models[base]
        write_expected(base, cls, config, folder, **load)

    # As float32 bit patterns, which keep NaN and the infinities apart.
    codes = torch.arange(256, dtype=torch.uint8)
    values = {dtype: codes.view(getattr(torch, dtype)).float().view(torch.int32).tolist()
              for dtype in ("float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu")}
    with open("tests/fixtures/fp8_values.json", "w") as f:
        json.dump(values, f)
