"""Writes tests/fixtures/sft_labels.json: dataset rows and the token ids and labels TRL's SFTTrainer trains
on for each, read off its own data collator (labels of -100 carry no loss). Three kinds of run:
  - conversations with assistant_only_loss=True through the templates in tests/fixtures/generation_marks/
    (given as chat_template_path, as a user gives nibble --chat-template), whose {% generation %} blocks
    say which tokens are the assistant's; text in several scripts, so that character and byte offsets
    must agree;
  - conversational prompt/completion rows with assistant_only_loss=True (the completion's assistant
    tokens only);
  - text rows and text prompt/completion rows (SFTTrainer appends the eos token to the text and to the
    completion; a prompt ending in a space shares its last token with the completion);
  - rows cut by max_length, keeping the start or the end (truncation_mode), each row through a trainer
    of its own: those left with no label SFTTrainer drops (their ids are null here);
  - text rows whose text is in another column (dataset_text_field);
  - text rows and text completions ending with another eos token (eos_token).
The tokenizer is the real Qwen2.5 one in assets/, and for the text rows also that one made to add a BOS
token (<|endoftext|>) before a text as Llama's, Gemma's and Mistral's do (tests/sft_labels.rs makes the
same one); the model a tiny random Qwen2 (its weights play no part).

Run from the repository root with a virtualenv holding transformers, trl and torch:
    python scripts/make_sft_labels_fixture.py
"""
import json
import os
import shutil
import tempfile

import torch
import transformers
import trl
from datasets import Dataset
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
from trl import SFTConfig, SFTTrainer

TOKENIZER = "assets/qwen2.5-tokenizer"
weather = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


conversations = [
    {"messages": [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What is the capital of Peru?"},
        {"role": "assistant", "content": "Lima."}]},
    {"messages": [
        {"role": "user", "content": "Wie heißt du?  "},
        {"role": "assistant", "content": "  Ich bin ein Modell. Ça va? 🚀"},
        {"role": "user", "content": "日本語で答えて。"},
        {"role": "assistant", "content": "はい、日本語で答えます。\n改行も。"}]},
    {"messages": [
        {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "reasoning_content": "2 + 3 = 5.", "content": "5"},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome."}]},
]
tool_conversations = [
    {"tools": [weather], "messages": [
        {"role": "user", "content": "Is it cold in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Oslo"})]},
        {"role": "tool", "content": "-3 °C"},
        {"role": "assistant", "content": "Yes: −3 °C."}]},
]
conversational_prompt_completion = [
    {"prompt": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Name a colour."}],
     "completion": [{"role": "assistant", "content": "Teal — a blue-green."}]},
    {"prompt": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2 + 2?"}],
     "completion": [{"role": "assistant", "content": "4"}]},
]
text_rows = [
    {"text": "The quick brown fox jumps over the lazy dog."},
    {"text": "Already ends with eos<|im_end|>"},
    {"text": "Zürich liegt am See — ça, c'est sûr."},
]
text_prompt_completion = [
    {"prompt": "The capital of France is", "completion": " Paris."},
    # a trailing space: the prompt's last token (" ") merges into the completion's first (" Paris")
    {"prompt": "The capital of Italy is ", "completion": "Rome."},
    {"prompt": "Q: 2+2=\nA:", "completion": " 4<|im_end|>"},
]

BOS_TOKENIZER = tempfile.mkdtemp()
shutil.copy(f"{TOKENIZER}/tokenizer_config.json", BOS_TOKENIZER)
with open(f"{TOKENIZER}/tokenizer.json") as f:
    with_bos = json.load(f)
with_bos["post_processor"] = {"type": "Sequence", "processors": [with_bos["post_processor"], {
    "type": "TemplateProcessing",
    "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
    "pair": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
             {"SpecialToken": {"id": "<|endoftext|>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
    "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [151643], "tokens": ["<|endoftext|>"]}}}]}
with open(os.path.join(BOS_TOKENIZER, "tokenizer.json"), "w") as f:
    json.dump(with_bos, f)

tok = AutoTokenizer.from_pretrained(TOKENIZER)
model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))


def labelled(rows, tokenizer=TOKENIZER, **config):
    """Each row's input ids and labels as SFTTrainer's collator makes them."""
    config.setdefault("max_length", None)
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, report_to=[], use_cpu=True, bf16=False, **config)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=AutoTokenizer.from_pretrained(tokenizer))
        cases = []
        for row, example in zip(rows, trainer.train_dataset):
            batch = trainer.data_collator([example])
            ids = batch["input_ids"][0].tolist()
            labels = batch["labels"][0].tolist()
            assert ids == example["input_ids"]
            cases.append({"row": row, "ids": ids, "labels": [label != -100 for label in labels]})
        return cases


groups = []
for template in ["chatml", "blocks"]:
    path = f"tests/fixtures/generation_marks/{template}.jinja"
    # One run per set of columns: a dataset takes its columns from its first row.
    for rows in [conversations] + ([tool_conversations] if template == "chatml" else []):
        groups.append({"chat_template": template, "loss_on": "assistant",
                       "cases": labelled(rows, assistant_only_loss=True, chat_template_path=path)})
    groups.append({"chat_template": template, "loss_on": "assistant",
                   "cases": labelled(conversational_prompt_completion, assistant_only_loss=True,
                                     chat_template_path=path)})
for tokenizer, bos in [(TOKENIZER, False), (BOS_TOKENIZER, True)]:
    for rows in [text_rows, text_prompt_completion]:
        groups.append({"chat_template": None, "bos": bos, "loss_on": "default",
                       "cases": labelled(rows, tokenizer)})
shutil.rmtree(BOS_TOKENIZER)
# TRL's eos_token: the token text rows and completions end with, in place of the tokenizer's.
for rows in [text_rows, text_prompt_completion]:
    groups.append({"chat_template": None, "loss_on": "default", "eos_token": "<|im_end|>",
                   "cases": labelled(rows, eos_token="<|im_end|>")})


def labelled_each(rows, **config):
    """Each row alone through SFTTrainer, which drops a row left with no label: its case then has null
    ids and labels."""
    cases = []
    for row in rows:
        with tempfile.TemporaryDirectory() as out:
            args = SFTConfig(output_dir=out, report_to=[], use_cpu=True, bf16=False, **config)
            trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list([row]),
                                 processing_class=AutoTokenizer.from_pretrained(TOKENIZER))
            if len(trainer.train_dataset) == 0:
                cases.append({"row": row, "ids": None, "labels": None})
                continue
            batch = trainer.data_collator([trainer.train_dataset[0]])
            cases.append({"row": row, "ids": batch["input_ids"][0].tolist(),
                          "labels": [label != -100 for label in batch["labels"][0].tolist()]})
    return cases


long_prompt = {"prompt": [{"role": "user", "content": "Tell me, in as many words as you like, what the "
                                                      "weather was like in Bergen on most days last winter."}],
               "completion": [{"role": "assistant", "content": "Rainy."}]}
cut_rows = conversations[:2] + conversational_prompt_completion + [long_prompt] + text_prompt_completion
for mode in ["keep_start", "keep_end"]:
    groups.append({"chat_template": None, "loss_on": "default", "max_length": 24, "truncation_mode": mode,
                   "cases": labelled_each(cut_rows, max_length=24, truncation_mode=mode)})
    path = "tests/fixtures/generation_marks/chatml.jinja"
    groups.append({"chat_template": "chatml", "loss_on": "assistant", "max_length": 20, "truncation_mode": mode,
                   "cases": labelled_each(conversations, max_length=20, truncation_mode=mode,
                                          assistant_only_loss=True, chat_template_path=path)})
content_rows = [{"content": row["text"], "text": "not this column"} for row in text_rows]
groups.append({"chat_template": None, "loss_on": "default", "text_field": "content",
               "cases": labelled(content_rows, dataset_text_field="content")})

with open("tests/fixtures/sft_labels.json", "w") as f:
    json.dump({"transformers": transformers.__version__, "trl": trl.__version__, "groups": groups}, f,
              ensure_ascii=False, indent=1)
print("wrote", sum(len(g["cases"]) for g in groups), "cases")
