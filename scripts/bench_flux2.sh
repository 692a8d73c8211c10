#!/usr/bin/env bash
# One FLUX.2 [klein] LoRA training step on the CPU, side by side in one run: diffusers + peft (float32 and
# bfloat16) and nibble (dense bf16 weights and NF4 g128, the executor's default precision) on the same
# transformer folders (the tiny shape and a slice of klein 4B: one double + one single block at full
# width), 1024 image tokens (512 px) + 512 caption tokens, LoRA r=32 on every block linear, gradient
# checkpointing, AdamW. Needs a virtualenv with torch, diffusers 0.42 and peft (PYTHON, default python3).
#
#     PYTHON=/tmp/hfvenv/bin/python bash scripts/bench_flux2.sh [STEPS] [SLICE_DTYPES]
#
# SLICE_DTYPES (default float32,bfloat16) are torch's dtypes for the klein 4B slice: on CPUs without
# native bf16 arithmetic torch's bf16 step there takes many minutes.
set -euo pipefail
steps=${1:-2}
slice_dtypes=${2:-float32,bfloat16}
python=${PYTHON:-python3}
cargo build --release --bench flux2_step >/dev/null 2>&1
echo "# $(date -u +%F) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) threads"
echo "# flags: $(grep -m1 -o -w -E 'avx2|avx512f|avx512_bf16|amx_bf16' /proc/cpuinfo | sort -u | xargs)"
for shape in tiny slice4b; do
  dir=/tmp/nibble-bench-flux2-$shape
  dtypes=float32,bfloat16
  [ "$shape" = slice4b ] && dtypes=$slice_dtypes
  "$python" -u scripts/bench_flux2_step.py --shape "$shape" --out "$dir" --steps "$steps" --dtypes "$dtypes" 2>/dev/null | grep '^{'
  NIBBLE_BENCH_STEPS=$steps NIBBLE_BENCH_MODEL=$dir cargo bench --bench flux2_step 2>/dev/null | grep 's/step'
done
