#!/usr/bin/env bash
# Online serving (BENCHMARKS.md "Serving (online)"): `graft bench serve` against
# `graft serve` with 0, 1, 8 and 64 adapters (uniform and skewed popularity), then
# against llama.cpp's server (llama-cpp-python) on the same GGUF, base model only.
# Random-weight smollm2-135m shape, Q4_0 (graft quantize); 8 random rank-16 LoRA files,
# loaded under 64 names (a0..a63, file i mod 8; each name its own copy in memory).
# Needs the peer venv (../shared/peer/setup.sh) with the server extras:
#   ~/.cache/graft-peer/bin/pip install 'llama-cpp-python[server]==0.3.36'
# Usage: scripts/bench-serve.sh   (env: RATE CONC N IN OUT REPS THREADS PORT DIR)
# Every configuration runs REPS times with seeds 1..REPS (the same workloads on both
# servers); the table shows the run with the higher request throughput and every
# run's req/s. Run it on a quiet machine: nothing else should share the cores.
set -euo pipefail
cd "$(dirname "$0")/.."
rate=${RATE:-2}
conc=${CONC:-8}
n=${N:-64}
in=${IN:-64}
out=${OUT:-32}
reps=${REPS:-2}
threads=${THREADS:-2}
port=${PORT:-18600}
dir=${DIR:-target/bench-serve}
peer=${GRAFT_PEER:-$HOME/.cache/graft-peer}
py="$peer/bin/python"
[ -x "$py" ] || { echo "peer missing: run bash ../shared/peer/setup.sh" >&2; exit 1; }
cargo build --release --quiet -p graft-cli
graft=target/release/graft
mkdir -p "$dir/results"
model="$dir/smol-Q4_0.gguf"
if [ ! -f "$model" ]; then
  "$py" ../shared/tools/make_model.py "$dir/smol-F16.gguf" --preset smollm2-135m --type F16
  $graft quantize "$dir/smol-F16.gguf" "$model" --type Q4_0
fi
for s in 0 1 2 3 4 5 6 7; do
  [ -f "$dir/lora-r16-$s.gguf" ] ||
    "$py" scripts/make_lora.py "$model" "$dir/lora-r16-$s.gguf" --rank 16 --seed "$s"
done

server_pid=
stop_server() {
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=
  fi
}
trap stop_server EXIT
wait_ready() {
  for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null && return 0
    kill -0 "$server_pid" 2>/dev/null || { echo "server exited" >&2; return 1; }
    sleep 0.5
  done
  echo "server did not come up" >&2
  return 1
}
bench() {
  local name=$1
  shift
  for r in $(seq 1 "$reps"); do
    $graft bench serve --url "http://127.0.0.1:$port" --request-rate "$rate" \
      --max-concurrency "$conc" --num-prompts "$n" --input-len "$in" --output-len "$out" \
      --seed "$r" --out "$dir/results/$name-$r.json" "$@" >/dev/null
    echo "$name run $r done" >&2
  done
}

adapters=()
for i in $(seq 0 63); do adapters+=(--adapter "a$i=$dir/lora-r16-$((i % 8)).gguf"); done
$graft serve -m "$model" --threads "$threads" --port "$port" "${adapters[@]}" 2>"$dir/graft-serve.log" &
server_pid=$!
wait_ready
bench graft-base
bench graft-1 --adapters 1
bench graft-8-uniform --adapters 8 --popularity uniform
bench graft-8-skewed --adapters 8 --popularity skewed
bench graft-64-uniform --adapters 64 --popularity uniform
bench graft-64-skewed --adapters 64 --popularity skewed
stop_server

# --interrupt_requests False: by default a new request cuts off the one streaming;
# llama-cpp-python serves one request at a time, the others wait.
"$py" -m llama_cpp.server --model "$model" --n_threads "$threads" --n_threads_batch "$threads" \
  --n_ctx 2048 --port "$port" --interrupt_requests False 2>"$dir/llama-server.log" >&2 &
server_pid=$!
wait_ready
bench llamacpp-base
stop_server

python3 - "$dir/results" "$reps" <<'PY'
import json, sys
d, reps = sys.argv[1], int(sys.argv[2])
rows = ["graft-base", "graft-1", "graft-8-uniform", "graft-8-skewed", "graft-64-uniform",
        "graft-64-skewed", "llamacpp-base"]
print("| server, adapters | req/s (each run) | out tok/s | TTFT median / p99 ms | TPOT median ms | ITL median / p99 ms | E2E median / p99 ms | completed / failed |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
for name in rows:
    runs = [json.load(open(f"{d}/{name}-{r}.json")) for r in range(1, reps + 1)]
    best = max(runs, key=lambda v: v["request_throughput"])
    each = " / ".join(f"{v['request_throughput']:.2f}" for v in runs)
    print(f"| {name} | {each} | {best['output_throughput']:.1f} "
          f"| {best['median_ttft_ms']:.0f} / {best['p99_ttft_ms']:.0f} "
          f"| {best['median_tpot_ms']:.1f} "
          f"| {best['median_itl_ms']:.1f} / {best['p99_itl_ms']:.1f} "
          f"| {best['median_e2el_ms']:.0f} / {best['p99_e2el_ms']:.0f} "
          f"| {sum(v['completed'] for v in runs)} / {sum(v['failed'] for v in runs)} |")
PY
