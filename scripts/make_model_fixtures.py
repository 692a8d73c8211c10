"""Writes tests/fixtures/hf/: small random Qwen2 (tied, q/k/v bias), Qwen3 (q/k norm), Llama (untied,
llama3 rope), Mistral (a sliding window of 5, head_dim apart from hidden/heads), Ministral (a sliding
and a full layer), SmolLM3 (tied, a layer without RoPE) and Phi-3 (fused projections, partial rotary,
LongRoPE, a sliding window) and Gemma 3 (sliding and full layers with their own RoPE bases, sandwich and
(1 + w) norms, GeGLU, a query scale of its own, final-logit soft-capping; the multimodal Gemma 3
beside it, whose head never caps), Ministral 3 (YaRN, queries scaled up every 4 positions) and the
multimodal Mistral 3 holding it (untied head)), Gemma 4 (31B's layout: plain-w and v norms, wider heads
on the full layers with values from k_proj and proportional RoPE, a scalar per layer; and multimodal;
and E2B's layout: per-layer inputs, layers sharing keys and values, double-wide MLPs; and 26B-A4B's:
experts beside each dense MLP, by itself and multimodal), the mixtures of
experts Qwen3-MoE, Mixtral and Qwen2-MoE, and gpt-oss (biased attention with sinks, a sliding and a full
layer, YaRN, biased experts stored [experts, in, out] with gate and up interleaved, the clamped SwiGLU)
models saved by transformers, a PEFT LoRA adapter for each with random A and B, and the
logits, loss and LoRA gradients transformers + peft compute for one labelled sequence, with the base
weights unquantized and with NF4 (group 64) emulated exactly (bitsandbytes quantize -> dequantize).

Run from the repository root with a virtualenv holding torch, transformers, peft and bitsandbytes:
    python scripts/make_model_fixtures.py [name ...]

gpt_oss_mxfp4 (not in `models`: written from the gpt_oss fixture, after it when both run, and by
`python scripts/make_model_fixtures.py gpt_oss_mxfp4` alone) is the same gpt-oss checkpoint with its
experts stored as the hub stores them, in MXFP4 (each weight's blocks and scales, quantization_config in
config.json): the expert weights transformers dequantizes from it on the CPU and the logits it computes
with them, no adapter.
"""
import json
import os
import shutil
import sys

import torch
import transformers
import peft
from bitsandbytes.functional import quantize_4bit, dequantize_4bit
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import (Gemma4Config, Gemma4ForCausalLM, Gemma4ForConditionalGeneration, Gemma4TextConfig,
                          GptOssConfig, GptOssForCausalLM,
                          Ministral3Config, Ministral3ForCausalLM, Mistral3Config, Mistral3ForConditionalGeneration,
                          Gemma3Config, Gemma3ForCausalLM, Gemma3ForConditionalGeneration, Gemma3TextConfig,
                          LlamaConfig, LlamaForCausalLM, MinistralConfig, MinistralForCausalLM, MistralConfig,
                          MistralForCausalLM, MixtralConfig, MixtralForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM, SmolLM3Config,
                          SmolLM3ForCausalLM)

OUT = "tests/fixtures/hf"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FUSED_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
models = {
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**common, tie_word_embeddings=True,
                                            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config(**common, head_dim=32, tie_word_embeddings=False,
                                            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "llama": (LlamaForCausalLM, LlamaConfig(**common, tie_word_embeddings=False, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    # Windows shorter than the 14-token sequence, so that they change the logits.
    "mistral": (MistralForCausalLM, MistralConfig(**common, head_dim=32, sliding_window=5, tie_word_embeddings=False,
                                                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "ministral": (MinistralForCausalLM, MinistralConfig(
        **common, head_dim=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0})),
    "smollm3": (SmolLM3ForCausalLM, SmolLM3Config(**common, no_rope_layers=[1, 0], tie_word_embeddings=True, pad_token_id=0,
                                                  rope_parameters={"rope_type": "default", "rope_theta": 2000000.0})),
    # Phi-4-mini's layout: fused projections, 3/4 of each 16-wide head rotated (6 frequencies), LongRoPE
    # (the short factors: 14 positions stay within the original 16) and a window of 6 as older Phi-3s set.
    "phi3": (Phi3ForCausalLM, Phi3Config(
        **common, tie_word_embeddings=False, sliding_window=6, partial_rotary_factor=0.75, pad_token_id=0,
        original_max_position_embeddings=16,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                         "long_factor": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]})),
    # Gemma 3's text decoder: a sliding layer (window 4, base 10^4) and a full one (base 10^6, linear x8,
    # as Gemma 3 4B), a query scale apart from head_dim's, (1 + w) and sandwich norms, GeGLU, and a logit
    # cap of 2 (these logits reach about ±3, so it bends them; Gemma 2 and 4 cap at 30).
    "gemma3_text": (Gemma3ForCausalLM, Gemma3TextConfig(
        **common, head_dim=32, query_pre_attn_scalar=24, sliding_window=4, final_logit_softcapping=2.0,
        layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True, pad_token_id=0,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}})),
}
# Gemma 3 4B and up: the same text decoder inside a multimodal model (a tiny SigLIP tower beside it), its
# modules under model.language_model; saved in the spelling transformers writes (language_model.model.*).
models["gemma3"] = (Gemma3ForConditionalGeneration, Gemma3Config(
    text_config=models["gemma3_text"][1].to_dict(),
    vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                   "image_size": 28, "patch_size": 14},
    mm_tokens_per_image=4))
# Ministral 3: YaRN (x16 past 4 positions) and the query scale 1 + 0.1·ln(1 + floor(pos / 4)), which
# changes three times within the 14 tokens.
models["ministral3"] = (Ministral3ForCausalLM, Ministral3Config(
    **common, head_dim=16, tie_word_embeddings=False, pad_token_id=0, sliding_window=None,
    rope_parameters={"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 16.0,
                     "original_max_position_embeddings": 4, "beta_fast": 32.0, "beta_slow": 1.0,
                     "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1}))
# Ministral 3's released folders: the decoder inside Mistral3ForConditionalGeneration (a tiny Pixtral
# tower beside it), the head untied by the outer flag.
models["mistral3"] = (Mistral3ForConditionalGeneration, Mistral3Config(
    text_config=models["ministral3"][1].to_dict(),
    vision_config={"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                   "num_attention_heads": 2, "head_dim": 8, "image_size": 28, "patch_size": 14},
    tie_word_embeddings=False))
# Gemma 4 as 31B is built (no per-layer inputs, no shared KV layers, no experts): a sliding layer (heads
# of 16, window 4, base 10^4) and a full one (heads of 32, one KV head whose values are its keys,
# proportional RoPE rotating 4 of 16 frequencies), logits capped at 30.
models["gemma4_text"] = (Gemma4ForCausalLM, Gemma4TextConfig(
    **{**common, "rms_norm_eps": 1e-6}, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
    attention_k_eq_v=True, layer_types=["sliding_attention", "full_attention"], sliding_window=4,
    final_logit_softcapping=30.0, hidden_size_per_layer_input=0, num_kv_shared_layers=0, enable_moe_block=False,
    tie_word_embeddings=True, pad_token_id=0,
    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                     "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                        "rope_theta": 1000000.0}}))
models["gemma4"] = (Gemma4ForConditionalGeneration, Gemma4Config(
    text_config=models["gemma4_text"][1].to_dict(), vision_config=None, audio_config=None))
# Gemma 4 as E2B is built: per-layer inputs (64 per layer, their two linears LoRA targets too), the last
# two of four layers attending over the keys and values of the first two (one of each type) with MLPs
# twice as wide.
models["gemma4_e2b"] = (Gemma4ForCausalLM, Gemma4TextConfig(
    **{**common, "rms_norm_eps": 1e-6, "num_hidden_layers": 4}, head_dim=16, global_head_dim=32,
    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"], sliding_window=4,
    final_logit_softcapping=30.0, hidden_size_per_layer_input=64, vocab_size_per_layer_input=256,
    num_kv_shared_layers=2, use_double_wide_mlp=True, enable_moe_block=False, tie_word_embeddings=True,
    pad_token_id=0,
    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                     "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                        "rope_theta": 1000000.0}}))
# Qwen3-MoE: three layers, the middle one a dense MLP (mlp_only_layers), the others 4 experts of
# width 64, 2 per token, their weights renormalised (norm_topk_prob, as Qwen3-30B-A3B sets it).
# PEFT's all-linear adapts the attention, the routers and the experts.
models["qwen3_moe"] = (Qwen3MoeForCausalLM, Qwen3MoeConfig(
    **{**common, "num_hidden_layers": 3}, head_dim=32, num_experts=4, num_experts_per_tok=2,
    moe_intermediate_size=64, norm_topk_prob=True, mlp_only_layers=[1], decoder_sparse_step=1,
    tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}))
# Mixtral: Mistral's attention, every layer 4 experts of width 128, 2 per token (always renormalised);
# saved as the hub stores it (block_sparse_moe.experts.{e}.w1/w2/w3, block_sparse_moe.gate).
models["mixtral"] = (MixtralForCausalLM, MixtralConfig(
    **common, num_local_experts=4, num_experts_per_tok=2, sliding_window=None, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}))
# Qwen2-MoE: Qwen2's attention (q/k/v bias), three layers, the middle one a dense MLP, the others 4
# experts of width 64, 2 per token, their weights as routed (norm_topk_prob off, the default), and a shared
# expert of width 192 scaled per token by sigmoid(shared_expert_gate). PEFT converts no target names for
# qwen2_moe itself (transformers maps other model types to its conversion, not its own), so all-linear
# adapts the attention, the dense MLP and the shared expert's linears and gate; the routers and experts
# are adapted as target_parameters, named (at rank r).
models["qwen2_moe"] = (Qwen2MoeForCausalLM, Qwen2MoeConfig(
    **{**common, "num_hidden_layers": 3}, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
    shared_expert_intermediate_size=192, norm_topk_prob=False, mlp_only_layers=[1], decoder_sparse_step=1,
    tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}))
# gpt-oss (20b's layout): biased q/k/v/o, a learned sink logit per query head (std 1, set below, so that
# they move the logits: at 0.1 a sink is one more key of score about 0), a sliding layer (window 4) and a
# full one, YaRN x4 past 64 positions (factor = max positions / original ones, as the hub's 32 = 131072 /
# 4096; frequency 0 kept, 1 on the fractional ramp that truncate off leaves (x0.52; x0.625 if truncated),
# 2..7 divided by 4, q and k scaled by 1 + 0.1·ln 4), 4 experts of width 64, 2 per token (softmax over the
# two chosen router logits, the router biased), stored [experts, in, out] with gate and up interleaved, each
# with a bias, and the clamped SwiGLU (up + 1)·g·σ(1.702·g), g = min(gate, limit), up in ±limit: with
# std-0.1 weights gate and up reach about ±3, so a limit of 0.8 clamps about 1 gate in 6 and 1 up in 3.
# PEFT's all-linear adapts q/k/v/o only (the router is no nn.Linear); the experts are target_parameters.
models["gpt_oss"] = (GptOssForCausalLM, GptOssConfig(
    **{**common, "intermediate_size": 64}, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
    sliding_window=4, layer_types=["sliding_attention", "full_attention"], attention_bias=True,
    swiglu_limit=0.8, tie_word_embeddings=False,
    rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                     "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 64}))
# Gemma 4 as 26B-A4B is built: 31B's attention (as gemma4_text's) and, beside each layer's dense MLP, 4
# experts of width 64, 2 per token, routed by a linear on the attention block's output normalised and
# scaled, each chosen weight scaled by its expert's factor. PEFT's all-linear adapts the attention, the
# dense MLPs and the routers (router.proj); the experts are target_parameters.
models["gemma4_moe"] = (Gemma4ForCausalLM, Gemma4TextConfig(
    **{**common, "rms_norm_eps": 1e-6}, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
    attention_k_eq_v=True, layer_types=["sliding_attention", "full_attention"], sliding_window=4,
    final_logit_softcapping=30.0, hidden_size_per_layer_input=0, num_kv_shared_layers=0, enable_moe_block=True,
    num_experts=4, top_k_experts=2, moe_intermediate_size=64, tie_word_embeddings=True, pad_token_id=0,
    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                     "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                        "rope_theta": 1000000.0}}))
# As released: inside Gemma4ForConditionalGeneration (no vision tower here).
models["gemma4_moe_multimodal"] = (Gemma4ForConditionalGeneration, Gemma4Config(
    text_config=models["gemma4_moe"][1].to_dict(), vision_config=None, audio_config=None))
MULTIMODAL = ("gemma3", "mistral3", "gemma4", "gemma4_moe_multimodal")
MOE = ("qwen3_moe", "mixtral", "qwen2_moe")
# Experts transformers holds [experts, in, out] (x @ W): nibble holds them [experts, out, in] as the others.
TRANSPOSED_EXPERTS = ("gpt_oss",)
ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
# What nibble packs in 4 bits beside the linears: a mixture-of-experts layer's stacked experts
# ([experts, rows, cols]; groups of 64 run along each row as nibble's do).
EXPERTS = ("gate_up_proj", "down_proj")
PLE_TARGETS = ["per_layer_input_gate", "per_layer_projection"]
# `python scripts/make_model_fixtures.py gemma4_e2b` rewrites that fixture alone.
ONLY = sys.argv[1:]


def write_expected(name, cls, config, folder, **load):
    """Logits, loss and LoRA gradients of transformers + peft for the model saved in `folder` (loaded
    with `load` as extra from_pretrained arguments), unquantized and with NF4 emulated; the adapter
    (random, seed 1) saved beside them."""
    vocab_size = getattr(config, "text_config", config).vocab_size
    ids = torch.randint(0, vocab_size, (1, 14))
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt that carries no loss

    targets = FUSED_TARGETS if name == "phi3" else TARGETS + PLE_TARGETS if name == "gemma4_e2b" else TARGETS
    # nibble packs every decoder linear, the shared expert's gate too.
    quantized = targets + ["shared_expert_gate"] if name == "qwen2_moe" else targets
    if name == "gpt_oss":
        # The router (no nn.Linear), sinks, biases and norms stay unquantized.
        quantized = ATTENTION_TARGETS
        targets = "all-linear"
    if name == "gemma4_moe":
        # The routers are linears, kept dense as every router is; PEFT converts nothing for gemma4.
        targets = "all-linear"
    if name == "gemma4_moe_multimodal":
        # all-linear's modules by name, under the language model: the routers' linears are `proj`.
        targets = TARGETS + ["proj"]
    if name in MOE:
        # PEFT turns all-linear into the attention's linears and, as target_parameters, the router
        # and both stacks of experts (gate_up_proj at twice the rank and alpha); the dense layer's
        # MLP is left out.
        targets = "all-linear"
    # In the multimodal model, only the text decoder's linears (the vision tower has q_proj too).
    text_only = r".*language_model.*\.(" + "|".join(targets) + ")"
    parameters = ["gate.weight", "gate_up_proj", "down_proj"] if name == "qwen2_moe" else None
    if name in ("gpt_oss", "gemma4_moe", "gemma4_moe_multimodal"):
        # PEFT wraps each stack of experts (gpt-oss's is_transposed: in = the middle axis) in a
        # ParamWrapper.
        parameters = ["gate_up_proj", "down_proj"]
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=text_only if name in MULTIMODAL else targets, target_parameters=parameters)
    for quant in ("none", "nf4"):
        base = cls.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation="eager", **load).eval()
        if quant == "nf4":
            with torch.no_grad():
                for mname, module in base.named_modules():
                    if mname.split(".")[-1] in quantized and "vision" not in mname:
                        w = module.weight.data
                        packed, state = quantize_4bit(w, blocksize=64, quant_type="nf4")
                        module.weight.copy_(dequantize_4bit(packed, state, blocksize=64, quant_type="nf4").reshape(w.shape))
                for pname, p in base.named_parameters():
                    if pname.split(".")[-2:-1] == ["experts"] and pname.split(".")[-1] in EXPERTS:
                        if name in TRANSPOSED_EXPERTS:
                            # Quantized in nibble's layout [experts, out, in] (each row whole groups).
                            w = p.data.transpose(1, 2).contiguous()
                            assert w.shape[-1] % 64 == 0, (pname, w.shape)
                            packed, state = quantize_4bit(w, blocksize=64, quant_type="nf4")
                            w = dequantize_4bit(packed, state, blocksize=64, quant_type="nf4").reshape(w.shape)
                            p.copy_(w.transpose(1, 2))
                            continue
                        packed, state = quantize_4bit(p.data, blocksize=64, quant_type="nf4")
                        p.copy_(dequantize_4bit(packed, state, blocksize=64, quant_type="nf4").reshape(p.shape))
        pm = get_peft_model(base, lora)
        torch.manual_seed(1)
        with torch.no_grad():
            for pname, p in pm.named_parameters():
                if "lora_" in pname:
                    p.copy_(torch.randn_like(p) * 0.1)
        if quant == "none":
            pm.save_pretrained(os.path.join(folder, "adapter"))
        out = pm(input_ids=ids, labels=labels)
        out.loss.backward()
        tensors = {"logits": out.logits[0].detach().contiguous()}
        for pname, p in pm.named_parameters():
            if "lora_" in pname:
                key = pname.replace(".default", "")
                tensors[key] = p.grad.detach().contiguous()
        save_file(tensors, os.path.join(folder, f"expected_{quant}.safetensors"))
        with open(os.path.join(folder, f"expected_{quant}.json"), "w") as f:
            json.dump({"input_ids": ids[0].tolist(), "labels": labels[0].tolist(), "loss": out.loss.item(),
                       "transformers": transformers.__version__, "peft": peft.__version__}, f, indent=1)
    print(name, "loss", out.loss.item())


# FP4 E2M1 by its code (bit 3 the sign), as transformers decodes MXFP4.
FP4_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def mxfp4_encode(w):
    """[..., K] (K a multiple of 32) -> blocks U8 [..., K/32, 16], scales U8 [..., K/32]: in each group of
    32 along the last axis the smallest power of two 2^(scale - 127) that brings max|w| within 6, each
    value rounded to the nearest E2M1 code (ties to the smaller magnitude), element 2j in byte j's low
    nibble and 2j + 1 in its high one."""
    g = w.reshape(*w.shape[:-1], w.shape[-1] // 32, 32)
    exponent = torch.ceil(torch.log2(g.abs().amax(-1).clamp_min(2.0 ** -120) / 6.0)).to(torch.int32)
    scaled = g / torch.exp2(exponent.float()).unsqueeze(-1)
    magnitudes = torch.tensor(FP4_VALUES[:8])
    code = (scaled.abs().unsqueeze(-1) - magnitudes).abs().argmin(-1) + 8 * (scaled < 0)
    code = code.to(torch.uint8)
    blocks = code[..., 0::2] | (code[..., 1::2] << 4)
    return blocks.contiguous(), (exponent + 127).to(torch.uint8)


def mxfp4_decode(blocks, scales):
    """The inverse of mxfp4_encode, [..., K/32, 16] and [..., K/32] -> [..., K] in f32."""
    values = torch.tensor(FP4_VALUES)
    codes = torch.stack([blocks & 0xF, blocks >> 4], -1).reshape(*blocks.shape[:-1], 32).long()
    w = torch.ldexp(values[codes], (scales.to(torch.int32) - 127).unsqueeze(-1))
    return w.reshape(*w.shape[:-2], -1)


def write_mxfp4(source, folder):
    """The gpt_oss fixture's checkpoint with its experts stored as the hub's gpt-oss: per layer
    mlp.experts.{gate_up,down}_proj_blocks U8 [experts, out, in/32, 16] and _scales U8 [experts, out, in/32]
    ([out, in] on disk: transformers transposes them to its [experts, in, out] as it dequantizes), the
    biases and every other tensor as the gpt_oss fixture saved them (f32), and quantization_config as the
    hub's. Expected: the experts transformers dequantizes on the CPU (its in-memory layout, f32, in
    expected_dequantized.safetensors) and the logits for the gpt_oss fixture's input ids with them, no
    adapter (expected_mxfp4.safetensors and .json)."""
    os.makedirs(folder, exist_ok=True)
    tensors = load_file(os.path.join(source, "model.safetensors"))
    encoded = {}
    for key in list(tensors):
        if key.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            w = tensors.pop(key).transpose(1, 2).contiguous()  # [experts, out, in]
            blocks, scales = mxfp4_encode(w)
            assert (mxfp4_decode(blocks, scales) - w).abs().max() <= w.abs().max() / 4  # near w, not exact
            tensors[key + "_blocks"], tensors[key + "_scales"] = blocks, scales
            encoded[key] = mxfp4_decode(blocks, scales).transpose(1, 2).contiguous()
    save_file(dict(sorted(tensors.items())), os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(source, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    shutil.copy(os.path.join(source, "generation_config.json"), folder)

    # Without a GPU (or the kernels package) transformers dequantizes the experts as it loads them.
    model = GptOssForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    dequantized = {}
    for pname, p in model.named_parameters():
        if pname.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            assert p.dtype == torch.float32 and torch.equal(p.data, encoded[pname]), pname
            dequantized[pname] = p.detach().contiguous()
    assert len(dequantized) == len(encoded)
    save_file(dequantized, os.path.join(folder, "expected_dequantized.safetensors"))
    with open(os.path.join(source, "expected_none.json")) as f:
        source_expected = json.load(f)
    ids = torch.tensor([source_expected["input_ids"]])
    labels = torch.tensor([source_expected["labels"]])
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    save_file({"logits": out.logits[0].contiguous()}, os.path.join(folder, "expected_mxfp4.safetensors"))
    with open(os.path.join(folder, "expected_mxfp4.json"), "w") as f:
        json.dump({"input_ids": ids[0].tolist(), "labels": labels[0].tolist(), "loss": out.loss.item(),
                   "transformers": transformers.__version__, "peft": peft.__version__}, f, indent=1)
    print("gpt_oss_mxfp4 loss", out.loss.item())


if __name__ == "__main__":
    for index, (name, (cls, config)) in enumerate(models.items()):
        if ONLY and name not in ONLY:
            continue
        # A seed per model (its place in `models`): a model appended keeps the others' fixtures as they are.
        torch.manual_seed(index)
        config._attn_implementation = "eager"
        model = cls(config).float().eval()
        with torch.no_grad():
            for pname, p in model.named_parameters():
                # std 0.1: with the usual 0.02 every loss is ln(vocab) whatever the bug.
                # Norm scales around 1 (Gemma's w around 0: it scales by 1 + w).
                around_one = "norm" in pname and not name.startswith("gemma3")
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if around_one else 0.0))
            # Gemma 4's per-layer scalar is a buffer the checkpoint holds.
            for bname, b in model.named_buffers():
                if bname.endswith("layer_scalar"):
                    b.copy_(torch.randn_like(b) * 0.1 + 1.0)
            # gpt-oss's sinks at std 1: a sink is one more logit in each row's softmax (with no value), beside
            # scores near 0 here (std-0.1 q and k), so at std 0.1 it would weigh like one more key, about the
            # same in every head; at ±1 to ±2 it takes from a few percent to most of a row's weight.
            for pname, p in model.named_parameters():
                if pname.endswith("self_attn.sinks"):
                    p.copy_(torch.randn_like(p))
                # Gemma 4's router: its scales around 1, and its weights as much larger as its input
                # is scaled down (hidden^-1/2), so that its logits spread and no two experts tie.
                if pname.endswith(("router.scale", "router.per_expert_scale")):
                    p.copy_(torch.randn_like(p) * 0.1 + 1.0)
                if pname.endswith("router.proj.weight"):
                    p.copy_(torch.randn_like(p) * 0.1 * getattr(config, "text_config", config).hidden_size ** 0.5)
        folder = os.path.join(OUT, name)
        model.save_pretrained(folder)
        write_expected(name, cls, config, folder)
    if not ONLY or "gpt_oss" in ONLY or "gpt_oss_mxfp4" in ONLY:
        write_mxfp4(os.path.join(OUT, "gpt_oss"), os.path.join(OUT, "gpt_oss_mxfp4"))
