"""The same step as benches/cpu_step.rs with transformers + peft: a Qwen2.5-0.5B-shaped model with random
weights, LoRA r=8 alpha=16 dropout 0.05 on all seven linears, forward + backward at 64 and 256 tokens,
base weights in float32 and in bfloat16 (PyTorch's fastest CPU mode).

    python scripts/bench_torch_step.py
"""
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM

config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                     num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)
print("torch", torch.__version__, "threads", torch.get_num_threads())
for dtype in (torch.float32, torch.bfloat16):
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(dtype)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.train()
    for tokens in (64, 256):
        ids = torch.randint(0, 150000, (1, tokens))
        times = []
        for _ in range(4):
            t = time.perf_counter()
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            model.zero_grad()
            times.append(time.perf_counter() - t)
        times = sorted(times[1:])
        median = times[len(times) // 2]
        print(f"{str(dtype):>15} {tokens:>4} tokens: {median:.3f} s per forward+backward, {tokens / median:.0f} tokens/s")
