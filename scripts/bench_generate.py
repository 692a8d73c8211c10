"""Greedy decoding with Hugging Face transformers on the CPU, for BENCHMARKS.md beside `nibble generate`:
the same model folder, the same prompt through the model's chat template, a fixed number of new tokens.

    python scripts/bench_generate.py MODEL_DIR fp32|bf16 NEW_TOKENS

Prints one JSON line: time to the first token (the prompt's forward pass and one step) and the decoding
rate after it (tokens 2..N), measured as the difference between a 1-token and an N-token generation.
"""
import json
import sys
import time


def main(model_dir, mode, new_tokens):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32 if mode == "fp32" else torch.bfloat16
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    text = tok.apply_chat_template([{"role": "user", "content": "Tell me about the sea"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids

    def run(n):
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        assert out.shape[1] == ids.shape[1] + n
        return time.perf_counter() - start

    run(2)  # warm-up
    first = min(run(1) for _ in range(3))
    whole = run(new_tokens)
    print(json.dumps({"mode": mode, "prompt_tokens": ids.shape[1], "first_token_s": first,
                      "tokens_per_s": (new_tokens - 1) / (whole - first), "torch": torch.__version__,
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
