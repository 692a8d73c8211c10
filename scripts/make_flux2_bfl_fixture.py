"""Writes tests/fixtures/flux2/tiny_bfl.safetensors: the tiny FLUX.2 [klein]-architecture transformer of
tests/fixtures/flux2/tiny/transformer/ (diffusers layout, bf16; written by scripts/make_flux2_fixture.py) re-saved
as ONE safetensors file in Black Forest Labs' official single-file naming, as BFL publishes FLUX.2 [klein]
checkpoints (e.g. flux-2-klein-base-9b.safetensors): bare keys, no prefix, bf16, metadata {"format": "pt"}.

    img_in.weight, txt_in.weight, time_in.{in,out}_layer.weight,
    double_stream_modulation_{img,txt}.lin.weight, single_stream_modulation.lin.weight,
    double_blocks.{i}.{img,txt}_attn.qkv.weight            (rows q | k | v, fused from diffusers' split q/k/v)
    double_blocks.{i}.{img,txt}_attn.norm.{query,key}_norm.scale
    double_blocks.{i}.{img,txt}_attn.proj.weight, double_blocks.{i}.{img,txt}_mlp.{0,2}.weight,
    single_blocks.{j}.linear1.weight, single_blocks.{j}.linear2.weight, single_blocks.{j}.norm.{query,key}_norm.scale,
    final_layer.adaLN_modulation.1.weight                    (rows (shift, scale); diffusers' norm_out.linear has
                                                              (scale, shift))
    final_layer.linear.weight

Every value is bit-identical to the diffusers fixture: bf16 in, bf16 out, only concatenations and a row swap.

Verified (the script asserts all of it):
  1. diffusers' own single-file converter,
     diffusers.loaders.single_file_utils.convert_flux2_transformer_checkpoint_to_diffusers, applied to the BFL
     dict read back from the written file, gives exactly the diffusers fixture's keys (no missing, no unexpected)
     and every tensor bit-identical (torch.equal, same dtype bf16, same shape);
  2. diffusers' single-file detection (infer_diffusers_model_type) classifies the file as FLUX.2 ("flux-2-dev",
     detected through the key "single_stream_modulation.lin.weight");
  3. Flux2Transformer2DModel.from_single_file(<file>, config=tests/fixtures/flux2/tiny/transformer,
     local_files_only=True, torch_dtype=bf16), run with HF_HUB_OFFLINE=1, loads with every parameter
     bit-identical to the fixture;
  4. no tensor in the BFL file is all zeros, every tensor is bf16, the metadata is {"format": "pt"}.
It prints the BFL keys with their shapes.

Run from the repository root (a virtualenv with torch, diffusers 0.42.x and safetensors; no network needed):
    /tmp/hfvenv/bin/python scripts/make_flux2_bfl_fixture.py
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

torch.set_num_threads(1)
SRC_DIR = "tests/fixtures/flux2/tiny/transformer"
SRC = os.path.join(SRC_DIR, "diffusion_pytorch_model.safetensors")
OUT = "tests/fixtures/flux2/tiny_bfl.safetensors"


def bfl_from_diffusers(sd):
    """diffusers Flux2Transformer2DModel state dict -> BFL single-file state dict (same tensors, same dtype).
    The inverse of convert_flux2_transformer_checkpoint_to_diffusers."""
    sd = dict(sd)
    W = {}

    def take(bfl, diff):
        W[bfl] = sd.pop(diff)

    take("img_in.weight", "x_embedder.weight")
    take("txt_in.weight", "context_embedder.weight")
    take("time_in.in_layer.weight", "time_guidance_embed.timestep_embedder.linear_1.weight")
    take("time_in.out_layer.weight", "time_guidance_embed.timestep_embedder.linear_2.weight")
    take("double_stream_modulation_img.lin.weight", "double_stream_modulation_img.linear.weight")
    take("double_stream_modulation_txt.lin.weight", "double_stream_modulation_txt.linear.weight")
    take("single_stream_modulation.lin.weight", "single_stream_modulation.linear.weight")
    take("final_layer.linear.weight", "proj_out.weight")
    # diffusers rows (scale, shift) -> BFL rows (shift, scale)
    scale, shift = sd.pop("norm_out.linear.weight").chunk(2, dim=0)
    W["final_layer.adaLN_modulation.1.weight"] = torch.cat([shift, scale], dim=0)

    n_double = len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")})
    n_single = len({k.split(".")[1] for k in sd if k.startswith("single_transformer_blocks.")})
    names = {"img": ("to_q", "to_k", "to_v", "to_out.0", "ff", "norm_q", "norm_k"),
             "txt": ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context", "norm_added_q",
                     "norm_added_k")}
    for i in range(n_double):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for s, (q, k, v, proj, ff, nq, nk) in names.items():
            W[b + f"{s}_attn.qkv.weight"] = torch.cat(
                [sd.pop(d + f"attn.{q}.weight"), sd.pop(d + f"attn.{k}.weight"), sd.pop(d + f"attn.{v}.weight")],
                dim=0)
            take(b + f"{s}_attn.norm.query_norm.scale", d + f"attn.{nq}.weight")
            take(b + f"{s}_attn.norm.key_norm.scale", d + f"attn.{nk}.weight")
            take(b + f"{s}_attn.proj.weight", d + f"attn.{proj}.weight")
            take(b + f"{s}_mlp.0.weight", d + f"{ff}.linear_in.weight")
            take(b + f"{s}_mlp.2.weight", d + f"{ff}.linear_out.weight")
    for j in range(n_single):
        d, b = f"single_transformer_blocks.{j}.attn.", f"single_blocks.{j}."
        take(b + "linear1.weight", d + "to_qkv_mlp_proj.weight")
        take(b + "linear2.weight", d + "to_out.weight")
        take(b + "norm.query_norm.scale", d + "norm_q.weight")
        take(b + "norm.key_norm.scale", d + "norm_k.weight")
    assert not sd, f"diffusers keys left unmapped: {sorted(sd)}"
    return W


def same(a, b):
    """bit-identical: dtype, shape and every value (bf16 compared through its raw int16 bits)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(torch.int16), b.contiguous().view(torch.int16)))


def check_against(label, got, orig):
    missing, unexpected = sorted(set(orig) - set(got)), sorted(set(got) - set(orig))
    differ = sorted(k for k in orig if k in got and not same(got[k], orig[k]))
    print(f"{label}: {len(got)} keys; missing {missing}; unexpected {unexpected}; differing {differ}")
    assert not missing and not unexpected and not differ, label


def main():
    import diffusers
    from diffusers import Flux2Transformer2DModel
    from diffusers.loaders.single_file_utils import (convert_flux2_transformer_checkpoint_to_diffusers,
                                                     infer_diffusers_model_type)

    orig = load_file(SRC)
    assert all(t.dtype == torch.bfloat16 for t in orig.values()), "source fixture is bf16"

    bfl = {k: t.contiguous() for k, t in bfl_from_diffusers(orig).items()}
    save_file(bfl, OUT, metadata={"format": "pt"})

    # --- read the file back and check it ---
    with safe_open(OUT, "pt") as f:
        assert f.metadata() == {"format": "pt"}, f.metadata()
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert set(dtypes.values()) == {"BF16"}, dtypes
    back = load_file(OUT)
    assert back.keys() == bfl.keys() and all(same(back[k], bfl[k]) for k in bfl), "file read-back"
    zeros = [k for k, t in back.items() if not t.float().abs().max() > 0]
    assert not zeros, f"all-zero tensors: {zeros}"
    assert not any(k.startswith("model.diffusion_model.") for k in back)

    print(f"{OUT}: {len(back)} keys, {os.path.getsize(OUT)} bytes, bf16, metadata {{'format': 'pt'}}, "
          f"diffusers {diffusers.__version__}")
    for k in sorted(back):
        print(f"  {k} {list(back[k].shape)}")

    # 1. diffusers' own converter, on a copy (it pops from the dict it is given)
    conv = convert_flux2_transformer_checkpoint_to_diffusers({k: t.clone() for k, t in back.items()})
    check_against("convert_flux2_transformer_checkpoint_to_diffusers(BFL file)", conv, orig)

    # 2. single-file model-type detection
    model_type = infer_diffusers_model_type(back)
    print("infer_diffusers_model_type:", model_type)
    assert model_type == "flux-2-dev", model_type

    # 3. from_single_file with the fixture's local config, offline
    m = Flux2Transformer2DModel.from_single_file(OUT, config=SRC_DIR, local_files_only=True,
                                                 torch_dtype=torch.bfloat16)
    check_against("Flux2Transformer2DModel.from_single_file(BFL file, config=local fixture dir)",
                  {k: t.detach() for k, t in m.state_dict().items()}, orig)
    print("OK: BFL file converts back bit-identically")


if __name__ == "__main__":
    main()
