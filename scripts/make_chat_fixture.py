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

# A template of our own that exercises the Jinja features current chat templates use (reverse slicing,
# namespace, Python string methods, tests, filters); rendered by transformers for comparison.
template = open("tests/fixtures/features_template.jinja").read()
feature_conversations = [
    [
        {"role": "system", "content": "  Be brief.  "},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": "<tool_response>ok</tool_response>"},
    ],
    [
        {"role": "user", "content": "First?"},
        {"role": "assistant", "content": "<think>old thought</think>Answer one"},
        {"role": "user", "content": "Second"},
        {"role": "assistant", "content": "<think>\nnew thought\n</think>Answer two"},
    ],
]
feature_cases = []
for messages in feature_conversations:
    for add_generation_prompt in (False, True):
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                       chat_template=template)
        feature_cases.append({"messages": messages, "add_generation_prompt": add_generation_prompt, "text": text})
with open("tests/fixtures/features_template.json", "w") as f:
    json.dump({"transformers": transformers.__version__, "cases": feature_cases}, f, ensure_ascii=False, indent=1)
print("wrote", len(feature_cases), "feature cases")

# The chat templates of the other families (tests/fixtures/templates/, sources in SOURCES.md there),
# rendered by transformers with each family's special tokens; a conversation the template refuses is
# recorded with its error message.
FAMILY_TEMPLATES = {
    "gemma3-it": {"bos_token": "<bos>", "eos_token": "<eos>"},
    "phi-3.5-mini-instruct": {"bos_token": "<s>", "eos_token": "<|endoftext|>"},
    "phi-4-mini-instruct": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"},
    "mistral-small-3.2-24b-instruct-2506": {"bos_token": "<s>", "eos_token": "</s>"},
    "mistral-nemo-instruct-2407": {"bos_token": "<s>", "eos_token": "</s>"},
    "gemma4-it": {"bos_token": "<bos>", "eos_token": "<eos>"},
    "smollm3-3b": {"eos_token": "<|im_end|>"},
    "openai-gpt-oss": {"bos_token": "<|startoftext|>", "eos_token": "<|return|>"},
}
# SmolLM3's and gpt-oss's templates write today's date into every system turn: their renders record the
# date they carry (and its format), which the test replaces by the day it runs.
import datetime
DATE_FORMATS = {"smollm3-3b": "%d %B %Y", "openai-gpt-oss": "%Y-%m-%d"}
NOW = datetime.datetime.now()
family_conversations = conversations + [
    # Two user turns in a row: Gemma's and Mistral's templates refuse it.
    [{"role": "user", "content": "One"}, {"role": "user", "content": "Two"}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "One"},
     {"role": "user", "content": "Two"}],
    # A system turn after the first message.
    [{"role": "user", "content": "Hi"}, {"role": "system", "content": "Late system"},
     {"role": "assistant", "content": "Hello"}],
    # Reasoning beside the answers (gpt-oss's `thinking`, which transformers also hands over as
    # `reasoning_content`): gpt-oss's template renders the last turn's alone, in training.
    [{"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4", "thinking": "Two and two make four."},
     {"role": "user", "content": "And 3+3?"},
     {"role": "assistant", "content": "6", "thinking": "Three and three."}],
]
family_cases = {}
for name, special in FAMILY_TEMPLATES.items():
    template = open(f"tests/fixtures/templates/{name}.jinja").read()
    for key, value in special.items():
        setattr(tok, key, value)
    rendered = []
    for messages in family_conversations:
        # The date in Mistral Small's default system prompt changes daily: only conversations with
        # their own system message.
        if "strftime_now" in template and name.startswith("mistral") and messages[0]["role"] != "system":
            continue
        for add_generation_prompt in (False, True):
            case = {"messages": messages, "add_generation_prompt": add_generation_prompt}
            try:
                case["text"] = tok.apply_chat_template(messages, tokenize=False, chat_template=template,
                                                       add_generation_prompt=add_generation_prompt)
            except Exception as e:  # jinja2's TemplateError from raise_exception
                case["error"] = str(e)
            rendered.append(case)
    family_cases[name] = {"special_tokens": special, "cases": rendered}
    if name in DATE_FORMATS:
        family_cases[name]["date"] = NOW.strftime(DATE_FORMATS[name])
        family_cases[name]["date_format"] = DATE_FORMATS[name]
with open("tests/fixtures/templates/rendered.json", "w") as f:
    json.dump({"transformers": transformers.__version__, "templates": family_cases}, f, ensure_ascii=False,
              indent=1)
print("wrote", sum(len(t["cases"]) for t in family_cases.values()), "family template cases")
