#!/usr/bin/env bash
# Set up, lint, and run the test suite (tiny random models; a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The kernels are also tested as other machines and compilers build them: cross-compiled for aarch64 and run
# under qemu-user (tests/kernels/emulated.py), and compiled by GCC 11 and clang 14. Install those tools where
# apt-get can; elsewhere the tests that need them are reported as skipped, with the reason.
EXTRA_TOOLS="gcc-aarch64-linux-gnu libgomp1-arm64-cross qemu-user gcc-11 clang-14 libomp-14-dev"
missing=0
for tool in aarch64-linux-gnu-gcc qemu-aarch64 gcc-11 clang-14; do command -v "$tool" >/dev/null || missing=1; done
if [ "$missing" = 1 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get install -y -q $EXTRA_TOOLS >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $EXTRA_TOOLS >/dev/null 2>&1; } \
            || echo "could not install $EXTRA_TOOLS: the tests that need them will be skipped"
    fi
fi
.venv/bin/ruff check spqr tests benchmarks
.venv/bin/python -m pytest -q -rs tests
# The oldest transformers that pyproject.toml allows, in a venv of its own, on the tests that touch transformers
# (model types, loaders, quantization, resume, evaluation, generation, the CLI). 4.57 failed them.
FLOOR=$(sed -n 's/.*"transformers>=\([0-9.]*\)".*/\1/p' pyproject.toml)
SPQR_VENV=.venv-floor SPQR_TRANSFORMERS="$FLOOR" bash scripts/setup.sh
echo "again with transformers $(.venv-floor/bin/python -c 'import transformers; print(transformers.__version__)'):"
.venv-floor/bin/python -m pytest -q -rs tests/test_architectures.py tests/test_hf.py tests/test_transformers_quantizer.py \
    tests/test_pipeline.py tests/test_resume.py tests/eval tests/test_generate.py tests/test_cli.py tests/test_interop.py \
    tests/test_lazy.py
