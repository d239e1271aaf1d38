#!/usr/bin/env bash
# Adapter methods side by side on the default model: LoRA, SaRA, STABLE-RPS (RPS-LoRA
# at rho 0.1 and 0.01) trained on every demo task with the same step budget; reports
# held-out exact match, retention (the base's `copy` task with the adapter active),
# trainable parameters, file size, peak RSS and training time as a Markdown table.
# Usage: [TASKS="reverse upper add"] scripts/bench-methods.sh [STEPS]   (default 1000;
# results in target/bench-methods)
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-1000}
out=target/bench-methods
mkdir -p "$out"
cargo build --release -p graft-cli
g=target/release/graft
model=models/graft-default.gguf
$g gen-data --task copy -n 200 --seed 99 -o "$out/copy-eval.jsonl"
: > "$out/results.jsonl"
for task in ${TASKS:-reverse upper add}; do
  $g gen-data --task "$task" -n 2000 --seed 7 -o "$out/$task.jsonl"
  common=(-m "$model" --data "$out/$task.jsonl" --steps "$steps" --batch 16 --rank 16 --alpha 32
          --eval-max 100 --retention-data "$out/copy-eval.jsonl" --seed 0)
  run() {
    local name=$1; shift
    /usr/bin/time -f "%e" -o "$out/time" "$g" train "${common[@]}" "$@" > "$out/one.json"
    python3 - "$task" "$name" "$out/one.json" >> "$out/results.jsonl" <<'PY'
import json, sys
r = json.load(open(sys.argv[3])); r["task"], r["name"] = sys.argv[1], sys.argv[2]
print(json.dumps(r))
PY
  }
  run lora --method lora --lr 3e-3 --out "$out/$task-lora.gguf"
  run sara --method sara --lr 3e-3 --out "$out/$task-sara.safetensors"
  run rps-0.1 --method rps --rho 0.1 --lr 3e-3 --out "$out/$task-rps01.rps"
  run rps-0.01 --method rps --rho 0.01 --lr 3e-3 --out "$out/$task-rps001.rps"
done
python3 - "$out/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| task | method | exact match | retention (copy) | trainable params | file | peak RSS | train time |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['task']} | {r['name']} | {r['eval_exact_match']:.2f} | {r['retention_exact_match']:.2f} | "
          f"{r['trainable_params']:,} | {r['out_bytes']/1024:.0f} KiB | {r['peak_rss_mib']:.0f} MiB | {r['train_seconds']:.0f} s |")
PY
