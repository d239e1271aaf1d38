#!/usr/bin/env bash
# The main job on a fresh machine: build graft, quantize the default model with
# llama.cpp's Q4_K_M recipe, and show what the result holds.
# Default model: the conformance suite's llama-gqa-F32.gguf (graft's own pretrained
# model replaces it when on-device training lands).
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-../shared/conformance/models/llama-gqa-F32.gguf}
[ -f "$model" ] || { echo "error: default model not found: $model (../shared must sit beside the repo)" >&2; exit 1; }
cargo build --release --quiet
out=target/demo
mkdir -p "$out"
target/release/graft quantize "$model" "$out/model-Q4_K_M.gguf" --type Q4_K_M
target/release/graft inspect "$out/model-Q4_K_M.gguf"
