#!/usr/bin/env bash
# Builds graft for 64-bit ARM (the phones and boards of docs/mobile.md) and runs the
# kernel tests there under qemu: the NEON kernels against the scalar reference. Also
# type-checks the C library for Android and iOS (no NDK/Xcode here, so no linking).
# Installs the Rust std of those targets (rustup), a cross linker and qemu-user (apt)
# if missing.
#
#   scripts/check-aarch64.sh [extra cargo test args]   (default: -p graft-quant --lib)
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-gnu
mobile=(aarch64-linux-android aarch64-apple-ios)

for t in "$target" "${mobile[@]}"; do
  rustup target list --installed | grep -qx "$t" || rustup target add "$t"
done
missing=()
command -v aarch64-linux-gnu-gcc >/dev/null || missing+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v qemu-aarch64 >/dev/null || missing+=(qemu-user)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq && $sudo apt-get install -y -qq "${missing[@]}"
fi

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"

echo "== the whole workspace compiles for $target, warnings as errors"
RUSTFLAGS="-D warnings" cargo check --release --target "$target" --workspace
for t in "${mobile[@]}"; do
  echo "== the C library type-checks for $t"
  RUSTFLAGS="-D warnings" cargo check --release --target "$t" -p graft-ffi
done
echo "== tests on $target under qemu"
if [ $# -eq 0 ]; then set -- -p graft-quant --lib; fi
cargo test --release --target "$target" "$@"
