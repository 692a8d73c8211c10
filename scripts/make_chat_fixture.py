"""Writes tests/fixtures/chat_template_qwen2.5.json: conversations rendered by transformers'
apply_chat_template with the Qwen2.5 tokenizer in assets/, and their token ids.

Run from the repository root with a virtualenv holding transformers:
    python scripts/make_chat_fixture.py
"""
import json
import transformers
from transformers import AutoTokenizer

tok = AutoTokenizer.from_pretrained("assets/qwen2.5-tokenizer")
conversations = [
    [{"role": "user", "content": "Hello! How are you?"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name a prime number."},
        {"role": "assistant", "content": "7"},
    ],
    [
        {"role": "user", "content": "Translate 'cat' to French."},
        {"role": "assistant", "content": "chat"},
        {"role": "user", "content": "And to German?"},
        {"role": "assistant", "content": "Katze"},
        {"role": "user", "content": "Thanks — 谢谢! 🐈"},
    ],
    [
        {"role": "system", "content": "  Leading and trailing spaces stay.  \n"},
        {"role": "user", "content": "Write code:\n```python\ndef f(x):\n    return x * 2\n```\n"},
        {"role": "assistant", "content": "Done.\n\n\tTabbed line.\n"},
    ],
    [
        {"role": "user", "content": "Quotes \"double\" and 'single', braces {{ }} {% raw %} and <tags>."},
        {"role": "assistant", "content": ""},
    ],
]
cases = []
for messages in conversations:
    for add_generation_prompt in (False, True):
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        cases.append({"messages": messages, "add_generation_prompt": add_generation_prompt, "text": text, "ids": ids})

with open("tests/fixtures/chat_template_qwen2.5.json", "w") as f:
    json.dump({"transformers": transformers.__version__, "cases": cases}, f, ensure_ascii=False, indent=1)
print("wrote", len(cases), "cases")
