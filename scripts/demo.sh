#!/usr/bin/env bash
# The main job on a fresh machine: build graft and run its default model, pretrained by
# graft itself (models/graft-default.gguf), with its demo adapters (models/adapters/:
# LoRAs trained on the CPU by `graft train`) hot-swapped in one process; then the same
# on the model quantized to Q4_0. Regenerate both with scripts/make-default-model.sh.
# Usage: scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
graft=target/release/graft
echo "== graft demo: base and task adapters hot-swapped, held-out prompts" >&2
$graft demo -n 2
echo "== graft run: the base model continues a sentence of its toy language" >&2
$graft run -m models/graft-default.gguf -p "The red cat" -n 16 --temp 0
echo "== the same adapters on the base quantized to Q4_0" >&2
mkdir -p target/demo
$graft quantize models/graft-default.gguf target/demo/graft-default-Q4_0.gguf --type Q4_0
$graft demo -m target/demo/graft-default-Q4_0.gguf -n 1
