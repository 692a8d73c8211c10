"""The PyTorch side of a CPU speed comparison for one FLUX.2 [klein] LoRA training step: diffusers'
Flux2Transformer2DModel + peft, timed against nibble's klein training step on the same transformer folder.

Shapes (both with 1 double-stream and 1 single-stream block, in_channels 128, mlp_ratio 3, axes_dims_rope
(32, 32, 32, 32), rope_theta 2000, timestep_guidance_channels 256, guidance_embeds False, eps 1e-6, patch_size 1):
  tiny     2 heads of 128 (hidden 256), joint_attention_dim 384
  slice4b  24 heads of 128 (hidden 3072, klein 4B's width), joint_attention_dim 7680 (klein 4B's text width)

What it does:
1. Builds the model with torch.manual_seed(0), re-draws every parameter (2-D: N(0, 0.02); 1-D, i.e. the q/k RMSNorm
   weights: 1 + N(0, 0.02)) so that nothing diffusers zero-initialises stays zero, and saves it in diffusers layout,
   weights in bfloat16, to OUT/transformer/ (config.json + diffusion_pytorch_model.safetensors). Nothing else is
   written; this is the folder nibble's side loads.
2. Unless --write-only, for each dtype (float32, bfloat16): loads that folder in the dtype, freezes it, attaches a
   PEFT LoRA (r 32, alpha 32, dropout 0; diffusers' model.add_adapter, B zero-initialised as peft does), turns on
   gradient checkpointing (diffusers' enable_gradient_checkpointing: torch.utils.checkpoint, use_reentrant=False,
   around every double and single block, as nibble's klein preset checkpoints each block), torch.set_num_threads(2).
   One step = forward on hidden_states [1, S*S, 128] and encoder_hidden_states [1, T, joint_attention_dim] (random,
   in the dtype), timestep = sigma in [0, 1] (Flux2Transformer2DModel.forward multiplies it by 1000 itself, as the
   pipeline passes scheduler_t / 1000), img_ids / txt_ids as Flux2KleinPipeline builds them
   (cartesian_prod(t, h, w, l)), guidance None; loss = float32 MSE against a random target; backward;
   torch.optim.AdamW(lr 1e-4, weight_decay 1e-4) over the LoRA parameters; step; zero_grad. One warm-up step, then
   --steps timed steps; prints one JSON line per dtype.

LoRA targets. nibble (like ai-toolkit) puts LoRA on the FUSED BFL linears: per double block img_attn.qkv,
img_attn.proj, img_mlp.0, img_mlp.2 and the txt_ twins (8), per single block linear1 and linear2 (2): 10 matrices for
1 + 1 blocks. diffusers splits the double blocks' qkv, so the equivalent PEFT targets (the modules diffusers' own
Flux2 LoRA conversion, _convert_non_diffusers_flux2_lora_to_diffusers, maps the fused targets to) are
  transformer_blocks.{i}.attn.to_q / to_k / to_v / to_out.0              (img_attn.qkv x3, img_attn.proj)
  transformer_blocks.{i}.attn.add_q_proj / add_k_proj / add_v_proj / to_add_out   (txt_attn.qkv x3, txt_attn.proj)
  transformer_blocks.{i}.ff.linear_in / linear_out                       (img_mlp.0, img_mlp.2)
  transformer_blocks.{i}.ff_context.linear_in / linear_out               (txt_mlp.0, txt_mlp.2)
  single_transformer_blocks.{j}.attn.to_qkv_mlp_proj / to_out            (linear1, linear2)
i.e. 12 + 2 = 14 adapted weight matrices for nibble's 10. The same base weights get a LoRA, but PEFT gives each of
q, k, v its own A (r x D) where the fused qkv has one A and one 3D x r B, so PEFT's LoRA has 4 more A matrices
(2 per double block) and does 3 down-projections where nibble does 1; the base compute is identical.

Run with a virtualenv holding torch, diffusers (0.42.x) and peft; OUT outside the repository:
    python scripts/bench_flux2_step.py --shape tiny --out /tmp/bench_tiny
    python scripts/bench_flux2_step.py --shape slice4b --out /tmp/bench_slice4b --write-only
    python scripts/bench_flux2_step.py --shape slice4b --out /tmp/bench_slice4b --steps 1 --dtypes float32
Options: --steps N (timed steps, default 3), --tokens-side S (latent grid side, default 32: 1024 image tokens, a
512 px image), --text-tokens T (default 512), --dtypes (comma list, default float32,bfloat16).
"""
import argparse
import json
import os
import resource
import statistics
import time

import torch
import diffusers
import peft
from diffusers import Flux2Transformer2DModel
from peft import LoraConfig

THREADS = 2
RANK, ALPHA = 32, 32
COMMON = dict(patch_size=1, in_channels=128, out_channels=None, num_layers=1, num_single_layers=1,
              attention_head_dim=128, timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
              rope_theta=2000, eps=1e-6, guidance_embeds=False)
SHAPES = {"tiny": dict(num_attention_heads=2, joint_attention_dim=384),
          "slice4b": dict(num_attention_heads=24, joint_attention_dim=7680)}


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def write_model(shape, out):
    folder = os.path.join(out, "transformer")
    torch.manual_seed(0)
    model = Flux2Transformer2DModel(**COMMON, **SHAPES[shape]).float()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.02 + (1.0 if p.ndim == 1 else 0.0))
    os.makedirs(folder, exist_ok=True)
    for f in os.listdir(folder):  # no stale shards / index files
        os.remove(os.path.join(folder, f))
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True, max_shard_size="100GB")
    n = sum(p.numel() for p in model.parameters())
    assert all(p.abs().max() > 0 for p in model.parameters())
    del model
    print(f"wrote {folder}: {n / 1e6:.1f}M parameters, bfloat16", flush=True)
    return folder


def lora_targets(model):
    names = []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        if name.startswith("transformer_blocks.") and name.split(".", 2)[2] in (
                "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
                "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out"):
            names.append(name)
        elif name.startswith("single_transformer_blocks.") and name.split(".", 2)[2] in (
                "attn.to_qkv_mlp_proj", "attn.to_out"):
            names.append(name)
    return names


def bench(shape, folder, dtype, steps, side, text_tokens):
    model = Flux2Transformer2DModel.from_pretrained(folder, torch_dtype=dtype)
    model.requires_grad_(False)
    targets = lora_targets(model)
    cfg = model.config
    n_double, n_single = cfg.num_layers, cfg.num_single_layers
    assert len(targets) == 12 * n_double + 2 * n_single, targets
    # exact full module names: peft matches a list entry by name == entry or name.endswith("." + entry)
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, init_lora_weights=True,
                                 target_modules=targets))
    checkpointing = False
    if getattr(model, "_supports_gradient_checkpointing", False):
        model.enable_gradient_checkpointing()
        checkpointing = bool(model.is_gradient_checkpointing)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    adapted = sum(1 for n, _ in model.named_parameters() if n.endswith(".lora_A.default.weight"))
    assert adapted == len(targets) and all(p.dtype == dtype for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)

    torch.manual_seed(1)
    n_img = side * side
    hidden = torch.randn(1, n_img, cfg.in_channels, dtype=dtype)
    ctx = torch.randn(1, text_tokens, cfg.joint_attention_dim, dtype=dtype)
    target = torch.randn(1, n_img, cfg.in_channels)
    sigma = torch.tensor([0.37])  # the model computes timestep * 1000 itself
    img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(side), torch.arange(side), torch.arange(1))
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(text_tokens))

    def step():
        v = model(hidden_states=hidden, encoder_hidden_states=ctx, timestep=sigma, img_ids=img_ids,
                  txt_ids=txt_ids, guidance=None, return_dict=False)[0]
        loss = ((v.float() - target) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    times, losses = [], []
    for i in range(steps + 1):
        t = time.perf_counter()
        losses.append(step())
        dt = time.perf_counter() - t
        print(f"  {shape} {str(dtype)[6:]} step {i}{' (warm-up)' if i == 0 else ''}: {dt:.3f} s, "
              f"loss {losses[-1]:.5f}", flush=True)
        if i > 0:
            times.append(dt)
    assert all(map(lambda x: x == x and abs(x) != float("inf"), losses)), losses
    res = {"shape": shape, "dtype": str(dtype)[6:], "image_tokens": n_img, "text_tokens": text_tokens,
           "seconds_per_step_median": statistics.median(times), "all": times, "checkpointing": checkpointing,
           "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_name(),
           "diffusers": diffusers.__version__, "peft": peft.__version__, "lora_rank": RANK,
           "adapted_matrices": adapted, "lora_params": sum(p.numel() for p in params),
           "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    del model, opt, params
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--tokens-side", type=int, default=32)
    ap.add_argument("--text-tokens", type=int, default=512)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--write-only", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(THREADS)
    folder = write_model(a.shape, a.out)
    if a.write_only:
        return
    print("torch", torch.__version__, "diffusers", diffusers.__version__, "peft", peft.__version__,
          "threads", torch.get_num_threads(), "cpu", cpu_name(), flush=True)
    for name in a.dtypes.split(","):
        res = bench(a.shape, folder, getattr(torch, name), a.steps, a.tokens_side, a.text_tokens)
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
