#!/usr/bin/env bash
# Regenerates graft's default model and its demo adapters from nothing, on the CPU,
# deterministically: a BPE vocabulary and a random Llama model (graft init-model),
# pretraining on a generated corpus (toy English + the `copy` task), then one LoRA
# per demo task. About 25 minutes on 2 cores.
#
# Usage: scripts/make-default-model.sh [OUT_DIR]   (default: models/)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-models}
work=target/default-model
mkdir -p "$out/adapters" "$work"
cargo build --release -p graft-cli
g=target/release/graft

$g init-model -o "$work/init.gguf" --seed 0
# Stage 1: the language (text : copy = 4 : 1); stage 2: more copying (2 : 3).
$g gen-data --task base -n 20000 --seed 0 -o "$work/stage1.jsonl"
$g train --method full -m "$work/init.gguf" --data "$work/stage1.jsonl" --out "$work/stage1.gguf" \
  --steps 3000 --batch 16 --lr 3e-3 --warmup 100 --eval-frac 0.01 --eval-max 32 --seed 0 \
  | tee "$work/stage1.json"
$g gen-data --task text -n 10000 --seed 5 -o "$work/text2.jsonl"
$g gen-data --task copy -n 15000 --seed 5 -o "$work/copy2.jsonl"
cat "$work/text2.jsonl" "$work/copy2.jsonl" > "$work/stage2.jsonl"
$g train --method full -m "$work/stage1.gguf" --data "$work/stage2.jsonl" --out "$work/stage2.gguf" \
  --steps 4000 --batch 16 --lr 2e-3 --warmup 50 --eval-frac 0.01 --eval-max 64 --seed 0 \
  | tee "$work/stage2.json"
# Stage 3: copying (induction) is what the adapters build on; polish it at a lower rate.
$g gen-data --task text -n 5000 --seed 9 -o "$work/text3.jsonl"
$g gen-data --task copy -n 15000 --seed 9 -o "$work/copy3.jsonl"
cat "$work/text3.jsonl" "$work/copy3.jsonl" > "$work/stage3.jsonl"
$g train --method full -m "$work/stage2.gguf" --data "$work/stage3.jsonl" --out "$out/graft-default.gguf" \
  --steps 3000 --batch 16 --lr 1e-3 --warmup 50 --eval-frac 0.01 --eval-max 100 --seed 0 \
  | tee "$work/stage3.json"

# The demo adapters, each with the step budget and rate that reached >= 95% held-out exact
# match (`recall` is left out: LoRA on this base stays near 30% on it, see BENCHMARKS.md).
adapter() {
  local task=$1 steps=$2 lr=$3
  $g gen-data --task "$task" -n 2000 --seed 7 -o "$work/$task.jsonl"
  $g train -m "$out/graft-default.gguf" --data "$work/$task.jsonl" --out "$out/adapters/$task.gguf" \
    --steps "$steps" --batch 16 --lr "$lr" --rank 16 --alpha 32 --eval-max 100 --seed 0 \
    | tee "$work/lora-$task.json"
}
adapter reverse 2000 5e-3
adapter upper 1000 3e-3
adapter add 1000 3e-3
echo "default model: $out/graft-default.gguf, adapters: $out/adapters/"
