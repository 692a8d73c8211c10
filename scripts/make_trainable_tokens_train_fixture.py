"""Writes tests/fixtures/hf_train/<family>/trainable_tokens/: LoRA with trainable token rows
(LoraConfig(trainable_token_indices=...)) as PEFT trains it, three optimizer steps of
scripts/make_train_fixtures.py's recipe on its 4-bit base (bitsandbytes NF4, group 64, emulated
exactly), for tests/train_parity.rs to compare `nibble train` against.

- model/: the family's fixture model in float32 (the rows PEFT trains are float32 parameters; nibble
  puts them into the table it reads, in the table's dtype, so a 16-bit table would round them);
- init_adapter/: random A and B (as make_train_fixtures.py's), and the rows of five tokens moved off
  the base's: <|im_start|> and <|im_end|> (in every example), `o` and ` ` (bytes the data holds) and
  byte 200 (which it never holds: only the output projection's softmax reaches that row). A tied model
  (Qwen2, Gemma 3 with its √hidden embedding scale) takes a list (one set of rows, which PEFT ties
  into the output projection); an untied one (Ministral 3) a map of embed_tokens and lm_head, each
  table its own rows;
- adapter_model.safetensors, expected.json: the adapter after the three steps, each step's loss and
  gradient norm, and how far float32 arithmetic alone moves each trained tensor (the same steps in
  float64).

Run from the repository root with the virtualenv of make_train_fixtures.py:
    python scripts/make_trainable_tokens_train_fixture.py [family ...]
"""
import os
import shutil
import sys

import peft
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, os.path.dirname(__file__))
from make_train_fixtures import FAMILIES, OUT, load_base, save_adapter, steps_against_float64  # noqa: E402

IDS = [257, 258, 111, 32, 200]
CHOSEN = ["qwen2", "gemma3_text", "ministral3"]


def trained(pm):
    """Every trained tensor by the name PEFT saves it under."""
    return {k.replace(".default", ""): p.detach().clone() for k, p in pm.named_parameters() if p.requires_grad}


def make(family):
    import json
    out = os.path.join(OUT, family)
    folder = os.path.join(out, "trainable_tokens")
    shutil.rmtree(folder, ignore_errors=True)
    model_dir = os.path.join(folder, "model")
    source = os.path.join(out, "model")
    AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).save_pretrained(model_dir)
    for name in os.listdir(source):
        if name.startswith("tokenizer") or name.endswith(".jinja"):
            shutil.copy(os.path.join(source, name), model_dir)
    targets = FAMILIES[family]
    base = load_base(model_dir, targets)
    tied = base.config.get_text_config().tie_word_embeddings
    indices = IDS if tied else {"embed_tokens": IDS, "lm_head": IDS}
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM",
                        trainable_token_indices=indices)
    pm = get_peft_model(base, config)
    torch.manual_seed(4)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
            elif "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p) * 0.05)
    init = os.path.join(folder, "init_adapter")
    save_adapter(pm, init)
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    with open(os.path.join(out, "data.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    examples = [torch.tensor(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=False))
                for r in rows]
    held = sorted({int(i) for e in examples for i in e})
    assert 200 not in held and all(i in held for i in IDS if i != 200), held
    bases = (load_base(model_dir, targets), load_base(model_dir, targets))
    losses, norms = steps_against_float64(folder, bases, init, examples, state=trained,
                                          versions={"peft": peft.__version__})
    os.remove(os.path.join(folder, "adapter_config.json"))  # the init adapter's, which the run keeps
    print(family, "tied" if tied else "untied", "losses", losses, "grad norms", norms)


for family in sys.argv[1:] or CHOSEN:
    make(family)
