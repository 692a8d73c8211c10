"""Writes tests/fixtures/flux2/tiny_vae_bfl.safetensors: the tiny FLUX.2 VAE of tests/fixtures/flux2/tiny_vae/
(diffusers AutoencoderKLFlux2 layout, bf16; written by scripts/make_flux2_vae_fixture.py) re-saved as ONE safetensors
file in Black Forest Labs' original (LDM-style) naming, as BFL publishes the FLUX.2 autoencoder (flux2-vae.safetensors
/ ae.safetensors): bare keys, no prefix, metadata {"format": "pt"}. The naming is the inverse of diffusers'
scripts/convert_flux2_to_diffusers.py (convert_flux2_vae_checkpoint_to_diffusers + DIFFUSERS_VAE_TO_FLUX2_MAPPING):

    encoder.conv_in.{weight,bias}, encoder.conv_out.{weight,bias}
    encoder.norm_out.{weight,bias}                           (diffusers encoder.conv_norm_out)
    encoder.quant_conv.{weight,bias}                         (diffusers top-level quant_conv; BFL keeps it inside
                                                              the encoder)
    encoder.down.{i}.block.{j}.{norm1,conv1,norm2,conv2}.*   (diffusers encoder.down_blocks.{i}.resnets.{j}.*)
    encoder.down.{i}.block.{j}.nin_shortcut.*                (diffusers ...resnets.{j}.conv_shortcut.*)
    encoder.down.{i}.downsample.conv.*                       (diffusers ...down_blocks.{i}.downsamplers.0.conv.*)
    encoder.mid.block_{1,2}.*                                (diffusers encoder.mid_block.resnets.{0,1}.*)
    encoder.mid.attn_1.{norm,q,k,v,proj_out}.*               (diffusers encoder.mid_block.attentions.0.
                                                              {group_norm,to_q,to_k,to_v,to_out.0}.*; the q/k/v/
                                                              proj_out WEIGHTS are 1x1 conv kernels [C, C, 1, 1],
                                                              diffusers' Linear weights [C, C] unsqueezed twice;
                                                              biases stay 1-D)
    decoder.*   the same scheme: decoder.conv_in, decoder.norm_out, decoder.conv_out,
                decoder.post_quant_conv.*                    (diffusers top-level post_quant_conv)
                decoder.mid.block_{1,2}, decoder.mid.attn_1.*,
                decoder.up.{n-1-i}.block.{j}.*               (diffusers decoder.up_blocks.{i}.resnets.{j}.*; LDM
                                                              numbers the decoder levels from the highest
                                                              resolution, diffusers in execution order)
                decoder.up.{n-1-i}.upsample.conv.*           (diffusers decoder.up_blocks.{i}.upsamplers.0.conv.*)
    bn.running_mean, bn.running_var, bn.num_batches_tracked  (unchanged; num_batches_tracked is the int64 counter
                                                              PyTorch's BatchNorm2d keeps; it is in the diffusers
                                                              fixture, value 0, so it is kept as is)

Every value is bit-identical to the diffusers fixture with the dtype as stored there (bf16; int64 for the counter):
only renames and the two-fold unsqueeze of the four attention weights per mid block.

Verified (the script asserts all of it):
  1a. an independent, rule-based (regex) re-implementation of the documented LDM->diffusers direction, written from
      the naming rules above in the reverse direction, applied to the BFL dict read back from the written file,
      gives exactly the diffusers fixture's key set (no missing, no unexpected) with every tensor bit-identical
      (same dtype, same shape after squeezing the 1x1 attention kernels, same bits); and converting that result
      forward again gives back exactly the BFL dict (round trip);
  1b. diffusers' installed generic LDM VAE converter,
      diffusers.loaders.single_file_utils.convert_ldm_vae_checkpoint(checkpoint, config), gives the diffusers
      fixture's encoder.* and quant_conv.* tensors (and decoder.* / post_quant_conv.* too) bit-identically.
      That function is written for the Stable Diffusion LDM layout, where quant_conv / post_quant_conv sit at the
      TOP level (quant_conv.*, post_quant_conv.*), whereas BFL's FLUX.2 file nests them as encoder.quant_conv.* /
      decoder.post_quant_conv.*. So the script first renames those four keys to the top level (and asserts that
      without that rename the function silently drops them). Its prefix detection (first_stage_model. / vae.)
      finds neither prefix in the bare-key file and takes every key as is. It does not know FLUX.2's BatchNorm,
      so its output lacks exactly the bn.* keys; that is asserted too;
  2.  no tensor in the file is all zeros, except bn.num_batches_tracked (an integer step counter, 0 in the diffusers
      fixture too); the dtypes are the fixture's (BF16, and I64 for the counter); the metadata is
      {"format": "pt"}; no key carries a prefix (first_stage_model., vae.);
  3.  AutoencoderKLFlux2.from_pretrained(tests/fixtures/flux2/tiny_vae) and a fresh AutoencoderKLFlux2(**config)
      into which the state dict converted back from the BFL file (1a) is loaded with strict=True have bit-identical
      parameters and buffers, and encode() of a seeded random 1x3x48x32 input in [-1, 1] gives a bit-identical
      posterior mean (latent_dist.mean) in both (float32, CPU, 1 thread). The fresh model's posterior mean of the
      fixture image in tests/fixtures/flux2/tiny_vae_expected.safetensors is also compared (printed, close).
It prints the BFL keys with their shapes and dtypes.

Run from the repository root (a virtualenv with torch, diffusers 0.42.x and safetensors; no network needed):
    /tmp/hfvenv/bin/python scripts/make_flux2_vae_bfl_fixture.py
"""
import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

torch.set_num_threads(1)
SRC_DIR = "tests/fixtures/flux2/tiny_vae"
SRC = os.path.join(SRC_DIR, "diffusion_pytorch_model.safetensors")
EXPECTED = "tests/fixtures/flux2/tiny_vae_expected.safetensors"
OUT = "tests/fixtures/flux2/tiny_vae_bfl.safetensors"

RESNET_PARTS = ("norm1", "conv1", "norm2", "conv2")
ATTN_PARTS = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def bfl_from_diffusers(sd, config):
    """diffusers AutoencoderKLFlux2 state dict -> BFL single-file state dict (same tensors, same dtype).
    Walks the architecture from the config, layer by layer; every diffusers key must be consumed exactly once."""
    sd = dict(sd)
    W = {}

    def take(bfl, diff):
        assert bfl not in W, bfl
        W[bfl] = sd.pop(diff)

    def take_wb(bfl, diff):
        for p in ("weight", "bias"):
            take(f"{bfl}.{p}", f"{diff}.{p}")

    def resnet(bfl, diff):
        for part in RESNET_PARTS:
            take_wb(f"{bfl}.{part}", f"{diff}.{part}")
        if f"{diff}.conv_shortcut.weight" in sd:
            take_wb(f"{bfl}.nin_shortcut", f"{diff}.conv_shortcut")

    def mid(side):
        resnet(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0")
        resnet(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1")
        for diff, bfl in ATTN_PARTS:
            d, b = f"{side}.mid_block.attentions.0.{diff}", f"{side}.mid.attn_1.{bfl}"
            w = sd.pop(f"{d}.weight")
            if diff != "group_norm":  # Linear [C, C] -> 1x1 conv kernel [C, C, 1, 1]
                assert w.ndim == 2, (d, w.shape)
                w = w[:, :, None, None]
            W[f"{b}.weight"] = w
            take(f"{b}.bias", f"{d}.bias")

    n = len(config["block_out_channels"])
    assert len(config["down_block_types"]) == n and len(config["up_block_types"]) == n
    lpb = config["layers_per_block"]

    # encoder
    take_wb("encoder.conv_in", "encoder.conv_in")
    for i in range(n):
        for j in range(lpb):
            resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}")
        if i != n - 1:
            take_wb(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
    mid("encoder")
    take_wb("encoder.norm_out", "encoder.conv_norm_out")
    take_wb("encoder.conv_out", "encoder.conv_out")
    take_wb("encoder.quant_conv", "quant_conv")

    # decoder: diffusers up_blocks.{i} runs i-th (lowest resolution first); BFL/LDM calls it up.{n-1-i}
    take_wb("decoder.post_quant_conv", "post_quant_conv")
    take_wb("decoder.conv_in", "decoder.conv_in")
    mid("decoder")
    for i in range(n):
        for j in range(lpb + 1):
            resnet(f"decoder.up.{n - 1 - i}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}")
        if i != n - 1:
            take_wb(f"decoder.up.{n - 1 - i}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv")
    take_wb("decoder.norm_out", "decoder.conv_norm_out")
    take_wb("decoder.conv_out", "decoder.conv_out")

    # latent BatchNorm statistics (and any other buffer it has in the diffusers file)
    for k in [k for k in sd if k.startswith("bn.")]:
        take(k, k)

    assert not sd, f"diffusers keys left unmapped: {sorted(sd)}"
    return W


def diffusers_from_bfl(bfl, config):
    """BFL / LDM FLUX.2 VAE state dict -> diffusers AutoencoderKLFlux2 state dict.
    An independent, rule-based (regex) implementation of the LDM->diffusers direction (what diffusers'
    convert_flux2_vae_checkpoint_to_diffusers does), used to check bfl_from_diffusers. Any key that no rule
    matches is an error."""
    n = len(config["up_block_types"])
    attn = {bfl: diff for diff, bfl in ATTN_PARTS}
    rules = [
        (r"encoder\.quant_conv\.(weight|bias)", lambda m: f"quant_conv.{m[1]}"),
        (r"decoder\.post_quant_conv\.(weight|bias)", lambda m: f"post_quant_conv.{m[1]}"),
        (r"(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)", lambda m: m[0]),
        (r"(encoder|decoder)\.norm_out\.(weight|bias)", lambda m: f"{m[1]}.conv_norm_out.{m[2]}"),
        (r"encoder\.down\.(\d+)\.block\.(\d+)\.(norm1|conv1|norm2|conv2|nin_shortcut)\.(weight|bias)",
         lambda m: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}."
                   f"{'conv_shortcut' if m[3] == 'nin_shortcut' else m[3]}.{m[4]}"),
        (r"encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)",
         lambda m: f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"),
        (r"decoder\.up\.(\d+)\.block\.(\d+)\.(norm1|conv1|norm2|conv2|nin_shortcut)\.(weight|bias)",
         lambda m: f"decoder.up_blocks.{n - 1 - int(m[1])}.resnets.{m[2]}."
                   f"{'conv_shortcut' if m[3] == 'nin_shortcut' else m[3]}.{m[4]}"),
        (r"decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)",
         lambda m: f"decoder.up_blocks.{n - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"),
        (r"(encoder|decoder)\.mid\.block_([12])\.(norm1|conv1|norm2|conv2|nin_shortcut)\.(weight|bias)",
         lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}."
                   f"{'conv_shortcut' if m[3] == 'nin_shortcut' else m[3]}.{m[4]}"),
        (r"(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)",
         lambda m: f"{m[1]}.mid_block.attentions.0.{attn[m[2]]}.{m[3]}"),
        (r"bn\.(running_mean|running_var|num_batches_tracked)", lambda m: m[0]),
    ]
    out = {}
    for key, t in bfl.items():
        hits = [(rx, f) for rx, f in rules if re.fullmatch(rx, key)]
        assert len(hits) == 1, f"{key}: {len(hits)} rules match"
        rx, f = hits[0]
        new = f(re.fullmatch(rx, key))
        if re.fullmatch(r".*\.mid\.attn_1\.(q|k|v|proj_out)\.weight", key):  # 1x1 conv kernel -> Linear
            assert t.ndim == 4 and tuple(t.shape[2:]) == (1, 1), (key, t.shape)
            t = t[:, :, 0, 0]
        assert new not in out, new
        out[new] = t
    return out


def same(a, b):
    """bit-identical: dtype, shape and every stored byte."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def check_against(label, got, orig):
    missing, unexpected = sorted(set(orig) - set(got)), sorted(set(got) - set(orig))
    differ = sorted(k for k in orig if k in got and not same(got[k], orig[k]))
    print(f"{label}: {len(got)} keys; missing {missing}; unexpected {unexpected}; differing {differ}")
    assert not missing and not unexpected and not differ, label


def main():
    import diffusers
    from diffusers import AutoencoderKLFlux2
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    with open(os.path.join(SRC_DIR, "config.json")) as f:
        config = json.load(f)
    orig = load_file(SRC)
    with safe_open(SRC, "pt") as f:
        src_dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}

    bfl = {k: t.contiguous() for k, t in bfl_from_diffusers(orig, config).items()}
    save_file(bfl, OUT, metadata={"format": "pt"})

    # --- read the file back and check it ---
    with safe_open(OUT, "pt") as f:
        assert f.metadata() == {"format": "pt"}, f.metadata()
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    back = load_file(OUT)
    assert back.keys() == bfl.keys() and all(same(back[k], bfl[k]) for k in bfl), "file read-back"
    assert sorted(set(dtypes.values())) == ["BF16", "I64"] and dtypes["bn.num_batches_tracked"] == "I64", dtypes
    assert sorted(src_dtypes.values()) == sorted(dtypes.values()), "dtypes as stored in the diffusers fixture"
    zeros = [k for k, t in back.items() if not t.double().abs().max() > 0]
    print("all-zero tensors:", zeros, "(only the integer counter bn.num_batches_tracked is allowed)")
    assert zeros == ["bn.num_batches_tracked"] and int(back["bn.num_batches_tracked"]) == int(
        orig["bn.num_batches_tracked"]), zeros
    assert not any(k.startswith(("first_stage_model.", "vae.", "model.")) for k in back)

    print(f"{OUT}: {len(back)} keys, {os.path.getsize(OUT)} bytes, metadata {{'format': 'pt'}}, "
          f"diffusers {diffusers.__version__}")
    for k in sorted(back):
        print(f"  {k} {list(back[k].shape)} {dtypes[k]}")

    # 1a. independent LDM->diffusers conversion, and the round trip
    conv = diffusers_from_bfl(back, config)
    check_against("1a. diffusers_from_bfl(BFL file) vs diffusers fixture", conv, orig)
    rt = {k: t.contiguous() for k, t in bfl_from_diffusers(conv, config).items()}
    check_against("1a. bfl_from_diffusers(diffusers_from_bfl(BFL file)) vs BFL file (round trip)", rt, back)

    # 1b. diffusers' installed generic LDM VAE converter
    raw = convert_ldm_vae_checkpoint({k: t.clone() for k, t in back.items()}, config)
    dropped = sorted(k for k in ("quant_conv.weight", "quant_conv.bias", "post_quant_conv.weight",
                                 "post_quant_conv.bias") if k not in raw)
    print("1b. convert_ldm_vae_checkpoint on the BFL keys as they are: drops", dropped,
          "(it expects the SD-LDM top-level quant_conv / post_quant_conv)")
    assert len(dropped) == 4 and not any("quant_conv" in k and not k.startswith(("quant", "post_quant")) for k in raw)
    ldm = {}
    for k, t in back.items():
        k = {"encoder.quant_conv.weight": "quant_conv.weight", "encoder.quant_conv.bias": "quant_conv.bias",
             "decoder.post_quant_conv.weight": "post_quant_conv.weight",
             "decoder.post_quant_conv.bias": "post_quant_conv.bias"}.get(k, k)
        ldm[k] = t.clone()
    conv_d = convert_ldm_vae_checkpoint(ldm, config)
    enc = lambda d: {k: v for k, v in d.items() if k.startswith(("encoder.", "quant_conv."))}  # noqa: E731
    check_against("1b. convert_ldm_vae_checkpoint(BFL file, quant_conv/post_quant_conv moved to top level), "
                  "encoder.* + quant_conv.*", enc(conv_d), enc(orig))
    no_bn = {k: v for k, v in orig.items() if not k.startswith("bn.")}
    not_bn_missing = sorted(set(orig) - set(conv_d))
    print("1b. keys it does not produce:", not_bn_missing)
    assert all(k.startswith("bn.") for k in not_bn_missing)
    check_against("1b. convert_ldm_vae_checkpoint(...), all keys but bn.*", conv_d, no_bn)

    # 3. models: the original folder vs a fresh model loaded from the converted-back state dict
    ref = AutoencoderKLFlux2.from_pretrained(SRC_DIR, local_files_only=True).eval()
    fresh = AutoencoderKLFlux2(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    res = fresh.load_state_dict(conv, strict=True)
    print("3. load_state_dict(strict=True):", res)
    check_against("3. fresh model state_dict vs from_pretrained(tiny_vae) state_dict",
                  {k: t.detach() for k, t in fresh.state_dict().items()},
                  {k: t.detach() for k, t in ref.state_dict().items()})
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 48, 32, generator=g) * 2 - 1
    with torch.no_grad():
        m_ref = ref.encode(x).latent_dist.mean
        m_new = fresh.encode(x).latent_dist.mean
    print(f"3. encode(seeded 1x3x48x32).latent_dist.mean: shape {list(m_new.shape)} {m_new.dtype}, "
          f"bit-identical {same(m_new, m_ref)}, max |diff| {(m_new - m_ref).abs().max().item()}, "
          f"mean |value| {m_new.abs().mean().item():.6f}")
    assert same(m_new, m_ref) and m_new.abs().max() > 0
    if os.path.exists(EXPECTED):
        exp = load_file(EXPECTED)
        with torch.no_grad():
            m = fresh.encode(exp["image"][None].float()).latent_dist.mean[0]
        d = (m - exp["mean"]).abs().max().item()
        print(f"3. fresh model on {EXPECTED} 'image': max |mean - expected mean| = {d}")
        assert d < 1e-4, d
    print("OK: BFL VAE file converts back bit-identically")


if __name__ == "__main__":
    main()
