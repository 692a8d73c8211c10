"""Writes tests/fixtures/flux2/tiny_vae_decode_expected.safetensors: the FLUX.2 VAE *decoder* path, as diffusers
(0.42.x) Flux2KleinPipeline turns the denoised latent tokens into an image, on the tiny VAE of
tests/fixtures/flux2/tiny_vae/ (written by scripts/make_flux2_vae_fixture.py; decoder widths (8, 16, 16, 32),
narrower than the encoder's and unequal, so that the levels' order and the resnets' 1x1 shortcuts count; GroupNorm
of 8 groups, 2 resnets per encoder level, so 3 per decoder level).

Tensors (float32, batch dimension dropped):
  tokens        (6, 128)     random packed latent tokens (what the sampler ends with), a 3 x 2 token grid
  latents       (32, 6, 4)   after Flux2KleinPipeline's own steps: _unpack_latents_with_ids, x * sqrt(running_var +
                             batch_norm_eps) + running_mean, _unpatchify_latents
  post_quant    (32, 6, 4)   post_quant_conv (1x1)
  conv_in       (32, 6, 4)   decoder.conv_in
  mid           (32, 6, 4)   decoder.mid_block (resnet, attention, resnet)
  up0 .. up3    (32, 12, 8), (16, 24, 16), (16, 48, 32), (8, 48, 32)
                             the outputs of decoder.up_blocks.i: 3 resnets, then (i < 3) nearest 2x enlargement and a
                             3x3 convolution (upsamplers.0.conv)
  decoded       (3, 48, 32)  vae.decode(...): conv_norm_out (GroupNorm), SiLU, conv_out
  image         (48, 32, 3)  image_processor.postprocess(output_type="np"): (decoded / 2 + 0.5) clamped to [0, 1],
                             pixels by channels
  bytes         (48, 32, 3)  the PIL image's bytes (round(image * 255)), as floats

The latents are drawn with a spread of 2.5 so that some decoded values leave [-1, 1] and the clamp acts.
diffusers runs in float32 on the bf16-rounded weights; the script checks it against diffusers in float64 and prints
the difference (the float32 rounding the Rust test's tolerance is set from).

Run from the repository root (CPU, one thread; a few seconds):
    /tmp/hfvenv/bin/python scripts/make_flux2_vae_decode_fixture.py
"""
import os
import sys
import types

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch
import diffusers
from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline
from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
from safetensors.torch import save_file

torch.set_num_threads(1)
diffusers.utils.logging.set_verbosity_error()

OUT_DIR = os.path.join("tests", "fixtures", "flux2")
VAE_DIR = os.path.join(OUT_DIR, "tiny_vae")
EXPECTED = os.path.join(OUT_DIR, "tiny_vae_decode_expected.safetensors")
ROWS, COLS = 3, 2  # token grid: the image is 16 * ROWS x 16 * COLS pixels


def decode(vae, tokens):
    """The pipeline's post-denoising steps on packed `tokens` (1, ROWS * COLS, 128) and their intermediates."""
    acts = {}
    hooks = []

    def hook(name):
        def f(_m, _inp, out):
            acts[name] = out.detach()[0].clone()
        return f

    dec = vae.decoder
    hooks.append(vae.post_quant_conv.register_forward_hook(hook("post_quant")))
    hooks.append(dec.conv_in.register_forward_hook(hook("conv_in")))
    hooks.append(dec.mid_block.register_forward_hook(hook("mid")))
    for i, blk in enumerate(dec.up_blocks):
        hooks.append(blk.register_forward_hook(hook(f"up{i}")))
    fake = types.SimpleNamespace(vae=vae)
    ids = Flux2KleinPipeline._prepare_latent_ids(torch.zeros(1, 128, ROWS, COLS))
    with torch.no_grad():
        # Flux2KleinPipeline.__call__ after its denoising loop, line for line.
        latents = Flux2KleinPipeline._unpack_latents_with_ids(tokens, ids, ROWS, COLS)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.dtype)
        latents = latents * std + mean
        latents = Flux2KleinPipeline._unpatchify_latents(latents)
        acts["latents"] = latents[0].clone()
        decoded = vae.decode(latents, return_dict=False)[0]
    for h in hooks:
        h.remove()
    acts["decoded"] = decoded[0].clone()
    proc = Flux2ImageProcessor(vae_scale_factor=16)
    image = proc.postprocess(decoded, output_type="np")[0]  # (H, W, 3) float32 in [0, 1]
    acts["image"] = torch.from_numpy(np.ascontiguousarray(image))
    pil = proc.postprocess(decoded, output_type="pil")[0]
    acts["bytes"] = torch.from_numpy(np.asarray(pil).astype(np.float32))
    del fake
    return acts


def main():
    if not diffusers.__version__.startswith("0.42"):
        print(f"warning: written against diffusers 0.42.x, found {diffusers.__version__}", file=sys.stderr)
    vae = AutoencoderKLFlux2.from_pretrained(VAE_DIR, torch_dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(11)
    tokens = 2.5 * torch.randn(1, ROWS * COLS, 128, generator=g, dtype=torch.float32)
    exp = decode(vae, tokens)
    exp["tokens"] = tokens[0]
    vae64 = AutoencoderKLFlux2.from_pretrained(VAE_DIR, torch_dtype=torch.float32).eval().to(torch.float64)
    exp64 = decode(vae64, tokens.to(torch.float64))

    clamped = ((exp["decoded"] < -1) | (exp["decoded"] > 1)).float().mean().item()
    print(f"diffusers {diffusers.__version__}, torch {torch.__version__}; {clamped:.0%} of decoded values clamped")
    assert 0.02 < clamped < 0.5, clamped
    names = ["latents", "post_quant", "conv_in", "mid", "up0", "up1", "up2", "up3", "decoded", "image"]
    for n in names:
        a, b = exp[n], exp64[n]
        d = (a.to(torch.float64) - b).abs().max().item()
        print(f"{n:<11} {str(tuple(a.shape)):<15} rms {a.pow(2).mean().sqrt().item():8.4f}  f32 - f64 {d:.2e}")
        assert d < 1e-4, (n, d)
    assert exp["bytes"].shape == (16 * ROWS, 16 * COLS, 3)
    assert torch.equal(exp["bytes"], (exp["image"] * 255).round())

    keys = ["tokens"] + names + ["bytes"]
    save_file({k: exp[k].to(torch.float32).contiguous() for k in keys}, EXPECTED,
              metadata={"diffusers": diffusers.__version__, "torch": torch.__version__,
                        "script": "scripts/make_flux2_vae_decode_fixture.py"})
    print(f"wrote {EXPECTED} ({os.path.getsize(EXPECTED)} bytes)")


if __name__ == "__main__":
    main()
