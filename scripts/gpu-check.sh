#!/usr/bin/env bash
# GPU check for graft-ort (an NVIDIA machine, never CI): the conformance cases through
# ONNX Runtime's CUDA execution provider (--provider ort-cuda), from an onnxruntime-gpu
# wheel carried to the machine (it has no network).
#
#   On a machine with network, once:
#     bash scripts/gpu-check.sh --prepare [DIR]
#   downloads onnxruntime-gpu and the NVIDIA runtime wheels it needs (CUDA 12 cuBLAS,
#   cuDNN, cuFFT, cuRAND, cudart, nvrtc) into DIR (default .ort-gpu/wheels) and builds
#   the conformance test binary with the `cuda` feature into DIR/bin.
#
#   On the GPU machine (DIR carried along, ../shared/conformance beside the repository):
#     bash scripts/gpu-check.sh [DIR]
#   installs the wheels offline into .ort-gpu/venv, points ORT_DYLIB_PATH at its
#   libonnxruntime.so and LD_LIBRARY_PATH at the NVIDIA libraries, then runs the
#   conformance test binary (DIR/bin/conformance, else `cargo test --features cuda`)
#   with GRAFT_ORT_PROVIDER=ort-cuda. The log goes to stdout and to $OUT (or /tmp).
set -euo pipefail
cd "$(dirname "$0")/.."

ORT_GPU_VERSION="${GRAFT_ORT_GPU_VERSION:-1.32.0}"
mode=run
if [ "${1:-}" = "--prepare" ]; then
  mode=prepare
  shift
fi
dir="${1:-.ort-gpu/wheels}"

if [ "$mode" = prepare ]; then
  mkdir -p "$dir/bin"
  echo "== downloading onnxruntime-gpu $ORT_GPU_VERSION and its CUDA/cuDNN wheels into $dir"
  python3 -m pip download -q --dest "$dir" --only-binary=:all: \
    "onnxruntime-gpu[cuda,cudnn]==$ORT_GPU_VERSION" numpy
  echo "== building the conformance test binary with the cuda feature"
  bin=$(cargo test --release -p graft-ort --features cuda --test conformance --no-run \
    --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "conformance":
        print(m["executable"])' | tail -n1)
  [ -n "$bin" ] || { echo "error: no conformance test binary was built" >&2; exit 1; }
  cp "$bin" "$dir/bin/conformance"
  du -sh "$dir"
  exit 0
fi

log="${OUT:-/tmp}/gpu-check.log"
exec > >(tee "$log") 2>&1
echo "== $(date -u +%FT%TZ) graft-ort GPU check, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
[ -d ../shared/conformance ] || { echo "error: ../shared/conformance is missing" >&2; exit 1; }
ls "$dir"/onnxruntime_gpu-*.whl >/dev/null 2>&1 ||
  { echo "error: no onnxruntime_gpu wheel in $dir (run --prepare where there is network)" >&2; exit 1; }

venv=.ort-gpu/venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --no-index --find-links "$dir" "onnxruntime-gpu[cuda,cudnn]" numpy
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ORT_DYLIB_PATH=$(ls "$site"/onnxruntime/capi/libonnxruntime.so.* | head -n1)
export ORT_DYLIB_PATH
# The CUDA provider dlopens cuBLAS/cuDNN/...: the nvidia-* wheels keep them in nvidia/*/lib.
nv_libs=$(find "$site/nvidia" -maxdepth 2 -name lib -type d 2>/dev/null | tr '\n' ':')
export LD_LIBRARY_PATH="${nv_libs}$site/onnxruntime/capi:${LD_LIBRARY_PATH:-}"
echo "ORT_DYLIB_PATH=$ORT_DYLIB_PATH"
"$venv/bin/python" -c 'import onnxruntime as o; print("onnxruntime", o.__version__, o.get_available_providers())'

export GRAFT_ORT_PROVIDER=ort-cuda
start=$(date +%s)
if [ -x "$dir/bin/conformance" ]; then
  # The binary finds ../shared/conformance from the path it was built at; run it from a
  # checkout at the same place, or rebuild with cargo below.
  "$dir/bin/conformance" --test-threads 1 --nocapture
else
  cargo test --release -p graft-ort --features cuda --test conformance -- --test-threads 1 --nocapture
fi
echo "== GPU check passed in $(( $(date +%s) - start )) s"
