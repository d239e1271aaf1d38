#!/usr/bin/env bash
# Checks graft's C ABI: the committed header is current, the C test program passes
# against the static and the dynamic library, and is valgrind-clean (no errors, no
# definitely-lost bytes).
#
#   ffi/check.sh [MODELS_DIR]     (default: ../shared/conformance/models)
#
# Run from anywhere; paths are resolved from the repository root.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
models="${1:-../shared/conformance/models}"
target="${CARGO_TARGET_DIR:-$root/target}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

step() { printf '\n== %s\n' "$*"; }

step "header is up to date"
cargo run --release -q -p graft-ffi-gen-header -- "$work/graft.h" >/dev/null
if ! diff -u ffi/include/graft.h "$work/graft.h"; then
    echo "ffi/include/graft.h is stale: run 'cargo run -p graft-ffi-gen-header' and commit it" >&2
    exit 1
fi

step "build libgraft (static and dynamic)"
cargo build --release -q -p graft-ffi
lib="$target/release"
test -f "$lib/libgraft.a" && test -f "$lib/libgraft.so"

cflags=(-std=c11 -D_POSIX_C_SOURCE=200809L -Wall -Wextra -Werror -O1 -g -I ffi/include)

step "C test, static library"
cc "${cflags[@]}" ffi/tests/c/test_graft.c "$lib/libgraft.a" -lpthread -ldl -lm -o "$work/test_static"
"$work/test_static" "$models" "$work"

step "C test, dynamic library"
cc "${cflags[@]}" ffi/tests/c/test_graft.c -L "$lib" -lgraft -lpthread -lm -o "$work/test_dynamic"
LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$work/test_dynamic" "$models" "$work"

step "example builds and runs"
cc "${cflags[@]}" examples/c/generate.c "$lib/libgraft.a" -lpthread -ldl -lm -o "$work/generate"
"$work/generate" "$models/llama-gqa-Q8_0.gguf" "Hello" "$models/llama-gqa-lora-all-r8.gguf" 0.5 >"$work/generate.out"
tail -n 1 "$work/generate.out"

step "training example builds and runs (LoRA on graft's default model)"
cc "${cflags[@]}" examples/c/train.c "$lib/libgraft.a" -lpthread -ldl -lm -o "$work/train"
cargo run --release -q -p graft-cli -- gen-data --task upper -n 2000 -o "$work/upper.jsonl"
"$work/train" models/graft-default.gguf "$work/upper.jsonl" "$work/upper.gguf" 600 \
    "upper: ship lamp king =" >"$work/train.out" 2>"$work/train.log"
tail -n 1 "$work/train.log"
tail -n 1 "$work/train.out"

step "C test under valgrind (dynamic library)"
# rayon's pool threads are still alive at exit ("possibly lost"/"still reachable"):
# only definite leaks and memory errors fail.
LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    valgrind --quiet --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite \
    --show-leak-kinds=definite "$work/test_dynamic" "$models" "$work"

echo
echo "ffi/check.sh: all checks passed"
