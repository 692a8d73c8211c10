#!/usr/bin/env bash
# Builds the browser package, serves web/ on localhost, and drives it in headless Chromium (Debian's
# package) with WebGPU on SwiftShader: web/test.mjs trains the built-in example and checks the result.
# Output (a screenshot of each state, result.json) goes to web/test-output/.
#   bash web/test.sh [STEPS]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
steps="${1:-30}"
bash "$here/build.sh"
command -v chromium >/dev/null || { echo "web/test.sh needs Debian's chromium package" >&2; exit 1; }
(cd "$here" && npm ci --no-audit --no-fund --loglevel=error)
# A model folder on disk, for the page's "pick a Hugging Face folder" path.
folder="$here/test-output/folder-model"
rm -rf "$folder"
(cd "$here/.." && cargo run --locked --release --quiet -- synth --preset tiny-llama --tokenizer byte --output "$folder")
# Qwen2.5-0.5B's shapes (random weights, 1 GB of bf16), which the page quantizes to NF4 as it loads.
big="$here/test-output/qwen2.5-0.5b-shaped"
rm -rf "$big"
(cd "$here/.." && cargo run --locked --release --quiet -- synth --preset qwen2.5-0.5b --output "$big")
log="$here/test-output/generate.log"
big_answer=$(cd "$here/.." && cargo run --locked --release --quiet -- generate --model "$big" --device cpu \
  --prompt "What is nibble?" --max-new-tokens 8 2>"$log") || { cat "$log" >&2; exit 1; }
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 -m http.server "$port" --bind 127.0.0.1 --directory "$here" >/dev/null 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  curl -s -o /dev/null "http://127.0.0.1:$port/" && break
  sleep 0.1
done
node "$here/test.mjs" "http://127.0.0.1:$port/" "$steps" "$here/test-output" "$folder" "$big" "$big_answer"
