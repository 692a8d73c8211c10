"""The qwen2.5-cpu recipe with the Hugging Face stack (transformers + peft + trl), for BENCHMARKS.md:
LoRA r=8, alpha=16, dropout 0.05 on all seven linears, lr 2e-4, batch 1, gradient accumulation 4,
2 epochs, chat data through the model's own template, on the CPU; base weights in fp32, in bf16 (fastest
where the CPU has AVX512-BF16 or AMX) or bitsandbytes NF4 (group 64, bf16 compute). scripts/bench_recipe.sh times it
beside `nibble train --preset qwen2.5-cpu` on the same model and data.

    python scripts/bench_recipe.py write-data DATA.jsonl
    python scripts/bench_recipe.py train MODEL_DIR DATA.jsonl OUT_DIR fp32|bf16|nf4 (each may end in -no-checkpointing)

TRL's SFTConfig turns gradient checkpointing on by default; a mode ending in -no-checkpointing turns it
off (faster, more memory), for comparison.
"""
import json
import random
import sys
import time

TOPICS = ["rust lifetimes", "sourdough bread", "the moon landing", "tide pools", "jazz chords", "compound interest",
          "bicycle gears", "volcanoes", "chess openings", "photosynthesis", "the printing press", "sea otters",
          "binary search", "coffee roasting", "glaciers", "the violin", "solar panels", "origami", "honey bees",
          "lighthouses"]


def write_data(path):
    rng = random.Random(0)
    with open(path, "w") as f:
        for topic in TOPICS:
            facts = [f"Fact {i + 1} about {topic}: " + " ".join(rng.choice(
                ["it", "is", "often", "rarely", "a", "surprising", "detail", "that", "people", "remember", "when",
                 "learning", "about", "history", "science", "and", "craft"]) for _ in range(rng.randint(12, 22)))
                for i in range(rng.randint(4, 7))]
            messages = [
                {"role": "system", "content": "You are a patient tutor who answers in short paragraphs."},
                {"role": "user", "content": f"Can you explain {topic} to me?"},
                {"role": "assistant", "content": " ".join(facts[:len(facts) // 2])},
                {"role": "user", "content": "Tell me more, please."},
                {"role": "assistant", "content": " ".join(facts[len(facts) // 2:])},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")


def train(model_dir, data, out, mode):
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    start = time.perf_counter()
    checkpointing = not mode.endswith("-no-checkpointing")
    base = mode.removesuffix("-no-checkpointing")
    dtype = torch.float32 if base == "fp32" else torch.bfloat16
    tok = AutoTokenizer.from_pretrained(model_dir)
    if base == "nf4":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=torch.bfloat16,
                                                     device_map="cpu")
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    args = SFTConfig(output_dir=out, per_device_train_batch_size=1, gradient_accumulation_steps=4,
                     num_train_epochs=2, learning_rate=2e-4, logging_steps=1, save_strategy="no", report_to=[],
                     bf16=dtype == torch.bfloat16, use_cpu=True, max_length=1024, dataloader_num_workers=0,
                     gradient_checkpointing=checkpointing)
    trainer = SFTTrainer(model=model, args=args, train_dataset=load_dataset("json", data_files=data)["train"],
                         processing_class=tok, peft_config=lora)
    trainer.train()
    trainer.save_model(out)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(json.dumps({"mode": mode, "seconds": time.perf_counter() - start, "steps": trainer.state.global_step,
                      "first_loss": losses[0], "last_loss": losses[-1], "torch": torch.__version__}))


if __name__ == "__main__":
    if sys.argv[1] == "write-data":
        write_data(sys.argv[2])
    else:
        train(*sys.argv[2:6])
