#!/usr/bin/env bash
# Builds the graft Python package with maturin in a virtual environment and runs its
# pytest suite. Needs the `graft` binary (built here unless GRAFT_SKIP_CLI_BUILD=1)
# and the conformance suite at <repo>/../shared/conformance (or GRAFT_CONFORMANCE).
#
#   GRAFT_PY_VENV   virtual environment to use/create (default bindings/python/.venv)
#   PYTHON          interpreter that creates it (default python3)
#   extra arguments go to pytest
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${GRAFT_PY_VENV:-$here/.venv}"

if [[ "${GRAFT_SKIP_CLI_BUILD:-0}" != 1 ]]; then
    (cd "$repo" && cargo build --release -p graft-cli)
fi
if [[ ! -x "$venv/bin/python" ]]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "maturin>=1.5,<2" numpy pytest safetensors
# `maturin develop` installs into the active environment. Sharing the root target
# directory reuses the graft crates and their dependencies built by the Rust tests.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
(
    cd "$here"
    export VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH"
    maturin develop --release
)
cd "$here"
"$venv/bin/python" -m pytest -q tests "$@"
