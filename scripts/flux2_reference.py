"""Plain float64 reference of the FLUX.2 [klein] transformer forward, in BFL (official single-file) names,
written from shared/FLUX2-KLEIN.md. scripts/make_flux2_fixture.py checks it against diffusers; it is the
blueprint for nibble's Rust implementation. Batch 1, no masks, no guidance embedding, no biases.

    W = bfl_from_diffusers(diffusers_state_dict)             # BFL key -> float64 tensor
    v = forward(W, x, ctx, sigma, img_ids, txt_ids, heads)   # (N_img, 128) predicted velocity

x (N_img, 128) packed latents; ctx (L_txt, text width); sigma a float in [0, 1]; ids (S, 4) = (t, h, w, l).
lora: optional {BFL linear name (no ".weight"): (A (r, in), B (out, r))}, added as scale * (y A^T) B^T.
"""
import math

import torch

EPS = 1e-6           # every LayerNorm (no affine) and every q/k RMSNorm
HEAD_DIM = 128
ROPE_AXES = (32, 32, 32, 32)
ROPE_THETA = 2000.0
TIME_DIM = 256       # sinusoidal timestep features: 128 cosines then 128 sines


def bfl_from_diffusers(sd):
    """diffusers Flux2Transformer2DModel state dict -> BFL checkpoint keys (float64)."""
    g = lambda k: sd[k].double()
    W = {
        "img_in.weight": g("x_embedder.weight"),
        "txt_in.weight": g("context_embedder.weight"),
        "time_in.in_layer.weight": g("time_guidance_embed.timestep_embedder.linear_1.weight"),
        "time_in.out_layer.weight": g("time_guidance_embed.timestep_embedder.linear_2.weight"),
        "double_stream_modulation_img.lin.weight": g("double_stream_modulation_img.linear.weight"),
        "double_stream_modulation_txt.lin.weight": g("double_stream_modulation_txt.linear.weight"),
        "single_stream_modulation.lin.weight": g("single_stream_modulation.linear.weight"),
        "final_layer.linear.weight": g("proj_out.weight"),
    }
    scale, shift = g("norm_out.linear.weight").chunk(2)  # diffusers rows (scale, shift); BFL rows (shift, scale)
    W["final_layer.adaLN_modulation.1.weight"] = torch.cat([shift, scale])
    n_double = len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")})
    n_single = len({k.split(".")[1] for k in sd if k.startswith("single_transformer_blocks.")})
    names = {"img": ("to_q", "to_k", "to_v", "to_out.0", "ff", "norm_q", "norm_k"),
             "txt": ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context", "norm_added_q", "norm_added_k")}
    for i in range(n_double):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for s, (q, k, v, proj, ff, nq, nk) in names.items():
            W[b + f"{s}_attn.qkv.weight"] = torch.cat([g(d + f"attn.{q}.weight"), g(d + f"attn.{k}.weight"),
                                                       g(d + f"attn.{v}.weight")])
            W[b + f"{s}_attn.norm.query_norm.scale"] = g(d + f"attn.{nq}.weight")
            W[b + f"{s}_attn.norm.key_norm.scale"] = g(d + f"attn.{nk}.weight")
            W[b + f"{s}_attn.proj.weight"] = g(d + f"attn.{proj}.weight")
            W[b + f"{s}_mlp.0.weight"] = g(d + f"{ff}.linear_in.weight")
            W[b + f"{s}_mlp.2.weight"] = g(d + f"{ff}.linear_out.weight")
    for j in range(n_single):
        d, b = f"single_transformer_blocks.{j}.attn.", f"single_blocks.{j}."
        W[b + "linear1.weight"] = g(d + "to_qkv_mlp_proj.weight")
        W[b + "linear2.weight"] = g(d + "to_out.weight")
        W[b + "norm.query_norm.scale"] = g(d + "norm_q.weight")
        W[b + "norm.key_norm.scale"] = g(d + "norm_k.weight")
    return W


def lora_targets(n_double, n_single):
    """The fused BFL LoRA targets as diffusers modules: {BFL target: [(diffusers module, which third of B's rows
    or None)]} (the fixture scripts' LoRA hooks)."""
    targets = {}
    for i in range(n_double):
        for s, (q, k, v, proj, ff) in {"img": ("to_q", "to_k", "to_v", "to_out.0", "ff"),
                                       "txt": ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                                               "ff_context")}.items():
            d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}.{s}_"
            targets[b + "attn.qkv"] = [(d + f"attn.{q}", 0), (d + f"attn.{k}", 1), (d + f"attn.{v}", 2)]
            targets[b + "attn.proj"] = [(d + f"attn.{proj}", None)]
            targets[b + "mlp.0"] = [(d + f"{ff}.linear_in", None)]
            targets[b + "mlp.2"] = [(d + f"{ff}.linear_out", None)]
    for j in range(n_single):
        targets[f"single_blocks.{j}.linear1"] = [(f"single_transformer_blocks.{j}.attn.to_qkv_mlp_proj", None)]
        targets[f"single_blocks.{j}.linear2"] = [(f"single_transformer_blocks.{j}.attn.to_out", None)]
    return targets


def attach_lora(model, lora, targets, scale):
    """Fused-LoRA forward hooks on a diffusers Flux2Transformer2DModel: out + scale (x A^T) B^T, B's thirds on
    q, k and v. lora: {BFL target: (A, B)}. Returns the hook handles."""
    mods = dict(model.named_modules())
    handles = []
    for name, parts in targets.items():
        A, B = lora[name]
        for mname, third in parts:
            def hook(mod, inp, out, A=A, B=B, third=third):
                b = B if third is None else B.chunk(3, dim=0)[third]
                return out + scale * (inp[0] @ A.T) @ b.T
            handles.append(mods[mname].register_forward_hook(hook))
    return handles


def timestep_embedding(sigma, f32_phase=False):
    """[cos(t f_k), sin(t f_k)], t = 1000 sigma, f_k = exp(-ln(10000) k / 128), k = 0..127.
    diffusers computes t (= float32(sigma) * 1000), f_k and t * f_k in float32 whatever the model dtype; with t up
    to 1000 that rounds the phase by up to ~3e-5 rad, which moves the velocity by ~1e-5 relative. f32_phase=True
    reproduces diffusers' rounding exactly (same torch float32 ops)."""
    half = TIME_DIM // 2
    if f32_phase:
        t = torch.tensor([sigma], dtype=torch.float32) * 1000
        f = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        a = (t * f).double()
    else:
        a = 1000.0 * sigma * torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    return torch.cat([torch.cos(a), torch.sin(a)])  # cosines first


def layer_norm(x):  # over the last dim, biased variance, no affine
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + EPS)


def rms_norm(x, w):  # x (S, H, 128), w (128)
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + EPS) * w


def modulate(x, shift, scale):
    return (1 + scale) * layer_norm(x) + shift


def rope_angles(ids):
    """ids (S, 4) -> angles (S, 64): head-dim group a (32 dims, 16 pairs) uses id coordinate a."""
    out = []
    for a, dim in enumerate(ROPE_AXES):
        omega = ROPE_THETA ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # 2000^(-2j/32), j = 0..15
        out.append(ids[:, a:a + 1].double() * omega)
    return torch.cat(out, dim=-1)


def rope(x, ang):
    """x (S, H, 128); adjacent pairs (2j, 2j+1) rotate by ang[:, j]."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = torch.cos(ang)[:, None, :], torch.sin(ang)[:, None, :]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)


def attention(q, k, v):
    """q, k, v (S, H, 128) -> (S, H*128); full bidirectional softmax attention, scale 1/sqrt(128)."""
    w = torch.einsum("shd,thd->hst", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("hst,thd->shd", torch.softmax(w, dim=-1), v).flatten(1)


def forward(W, x, ctx, sigma, img_ids, txt_ids, heads, lora=None, lora_scale=1.0, f32_phase=False):
    lora = lora or {}

    def lin(name, y):  # y W^T (+ LoRA)
        out = y @ W[name + ".weight"].T
        if name in lora:
            A, B = lora[name]
            out = out + lora_scale * (y @ A.T) @ B.T
        return out

    silu = torch.nn.functional.silu
    D = heads * HEAD_DIM
    L = ctx.shape[0]
    n_double = len({k.split(".")[1] for k in W if k.startswith("double_blocks.")})
    n_single = len({k.split(".")[1] for k in W if k.startswith("single_blocks.")})

    # 1-2. time embedding and the modulations shared by all blocks
    temb = lin("time_in.out_layer", silu(lin("time_in.in_layer", timestep_embedding(sigma, f32_phase))))
    mod_img = lin("double_stream_modulation_img.lin", silu(temb)).chunk(6)  # shift, scale, gate (attn) | (mlp)
    mod_txt = lin("double_stream_modulation_txt.lin", silu(temb)).chunk(6)
    shift, scale, gate = lin("single_stream_modulation.lin", silu(temb)).chunk(3)

    # 3. input projections; RoPE angles in joint order TEXT FIRST
    img, txt = lin("img_in", x), lin("txt_in", ctx)
    ang = torch.cat([rope_angles(txt_ids), rope_angles(img_ids)])

    def qkv_heads(y):  # (S, 3D) -> q, k, v each (S, H, 128)
        return [t.unflatten(-1, (heads, HEAD_DIM)) for t in y.chunk(3, dim=-1)]

    def swiglu(u):  # u = [gate | value]
        g_, v_ = u.chunk(2, dim=-1)
        return silu(g_) * v_

    # 4. double-stream blocks
    for i in range(n_double):
        b = f"double_blocks.{i}."
        qs, ks, vs = [], [], []
        for s, h, m in (("txt", txt, mod_txt), ("img", img, mod_img)):
            q, k, v = qkv_heads(lin(b + f"{s}_attn.qkv", modulate(h, m[0], m[1])))
            qs.append(rms_norm(q, W[b + f"{s}_attn.norm.query_norm.scale"]))
            ks.append(rms_norm(k, W[b + f"{s}_attn.norm.key_norm.scale"]))
            vs.append(v)
        o = attention(rope(torch.cat(qs), ang), rope(torch.cat(ks), ang), torch.cat(vs))
        o_txt, o_img = o[:L], o[L:]
        out = {}
        for s, h, m, o_s in (("txt", txt, mod_txt, o_txt), ("img", img, mod_img, o_img)):
            h = h + m[2] * lin(b + f"{s}_attn.proj", o_s)
            h = h + m[5] * lin(b + f"{s}_mlp.2", swiglu(lin(b + f"{s}_mlp.0", modulate(h, m[3], m[4]))))
            out[s] = h
        txt, img = out["txt"], out["img"]

    # 5. single-stream blocks over [txt; img]
    h = torch.cat([txt, img])
    for j in range(n_single):
        b = f"single_blocks.{j}."
        y = lin(b + "linear1", modulate(h, shift, scale))
        q, k, v = qkv_heads(y[:, :3 * D])
        q = rope(rms_norm(q, W[b + "norm.query_norm.scale"]), ang)
        k = rope(rms_norm(k, W[b + "norm.key_norm.scale"]), ang)
        h = h + gate * lin(b + "linear2", torch.cat([attention(q, k, v), swiglu(y[:, 3 * D:])], dim=-1))

    # 6. final layer on the image tokens; adaLN_modulation = Sequential(SiLU, Linear), rows (shift, scale)
    f_shift, f_scale = lin("final_layer.adaLN_modulation.1", silu(temb)).chunk(2)
    return lin("final_layer.linear", modulate(h[L:], f_shift, f_scale))
