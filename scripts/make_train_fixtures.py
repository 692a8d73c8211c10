"""Writes tests/fixtures/hf_train/<family>/: three optimizer steps of LoRA training done by transformers +
peft, for tests/train_parity.rs to compare `nibble train` against; checks that PEFT loads nibble's adapter
and that transformers loads `nibble merge`'s folder (results recorded in expected.json).

The setup is the issue's parity recipe, for six families: small random Qwen2 (tied embeddings, q/k/v
bias), Gemma 3 (sandwich norms, GeGLU, sliding and full layers), Phi-3 (fused projections, partial
rotary, LongRoPE), Gemma 4 (v norms, a full layer with wider heads whose values are its keys, a scalar
per layer, capped logits, per-layer inputs whose two linears are adapted too, two layers reusing the
first two's keys and values with double-wide MLPs), Ministral 3 (YaRN, the per-position query scale)
and Qwen3-MoE (8 experts, 2 per token, a dense layer between two sparse ones; all-linear: LoRA on the attention,
the routers and the experts), Qwen2-MoE (as Qwen3-MoE's, weights as routed, a shared expert of width 192 gated
per token; all-linear and the routers and experts as target_parameters), Mixtral (Mistral's attention with a window of 8, 4 experts in each of two
layers; all-linear) and gpt-oss (biased attention with sinks, a sliding and a full layer, 4 biased experts
stored [experts, in, out] with gate and up interleaved, the clamped SwiGLU; all-linear and the experts as
target_parameters) and Gemma 4 with 26B-A4B's experts (4 beside each of two layers' dense MLPs, 2 per token,
routed by a linear on its own norm and scale, per-expert factors; all-linear, which takes the routers'
linears, and the experts as target_parameters) models made by `nibble synth --tokenizer byte` (a byte-level tokenizer with Qwen2.5's
chat template), NF4 with group 64 emulated exactly (bitsandbytes quantize -> dequantize of the decoder
linears), a PEFT LoRA adapter (r=4, alpha=8, every decoder linear by PEFT's names, random A and B),
dropout 0, batch 1 with gradient accumulation 2, constant
lr 1e-3, AdamW (betas 0.9/0.999, eps 1e-8, no weight decay), clipping at global norm 1.0, the data in file
order, and the loss of each optimizer step = Σ token cross-entropy over its examples / their label-token
count (transformers' num_items_in_batch). Messages rows carry loss on every token, as TRL's default.

Run from the repository root with a virtualenv holding torch, transformers, peft and bitsandbytes:
    python scripts/make_train_fixtures.py [family ...]
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F
import transformers
import peft
from bitsandbytes.functional import quantize_4bit, dequantize_4bit
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

OUT = "tests/fixtures/hf_train"
SEPARATE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FAMILIES = {"qwen2": SEPARATE, "gemma3_text": SEPARATE, "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
            "gemma4_text": SEPARATE + ["per_layer_input_gate", "per_layer_projection"], "ministral3": SEPARATE,
            # PEFT turns all-linear into the attention's linears and, as target_parameters, the
            # routers and both stacks of experts (gate_up_proj at twice the rank and alpha).
            "qwen3_moe": "all-linear", "mixtral": "all-linear",
            # PEFT converts no names for qwen2_moe's own model type: all-linear adapts the attention,
            # the dense MLP and the shared experts with their gates; the routers and experts are named
            # as target_parameters (at rank r).
            "qwen2_moe": "all-linear",
            # PEFT's all-linear adapts gpt-oss's attention alone; its experts (stored [experts, in,
            # out], gate and up columns interleaved) are named as target_parameters, its router not.
            "gpt_oss": "all-linear",
            # Gemma 4 26B-A4B's block: all-linear adapts the attention, the dense MLPs and the
            # routers (router.proj, linears); the experts beside the MLPs are target_parameters.
            "gemma4_moe": "all-linear"}
TARGET_PARAMETERS = {"qwen2_moe": ["gate.weight", "gate_up_proj", "down_proj"],
                     "gpt_oss": ["gate_up_proj", "down_proj"],
                     "gemma4_moe": ["gate_up_proj", "down_proj"]}
# Stacks of experts stored [experts, in, out]: nibble packs them as [experts, out, in], groups of 64
# along each row of that.
TRANSPOSED_EXPERTS = ("gpt_oss",)
STEPS, ACCUM, LR, MAX_NORM = 3, 2, 1e-3, 1.0
CHATS = [
    ("Be brief.", "What is LoRA?", "Low-rank adapters on frozen weights."),
    (None, "Name a 4-bit format.", "NF4."),
    ("You answer in French.", "Hello!", "Bonjour !"),
    (None, "2+2?", "4, of course."),
]


def nibble(*args):
    subprocess.run(["cargo", "run", "--release", "--quiet", "--", *args], check=True)


def nf4(w):
    packed, state = quantize_4bit(w, blocksize=64, quant_type="nf4")
    return dequantize_4bit(packed, state, blocksize=64, quant_type="nf4").reshape(w.shape)


def load_base(folder, targets):
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    # nibble packs every decoder linear in 4 bits, and a mixture-of-experts layer's stacked experts
    # ([experts, rows, cols]: groups of 64 along each row, as nibble's); its router stays dense.
    moe = base.config.model_type in ("qwen3_moe", "mixtral", "qwen2_moe", "gpt_oss") or getattr(
        base.config, "enable_moe_block", False)
    if moe:
        # transformers' default (grouped_mm) has no float64; the loop over experts equals it in f32.
        base.set_experts_implementation("eager")
    names = set(SEPARATE) | {"shared_expert_gate"} if moe else set(targets)
    with torch.no_grad():
        for name, module in base.named_modules():
            if name.split(".")[-1] in names:
                module.weight.copy_(nf4(module.weight.data))
        for name, p in base.named_parameters():
            # The experts' weights, not gpt-oss's biases beside them.
            if moe and name.split(".")[-2] == "experts" and not name.endswith("_bias"):
                if base.config.model_type in TRANSPOSED_EXPERTS:
                    p.copy_(nf4(p.data.transpose(1, 2).contiguous()).transpose(1, 2))
                else:
                    p.copy_(nf4(p.data))
    return base


def save_adapter(pm, folder):
    pm.save_pretrained(folder)
    os.remove(os.path.join(folder, "README.md"))  # PEFT's model-card template: nothing of ours


def lora_state(pm):
    return {k.replace(".default", ""): p.detach().clone() for k, p in pm.named_parameters() if "lora_" in k}


def nll(logits, labels):
    """Σ token cross-entropy (transformers' causal-LM loss before the division by the token count)."""
    return F.cross_entropy(logits, labels, reduction="sum")


def steps_against_float64(folder, bases, init, examples, token_loss=nll, state=lora_state, versions=None):
    """From the adapter folder `init`, the STEPS optimizer steps on `bases` (a float32 base model and a
    float64 one); writes the float32 run's adapter into `folder`, and its expected.json: each step's loss
    and gradient norm, and how far float32 arithmetic alone moves each trained tensor (the float64 run).
    `state(pm)` names the trained tensors as PEFT saves them. Returns the float32 losses and norms."""
    base32, base64 = bases
    pm = PeftModel.from_pretrained(base32, init, is_trainable=True)
    start = state(pm)
    losses, norms = train(pm, examples, token_loss)
    save_adapter(pm, folder)
    pm64 = PeftModel.from_pretrained(base64.double(), init, is_trainable=True).double()
    losses64, norms64 = train(pm64, examples, token_loss)
    ours32, ours64 = state(pm), state(pm64)
    noise = {k: ((ours32[k].double() - ours64[k]).norm() / (ours64[k] - start[k].double()).norm()).item()
             for k in ours32}
    with open(os.path.join(folder, "expected.json"), "w") as f:
        json.dump({"losses": losses, "grad_norms": norms, "update_float32_noise": noise,
                   "float64_losses": losses64, "float64_grad_norms": norms64, **(versions or {}),
                   "torch": torch.__version__}, f, indent=1)
    return losses, norms


def train(pm, examples, token_loss=nll):
    """STEPS optimizer steps of ACCUM examples each; `token_loss(logits, labels)` sums a sequence's
    loss."""
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    losses, norms, cursor = [], [], 0
    for _ in range(STEPS):
        batch = []
        for _ in range(ACCUM):
            batch.append(examples[cursor % len(examples)])
            cursor += 1
        items = sum(len(ids) - 1 for ids in batch)
        opt.zero_grad()
        total = 0.0
        for ids in batch:
            logits = pm(input_ids=ids[None]).logits[0]
            loss = token_loss(logits[:-1], ids[1:]) / items
            loss.backward()
            total += loss.item()
        norms.append(torch.nn.utils.clip_grad_norm_(params, MAX_NORM).item())
        opt.step()
        losses.append(total)
    return losses, norms


def main():
    # Families named on the command line are remade alone; none: every one.
    chosen = sys.argv[1:] or list(FAMILIES)
    for family in chosen:
        shutil.rmtree(os.path.join(OUT, family), ignore_errors=True)
        make(family, FAMILIES[family])


def make(family, targets):
    out = os.path.join(OUT, family)
    os.makedirs(out)
    model_dir = os.path.join(out, "model")
    preset = "tiny-" + {"qwen3_moe": "qwen3-moe", "qwen2_moe": "qwen2-moe", "gpt_oss": "gpt-oss",
                        "gemma4_moe": "gemma4-moe"}.get(
        family, family.split("_")[0])
    nibble("synth", "--preset", preset, "--tokenizer", "byte", "--seed", "3", "--output", model_dir)
    rows = []
    for system, user, assistant in CHATS:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        rows.append({"messages": messages})
    data = os.path.join(out, "data.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)

    # The byte tokenizer as written, whatever tokenizer class the model family would pick.
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    examples = [torch.tensor(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=False))
                for r in rows]

    torch.manual_seed(0)
    pm = get_peft_model(load_base(model_dir, targets), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM",
        target_parameters=TARGET_PARAMETERS.get(family)))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    save_adapter(pm, os.path.join(out, "init_adapter"))
    start = lora_state(pm)
    losses, norms = train(pm, examples)
    save_adapter(pm, os.path.join(out, "expected_adapter"))
    # The same steps in float64: how far float32 arithmetic alone moves each LoRA update. AdamW divides
    # each gradient element by its own running magnitude, so an update can carry far more float32 noise
    # than the gradients do (Gemma's k_proj behind its k norm: 5e-4).
    pm64 = PeftModel.from_pretrained(load_base(model_dir, targets).double(), os.path.join(out, "init_adapter"),
                                     is_trainable=True).double()
    train(pm64, examples)
    ours32, ours64 = lora_state(pm), lora_state(pm64)
    noise = {k: ((ours32[k].double() - ours64[k]).norm() / (ours64[k] - start[k].double()).norm()).item()
             for k in ours32}

    # PEFT must load nibble's adapter with no missing or unexpected keys; run the same recipe with nibble.
    with tempfile.TemporaryDirectory() as tmp:
        ours = os.path.join(tmp, "run")
        nibble("train", "--model", model_dir, "--data", data, "--output", ours, "--device", "cpu",
               "--precision", "f32", "--quant", "nf4", "--group-size", "64",
               "--init-adapter", os.path.join(out, "init_adapter"), "--lora-dropout", "0",
               "--lr", str(LR), "--lr-scheduler", "constant", "--grad-accum", str(ACCUM),
               "--max-steps", str(STEPS), "--no-shuffle", "--max-grad-norm", str(MAX_NORM))
        loaded = PeftModel.from_pretrained(load_base(model_dir, targets), os.path.join(out, "expected_adapter"))
        result = loaded.load_adapter(ours, adapter_name="nibble")
        lora_missing = [k for k in result.missing_keys if "lora_" in k]
        assert not lora_missing and not result.unexpected_keys, (lora_missing, result.unexpected_keys)
        ids = examples[0][None]
        with torch.no_grad():
            reference = loaded(input_ids=ids).logits
            loaded.set_adapter("nibble")
            theirs = loaded(input_ids=ids).logits
        logits_diff = ((theirs - reference).norm() / reference.norm()).item()
        # `nibble merge` must give a folder transformers loads, equal to base + adapter through PEFT.
        merged_dir = os.path.join(tmp, "merged")
        nibble("merge", "--model", model_dir, "--adapter", ours, "--output", merged_dir, "--dtype", "f32")
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, attn_implementation="eager").eval()
        plain = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager"),
            ours).eval()
        with torch.no_grad():
            want = plain(input_ids=ids).logits
            merged_diff = ((merged(input_ids=ids).logits - want).norm() / want.norm()).item()
        with open(os.path.join(ours, "metrics.jsonl")) as f:
            nibble_losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]

    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump({
            "steps": STEPS, "grad_accum": ACCUM, "lr": LR, "max_grad_norm": MAX_NORM,
            "losses": losses, "grad_norms": norms,
            "update_float32_noise": noise,
            "peft_loads_nibble_adapter": {"missing_lora_keys": lora_missing,
                                          "unexpected_keys": list(result.unexpected_keys),
                                          "logits_relative_difference_vs_expected_adapter": logits_diff,
                                          "nibble_losses": nibble_losses},
            "transformers_loads_nibble_merge": {"logits_relative_difference_vs_peft": merged_diff},
            "transformers": transformers.__version__, "peft": peft.__version__, "torch": torch.__version__,
        }, f, indent=1)
    print(family, "losses", losses, "grad norms", norms)
    print("nibble losses", nibble_losses, "logits difference with nibble's adapter", logits_diff)
    print("merged model vs base + adapter through PEFT", merged_diff)


if __name__ == "__main__":
    main()
