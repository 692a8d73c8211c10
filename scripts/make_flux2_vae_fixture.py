"""Writes a fixture for the FLUX.2 VAE *encoder* path, as diffusers (0.42.x) computes the training latents that
Flux2KleinPipeline feeds its transformer:

  tests/fixtures/flux2/tiny_vae/                 a tiny random AutoencoderKLFlux2 (config.json +
                                                 diffusion_pytorch_model.safetensors, weights in bfloat16)
  tests/fixtures/flux2/tiny_vae_expected.safetensors   (all float32, batch dimension dropped)
      pixels     (3, 48, 32)  the image in [0, 1] (random uint8 / 255, as read from a PNG), channel-first RGB
      image      (3, 48, 32)  what the pipeline's Flux2ImageProcessor makes of it: 2 * pixels - 1
      conv_in    (32, 48, 32) encoder.conv_in output
      down0      (32, 24, 16) output of encoder.down_blocks.0 (after its downsampler)
      down1      (32, 12, 8)
      down2      (64, 6, 4)
      down3      (64, 6, 4)   (last level: no downsampler)
      mid        (64, 6, 4)   encoder.mid_block output
      conv_out   (64, 6, 4)   encoder output (after conv_norm_out, SiLU, conv_out), before quant_conv
      quant_conv (64, 6, 4)   the posterior "moments" (mean = channels 0..31, logvar = 32..63)
      mean       (32, 6, 4)   latent_dist.mean == latent_dist.mode() (what retrieve_latents(sample_mode="argmax") takes)
      patchified (128, 3, 2)  mean after the 2x2 patchify, before normalisation
      latents    (6, 128)     the packed, BatchNorm-normalised tokens: Flux2KleinPipeline._encode_vae_image then
                              _pack_latents
      ids        (6, 4)       position ids (T, H, W, L) of those tokens as the pipeline gives the latents it
                              denoises (_prepare_latent_ids: T = 0)
      ref_ids    (6, 4)       the same image's ids as a *reference* image (_prepare_image_ids: T = 10)

Everything is computed by diffusers in float32 on the bf16-rounded weights (loaded back from the saved folder with
torch_dtype=float32, so every weight is exactly a bf16 value). The script then checks a plain float64
re-implementation (functional torch ops on the raw safetensors, no diffusers modules) against diffusers in float32
and in float64.

Tiny config (the real FLUX.2 / klein VAE in brackets; its config has norm_num_groups 32, batch_norm_eps 1e-4):
  block_out_channels (32, 32, 64, 64)   [(128, 256, 512, 512)]
  norm_num_groups 8                     [32]   -- 32 would also be accepted (32 | 32, 64) but gives 1 channel per
                                                  group at width 32, which cannot catch a wrong channel->group map;
                                                  8 gives 4 / 8 channels per group (the real model: 4 .. 16).
  layers_per_block 2, latent_channels 32, in_channels 3, mid_block_add_attention True, use_quant_conv True,
  batch_norm_eps 1e-4, patch_size (2, 2)      [all as real]
  decoder_block_out_channels (8, 16, 16, 32)    [None = encoder widths; some FLUX.2 VAE variants ship a smaller
                                                  decoder (96, 192, 384, 384)]. Narrow to keep the file small, and
                                                  unequal so that scripts/make_flux2_vae_decode_fixture.py checks the
                                                  decoder's level order and its resnets' 1x1 shortcuts (32 -> 16 ->
                                                  8, as the real decoder's 512 -> 256 -> 128).
Weights: conv/linear weight randn / sqrt(fan_in), biases 0.1 * randn, GroupNorm weight 1 + 0.1 * randn and bias
0.1 * randn, bn.running_mean 0.3 * randn, bn.running_var exp(0.5 * randn) (positive); all rounded to bf16.

THE ENCODER COMPUTATION (B = 1; C0..C3 = block_out_channels; G = norm_num_groups; GN = GroupNorm(G groups,
eps 1e-6, affine: per-channel weight and bias, statistics over (channels of the group) x H x W, biased variance);
every conv has a bias and zero padding; weight keys are diffusers' names in the safetensors, prefix "encoder."):
  x = 2 * pixels - 1                                  (3, H, W), H and W multiples of 16
  conv_in: Conv2d 3 -> C0, k 3, stride 1, pad 1       (C0, H, W)
  for level i = 0..3 (down_blocks.i), c_in = C_{i-1} (C_{-1} = C0), c_out = C_i:
      resnets.0: ResBlock(c_in -> c_out); resnets.1: ResBlock(c_out -> c_out)
      if i < 3: downsamplers.0.conv: F.pad(x, (0, 1, 0, 1)) -- one zero column on the RIGHT and one zero row at
                the BOTTOM, nothing left/top -- then Conv2d c_out -> c_out, k 3, stride 2, pad 0   (c_out, H/2, W/2)
  ResBlock(x; c_in -> c_out):
      h = conv1(SiLU(norm1(x)))          norm1 = GN over c_in; conv1 k 3, s 1, pad 1, c_in -> c_out
      h = conv2(SiLU(norm2(h)))          norm2 = GN over c_out; (dropout 0); conv2 k 3, s 1, pad 1
      s = conv_shortcut(x) if c_in != c_out else x     (conv_shortcut: 1x1, s 1, pad 0, with bias)
      out = (s + h) / 1.0                output_scale_factor is 1 everywhere in the encoder
  mid_block (C3 channels, at H/8 x W/8): resnets.0 (C3 -> C3), attentions.0, resnets.1 (C3 -> C3)
  attentions.0 (a single head of dim C3, self-attention over all H/8 * W/8 positions):
      r = x
      h = group_norm(x)                  GN(G, eps 1e-6, affine) over C3
      h -> tokens (HW, C3), token t = y * w + x (row-major over the latent grid)
      q = h Wq^T + bq (to_q), k = h Wk^T + bk (to_k), v = h Wv^T + bv (to_v)     Linear C3 -> C3, weights (out, in)
      a = softmax(q k^T / sqrt(C3), over keys) v
      o = a Wo^T + bo (to_out.0)         (to_out.1 is dropout 0)
      out = (o back to (C3, h, w)) + r, then / 1.0 (rescale_output_factor 1)
  conv_norm_out: GN over C3; SiLU; conv_out: Conv2d C3 -> 2 * latent_channels (64), k 3, s 1, pad 1   (64, H/8, W/8)
  quant_conv (top-level key "quant_conv"): Conv2d 64 -> 64, 1x1                              (64, H/8, W/8)
  mean = channels 0..31 (logvar = 32..63, clamped to [-30, 20], unused: the pipeline takes mode() = mean)

PATCHIFY + NORMALISATION + PACKING (Flux2KleinPipeline._encode_vae_image, _pack_latents, _prepare_latent_ids):
  z = mean (32, h, w), h = H/8, w = W/8
  P[c*4 + pi*2 + pj, i, j] = z[c, 2i + pi, 2j + pj]       c in 0..31, pi, pj in {0, 1}; P is (128, h/2, w/2)
  L[k, i, j] = (P[k, i, j] - bn.running_mean[k]) / sqrt(bn.running_var[k] + config.batch_norm_eps)
      eps = config.batch_norm_eps = 1e-4 (NOT BatchNorm2d's default 1e-5); sqrt of (var + eps), then divide;
      bn is affine=False (no weight/bias); the BatchNorm module's forward is never called.
  latents[t, k] = L[k, i, j] with t = i * (w/2) + j (row-major); ids[t] = (0, i, j, 0) for the latents being
  trained/denoised; a reference (conditioning) image n gets T = 10 + 10 n instead (_prepare_image_ids).

Run from the repository root (CPU, one thread; takes a few seconds):
    /tmp/hfvenv/bin/python scripts/make_flux2_vae_fixture.py
"""
import json
import math
import os
import sys
import types

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
import diffusers
from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline
from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
from diffusers.pipelines.flux2.pipeline_flux2_klein import retrieve_latents
from safetensors.torch import load_file, save_file

torch.set_num_threads(1)
diffusers.utils.logging.set_verbosity_error()  # silences "modules that should be kept in float32: []" on .to()

OUT_DIR = os.path.join("tests", "fixtures", "flux2")
VAE_DIR = os.path.join(OUT_DIR, "tiny_vae")
EXPECTED = os.path.join(OUT_DIR, "tiny_vae_expected.safetensors")

H, W = 48, 32
CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 32, 64, 64),
    decoder_block_out_channels=(8, 16, 16, 32),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=32,
    norm_num_groups=8,
    sample_size=1024,
    use_quant_conv=True,
    use_post_quant_conv=True,
    mid_block_add_attention=True,
    batch_norm_eps=1e-4,
    batch_norm_momentum=0.1,
    patch_size=(2, 2),
)


def bf16_round(t):
    return t.to(torch.bfloat16).to(t.dtype)


def build_vae():
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(**CONFIG).eval()
    g = torch.Generator().manual_seed(1234)

    def randn(shape):
        return torch.randn(shape, generator=g, dtype=torch.float32)

    with torch.no_grad():
        for name, m in vae.named_modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(1.0 + 0.1 * randn(m.weight.shape))
                m.bias.copy_(0.1 * randn(m.bias.shape))
            elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(randn(m.weight.shape) / math.sqrt(fan_in))
                if m.bias is not None:
                    m.bias.copy_(0.1 * randn(m.bias.shape))
        vae.bn.running_mean.copy_(0.3 * randn(vae.bn.running_mean.shape))
        vae.bn.running_var.copy_(torch.exp(0.5 * randn(vae.bn.running_var.shape)))
        for p in vae.parameters():
            p.copy_(bf16_round(p))
        vae.bn.running_mean.copy_(bf16_round(vae.bn.running_mean))
        vae.bn.running_var.copy_(bf16_round(vae.bn.running_var))
    return vae


# ----------------------------------------------------------------------------------------------------------
# plain float64 re-implementation (functional ops only, on the raw safetensors dict)
# ----------------------------------------------------------------------------------------------------------

def ref_group_norm(x, w, b, groups, eps):
    c, hh, ww = x.shape
    xg = x.reshape(groups, c // groups, hh, ww)
    mu = xg.mean(dim=(1, 2, 3), keepdim=True)
    var = ((xg - mu) ** 2).mean(dim=(1, 2, 3), keepdim=True)
    y = ((xg - mu) / torch.sqrt(var + eps)).reshape(c, hh, ww)
    return y * w[:, None, None] + b[:, None, None]


def ref_silu(x):
    return x / (1.0 + torch.exp(-x))


def ref_conv(x, w, b, stride=1, pad=1):
    return F.conv2d(x[None], w, b, stride=stride, padding=pad)[0]


def ref_resblock(sd, p, x, groups):
    h = ref_conv(ref_silu(ref_group_norm(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"], groups, 1e-6)),
                 sd[p + "conv1.weight"], sd[p + "conv1.bias"])
    h = ref_conv(ref_silu(ref_group_norm(h, sd[p + "norm2.weight"], sd[p + "norm2.bias"], groups, 1e-6)),
                 sd[p + "conv2.weight"], sd[p + "conv2.bias"])
    s = ref_conv(x, sd[p + "conv_shortcut.weight"], sd[p + "conv_shortcut.bias"], pad=0) \
        if p + "conv_shortcut.weight" in sd else x
    return (s + h) / 1.0


def ref_attention(sd, p, x, groups):
    c, hh, ww = x.shape
    h = ref_group_norm(x, sd[p + "group_norm.weight"], sd[p + "group_norm.bias"], groups, 1e-6)
    t = h.reshape(c, hh * ww).T  # (HW, C), token = y * w + x
    q = t @ sd[p + "to_q.weight"].T + sd[p + "to_q.bias"]
    k = t @ sd[p + "to_k.weight"].T + sd[p + "to_k.bias"]
    v = t @ sd[p + "to_v.weight"].T + sd[p + "to_v.bias"]
    s = q @ k.T / math.sqrt(c)
    s = s - s.max(dim=-1, keepdim=True).values
    a = torch.exp(s)
    a = a / a.sum(dim=-1, keepdim=True)
    o = (a @ v) @ sd[p + "to_out.0.weight"].T + sd[p + "to_out.0.bias"]
    return (o.T.reshape(c, hh, ww) + x) / 1.0


def ref_encode(sd, cfg, x):
    """x (3, H, W) float64, the image already scaled to [-1, 1] (2 * pixels - 1) -> dict of intermediates and the
    packed latents."""
    G = cfg["norm_num_groups"]
    nlev = len(cfg["block_out_channels"])
    out = {}
    x = ref_conv(x, sd["encoder.conv_in.weight"], sd["encoder.conv_in.bias"])
    out["conv_in"] = x
    for i in range(nlev):
        for j in range(cfg["layers_per_block"]):
            x = ref_resblock(sd, f"encoder.down_blocks.{i}.resnets.{j}.", x, G)
        if i < nlev - 1:
            x = F.pad(x, (0, 1, 0, 1))  # right 1, bottom 1
            p = f"encoder.down_blocks.{i}.downsamplers.0.conv."
            x = ref_conv(x, sd[p + "weight"], sd[p + "bias"], stride=2, pad=0)
        out[f"down{i}"] = x
    x = ref_resblock(sd, "encoder.mid_block.resnets.0.", x, G)
    x = ref_attention(sd, "encoder.mid_block.attentions.0.", x, G)
    x = ref_resblock(sd, "encoder.mid_block.resnets.1.", x, G)
    out["mid"] = x
    x = ref_silu(ref_group_norm(x, sd["encoder.conv_norm_out.weight"], sd["encoder.conv_norm_out.bias"], G, 1e-6))
    x = ref_conv(x, sd["encoder.conv_out.weight"], sd["encoder.conv_out.bias"])
    out["conv_out"] = x
    x = ref_conv(x, sd["quant_conv.weight"], sd["quant_conv.bias"], pad=0)
    out["quant_conv"] = x
    lc = cfg["latent_channels"]
    z = x[:lc]
    out["mean"] = z
    c, h, w = z.shape
    P = torch.empty(c * 4, h // 2, w // 2, dtype=z.dtype)
    for ci in range(c):
        for pi in range(2):
            for pj in range(2):
                P[ci * 4 + pi * 2 + pj] = z[ci, pi::2, pj::2]
    out["patchified"] = P
    L = (P - sd["bn.running_mean"][:, None, None]) / torch.sqrt(sd["bn.running_var"][:, None, None]
                                                                + cfg["batch_norm_eps"])
    out["latents"] = L.reshape(c * 4, -1).T  # token t = i * (w/2) + j
    ids = torch.zeros(h // 2 * (w // 2), 4, dtype=torch.float64)
    for i in range(h // 2):
        for j in range(w // 2):
            ids[i * (w // 2) + j] = torch.tensor([0.0, i, j, 0.0])
    out["ids"] = ids
    return out


# ----------------------------------------------------------------------------------------------------------
# diffusers
# ----------------------------------------------------------------------------------------------------------

def diffusers_encode(vae, image):
    """image (1, 3, H, W) already preprocessed to [-1, 1]; returns dict of (batch-less) tensors."""
    acts = {}
    hooks = []

    def hook(name):
        def f(_m, _inp, out):
            acts[name] = out.detach()[0].clone()
        return f

    enc = vae.encoder
    hooks.append(enc.conv_in.register_forward_hook(hook("conv_in")))
    for i, blk in enumerate(enc.down_blocks):
        hooks.append(blk.register_forward_hook(hook(f"down{i}")))
    hooks.append(enc.mid_block.register_forward_hook(hook("mid")))
    hooks.append(enc.conv_out.register_forward_hook(hook("conv_out")))
    hooks.append(vae.quant_conv.register_forward_hook(hook("quant_conv")))

    fake = types.SimpleNamespace(vae=vae, _patchify_latents=Flux2KleinPipeline._patchify_latents)
    with torch.no_grad():
        posterior = vae.encode(image).latent_dist
        acts["mean"] = posterior.mean[0].clone()
        mode = retrieve_latents(vae.encode(image), sample_mode="argmax")
        assert torch.equal(mode, posterior.mean)
        acts["patchified"] = Flux2KleinPipeline._patchify_latents(mode)[0].clone()
        # the pipeline's own path: encode -> mode -> patchify -> (z - mean) / sqrt(var + eps)
        lat4 = Flux2KleinPipeline._encode_vae_image(fake, image=image, generator=None)
        ids = Flux2KleinPipeline._prepare_latent_ids(lat4)
        ref_ids = Flux2KleinPipeline._prepare_image_ids([lat4])
        packed = Flux2KleinPipeline._pack_latents(lat4)
    for h in hooks:
        h.remove()
    acts["latents"] = packed[0].clone()
    acts["ids"] = ids[0].to(image.dtype)
    acts["ref_ids"] = ref_ids[0].to(image.dtype)
    return acts


def main():
    if not diffusers.__version__.startswith("0.42"):
        print(f"warning: written against diffusers 0.42.x, found {diffusers.__version__}", file=sys.stderr)
    os.makedirs(OUT_DIR, exist_ok=True)

    vae = build_vae()
    vae.to(torch.bfloat16).save_pretrained(VAE_DIR, safe_serialization=True)
    vae = AutoencoderKLFlux2.from_pretrained(VAE_DIR, torch_dtype=torch.float32).eval()

    raw = load_file(os.path.join(VAE_DIR, "diffusion_pytorch_model.safetensors"))
    sd64 = {k: v.to(torch.float64) for k, v in raw.items() if v.is_floating_point()}
    assert all(v.dtype == torch.bfloat16 for v in raw.values() if v.is_floating_point())
    full_sd = vae.state_dict()
    for k, v in sd64.items():  # the float32 model holds exactly the stored bf16 values
        assert torch.equal(full_sd[k].to(torch.float64), v), k
    with open(os.path.join(VAE_DIR, "config.json")) as f:
        cfg = json.load(f)

    # image: random uint8 as from a PNG, through the pipeline's own preprocessing
    g = torch.Generator().manual_seed(7)
    u8 = torch.randint(0, 256, (H, W, 3), generator=g, dtype=torch.uint8).numpy()
    pil = PIL.Image.fromarray(u8, mode="RGB")
    vae_scale_factor = 2 ** (len(cfg["block_out_channels"]) - 1)
    proc = Flux2ImageProcessor(vae_scale_factor=vae_scale_factor * 2)
    image = proc.preprocess(pil, height=H, width=W, resize_mode="crop").to(torch.float32)  # (1, 3, H, W)
    pixels = torch.from_numpy(u8.astype(np.float32) / 255.0).permute(2, 0, 1).contiguous()
    assert image.shape == (1, 3, H, W)
    assert torch.equal(image[0], 2.0 * pixels - 1.0)

    exp = diffusers_encode(vae, image)
    exp["pixels"] = pixels
    exp["image"] = image[0]

    # float64 diffusers, same weights, for an exact check of the description
    vae64 = AutoencoderKLFlux2.from_pretrained(VAE_DIR, torch_dtype=torch.float32).eval().to(torch.float64)
    exp64 = diffusers_encode(vae64, image.to(torch.float64))

    # the float32 image (2 * pixels - 1 rounded to float32, as the pipeline has it), taken exactly into float64
    ref = ref_encode(sd64, cfg, image[0].to(torch.float64))

    print(f"diffusers {diffusers.__version__}, torch {torch.__version__}")
    names = ["conv_in", "down0", "down1", "down2", "down3", "mid", "conv_out", "quant_conv", "mean", "patchified",
             "latents", "ids"]
    worst32 = 0.0
    print(f"{'tensor':<11} {'shape':<15} {'rms':>9} {'max|x|':>9} {'ref64-dif32':>12} {'ref64-dif64':>12}")
    for n in names:
        a, b, r = exp[n], exp64[n], ref[n]
        assert tuple(a.shape) == tuple(r.shape), (n, a.shape, r.shape)
        d32 = (a.to(torch.float64) - r).abs().max().item()
        d64 = (b - r).abs().max().item()
        print(f"{n:<11} {str(tuple(a.shape)):<15} {a.pow(2).mean().sqrt().item():9.4f} "
              f"{a.abs().max().item():9.4f} {d32:12.3e} {d64:12.3e}")
        assert d64 < 1e-10, (n, d64)
        worst32 = max(worst32, d32)
    assert worst32 < 1e-4, worst32
    assert torch.equal(exp["ids"], ref["ids"].to(torch.float32))

    keys = ["pixels", "image", "conv_in", "down0", "down1", "down2", "down3", "mid", "conv_out", "quant_conv",
            "mean", "patchified", "latents", "ids", "ref_ids"]
    save_file({k: exp[k].to(torch.float32).contiguous() for k in keys}, EXPECTED,
              metadata={"diffusers": diffusers.__version__, "torch": torch.__version__,
                        "script": "scripts/make_flux2_vae_fixture.py"})
    for p in (os.path.join(VAE_DIR, "config.json"), os.path.join(VAE_DIR, "diffusion_pytorch_model.safetensors"),
              EXPECTED):
        print(f"wrote {p} ({os.path.getsize(p)} bytes)")


if __name__ == "__main__":
    main()
