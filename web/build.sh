#!/usr/bin/env bash
# Builds the browser package into web/pkg: the nibble library compiled to wasm32 plus its wasm-bindgen
# JS glue. wasm-bindgen-cli must match the wasm-bindgen version in Cargo.lock; it is installed with
# cargo when missing or different.
#   bash web/build.sh
#   python3 -m http.server 8000 --bind 127.0.0.1 --directory web    # then open http://127.0.0.1:8000/
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
version=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/"/, "", $3); print $3; exit }' Cargo.lock)
if [ "$(wasm-bindgen --version 2>/dev/null | awk '{print $2}')" != "$version" ]; then
  echo "installing wasm-bindgen-cli $version" >&2
  cargo install wasm-bindgen-cli --version "$version"
fi
rustup target add wasm32-unknown-unknown >/dev/null 2>&1 || true
cargo build --locked --release --lib --target wasm32-unknown-unknown
wasm-bindgen --target web --no-typescript --out-dir web/pkg \
  target/wasm32-unknown-unknown/release/nibble.wasm
echo "built web/pkg ($(du -h web/pkg/nibble_bg.wasm | cut -f1) of wasm)" >&2
