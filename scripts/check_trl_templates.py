"""Renders conversations through every chat template TRL ships (trl/chat_templates/*.jinja: the released
templates of Qwen 2.5 to 3.8, Llama 3 to 3.2, Gemma 1 to 4, GLM-4.5, gpt-oss, Phi-3, Cohere, DeepSeek,
LFM2, Nemotron 3, SmolVLM, ... and TRL's training variants with {% generation %} blocks) with
transformers and with `nibble data --chat-template`, and reports any template where the token ids differ,
or, for the training variants, where the tokens carrying loss under --loss-on assistant differ from
transformers' assistant masks (TRL's assistant_only_loss). A template both refuse counts as agreeing.
Each template is tried with Qwen2.5's tokenizer as it is (no BOS token: `bos_token` undefined) and with
<|endoftext|> made its BOS token (as Llama's, Gemma's and Mistral's tokenizers have one).

Not part of the test suite (TRL's templates are not copied into this repository): run it from the
repository root after `cargo build --release`, with a virtualenv holding transformers and trl:
    python scripts/check_trl_templates.py
"""
import glob
import json
import os
import subprocess
import tempfile

import trl
from transformers import AutoTokenizer

NIBBLE = "target/release/nibble"
TEMPLATES = os.path.join(os.path.dirname(trl.__file__), "chat_templates")
tok = AutoTokenizer.from_pretrained("assets/qwen2.5-tokenizer")
weather = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City"}},
                          "required": ["city"]}}}
rows = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi? é"},
                  {"role": "assistant", "content": "Hello 🚀."}, {"role": "user", "content": "Two?"},
                  {"role": "assistant", "content": "Yes, two."}]},
    {"messages": [{"role": "user", "content": "Capital of Peru?"}, {"role": "assistant", "content": "Lima."}]},
    {"messages": [{"role": "user", "content": "2+3?"},
                  {"role": "assistant", "reasoning_content": "Add.", "content": "5"}]},
    {"tools": [weather], "messages": [
        {"role": "user", "content": "Cold in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "name": "get_weather", "content": "-3"},
        {"role": "assistant", "content": "Yes."}]},
]

with tempfile.TemporaryDirectory() as tmp:
    model = os.path.join(tmp, "model")
    subprocess.run([NIBBLE, "synth", "--preset", "tiny-qwen2", "--output", model], check=True,
                   capture_output=True)
    row_file = os.path.join(tmp, "row.jsonl")
    agree, differ = 0, []
    for bos in [None, "<|endoftext|>"]:
        tok.bos_token = bos
        config_path = os.path.join(model, "tokenizer_config.json")
        with open(config_path) as f:
            config = json.load(f)
        config["bos_token"] = bos
        with open(config_path, "w") as f:
            json.dump(config, f)
        for path in sorted(glob.glob(os.path.join(TEMPLATES, "*.jinja"))):
            name = f"{os.path.basename(path)} (bos {bos})"
            with open(path, encoding="utf-8") as f:
                template = f.read()
            training = name.split(" ")[0].endswith("_training.jinja")
            outcome = []
            for row in rows:
                try:
                    expected = tok.apply_chat_template(row["messages"], tools=row.get("tools"),
                                                       chat_template=template, tokenize=True, return_dict=True,
                                                       return_assistant_tokens_mask=training)
                except Exception:
                    expected = None
                with open(row_file, "w") as f:
                    f.write(json.dumps(row) + "\n")
                run = subprocess.run([NIBBLE, "data", row_file, "--model", model, "--json", "--chat-template",
                                      path, "--loss-on", "assistant" if training else "all"],
                                     capture_output=True, text=True)
                got = json.loads(run.stdout.splitlines()[0]) if run.returncode == 0 else None
                if expected is None or got is None:
                    outcome.append("both refuse" if expected is None and got is None else
                                   f"only {'transformers' if expected is None else 'nibble'} refuses: "
                                   + run.stderr.strip()[-160:])
                elif got["ids"] != expected["input_ids"]:
                    outcome.append("token ids differ")
                elif training and got["labelled"][1:] != [bool(m) for m in expected["assistant_masks"][1:]]:
                    outcome.append("tokens carrying loss differ")
                else:
                    outcome.append("same")
            if all(o in ("same", "both refuse") for o in outcome):
                agree += 1
            else:
                differ.append((name, outcome))
    for name, outcome in differ:
        print(name, outcome)
    print(f"transformers {__import__('transformers').__version__}, trl {trl.__version__}: {agree} template runs agree, "
          f"{len(differ)} differ")
