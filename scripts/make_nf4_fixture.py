"""Writes tests/fixtures/nf4_bitsandbytes.safetensors: inputs, codes and absmax as bitsandbytes 4-bit
quantization produces them (quant_type="nf4"), for group sizes 32, 64 and 128.

Run from the repository root with a virtualenv holding torch and bitsandbytes:
    python scripts/make_nf4_fixture.py
"""
import numpy as np
import torch
from bitsandbytes.functional import quantize_4bit, dequantize_4bit, get_4bit_type
from safetensors.torch import save_file

torch.manual_seed(1234)
rows, cols = 16, 256
tensors = {}
code = get_4bit_type("nf4", device="cpu")
thresholds = (code[:-1] + code[1:]) / 2
for g in (32, 64, 128):
    w = torch.randn(rows, cols) * 0.05
    # Row 0: bf16-rounded weights, as a bf16 checkpoint would hold them.
    w[0] = w[0].to(torch.bfloat16).float()
    # Row 1: values exactly on the decision thresholds (absmax 1.0 in each group), to pin the tie rule.
    row = torch.empty(cols)
    for start in range(0, cols, g):
        vals = torch.cat([torch.tensor([1.0]), thresholds, -thresholds, thresholds.flip(0)])
        row[start:start + g] = vals.repeat((g + len(vals) - 1) // len(vals))[:g]
    w[1] = row
    # Row 2: heavy tails (outliers dominate a group's absmax).
    w[2] = torch.distributions.StudentT(2.0).sample((cols,)) * 0.05
    packed, state = quantize_4bit(w, blocksize=g, quant_type="nf4")
    p = packed.flatten()
    codes = torch.stack([(p >> 4) & 0xF, p & 0xF], dim=1).flatten()[: rows * cols].reshape(rows, cols)
    deq = dequantize_4bit(packed, state, blocksize=g, quant_type="nf4")
    tensors[f"g{g}.input"] = w.contiguous()
    tensors[f"g{g}.codes"] = codes.to(torch.uint8).contiguous()
    tensors[f"g{g}.absmax"] = state.absmax.float().reshape(rows, cols // g).contiguous()
    tensors[f"g{g}.dequantized"] = deq.float().reshape(rows, cols).contiguous()

import bitsandbytes
save_file(tensors, "tests/fixtures/nf4_bitsandbytes.safetensors",
          metadata={"bitsandbytes": bitsandbytes.__version__, "torch": torch.__version__})
print("wrote", len(tensors), "tensors")
