"""Writes tests/fixtures/flux2/: a tiny random FLUX.2 [klein]-architecture diffusers Flux2Transformer2DModel
(tiny/transformer/, config.json + diffusion_pytorch_model.safetensors; 1 double-stream and 1 single-stream block,
2 heads of 128, weights stored in bfloat16 so the file is small enough to commit) and tiny_expected.safetensors:
the inputs (a non-square 3 x 5 latent grid, 8 text tokens), a LoRA on the FUSED BFL targets (rank 4, alpha 8,
A and B random), and for the dense weights and for NF4 (bitsandbytes quantize -> dequantize, blocksize 128, every
2-D weight) the velocity, the flow-matching loss and the gradients of every LoRA A and B, as diffusers computes
them in float32 on the bf16 weights upcast to float32 (every value in the fixture is computed from exactly the
stored bf16 weights).

It also checks scripts/flux2_reference.py (a plain float64 forward in BFL names, written from
shared/FLUX2-KLEIN.md) against diffusers: velocity, loss and LoRA gradients, dense and NF4; the BFL <-> diffusers
weight-name map against diffusers' own single-file converter; and the fused-LoRA hooks against diffusers' own
Flux2 LoRA loader (peft).

tiny_train.safetensors (float32) is a training-parity fixture on the dense weights with the same hooks: from the
`lora.*` matrices of tiny_expected, three steps, each on x0 and ctx with its own step{s}.sigma (logit-normal: sigmoid
of N(0, 1)) and step{s}.noise drawn from torch.Generator seed 1; loss = mean((v - (noise - x0))^2), backward,
torch.nn.utils.clip_grad_norm_ over every LoRA A and B (max_norm 1), torch.optim.AdamW (lr 1e-3, betas (0.9, 0.999),
eps 1e-8, weight_decay 1e-4), zero grads. Per step: sigma, noise, loss (before the update), grad_norm (the total norm
clip_grad_norm_ returned); after the three steps: final.<BFL target>.lora_A / .lora_B. The same steps in float64
through flux2_reference bound how closely a float32 reimplementation can follow.

Last, it checks that Flux2KleinPipeline.load_lora_weights (diffusers' Flux2LoraLoaderMixin) takes a bf16 file with
keys diffusion_model.<BFL target>.lora_A.weight / .lora_B.weight and no alpha keys (scale 1), with no missing or
unexpected keys, and that the loaded transformer's output equals the hooks' (nothing written).

Run from the repository root with a virtualenv holding torch, diffusers (0.42.x), peft and bitsandbytes:
    python scripts/make_flux2_fixture.py
"""
import json
import os
import sys

import torch
import diffusers
from bitsandbytes.functional import dequantize_4bit, quantize_4bit
from diffusers import Flux2Transformer2DModel
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flux2_reference as ref  # noqa: E402

torch.set_num_threads(2)
OUT = "tests/fixtures/flux2"
HEADS, N_DOUBLE, N_SINGLE, TEXT_WIDTH = 2, 1, 1, 256
# klein-4b / klein-9b values from diffusers' scripts/convert_flux2_to_diffusers.py, scaled down.
CONFIG = dict(patch_size=1, in_channels=128, out_channels=None, num_layers=N_DOUBLE, num_single_layers=N_SINGLE,
              attention_head_dim=128, num_attention_heads=HEADS, joint_attention_dim=TEXT_WIDTH,
              timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000,
              eps=1e-6, guidance_embeds=False)
ROWS, COLS, L_TXT, SIGMA = 3, 5, 8, 0.37  # latent grid H x W (non-square), N = H W image tokens
N_IMG = ROWS * COLS
RANK, ALPHA = 4, 8
SCALE = ALPHA / RANK

# --- 1. tiny random model ----------------------------------------------------------------------------------
torch.manual_seed(0)
model = Flux2Transformer2DModel(**CONFIG).float().eval()
with torch.no_grad():
    for p in model.parameters():
        # the only 1-D parameters are the q/k RMSNorm weights ("norm" in the name would also catch norm_out.linear);
        # drawn in float32, then rounded to bfloat16 (kept as float32 values that are exactly representable in bf16)
        p.copy_((torch.randn_like(p) * 0.1 + (1.0 if p.ndim == 1 else 0.0)).bfloat16().float())
folder = os.path.join(OUT, "tiny", "transformer")
for f in os.listdir(folder) if os.path.isdir(folder) else []:  # no stale shards / index / float32 file
    os.remove(os.path.join(folder, f))
model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
model.float()
with safe_open(os.path.join(folder, "diffusion_pytorch_model.safetensors"), "pt") as f:
    assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys()), "stored dtype"

# --- 2. inputs -----------------------------------------------------------------------------------------------
torch.manual_seed(1)
x0 = torch.randn(N_IMG, 128)
noise = torch.randn(N_IMG, 128)
ctx = torch.randn(L_TXT, TEXT_WIDTH)
sigma = torch.tensor([SIGMA])
# As Flux2KleinPipeline._prepare_latent_ids / _prepare_text_ids: cartesian_prod(t, h, w, l), row-major.
img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(ROWS), torch.arange(COLS), torch.arange(1))  # (N_IMG, 4)
txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(L_TXT))
x_sigma = (1 - sigma) * x0 + sigma * noise
target = noise - x0

# --- 3. LoRA on the fused BFL targets, as hooks on the diffusers modules ----------------------------------
# BFL target -> [(diffusers module, which third of B's rows or None)]
TARGETS = ref.lora_targets(N_DOUBLE, N_SINGLE)

modules = dict(model.named_modules())
torch.manual_seed(2)
lora = {}
for name, parts in TARGETS.items():
    in_f = modules[parts[0][0]].in_features
    out_f = sum(modules[m].out_features for m, _ in parts)
    lora[name] = (torch.randn(RANK, in_f) * 0.1, torch.randn(out_f, RANK) * 0.1)
    for t in lora[name]:
        t.requires_grad_(True)


def attach(model, lora_=None):
    """Fused-LoRA forward hooks (scale SCALE) on the diffusers modules; lora_ defaults to the fixture's `lora`."""
    return ref.attach_lora(model, lora if lora_ is None else lora_, TARGETS, SCALE)


def run(model):
    for A, B in lora.values():
        A.grad = B.grad = None
    # the pipeline passes timestep = scheduler_t / 1000 = sigma; the model multiplies by 1000 itself
    v = model(hidden_states=x_sigma[None], encoder_hidden_states=ctx[None], timestep=sigma, img_ids=img_ids,
              txt_ids=txt_ids, guidance=None, return_dict=False)[0][0]
    loss = ((v - target) ** 2).mean()
    loss.backward()
    grads = {f"{n}.lora_{ab}": t.grad.detach().clone() for n, (A, B) in lora.items() for ab, t in (("A", A), ("B", B))}
    return v.detach(), loss.detach(), grads


def nf4(w):  # as scripts/make_model_fixtures.py; bitsandbytes blocks the flattened row-major weight, and every
    # in_features here is a multiple of 128, so each block is 128 consecutive weights of one row
    assert w.shape[1] % 128 == 0
    packed, state = quantize_4bit(w.contiguous(), blocksize=128, quant_type="nf4")
    return dequantize_4bit(packed, state, blocksize=128, quant_type="nf4").reshape(w.shape)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def reference(model, f32_phase):
    """float64 forward + backward of flux2_reference on this model's weights."""
    W = ref.bfl_from_diffusers(model.state_dict())
    lr = {n: (A.detach().double().requires_grad_(), B.detach().double().requires_grad_()) for n, (A, B) in lora.items()}
    v = ref.forward(W, x_sigma.double(), ctx.double(), SIGMA, img_ids, txt_ids, HEADS, lr, SCALE, f32_phase)
    loss = ((v - target.double()) ** 2).mean()
    loss.backward()
    grads = {f"{n}.lora_{ab}": t.grad for n, (A, B) in lr.items() for ab, t in (("A", A), ("B", B))}
    return W, v.detach(), loss.detach(), grads


tensors = {"x0": x0, "noise": noise, "ctx": ctx, "sigma": sigma, "img_ids": img_ids.float(), "txt_ids": txt_ids.float()}
for n, (A, B) in lora.items():
    tensors[f"lora.{n}.lora_A"], tensors[f"lora.{n}.lora_B"] = A.detach(), B.detach()
summary = {}
for quant in ("dense", "nf4"):
    # the stored bf16 weights, upcast exactly to float32; every computation below runs in float32 (reference: float64)
    m = Flux2Transformer2DModel.from_pretrained(folder, torch_dtype=torch.float32).eval().requires_grad_(False)
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert all(torch.equal(p, p.bfloat16().float()) for p in m.parameters())
    if quant == "dense":
        sd0 = model.state_dict()
        assert all(torch.equal(t, sd0[k]) for k, t in m.state_dict().items()), "saved bf16 weights"
    if quant == "nf4":
        with torch.no_grad():
            for p in m.parameters():
                if p.ndim == 2:
                    p.copy_(nf4(p))
    handles = attach(m)
    v, loss, grads = run(m)
    for h in handles:
        h.remove()
    tensors[f"{quant}.velocity"] = v
    tensors[f"{quant}.loss"] = loss.reshape(1)
    for k, g in grads.items():
        tensors[f"{quant}.grad.{k}"] = g

    # --- checks ---
    assert torch.isfinite(v).all() and torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    assert v.std() > 0.05 and all(g.abs().max() > 0 for g in grads.values())
    S = summary[quant] = dict(loss=loss.item(), velocity_std=v.std().item(),
                              min_grad_absmax=min(g.abs().max().item() for g in grads.values()))
    # the float64 reference, with diffusers' float32 time-embedding phase (f32) and exact (f64)
    for phase in ("f32", "f64"):
        W, v_ref, loss_ref, g_ref = reference(m, phase == "f32")
        S[f"ref_{phase}_phase"] = dict(loss=loss_ref.item(), velocity_rel=rel(v, v_ref),
                                       loss_rel=abs(loss.item() / loss_ref.item() - 1),
                                       max_grad_rel=max(rel(grads[k], g_ref[k]) for k in grads))
    print(quant, json.dumps(S))
    assert S["ref_f32_phase"]["velocity_rel"] < 3e-6 and S["ref_f32_phase"]["max_grad_rel"] < 2e-5, "reference"
    assert S["ref_f64_phase"]["velocity_rel"] < 5e-5 and S["ref_f64_phase"]["max_grad_rel"] < 2e-4, "reference"

    if quant == "dense":
        # the BFL name map round-trips through diffusers' own single-file converter
        from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
        back = convert_flux2_transformer_checkpoint_to_diffusers({k: t.float() for k, t in W.items()})
        sd = m.state_dict()
        assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd), "name map"
        # the fused-LoRA hooks agree with diffusers' own Flux2 LoRA loader (peft; no alpha keys -> scale 1)
        from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_flux2_lora_to_diffusers
        sd_lora = {}
        for n, (A, B) in lora.items():
            sd_lora[f"diffusion_model.{n}.lora_A.weight"] = A.detach().clone()
            sd_lora[f"diffusion_model.{n}.lora_B.weight"] = B.detach() * SCALE
        m.load_lora_adapter(_convert_non_diffusers_flux2_lora_to_diffusers(sd_lora), prefix="transformer",
                            adapter_name="check")
        with torch.no_grad():
            v_peft = m(hidden_states=x_sigma[None], encoder_hidden_states=ctx[None], timestep=sigma, img_ids=img_ids,
                       txt_ids=txt_ids, return_dict=False)[0][0]
            m.disable_adapters()
            v_base = m(hidden_states=x_sigma[None], encoder_hidden_states=ctx[None], timestep=sigma, img_ids=img_ids,
                       txt_ids=txt_ids, return_dict=False)[0][0]
        summary["peft_loader_rel"], summary["lora_effect_rel"] = rel(v_peft, v), rel(v_base, v)
        print("diffusers LoRA loader vs hooks: rel", summary["peft_loader_rel"], "; LoRA off vs on:", rel(v_base, v))
        assert summary["peft_loader_rel"] < 1e-6 and summary["lora_effect_rel"] > 1e-3

assert rel(tensors["nf4.velocity"], tensors["dense.velocity"]) > 1e-4  # NF4 really changed the weights
tensors = {k: t.float().contiguous() for k, t in tensors.items()}
save_file(tensors, os.path.join(OUT, "tiny_expected.safetensors"),
          metadata={"lora_scale": str(SCALE), "rank": str(RANK), "diffusers": diffusers.__version__})


# --- 4. training parity: three LoRA steps (clip_grad_norm_ + AdamW) on the dense weights -------------------------
LR, BETAS, EPS_ADAM, WEIGHT_DECAY, MAX_NORM, TRAIN_STEPS, TRAIN_SEED = 1e-3, (0.9, 0.999), 1e-8, 1e-4, 1.0, 3, 1


def train_draws():
    """Per step s, from one torch.Generator seeded TRAIN_SEED, in this order: z_s ~ N(0, 1) (shape [1]), then
    noise_s ~ N(0, I) (N_IMG, 128); sigma_s = sigmoid(z_s) (logit-normal timestep sampling)."""
    g = torch.Generator().manual_seed(TRAIN_SEED)
    draws = []
    for _ in range(TRAIN_STEPS):
        z = torch.randn(1, generator=g)
        draws.append((torch.sigmoid(z), torch.randn(N_IMG, 128, generator=g)))
    return draws


def train(velocity_fn, params_by_target, draws):
    """velocity_fn(x_sigma, sigma) -> (N_IMG, 128) with the LoRA of params_by_target applied. Runs TRAIN_STEPS steps of
    loss = mean((v - (noise - x0))^2); backward; clip_grad_norm_(all A and B, MAX_NORM); AdamW; zero grads.
    Returns per-step losses (before the update) and the total norms clip_grad_norm_ returned."""
    params = [t for A, B in params_by_target.values() for t in (A, B)]
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS_ADAM, weight_decay=WEIGHT_DECAY, foreach=False)
    dt = params[0].dtype
    losses, norms = [], []
    for sigma_s, noise_s in draws:
        s_, n_, x0_ = sigma_s.to(dt), noise_s.to(dt), x0.to(dt)
        v = velocity_fn((1 - s_) * x0_ + s_ * n_, sigma_s)
        loss = ((v - (n_ - x0_)) ** 2).mean()
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(params, max_norm=MAX_NORM, foreach=False).detach().clone())
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().clone())
    return losses, norms


def make_train_fixture():
    draws = train_draws()
    # float32, diffusers, the stored bf16 weights upcast (dense), the same fused-LoRA hooks
    m = Flux2Transformer2DModel.from_pretrained(folder, torch_dtype=torch.float32).eval().requires_grad_(False)
    lt = {n: (A.detach().clone().requires_grad_(True), B.detach().clone().requires_grad_(True))
          for n, (A, B) in lora.items()}
    handles = attach(m, lt)

    def v_diffusers(xs, s):  # exactly as run(): timestep = sigma, the model multiplies by 1000 itself
        return m(hidden_states=xs[None], encoder_hidden_states=ctx[None], timestep=s, img_ids=img_ids,
                 txt_ids=txt_ids, guidance=None, return_dict=False)[0][0]

    losses, norms = train(v_diffusers, lt, draws)
    for h in handles:
        h.remove()

    # the same three steps in float64 through flux2_reference (diffusers' float32 time phase): how sensitive the
    # result is to forward/backward rounding, i.e. what a float32 reimplementation can be held to
    W = ref.bfl_from_diffusers(m.state_dict())
    l64 = {n: (A.detach().double().requires_grad_(True), B.detach().double().requires_grad_(True))
           for n, (A, B) in lora.items()}
    losses64, norms64 = train(lambda xs, s: ref.forward(W, xs, ctx.double(), s.item(), img_ids, txt_ids, HEADS, l64,
                                                        SCALE, True), l64, draws)

    out = {}
    for s, (sigma_s, noise_s) in enumerate(draws):
        out[f"step{s}.sigma"], out[f"step{s}.noise"] = sigma_s, noise_s
        out[f"step{s}.loss"], out[f"step{s}.grad_norm"] = losses[s].reshape(1), norms[s].reshape(1)
    S = {"loss": [l.item() for l in losses], "grad_norm": [g.item() for g in norms],
         "sigma": [d[0].item() for d in draws]}
    moved, moved_max, delta_rel64 = {}, 0.0, 0.0
    for n, (A, B) in lt.items():
        for ab, t, t0, t64 in (("A", A, lora[n][0], l64[n][0]), ("B", B, lora[n][1], l64[n][1])):
            out[f"final.{n}.lora_{ab}"] = t.detach()
            d = t.detach().double() - t0.detach().double()
            moved[f"{n}.lora_{ab}"] = (d.norm() / t0.detach().double().norm()).item()
            moved_max = max(moved_max, d.abs().max().item())
            delta_rel64 = max(delta_rel64, rel(d, t64.detach() - t0.detach().double()))
    S["moved_rel_min"], S["moved_rel_max"], S["moved_abs_max"] = min(moved.values()), max(moved.values()), moved_max
    S["f64_vs_f32"] = dict(max_loss_rel=max(abs(a.item() / b.item() - 1) for a, b in zip(losses, losses64)),
                           max_grad_norm_rel=max(abs(a.item() / b.item() - 1) for a, b in zip(norms, norms64)),
                           max_delta_rel=delta_rel64)
    print("train", json.dumps(S))

    # --- checks ---
    assert all(torch.isfinite(t).all() for t in out.values()), "finite"
    assert all(0 < x.item() < 1 for x, _ in draws)
    assert all(l.item() > 0 for l in losses) and all(g.item() > 0 for g in norms)
    # AdamW moves each entry by about lr per step (|m_hat| / sqrt(v_hat) <~ 1), so after 3 steps by <~ 3e-3, on
    # matrices with entries ~0.1: every matrix moves, by well under 10%
    assert 1e-3 < S["moved_rel_min"] and S["moved_rel_max"] < 0.1 and S["moved_abs_max"] < 5 * TRAIN_STEPS * LR, "moved"
    assert S["f64_vs_f32"]["max_loss_rel"] < 1e-5 and S["f64_vs_f32"]["max_grad_norm_rel"] < 1e-4, "f64 training"
    out = {k: t.float().contiguous() for k, t in out.items()}
    save_file(out, os.path.join(OUT, "tiny_train.safetensors"), metadata={
        "lr": str(LR), "betas": f"{BETAS[0]},{BETAS[1]}", "eps": str(EPS_ADAM), "weight_decay": str(WEIGHT_DECAY),
        "max_norm": str(MAX_NORM), "steps": str(TRAIN_STEPS), "lora_scale": str(SCALE), "rank": str(RANK),
        "initial_lora": "lora.* of tiny_expected.safetensors",
        "clip": "torch.nn.utils.clip_grad_norm_: coef = min(1, max_norm / (total_norm + 1e-6))",
        "optimizer": "torch.optim.AdamW (decoupled weight decay p *= 1 - lr wd, bias-corrected moments)",
        "diffusers": diffusers.__version__, "torch": torch.__version__})
    return S


summary["train"] = make_train_fixture()


# --- 5. diffusers' Flux2 LoRA loader takes a BFL-named, bf16, alpha-less LoRA file ----------------------------------
def check_diffusers_lora_loader():
    """Writes diffusion_model.<BFL target>.lora_A.weight (r, in) / .lora_B.weight (out, r) in bfloat16, no alpha keys,
    no metadata (B = SCALE * B, so scale 1 reproduces the fixture's scale-SCALE LoRA) to a temporary file, loads it with
    Flux2KleinPipeline.load_lora_weights (Flux2LoraLoaderMixin: lora_state_dict -> is_ai_toolkit ->
    _convert_non_diffusers_flux2_lora_to_diffusers -> transformer.load_lora_adapter), and compares the transformer's
    output with the fused-LoRA hooks on the same bf16-rounded matrices."""
    import logging
    import tempfile
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from diffusers.loaders import Flux2LoraLoaderMixin
    from peft.tuners.lora import LoraLayer

    file_sd = {}
    for n, (A, B) in lora.items():
        file_sd[f"diffusion_model.{n}.lora_A.weight"] = A.detach().bfloat16().contiguous()
        file_sd[f"diffusion_model.{n}.lora_B.weight"] = (B.detach() * SCALE).bfloat16().contiguous()
    # the hooks' matrices: exactly the values in the file (doubling is exact in bf16), at scale SCALE
    l_r = {n: (file_sd[f"diffusion_model.{n}.lora_A.weight"].float(),
               file_sd[f"diffusion_model.{n}.lora_B.weight"].float() / SCALE) for n in lora}

    m = Flux2Transformer2DModel.from_pretrained(folder, torch_dtype=torch.float32).eval().requires_grad_(False)

    def fwd():
        with torch.no_grad():
            return m(hidden_states=x_sigma[None], encoder_hidden_states=ctx[None], timestep=sigma, img_ids=img_ids,
                     txt_ids=txt_ids, guidance=None, return_dict=False)[0][0]

    handles = attach(m, l_r)
    v_hooks = fwd()
    for h in handles:
        h.remove()
    v_base = fwd()

    records = []
    class Catch(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                records.append(record.getMessage())
    catch = Catch()
    logging.getLogger("diffusers").addHandler(catch)
    with tempfile.TemporaryDirectory() as d:
        save_file(file_sd, os.path.join(d, "klein_lora.safetensors"))
        # what the loader converts the file to (the classmethod load_lora_weights calls first)
        converted = Flux2LoraLoaderMixin.lora_state_dict(d, weight_name="klein_lora.safetensors")
        pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                                  tokenizer=None, transformer=m)
        pipe.load_lora_weights(d, weight_name="klein_lora.safetensors", adapter_name="klein")
    logging.getLogger("diffusers").removeHandler(catch)
    v_loaded = fwd()

    # which of the file's (converted) tensors landed in the model, and which LoRA parameters got nothing
    sd = m.state_dict()
    model_lora = {k for k in sd if ".lora_A." in k or ".lora_B." in k}
    want = {k.removeprefix("transformer.").replace(".lora_A.weight", ".lora_A.klein.weight")
            .replace(".lora_B.weight", ".lora_B.klein.weight"): t for k, t in converted.items()}
    unexpected, missing = sorted(set(want) - model_lora), sorted(model_lora - set(want))
    values_equal = all(torch.equal(sd[k], t.float()) for k, t in want.items() if k in sd)
    layers = {n: mod for n, mod in m.named_modules() if isinstance(mod, LoraLayer)}
    scalings = sorted({mod.scaling["klein"] for mod in layers.values()})
    S = dict(loader="Flux2KleinPipeline.load_lora_weights (Flux2LoraLoaderMixin)", file_keys=len(file_sd),
             converted_keys=len(converted), lora_layers=len(layers), scalings=scalings, missing=missing,
             unexpected=unexpected, values_equal=values_equal, warnings=records,
             rel_vs_hooks=rel(v_loaded, v_hooks), rel_vs_fixture_f32_lora=rel(v_loaded, tensors["dense.velocity"]),
             lora_effect_rel=rel(v_base, v_hooks))
    print("diffusers Flux2 LoRA loader:", json.dumps(S))
    assert not missing and not unexpected and values_equal and not records, "loader keys"
    assert len(layers) == sum(len(p) for p in TARGETS.values()) and scalings == [1.0], "loader layers"
    assert S["rel_vs_hooks"] < 1e-6 and S["lora_effect_rel"] > 1e-3, "loader output"
    return S


summary["diffusers_lora_loader"] = check_diffusers_lora_loader()
print(json.dumps(summary, indent=1))
