#!/usr/bin/env bash
# Prints the path of an ONNX Runtime shared library for graft-ort (ORT_DYLIB_PATH),
# installing the PyPI onnxruntime wheel (and numpy, for the Python comparison test)
# into .ort-venv on first use (the Python comparison test runs that venv). An
# ORT_DYLIB_PATH already set to an existing file is printed instead of the venv's.
#   export ORT_DYLIB_PATH="$(bash scripts/ort-env.sh)"
set -euo pipefail
cd "$(dirname "$0")/.."

venv="$PWD/.ort-venv"
# The newest wheel when this was written; graft-ort needs ONNX Runtime >= 1.20.
ort_version="${GRAFT_ORT_VERSION:-1.32.0}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import onnxruntime, numpy" 2>/dev/null; then
  echo "== installing onnxruntime $ort_version into $venv" >&2
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install -q "onnxruntime==$ort_version" numpy >&2
fi
if [ -n "${ORT_DYLIB_PATH:-}" ] && [ -f "$ORT_DYLIB_PATH" ]; then
  echo "$ORT_DYLIB_PATH"
  exit 0
fi
lib=$(ls "$venv"/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* 2>/dev/null | head -n1)
if [ -z "$lib" ]; then
  echo "error: no libonnxruntime.so.* in $venv (onnxruntime wheel layout changed?)" >&2
  exit 1
fi
echo "$lib"
