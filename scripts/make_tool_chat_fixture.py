"""Writes tests/fixtures/tool_chats.json: dataset rows with function calling and reasoning (a `tools`
column, as a list or as a JSON string; assistant turns with `tool_calls` and null content; `tool`
turns; Qwen3's `reasoning_content`; `chat_template_kwargs`), and the text and token ids TRL's SFTTrainer
trains on for each: transformers' apply_chat_template(messages, tools=tools, **chat_template_kwargs)
with the Qwen2.5 and Qwen3 tokenizers in assets/ (Qwen3's tokenizer.json is Qwen2.5's with its four
extra tokens, as nibble's synth builds it). Also tests/fixtures/templates/rendered_tools.json: rows with
tools and calls through the other families' templates that render tools (Mistral Small 3.2, Mistral Nemo,
Phi-4-mini, Gemma 4), as transformers renders them.

Run from the repository root with a virtualenv holding transformers:
    python scripts/make_tool_chat_fixture.py
"""
import json
import os
import shutil
import tempfile

import transformers
from transformers import AutoTokenizer

weather = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {
        "type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}
clock = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


rows = {
    "qwen2.5": [
        # tools as a list, arguments as an object, null content beside the call
        {"tools": [weather], "messages": [
            {"role": "system", "content": "You help with travel."},
            {"role": "user", "content": "Is it cold in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [call("get_weather", {"city": "Oslo"})]},
            {"role": "tool", "name": "get_weather", "content": "{\"temp\": -3, \"unit\": \"celsius\"}"},
            {"role": "assistant", "content": "Yes: -3 °C in Oslo."}]},
        # tools as a JSON string (how Parquet tables hold them), two calls in one turn, arguments as a JSON
        # string, two tool answers in a row
        {"tools": json.dumps([weather, clock]), "messages": [
            {"role": "user", "content": "Weather and time in Lima?"},
            {"role": "assistant", "content": "Let me check.", "tool_calls": [
                call("get_weather", "{\"city\": \"Lima\", \"unit\": \"celsius\"}"), call("get_time", {"city": "Lima"})]},
            {"role": "tool", "content": "18 °C, cloudy"},
            {"role": "tool", "content": "14:05"},
            {"role": "assistant", "content": "18 °C and cloudy, just after two."}]},
        # an empty tools list passes as it is (as SFTTrainer passes it), and null fields (how a table holds
        # the keys other rows have) are dropped, as transformers drops them
        {"tools": [], "messages": [
            {"role": "user", "content": "Hi", "tool_calls": None, "name": None},
            {"role": "assistant", "content": "Hello!", "tool_calls": None, "reasoning_content": None}]},
        # LLaMA-Factory's ShareGPT with tools: its function_call turn (JSON text) is the assistant's tool
        # call, its observation the tool's turn; rendered by transformers as the messages in `_reference`
        {"tools": json.dumps([weather]), "conversations": [
            {"from": "human", "value": "Cold in Oslo?"},
            {"from": "function_call", "value": "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}"},
            {"from": "observation", "value": "-3 degrees"},
            {"from": "gpt", "value": "Yes, it is freezing."}],
         "_reference": [
            {"role": "user", "content": "Cold in Oslo?"},
            {"role": "assistant", "tool_calls": [call("get_weather", {"city": "Oslo"})]},
            {"role": "tool", "content": "-3 degrees"},
            {"role": "assistant", "content": "Yes, it is freezing."}]},
        # a conversational prompt/completion row with tools: the completion is the call
        {"tools": [weather], "prompt": [{"role": "user", "content": "Rain in Bergen?"}],
         "completion": [{"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Bergen"})]}]},
    ],
    "qwen3": [
        # reasoning in an earlier and in the last assistant turn (the template keeps only the last one's)
        {"messages": [
            {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "reasoning_content": "Add them.", "content": "5"},
            {"role": "user", "content": "And times 4?"},
            {"role": "assistant", "reasoning_content": "5 x 4 = 20.", "content": "20"}]},
        # thinking switched off for the row
        {"chat_template_kwargs": {"enable_thinking": False}, "messages": [
            {"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]},
        # reasoning under another name (transformers reads `reasoning` and `thinking` as `reasoning_content`)
        {"messages": [
            {"role": "user", "content": "Capital of Peru?"},
            {"role": "assistant", "reasoning": "Peru's capital is Lima.", "content": "Lima"}]},
        # an agent's trace: a call after reasoning, the tool's answer, the answer, then a new question (the
        # earlier turns' reasoning is dropped in the whole conversation, not in the turns' own prefixes)
        {"tools": [weather], "messages": [
            {"role": "user", "content": "Umbrella in Paris?"},
            {"role": "assistant", "reasoning_content": "I need the weather.", "content": "",
             "tool_calls": [call("get_weather", {"city": "Paris"})]},
            {"role": "tool", "content": "light rain"},
            {"role": "assistant", "reasoning_content": "Rain: yes.", "content": "Yes, take one."},
            {"role": "user", "content": "And in Rome?"},
            {"role": "assistant", "content": "No need there."}]},
        # tools, a call after reasoning, the answer wrapped in <tool_response>
        {"tools": [weather], "messages": [
            {"role": "user", "content": "Umbrella in Paris?"},
            {"role": "assistant", "reasoning_content": "I need the weather.", "content": "",
             "tool_calls": [call("get_weather", {"city": "Paris"})]},
            {"role": "tool", "content": "light rain"},
            {"role": "assistant", "content": "Yes, take one."}]},
    ],
}


def tokenizer_folder(name, tmp):
    """A folder transformers loads: assets/<name>-tokenizer, Qwen3's with the tokenizer.json nibble
    builds for it."""
    if name == "qwen2.5":
        return "assets/qwen2.5-tokenizer"
    folder = os.path.join(tmp, name)
    os.makedirs(folder)
    shutil.copy("assets/qwen3-tokenizer/tokenizer_config.json", folder)
    with open("assets/qwen2.5-tokenizer/tokenizer.json") as f:
        tok = json.load(f)
    for id, content in [(151665, "<tool_response>"), (151666, "</tool_response>"), (151667, "<think>"),
                        (151668, "</think>")]:
        tok["added_tokens"].append({"id": id, "content": content, "single_word": False, "lstrip": False,
                                    "rstrip": False, "normalized": False, "special": False})
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        json.dump(tok, f)
    return folder


cases = []
with tempfile.TemporaryDirectory() as tmp:
    for name, examples in rows.items():
        tok = AutoTokenizer.from_pretrained(tokenizer_folder(name, tmp))
        for row in examples:
            # As TRL's SFTTrainer tokenizes a row.
            tools = row.get("tools")
            tools = json.loads(tools) if isinstance(tools, str) else tools
            kwargs = {"tools": tools, **row.get("chat_template_kwargs", {})}
            reference = row.pop("_reference", None)
            messages = reference or (row["messages"] if "messages" in row else row["prompt"] + row["completion"])
            text = tok.apply_chat_template(messages, tokenize=False, **kwargs)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            case = {"tokenizer": name, "row": row, "text": text, "ids": ids}
            if reference:
                case["messages"] = reference
            if "prompt" in row:
                case["prompt_text"] = tok.apply_chat_template(row["prompt"], tokenize=False,
                                                              add_generation_prompt=True, **kwargs)
            cases.append(case)

with open("tests/fixtures/tool_chats.json", "w") as f:
    json.dump({"transformers": transformers.__version__, "cases": cases}, f, ensure_ascii=False, indent=1)
print("wrote", len(cases), "cases")

# The other families' templates that render tools (tests/fixtures/templates/), each with its special
# tokens, on rows with tools and calls (Mistral's want 9-character call ids and the id on the tool's
# answer); a row a template refuses is recorded with its error.
FAMILY_TEMPLATES = {
    "mistral-small-3.2-24b-instruct-2506": {"bos_token": "<s>", "eos_token": "</s>"},
    "mistral-nemo-instruct-2407": {"bos_token": "<s>", "eos_token": "</s>"},
    "phi-4-mini-instruct": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"},
    "gemma4-it": {"bos_token": "<bos>", "eos_token": "<eos>"},
}
calls = [{"id": "a1B2c3D4e", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]
family_rows = [
    {"tools": [weather, clock], "messages": [
        {"role": "system", "content": "You help with travel."},
        {"role": "user", "content": "Cold in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "a1B2c3D4e", "name": "get_weather", "content": "-3 degrees"},
        {"role": "assistant", "content": "Yes, it is freezing."}]},
    {"tools": json.dumps([weather]), "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Lima?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "Zz9Yy8Xx7", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Lima\"}"}}]},
        {"role": "tool", "tool_call_id": "Zz9Yy8Xx7", "content": "18 degrees"},
        {"role": "assistant", "content": "Mild."}]},
]
tok = AutoTokenizer.from_pretrained("assets/qwen2.5-tokenizer")
family = {}
for name, special in FAMILY_TEMPLATES.items():
    template = open(f"tests/fixtures/templates/{name}.jinja").read()
    for key, value in special.items():
        setattr(tok, key, value)
    rendered = []
    for row in family_rows:
        tools = json.loads(row["tools"]) if isinstance(row["tools"], str) else row["tools"]
        case = {"row": row}
        try:
            case["text"] = tok.apply_chat_template(row["messages"], tools=tools, tokenize=False,
                                                   chat_template=template)
        except Exception as e:  # jinja2's TemplateError from raise_exception
            case["error"] = str(e)
        rendered.append(case)
    family[name] = {"special_tokens": special, "cases": rendered}
with open("tests/fixtures/templates/rendered_tools.json", "w") as f:
    json.dump({"transformers": transformers.__version__, "templates": family}, f, ensure_ascii=False, indent=1)
print("wrote", sum(len(t["cases"]) for t in family.values()), "family tool cases")
