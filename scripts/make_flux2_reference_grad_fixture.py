"""Writes tests/fixtures/flux2/tiny_reference_grads.safetensors: a FLUX.2 [klein] training step with reference
(control) images, as ai-toolkit trains edit LoRAs and Flux2KleinPipeline samples with image=: the reference images'
clean latent tokens follow the noised tokens in the image stream, each image on its own time coordinate
(t = 10, 20, ...: the pipeline's _prepare_image_ids), the timestep is the noised image's, and only the noised
tokens' velocities are kept (ai-toolkit: packed_noise_pred[:, :packed_latents.shape[1]]) for the flow-matching loss.

On the tiny transformer and LoRA of scripts/make_flux2_fixture.py (tests/fixtures/flux2/tiny and the lora.* and
inputs of tiny_expected.safetensors), with two random reference grids of 2 x 3 and 1 x 4 tokens, in float32 as
diffusers computes it on the stored bf16 weights: velocity (the 15 noised tokens'), loss, and the gradient of every
LoRA A and B (the fused-LoRA forward hooks of flux2_reference.attach_lora, as make_flux2_fixture.py's). Checked against scripts/flux2_reference.py
(float64) and against the step without references (they must change the velocity).

Run from the repository root with a virtualenv holding torch and diffusers (0.42.x):
    /tmp/hfvenv/bin/python scripts/make_flux2_reference_grad_fixture.py
"""
import os
import sys

import torch
import diffusers
from diffusers import Flux2Transformer2DModel
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flux2_reference as ref  # noqa: E402

torch.set_num_threads(2)
FIXTURES = "tests/fixtures/flux2"
HEADS, N_DOUBLE, N_SINGLE, SCALE = 2, 1, 1, 8 / 4
GRIDS = [(2, 3), (1, 4)]

TARGETS = ref.lora_targets(N_DOUBLE, N_SINGLE)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main():
    e = load_file(os.path.join(FIXTURES, "tiny_expected.safetensors"))
    x0, noise, ctx, sigma = e["x0"], e["noise"], e["ctx"], e["sigma"]
    img_ids, txt_ids = e["img_ids"].long(), e["txt_ids"].long()
    n = x0.shape[0]
    lora = {name: (e[f"lora.{name}.lora_A"].clone().requires_grad_(True),
                   e[f"lora.{name}.lora_B"].clone().requires_grad_(True)) for name in TARGETS}
    torch.manual_seed(3)
    refs = [torch.randn(r * c, 128) for r, c in GRIDS]
    ref_ids = [torch.cartesian_prod(torch.tensor([10 * (k + 1)]), torch.arange(r), torch.arange(c), torch.arange(1))
               for k, (r, c) in enumerate(GRIDS)]
    x_sigma = (1 - sigma) * x0 + sigma * noise
    target = noise - x0
    hidden = torch.cat([x_sigma] + refs)
    ids = torch.cat([img_ids] + ref_ids)

    model = Flux2Transformer2DModel.from_pretrained(os.path.join(FIXTURES, "tiny", "transformer"),
                                                    torch_dtype=torch.float32).eval().requires_grad_(False)
    ref.attach_lora(model, lora, TARGETS, SCALE)
    v = model(hidden_states=hidden[None], encoder_hidden_states=ctx[None], timestep=sigma, img_ids=ids,
              txt_ids=txt_ids, guidance=None, return_dict=False)[0][0][:n]
    loss = ((v - target) ** 2).mean()
    loss.backward()
    grads = {f"grad.{name}.lora_{ab}": t.grad.detach().clone() for name, (A, B) in lora.items()
             for ab, t in (("A", A), ("B", B))}

    # float64 reference on the same weights and LoRA
    W = ref.bfl_from_diffusers(model.state_dict())
    lr = {name: (A.detach().double().requires_grad_(), B.detach().double().requires_grad_())
          for name, (A, B) in lora.items()}
    v_ref = ref.forward(W, hidden.double(), ctx.double(), sigma.item(), ids, txt_ids, HEADS, lr, SCALE, True)[:n]
    loss_ref = ((v_ref - target.double()) ** 2).mean()
    loss_ref.backward()
    g_ref = {f"grad.{name}.lora_{ab}": t.grad for name, (A, B) in lr.items() for ab, t in (("A", A), ("B", B))}
    v_rel, g_rel = rel(v, v_ref), max(rel(grads[k], g_ref[k]) for k in grads)
    moved = rel(e["dense.velocity"], v)
    print(f"loss {loss.item():.6f}; against float64: velocity {v_rel:.2e}, gradients {g_rel:.2e}; "
          f"the references moved the velocity by {moved:.3f}")
    assert v_rel < 3e-6 and g_rel < 2e-5 and moved > 1e-2
    assert all(g.abs().max() > 0 for g in grads.values())

    out = {"velocity": v.detach(), "loss": loss.detach().reshape(1), **grads}
    for k, (t, i) in enumerate(zip(refs, ref_ids)):
        out[f"reference{k}.tokens"], out[f"reference{k}.ids"] = t, i.float()
    path = os.path.join(FIXTURES, "tiny_reference_grads.safetensors")
    save_file({k: t.float().contiguous() for k, t in out.items()}, path,
              metadata={"diffusers": diffusers.__version__, "torch": torch.__version__,
                        "script": "scripts/make_flux2_reference_grad_fixture.py"})
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
