#!/usr/bin/env bash
# One prepared check for a session lent a GPU machine (the `device` tool: an NVIDIA H200 host, x86-64,
# no network, no Rust toolchain, at most 64 MiB of working tree with the carried files, ~15 minutes in
# all). Session 24 found there: tests/gpu.rs stalled as a whole (ten devices at once), the recipe ran on
# Vulkan at 209 tokens/s, and on the host's Intel cores the bf16 products were slower than the
# integer ones (BENCHMARKS.md, session 24). This script re-asks those questions in one call; the GPU
# recipe's log (recipe-gpu.log) ends with NIBBLE_PROFILE's device time per operation and kernel.
#
#   bash scripts/device_check.sh prepare      # here: builds, strips and packs into .bin, .gl, .whl
#   then the device tool's run, carry [".bin", ".gl", ".whl"], timeout_s 590:
#   bash scripts/device_check.sh run          # there: writes $OUT/summary.log and a few logs
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

prepare() {
  set -e
  for d in .bin .gl .whl; do grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude; done
  cargo build --release --quiet
  local tests=(gpu shaders op_suite graph train_parity generate flux2 profile)
  local listing
  listing=$(cargo test --release --no-run 2>&1)
  rm -rf /tmp/device-pack && mkdir -p /tmp/device-pack .bin .gl .whl
  cp target/release/nibble /tmp/device-pack/
  for t in "${tests[@]}"; do
    cp "$(echo "$listing" | grep -o "tests/$t.rs (target/release/deps/[^)]*)" | sed 's/.*(\(.*\))/\1/')" "/tmp/device-pack/$t"
  done
  strip /tmp/device-pack/*
  # One xz stream over all binaries: they share most of the library, so the large dictionary packs the
  # eight (~100 MB stripped) into ~11 MB, which with the tracked tree (~50 MB) fits the 64 MiB limit.
  tar cf - -C /tmp/device-pack . | xz -T1 -9e --lzma2=dict=192MiB > .bin/bins.tar.xz
  local o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
  mkdir -p /tmp/amd64/partial
  apt-get $o update > /dev/null
  (cd .gl && apt-get $o download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
  # The image has torch, transformers, peft and accelerate, but not trl or datasets (and their two
  # missing needs).
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
    trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  du -sh .bin .gl .whl
}

run() {
  local out="${OUT:-/tmp/device-out}" t0
  mkdir -p "$out"
  t0=$(date +%s)
  say() { echo "== $(date +%T) +$(( $(date +%s) - t0 ))s $*" | tee -a "$out/summary.log"; }
  seconds_since() { awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $1}"; }
  # The tests find their fixtures and `nibble` under the path they were built in.
  mkdir -p /work; [ -e /work/main ] || ln -s "$root" /work/main
  for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
  local icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  [ -f $icd ] && export VK_DRIVER_FILES=$icd
  export XDG_RUNTIME_DIR=/tmp NIBBLE_REQUIRE_GPU=1
  mkdir -p /tmp/b target/release && xz -dc .bin/bins.tar.xz | tar x -C /tmp/b && cp /tmp/b/nibble target/release/
  lscpu | grep -E "Model name|Flags" | cut -c1-2000 > "$out/machine.log"; nvidia-smi >> "$out/machine.log" 2>&1
  say "$(grep 'Model name' "$out/machine.log")"

  say "tests/gpu.rs one test at a time (30 s each; a thread dump of the first two that stall)"
  local name pid s rc stalls=0
  for name in $(/tmp/b/gpu --list 2>/dev/null | sed -n 's/: test$//p'); do
    [ $stalls -ge 2 ] && { say "$name: not run (two stalls already)"; continue; }
    s=$(date +%s.%N)
    /tmp/b/gpu --exact "$name" --test-threads 1 > "$out/one-test.log" 2>&1 & pid=$!
    for _ in $(seq 30); do kill -0 $pid 2>/dev/null || break; sleep 1; done
    if kill -0 $pid 2>/dev/null; then
      { echo "### $name stalled"; for task in /proc/$pid/task/*; do
          echo "$(cat "$task/comm") $(cat "$task/wchan" 2>/dev/null)"; cat "$task/stack" 2>/dev/null | head -8; done
        tail -20 "$out/one-test.log"; } >> "$out/stalls.log"
      kill -9 $pid; wait $pid 2>/dev/null; stalls=$((stalls + 1)); say "$name: STALLED (see stalls.log)"
    else
      wait $pid; rc=$?
      say "$name: rc=$rc $(seconds_since "$s") s"
      [ $rc -ne 0 ] && { echo "### $name"; cat "$out/one-test.log"; } >> "$out/failures.log"
    fi
  done
  for t in "gpu --test-threads 16" shaders op_suite graph "train_parity gpu" "generate gpu" "flux2 gpu" profile; do
    s=$(date +%s.%N)
    timeout 60 /tmp/b/$t > "$out/binary.log" 2>&1; rc=$?
    say "$t: rc=$rc $(seconds_since "$s") s $(grep '^test result' "$out/binary.log" | tail -1)"
    [ $rc -ne 0 ] && { echo "### $t"; tail -60 "$out/binary.log"; } >> "$out/failures.log"
  done

  cd /tmp && mkdir -p rec && cd rec
  [ -d model ] || /tmp/b/nibble synth --preset qwen2.5-0.5b --output model > /dev/null 2>&1 || say "synth failed"
  python3 "$root/scripts/bench_recipe.py" write-data chats.jsonl
  for dev in gpu cpu; do
    s=$(date +%s.%N)
    NIBBLE_PROFILE=1 timeout 100 /tmp/b/nibble train --preset qwen2.5-cpu --model model --data chats.jsonl \
      --output "o-$dev" --device $dev > "$out/recipe-$dev.log" 2>&1; rc=$?
    say "recipe --device $dev: rc=$rc $(seconds_since "$s") s $(grep -o 'step 10/10 .*' "$out/recipe-$dev.log" | tail -1)"
  done

  # The CPU question: on Intel AVX512-BF16 cores, do the integer products beat the bf16 ones natively?
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$root"/.whl/*.whl && export PYTHONPATH=/tmp/site
  local cpus pairs i job cmd
  cpus=($(lscpu -p=CPU,CORE,SOCKET | grep -v '^#' | awk -F, '!seen[$3","$2]++ {print $1}'))
  local threads="OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 RAYON_NUM_THREADS=2 CUDA_VISIBLE_DEVICES="
  local nib="/tmp/b/nibble train --preset qwen2.5-cpu --model model --data chats.jsonl --device cpu --output"
  local hf="python3 $root/scripts/bench_recipe.py train model chats.jsonl"
  local cap="ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2_VNNI"
  local jobs=(
    "native-default|env $threads $nib o1"
    "native-int16|env $threads $nib o2 --precision int16"
    "avx2vnni|env $threads NIBBLE_CPU_FEATURES=avx2vnni $nib o3"
    "avx2|env $threads NIBBLE_CPU_FEATURES=avx2 $nib o4"
    "hf-fp32-avx2|env $threads $cap $hf h1 fp32-no-checkpointing"
    "hf-bf16|env $threads $hf h2 bf16-no-checkpointing"
    "native-default-again|env $threads $nib o5"
    "native-int16-again|env $threads $nib o6 --precision int16"
  )
  pairs=$(( ${#cpus[@]} / 2 )); [ $pairs -gt ${#jobs[@]} ] && pairs=${#jobs[@]}
  say "recipe on the CPU: $pairs runs at once, each on two cores of its own"
  for ((i = 0; i < pairs; i++)); do
    job=${jobs[$i]%%|*}; cmd=${jobs[$i]#*|}
    (
      s=$(date +%s.%N)
      left=$(( 570 - ($(date +%s) - t0) )); [ $left -lt 30 ] && left=30
      timeout $left /usr/bin/time -f "%e s %M KiB" \
        taskset -c "${cpus[$((2 * i))]},${cpus[$((2 * i + 1))]}" $cmd > "/tmp/rec/$job.log" 2> "/tmp/rec/$job.err"
      say "$job: $(seconds_since "$s") s; $(tail -1 "/tmp/rec/$job.err") $(grep -o 'step 10/10 .*' "/tmp/rec/$job.err" | tail -1)$(grep -o '"last_loss": [0-9.]*' "/tmp/rec/$job.log")"
    ) &
  done
  wait
  say done
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: bash scripts/device_check.sh prepare|run" >&2; exit 2 ;;
esac
