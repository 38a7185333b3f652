#!/usr/bin/env bash
# Set up, lint, and run the test suite (tiny random models; a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The kernels are also tested as an ARM machine builds them: cross-compiled for aarch64 and run under qemu-user
# (tests/kernels/emulated.py). Install the cross compiler and the emulator where apt-get can; elsewhere those
# tests are reported as skipped, with the reason.
CROSS_TOOLS="gcc-aarch64-linux-gnu libgomp1-arm64-cross qemu-user"
if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get install -y -q $CROSS_TOOLS >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $CROSS_TOOLS >/dev/null 2>&1; } \
            || echo "could not install $CROSS_TOOLS: the aarch64 kernel tests will be skipped"
    fi
fi
.venv/bin/ruff check spqr tests benchmarks
.venv/bin/python -m pytest -q -rs tests
