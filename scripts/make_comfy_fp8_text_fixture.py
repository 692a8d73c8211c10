"""Writes tests/fixtures/klein_text/qwen_3_tiny_fp8mixed.safetensors and expected_fp8mixed.safetensors: the tiny
Qwen3 text encoder of make_klein_text_fixture.py as ComfyUI's "fp8mixed" one-file text encoders store it
(Comfy-Org's qwen_3_8b_fp8mixed.safetensors for FLUX.2 [klein] 9B), and the caption features diffusers' klein
pipeline computes from what ComfyUI dequantizes it to.

The layout, as ComfyUI's loader reads it (comfy/ops.py `_load_quantized_module`, comfy/utils.py
`convert_old_quants`) and comfy-kitchen (ComfyUI's quantization library, installed here from PyPI) writes it:
  X.weight        float8_e4m3fn (or float8_e5m2) codes, [out, in]
  X.weight_scale  float32 scalar (0-d): the weight is codes * scale (comfy-kitchen's dequantize_per_tensor_fp8;
                  quantize takes scale = amax / 448 and codes = round(w / scale))
  X.input_scale   float32 scalar, optional: the fp8 matmul's activation scale; text encoders run with
                  full_precision_mm (weights dequantized), so it changes nothing
  X.comfy_quant   uint8 [n]: UTF-8 JSON, {"format": "float8_e4m3fn"} (json.dumps, as ComfyUI writes it) or the
                  compact sorted form comfy-quants writes with "full_precision_matrix_mult": true
Layers without a comfy_quant marker are plain bf16 tensors ("mixed"). Embeddings may be fp8 too
(MixedPrecisionOps.Embedding). Names are transformers' (model.layers.N...), no lm_head (tied).

This file: the embedding and decoder layers 1-26 in fp8 (e4m3; layer 5's in e5m2), layers 0 and 27 and every
norm in bf16, input scales on the attention projections of even layers.

expected_fp8mixed.safetensors (float32), per caption i (0: "a red fox sitting in snow", 1: ""):
  caption{i}.features (24, 96): Flux2KleinPipeline._get_qwen3_prompt_embeds on Qwen3ForCausalLM holding the
  dequantized weights (comfy-kitchen's dequantize in float32), with the tokenizer of the klein_text fixture.
Also checked: the dequantized weights against codes.float() * scale in plain torch, and how far the features
move from the bf16 model's (tests/fixtures/klein_text/expected.safetensors).

Run from the repository root with a virtualenv holding torch, transformers (5.x), diffusers (0.42.x) and
comfy-kitchen (0.2.x), after make_klein_text_fixture.py:
    python scripts/make_comfy_fp8_text_fixture.py
"""
import importlib.metadata
import json
import os
import shutil
import tempfile

import torch
import comfy_kitchen
from comfy_kitchen.tensor.fp8 import TensorCoreFP8Layout
from diffusers import Flux2KleinPipeline
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Qwen2TokenizerFast, Qwen3ForCausalLM

torch.set_num_threads(2)
DIR = "tests/fixtures/klein_text"
QWEN25 = "assets/qwen2.5-tokenizer"
MAX_LEN = 24
CAPTIONS = ["a red fox sitting in snow", ""]
LAYERS = (9, 18, 27)
BF16_LAYERS = (0, 27)
E5M2_LAYER = 5
print(f"torch {torch.__version__}, comfy-kitchen {importlib.metadata.version('comfy-kitchen')}")

with safe_open(os.path.join(DIR, "text_encoder/model.safetensors"), "pt") as f:
    source = {k: f.get_tensor(k) for k in f.keys()}
assert all(t.dtype == torch.bfloat16 for t in source.values())


def marker(fmt, compact):
    conf = {"format": fmt}
    if compact:
        conf["full_precision_matrix_mult"] = True
        text = json.dumps(conf, separators=(",", ":"), sort_keys=True)
    else:
        text = json.dumps(conf)
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)


stored, dequantized = {}, {}
for name, w in source.items():
    layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
    quantize = w.ndim == 2 and layer not in BF16_LAYERS
    if not quantize:
        stored[name] = w
        dequantized[name] = w.float()
        continue
    fp8 = torch.float8_e5m2 if layer == E5M2_LAYER else torch.float8_e4m3fn
    codes, params = TensorCoreFP8Layout.quantize(w.float(), scale="recalculate", dtype=fp8)
    assert codes.dtype == fp8 and params.scale.dtype == torch.float32 and params.scale.ndim == 0
    module = name.removesuffix("weight")
    stored[name] = codes
    stored[module + "weight_scale"] = params.scale.clone()
    stored[module + "comfy_quant"] = marker(str(fp8).removeprefix("torch."), compact=layer is not None and layer % 3 == 0)
    if layer is not None and layer % 2 == 0 and "self_attn" in name:
        stored[module + "input_scale"] = torch.tensor(0.0173, dtype=torch.float32)
    dq = TensorCoreFP8Layout.dequantize(codes, TensorCoreFP8Layout.Params(
        scale=params.scale, orig_dtype=torch.float32, orig_shape=tuple(codes.shape)))
    assert dq.dtype == torch.float32
    assert torch.equal(dq, codes.float() * params.scale), name
    dequantized[name] = dq
    rel = ((dq - w.float()).norm() / w.float().norm()).item()
    assert 0 < rel < (0.2 if fp8 == torch.float8_e5m2 else 0.06), (name, rel)

out = os.path.join(DIR, "qwen_3_tiny_fp8mixed.safetensors")
save_file(stored, out)
with safe_open(out, "pt") as f:
    kinds = {}
    for k in f.keys():
        kinds[f.get_slice(k).get_dtype()] = kinds.get(f.get_slice(k).get_dtype(), 0) + 1
print(f"{out}: {os.path.getsize(out)} bytes, dtypes {kinds}")

# The pipeline on the dequantized weights, float32, with the klein_text fixture's tokenizer.
tmp = tempfile.mkdtemp()
shutil.copy(os.path.join(QWEN25, "tokenizer.json"), tmp)
shutil.copy(os.path.join(DIR, "tokenizer/tokenizer_config.json"), tmp)
tokenizer = Qwen2TokenizerFast.from_pretrained(tmp)
model_dir = os.path.join(tmp, "model")
os.makedirs(model_dir)
shutil.copy(os.path.join(DIR, "text_encoder/config.json"), model_dir)
save_file(dequantized, os.path.join(model_dir, "model.safetensors"))
encoder = Qwen3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
for name, p in encoder.state_dict().items():
    if name != "lm_head.weight":
        assert torch.equal(p, dequantized[name]), name
with torch.no_grad():
    features = Flux2KleinPipeline._get_qwen3_prompt_embeds(
        text_encoder=encoder, tokenizer=tokenizer, prompt=CAPTIONS, device=torch.device("cpu"),
        max_sequence_length=MAX_LEN, hidden_states_layers=LAYERS)
assert features.shape == (2, MAX_LEN, 96) and features.dtype == torch.float32
with safe_open(os.path.join(DIR, "expected.safetensors"), "pt") as f:
    for i in range(len(CAPTIONS)):
        bf16 = f.get_tensor(f"caption{i}.features")
        print(f"caption {i}: fp8 features differ from the bf16 model's by "
              f"{((features[i] - bf16).norm() / bf16.norm()).item():.3e} (relative)")
save_file({f"caption{i}.features": features[i].contiguous() for i in range(len(CAPTIONS))},
          os.path.join(DIR, "expected_fp8mixed.safetensors"),
          metadata={"captions": json.dumps(CAPTIONS), "max_length": str(MAX_LEN)})
shutil.rmtree(tmp)
print("wrote", os.path.join(DIR, "expected_fp8mixed.safetensors"))
