#!/usr/bin/env bash
# The qwen2.5-cpu recipe, whole process wall time and peak RSS, nibble beside the Hugging Face stack on
# the same model (a random Qwen2.5-0.5B-shaped one) and the same 20 conversations.
#   PY=/path/to/venv/bin/python bash scripts/bench_recipe.sh [WORK_DIR]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-/tmp/nibble-recipe}"
py="${PY:-python3}"
mkdir -p "$work"
cargo build --release --quiet --manifest-path "$root/Cargo.toml"
nibble="$root/target/release/nibble"
[ -d "$work/model" ] || "$nibble" synth --preset qwen2.5-0.5b --output "$work/model"
"$py" "$root/scripts/bench_recipe.py" write-data "$work/chats.jsonl"
measure() {
  local name="$1"; shift
  /usr/bin/time -f "$name: %e s wall, %M KiB peak RSS" "$@" > "$work/$name.log" 2> "$work/$name.err" || {
    tail -20 "$work/$name.err"; exit 1; }
  tail -1 "$work/$name.err"
}
rm -rf "$work/nibble-out"
measure nibble "$nibble" train --preset qwen2.5-cpu --model "$work/model" --data "$work/chats.jsonl" \
  --output "$work/nibble-out" --device cpu
# MODES: the Hugging Face modes to run (bf16 and nf4 take many minutes on CPUs without AVX512-BF16/AMX).
for mode in ${MODES:-fp32 fp32-no-checkpointing bf16 bf16-no-checkpointing nf4}; do
  measure "hf-$mode" "$py" "$root/scripts/bench_recipe.py" train "$work/model" "$work/chats.jsonl" \
    "$work/hf-$mode" "$mode"
done
