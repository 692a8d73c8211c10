"""Writes tests/fixtures/klein_text/: the caption features FLUX.2 [klein] gives its transformer, computed by
diffusers 0.42.1's own Flux2KleinPipeline._get_qwen3_prompt_embeds on a tiny random Qwen3 text encoder.

What the pipeline does (pipeline_flux2_klein.py, _get_qwen3_prompt_embeds), per caption:
  text = tokenizer.apply_chat_template([{"role": "user", "content": caption}], tokenize=False,
                                       add_generation_prompt=True, enable_thinking=False)
       = "<|im_start|>user\n{caption}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
  tokenizer(text, padding="max_length", truncation=True, max_length=max_sequence_length)  (512 in the
       pipeline, 24 here): right padding with <|endoftext|> (151643), attention_mask 1 on real tokens, 0 on padding;
  text_encoder(input_ids, attention_mask, output_hidden_states=True, use_cache=False) (Qwen3ForCausalLM, whole model);
  features = concat over (hidden_states[9], hidden_states[18], hidden_states[27]) per token, in that order
       (torch.stack(dim=1) then permute(0, 2, 1, 3).reshape(B, L, 3 * hidden)), cast to text_encoder.dtype;
       every position is kept, padding included.
hidden_states[0] is the embedding output and hidden_states[k] the output of decoder layer k-1 (0-based), with no
final norm (only hidden_states[num_layers] is normed, and it is never used: the model here has 28 layers).

Files:
  tokenizer/tokenizer_config.json  the Qwen3 tokenizer's config: Qwen2.5's (assets/qwen2.5-tokenizer, byte-identical
      to shared/models/qwen2.5-tokenizer) plus the four added, non-special tokens 151665 <tool_response>,
      151666 </tool_response>, 151667 <think>, 151668 </think> in added_tokens_decoder, and the Qwen3 hybrid chat
      template (inline, as Qwen3's own tokenizer_config.json has it). No tokenizer.json is written (it would be 5.4 MB):
      the Qwen3 tokenizer.json is assets/qwen2.5-tokenizer/tokenizer.json with those four entries appended to
      "added_tokens" ({"id", "content", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false,
      "special": false}); transformers loads the same tokenizer either way (checked below).
  text_encoder/config.json + model.safetensors  a random Qwen3ForCausalLM: vocab 151936 (the real one), hidden 32,
      28 layers, 2 query heads and 1 key/value head of 16, MLP 64, rope_theta 1e6, rms eps 1e-6, tied embeddings,
      weights stored in bfloat16 (weights randn * 0.1, norm weights 1 + 0.1 * randn); all values below are computed
      in float32 on exactly those bf16 values. Every embedding row is drawn, then every row whose token id appears in
      no caption's input_ids (padding included) is set to zero, so that the file compresses well: the features
      only read the rows of those ids, and the tied lm_head (the only other reader) is never used.
  expected.safetensors (float32), per caption i (0: "a red fox sitting in snow", 1: "" -- caption dropout's):
      caption{i}.input_ids (24,) and caption{i}.attention_mask (24,) as float32 (exact: ids < 2^24),
      caption{i}.features (24, 96) = the prompt_embeds the pipeline gives the transformer,
      caption{i}.hidden_9 / .hidden_18 / .hidden_27 (24, 32); metadata: max_length and caption{i}.text (the exact
      string that was tokenized), caption{i}.caption.

The script also checks the pipeline's features against a float64 re-implementation written from the description
above (attention of query i over keys j <= i with attention_mask[j] = 1, positions 0..L-1 for every token, padding
included), against transformers' eager attention, and reports how features at padding positions change when the
attention mask is dropped.

Run from the repository root with a virtualenv holding torch, transformers (5.x) and diffusers (0.42.x):
    python scripts/make_klein_text_fixture.py
"""
import hashlib
import json
import os
import shutil
import tempfile

import torch
import diffusers
import transformers
from diffusers import Flux2KleinPipeline
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3ForCausalLM

torch.set_num_threads(2)
OUT = "tests/fixtures/klein_text"
QWEN25 = "assets/qwen2.5-tokenizer"
MAX_LEN = 24  # the pipeline's max_sequence_length is 512; same semantics
CAPTIONS = ["a red fox sitting in snow", ""]
LAYERS = (9, 18, 27)  # the pipeline's default text_encoder_out_layers
ADDED = [(151665, "<tool_response>"), (151666, "</tool_response>"), (151667, "<think>"), (151668, "</think>")]

# Qwen/Qwen3-0.6B's chat template (the hybrid one; Qwen3-4B / -8B ship the same), copied from huggingface.js
# packages/jinja/test/e2e.test.js (added in commit 15417612868e, 2025-04-28, the day of Qwen3's release).
QWEN3_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""
assert hashlib.sha256(QWEN3_CHAT_TEMPLATE.encode()).hexdigest() == (
    "87a2728cb8dc9fe424d624542f6060ec05a1d285ebbec578bb078900e33396b5"), "template text changed"
assert QWEN3_CHAT_TEMPLATE.endswith(
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n    {%- endif %}\n{%- endif %}")

print(f"torch {torch.__version__}, transformers {transformers.__version__}, diffusers {diffusers.__version__}")

# --- 1. the Qwen3 tokenizer ----------------------------------------------------------------------------------
with open(os.path.join(QWEN25, "tokenizer.json"), encoding="utf-8") as f:
    tokenizer_json = json.load(f)
with open(os.path.join(QWEN25, "tokenizer_config.json"), encoding="utf-8") as f:
    tokenizer_config = json.load(f)
assert [t["id"] for t in tokenizer_json["added_tokens"]][-1] == 151664 and len(tokenizer_json["model"]["vocab"]) == 151643
for i, content in ADDED:
    tokenizer_json["added_tokens"].append(dict(id=i, content=content, single_word=False, lstrip=False, rstrip=False,
                                               normalized=False, special=False))
    tokenizer_config["added_tokens_decoder"][str(i)] = dict(content=content, lstrip=False, normalized=False,
                                                            rstrip=False, single_word=False, special=False)
tokenizer_config["chat_template"] = QWEN3_CHAT_TEMPLATE
tokenizer_config["model_max_length"] = 131072  # Qwen3-4B / -8B's value (unused: truncation is explicit)
assert tokenizer_config["pad_token"] == "<|endoftext|>" and tokenizer_config["eos_token"] == "<|im_end|>"
assert tokenizer_config["bos_token"] is None and tokenizer_config["add_bos_token"] is False

tok_dir = os.path.join(OUT, "tokenizer")
if os.path.isdir(tok_dir):
    shutil.rmtree(tok_dir)
os.makedirs(tok_dir)
with open(os.path.join(tok_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(tokenizer_config, f, indent=2, ensure_ascii=False)
    f.write("\n")

tmp = tempfile.mkdtemp()
full_dir, fixture_dir = os.path.join(tmp, "full"), os.path.join(tmp, "fixture")
os.makedirs(full_dir)
os.makedirs(fixture_dir)
with open(os.path.join(full_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
    json.dump(tokenizer_json, f, ensure_ascii=False)
shutil.copy(os.path.join(tok_dir, "tokenizer_config.json"), full_dir)
shutil.copy(os.path.join(QWEN25, "tokenizer.json"), fixture_dir)  # what a test builds from: assets + the fixture
shutil.copy(os.path.join(tok_dir, "tokenizer_config.json"), fixture_dir)
tokenizer = Qwen2TokenizerFast.from_pretrained(full_dir)  # the class the pipeline declares
tokenizer_b = Qwen2TokenizerFast.from_pretrained(fixture_dir)
for t in (tokenizer, tokenizer_b):
    assert len(t) == 151669 and t.padding_side == "right" and t.truncation_side == "right"
    assert (t.pad_token, t.pad_token_id, t.eos_token, t.eos_token_id) == ("<|endoftext|>", 151643, "<|im_end|>", 151645)
    assert t.convert_tokens_to_ids([c for _, c in ADDED]) == [i for i, _ in ADDED]
print(f"tokenizer: {type(tokenizer).__name__}, {len(tokenizer)} tokens, padding_side {tokenizer.padding_side}")

# --- 2. tiny random Qwen3 text encoder ----------------------------------------------------------------------
config = Qwen3Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=28,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=16, hidden_act="silu",
                     max_position_embeddings=40960, rms_norm_eps=1e-6,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=True,
                     attention_bias=False, use_sliding_window=False, sliding_window=None, max_window_layers=28,
                     bos_token_id=151643, eos_token_id=151645, pad_token_id=None)
# the token ids the fixture uses: every id in any caption's input_ids, padding token included (section 3 redoes
# this tokenization with the pipeline's arguments and checks it gives exactly these ids)
used_ids = sorted({i for c in CAPTIONS for i in tokenizer(
    tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True,
                                  enable_thinking=False),
    padding="max_length", truncation=True, max_length=MAX_LEN)["input_ids"]})
assert tokenizer.pad_token_id in used_ids
torch.manual_seed(0)
model = Qwen3ForCausalLM(config).float().eval()
with torch.no_grad():
    for name, p in model.named_parameters():
        # 1-D parameters are exactly the RMSNorm weights (input/post-attention, q_norm/k_norm, final norm)
        p.copy_((torch.randn_like(p) * 0.1 + (1.0 if p.ndim == 1 else 0.0)).bfloat16().float())
    # zero the embedding rows no caption uses, after every draw, so the kept rows and all other weights are the
    # same values as with no zeroing; with tied embeddings this changes only the logits, which nothing here reads
    unused = torch.ones(config.vocab_size, dtype=torch.bool)
    unused[used_ids] = False
    model.model.embed_tokens.weight[unused] = 0.0
assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "tied embeddings"
te_dir = os.path.join(OUT, "text_encoder")
if os.path.isdir(te_dir):
    shutil.rmtree(te_dir)
model.to(torch.bfloat16).save_pretrained(te_dir, safe_serialization=True)
for extra in ("generation_config.json",):
    if os.path.exists(os.path.join(te_dir, extra)):
        os.remove(os.path.join(te_dir, extra))
with safe_open(os.path.join(te_dir, "model.safetensors"), "pt") as f:
    keys = list(f.keys())
    assert all(f.get_slice(k).get_dtype() == "BF16" for k in keys), "stored dtype"
    assert "lm_head.weight" not in keys and len(keys) == 1 + 28 * 11 + 1, len(keys)
    emb = f.get_tensor("model.embed_tokens.weight")
    assert emb.shape == (config.vocab_size, 32)
    assert (emb != 0).any(-1).nonzero().flatten().tolist() == used_ids, "nonzero embedding rows = the used ids"
    del emb
print(f"embedding: {len(used_ids)} used rows kept, {config.vocab_size - len(used_ids)} set to zero: {used_ids}")
# What the pipeline runs: the saved folder, loaded in float32 (the bf16 values exactly), default attention (sdpa).
text_encoder = Qwen3ForCausalLM.from_pretrained(te_dir, dtype=torch.float32).eval()
print(f"text encoder: attn_implementation {text_encoder.config._attn_implementation}, dtype {text_encoder.dtype}")

# --- 3. the pipeline's own encoder ----------------------------------------------------------------------------
with torch.no_grad():
    features = Flux2KleinPipeline._get_qwen3_prompt_embeds(
        text_encoder=text_encoder, tokenizer=tokenizer, prompt=CAPTIONS, device=torch.device("cpu"),
        max_sequence_length=MAX_LEN, hidden_states_layers=LAYERS)
    assert features.shape == (2, MAX_LEN, 3 * 32) and features.dtype == torch.float32
    for i, c in enumerate(CAPTIONS):  # batching does not change a caption's features
        alone = Flux2KleinPipeline._get_qwen3_prompt_embeds(text_encoder=text_encoder, tokenizer=tokenizer_b, prompt=c,
                                                            max_sequence_length=MAX_LEN)
        assert torch.equal(alone[0], features[i]) or (alone[0] - features[i]).abs().max() < 1e-6

    # the same tokenization, for the fixture (the pipeline does not return it)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False,
                                           add_generation_prompt=True, enable_thinking=False) for c in CAPTIONS]
    for c, t in zip(CAPTIONS, texts):
        assert t == f"<|im_start|>user\n{c}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n", repr(t)
    enc = [tokenizer(t, return_tensors="pt", padding="max_length", truncation=True, max_length=MAX_LEN) for t in texts]
    for t, e in zip(texts, enc):
        e2 = tokenizer_b(t, return_tensors="pt", padding="max_length", truncation=True, max_length=MAX_LEN)
        assert torch.equal(e["input_ids"], e2["input_ids"]) and torch.equal(e["attention_mask"], e2["attention_mask"])
    input_ids = torch.cat([e["input_ids"] for e in enc])
    mask = torch.cat([e["attention_mask"] for e in enc])
    assert sorted(set(input_ids.flatten().tolist())) == used_ids, "the embedding rows kept are the ids used"
    out = text_encoder(input_ids=input_ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    assert len(out.hidden_states) == 29
    hidden = {k: out.hidden_states[k] for k in LAYERS}
    assert torch.equal(torch.cat([hidden[k] for k in LAYERS], dim=-1), features), "features = [h9 | h18 | h27]"
    # hidden_states[k] is decoder layer k-1's output (no final norm): check with a hook on layer 26
    seen = {}

    def keep_output(module, args, output):
        seen["o"] = output[0] if isinstance(output, tuple) else output

    h = text_encoder.model.layers[26].register_forward_hook(keep_output)
    text_encoder(input_ids=input_ids, attention_mask=mask, use_cache=False)
    h.remove()
    assert torch.equal(seen["o"], hidden[27])

    # the attention mask transformers hands layer 0's attention (sdpa: boolean, True = may attend)
    masks = {}

    def keep_mask(module, args, kwargs):
        masks.setdefault("m", kwargs.get("attention_mask"))

    h = text_encoder.model.layers[0].self_attn.register_forward_pre_hook(keep_mask, with_kwargs=True)
    text_encoder(input_ids=input_ids, attention_mask=mask, use_cache=False)
    h.remove()
    am = masks["m"]

    # eager attention gives the same features
    eager = Qwen3ForCausalLM.from_pretrained(te_dir, dtype=torch.float32, attn_implementation="eager").eval()
    f_eager = Flux2KleinPipeline._get_qwen3_prompt_embeds(text_encoder=eager, tokenizer=tokenizer, prompt=CAPTIONS,
                                                          max_sequence_length=MAX_LEN)
    # ... and without the attention mask (plain causal): how much the padding positions change
    out_nomask = text_encoder(input_ids=input_ids, output_hidden_states=True, use_cache=False)
    f_nomask = torch.cat([out_nomask.hidden_states[k] for k in LAYERS], dim=-1)


# --- 4. float64 reference written from the description -------------------------------------------------------
def reference(ids, m, allow_pad_keys=False):
    W = {k: v.double() for k, v in text_encoder.state_dict().items()}
    L, H, KV, hd, eps = len(ids), 2, 1, 16, 1e-6
    rms = lambda x, w: w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    pos = torch.arange(L, dtype=torch.float64)  # every token, padding included, at its index
    inv = 1.0 / (1e6 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.cat([pos[:, None] * inv, pos[:, None] * inv], -1)
    cos, sin = ang.cos(), ang.sin()
    rope = lambda x: x * cos[:, None] + torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1) * sin[:, None]
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool))
    allowed = causal if allow_pad_keys else causal & m.bool()[None, :]  # allowed[i, j]: query i may see key j
    x = W["model.embed_tokens.weight"][ids]
    hs = [x]
    for l in range(28):
        p = f"model.layers.{l}."
        a = rms(x, W[p + "input_layernorm.weight"])
        q = rope(rms((a @ W[p + "self_attn.q_proj.weight"].T).view(L, H, hd), W[p + "self_attn.q_norm.weight"]))
        k = rope(rms((a @ W[p + "self_attn.k_proj.weight"].T).view(L, KV, hd), W[p + "self_attn.k_norm.weight"]))
        v = (a @ W[p + "self_attn.v_proj.weight"].T).view(L, KV, hd)
        k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
        s = torch.einsum("ihd,jhd->hij", q, k) / hd ** 0.5
        s = s.masked_fill(~allowed[None], float("-inf")).softmax(-1)
        o = torch.einsum("hij,jhd->ihd", s, v).reshape(L, H * hd)
        x = x + o @ W[p + "self_attn.o_proj.weight"].T
        a = rms(x, W[p + "post_attention_layernorm.weight"])
        g = a @ W[p + "mlp.gate_proj.weight"].T
        x = x + (torch.nn.functional.silu(g) * (a @ W[p + "mlp.up_proj.weight"].T)) @ W[p + "mlp.down_proj.weight"].T
        hs.append(x)
    return torch.cat([hs[k] for k in LAYERS], -1)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


print("\nchecks (max |difference|, relative L2):")
for i in range(2):
    n = int(mask[i].sum())
    ref = reference(input_ids[i], mask[i])
    ref_nomask = reference(input_ids[i], mask[i], allow_pad_keys=True)
    d = lambda a, b, sl: (a[sl].double() - b[sl].double()).abs().max().item()
    real, pad = slice(0, n), slice(n, MAX_LEN)
    print(f" caption{i}: {n} real tokens, {MAX_LEN - n} padding")
    print(f"   pipeline vs float64 reference (padding mask): real {d(features[i], ref, real):.2e}, "
          f"padding {d(features[i], ref, pad):.2e}, rel {rel(features[i], ref):.2e}")
    print(f"   pipeline vs float64 reference (causal only):  real {d(features[i], ref_nomask, real):.2e}, "
          f"padding {d(features[i], ref_nomask, pad):.2e}")
    print(f"   pipeline sdpa vs eager: {(features[i] - f_eager[i]).abs().max().item():.2e}")
    print(f"   with mask vs without mask: real {d(features[i], f_nomask[i], real):.2e}, "
          f"padding {d(features[i], f_nomask[i], pad):.2e} (padding features' scale "
          f"{features[i][pad].abs().max().item():.2e}); float64 reference of the same: "
          f"padding {d(ref, ref_nomask, pad):.2e}")
    assert rel(features[i], ref) < 1e-5 and d(features[i], ref, pad) < 1e-4
    assert (features[i] - f_eager[i]).abs().max() < 1e-4
    # which keys each query row sees, as transformers' mask says (sdpa bool mask, or additive float for eager)
    mi = am[i, 0] if am.dtype == torch.bool else am[i, 0] == 0
    expect = torch.tril(torch.ones(MAX_LEN, MAX_LEN, dtype=torch.bool)) & mask[i].bool()[None, :]
    print(f"   transformers' mask == (j <= i) & attention_mask[j]: {torch.equal(mi, expect)}; "
          f"padded query row {n} sees keys {mi[n].nonzero().flatten().tolist()}, "
          f"last row sees keys {mi[-1].nonzero().flatten().tolist()}")

# --- 5. write -----------------------------------------------------------------------------------------------
tensors, meta = {}, {"max_length": str(MAX_LEN), "pipeline_max_length": "512",
                     "layers": ",".join(map(str, LAYERS)), "order": "features = [hidden_9 | hidden_18 | hidden_27]",
                     "diffusers": diffusers.__version__, "transformers": transformers.__version__}
for i, c in enumerate(CAPTIONS):
    tensors[f"caption{i}.input_ids"] = input_ids[i].float()
    tensors[f"caption{i}.attention_mask"] = mask[i].float()
    tensors[f"caption{i}.features"] = features[i].float().contiguous()
    for k in LAYERS:
        tensors[f"caption{i}.hidden_{k}"] = hidden[k][i].float().contiguous()
    meta[f"caption{i}.caption"] = c
    meta[f"caption{i}.text"] = texts[i]
assert all(torch.equal(tensors[f"caption{i}.input_ids"].long(), input_ids[i]) for i in range(2))
save_file(tensors, os.path.join(OUT, "expected.safetensors"), metadata=meta)
# safetensors writes the metadata in hash order; sort it so that reruns give identical bytes
with open(os.path.join(OUT, "expected.safetensors"), "r+b") as f:
    n = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(n))
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    assert len(text) <= n
    f.seek(8)
    f.write(text + b" " * (n - len(text)))
with safe_open(os.path.join(OUT, "expected.safetensors"), "pt") as f:
    assert f.metadata() == meta and torch.equal(f.get_tensor("caption0.features"), tensors["caption0.features"])
shutil.rmtree(tmp)

print("\nwritten:")
for root, _, files in sorted(os.walk(OUT)):
    for name in sorted(files):
        path = os.path.join(root, name)
        print(f"  {path}: {os.path.getsize(path):,} bytes")
for i in range(2):
    print(f"caption{i}: {texts[i]!r}\n  ids {input_ids[i].tolist()}\n  mask {mask[i].tolist()}")
