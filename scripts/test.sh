#!/usr/bin/env bash
# Every test of graft: the Rust workspace, the C ABI (header freshness, C test program
# against the static and dynamic library, valgrind) and the Python bindings (pytest in a
# venv). Needs ../shared/conformance beside the repository. Installs what is missing
# (cc and valgrind from apt; maturin, numpy, pytest from PyPI into a venv; onnxruntime
# from PyPI into .ort-venv for graft-ort).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v cc >/dev/null || missing+=(gcc libc6-dev)
command -v valgrind >/dev/null || missing+=(valgrind)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "== installing ${missing[*]}"
  $sudo apt-get update -qq && $sudo apt-get install -y -qq "${missing[@]}"
fi

echo "== ONNX Runtime (graft-ort tests load it at run time)"
ORT_DYLIB_PATH="$(bash scripts/ort-env.sh)"
export ORT_DYLIB_PATH
echo "ORT_DYLIB_PATH=$ORT_DYLIB_PATH"

echo "== cargo tests"
cargo test --release --workspace

echo "== C ABI"
bash ffi/check.sh

echo "== Python bindings"
bash bindings/python/run_tests.sh
