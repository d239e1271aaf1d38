#!/usr/bin/env bash
# graft vs llama.cpp, side by side in one run, on a random-weight model with a real
# model's shape (../shared/tools/make_model.py), quantized by graft.
# Needs the peer built once: bash ../shared/peer/setup.sh (about 8 minutes).
# Usage: scripts/bench-peer.sh [PRESET] [THREADS] [TYPES...]
# Run it on a quiet machine: both engines are timing-sensitive.
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${1:-smollm2-135m}
threads=${2:-2}
shift $(( $# > 2 ? 2 : $# ))
types=("${@:-F32 Q8_0 Q4_0 Q4_K_M}")
read -r -a types <<< "${types[*]}"
peer=${GRAFT_PEER:-$HOME/.cache/graft-peer}
py="$peer/bin/python"
[ -x "$py" ] || { echo "peer missing: run bash ../shared/peer/setup.sh" >&2; exit 1; }
cargo build --release --quiet
graft=target/release/graft
dir=target/bench-peer
mkdir -p "$dir"
src="$dir/$preset-F32.gguf"
[ -f "$src" ] || "$py" ../shared/tools/make_model.py "$src" --preset "$preset" --type F32
printf '| type | engine | pp512 tok/s | tg128 tok/s |\n|---|---|---|---|\n'
for t in "${types[@]}"; do
  model="$dir/$preset-$t.gguf"
  [ "$t" = F32 ] || [ -f "$model" ] || $graft quantize "$src" "$model" --type "$t" 2>/dev/null
  [ "$t" = F32 ] && model="$src"
  g=$($graft bench -m "$model" --threads "$threads" --pp 512 --tg 128 -r 3)
  l=$("$py" ../shared/peer/llamacpp_bench.py "$model" --threads "$threads" --pp 512 --tg 128 --reps 3 2>/dev/null | tail -1)
  "$py" - "$t" "$g" "$l" <<'PY'
import json, sys
t, g, l = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
print(f"| {t} | graft | {g['pp_tokens_per_s']:.1f} | {g['tg_tokens_per_s']:.1f} |")
print(f"| {t} | llama.cpp | {l['pp_tokens_per_s']:.1f} | {l['tg_tokens_per_s']:.1f} |")
print(f"| {t} | ratio | {g['pp_tokens_per_s']/l['pp_tokens_per_s']:.2f} | {g['tg_tokens_per_s']/l['tg_tokens_per_s']:.2f} |")
PY
done
