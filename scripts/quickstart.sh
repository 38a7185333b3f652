#!/usr/bin/env bash
# Set up, then compress the default model (SmolLM2-135M-Instruct) with SpQR 3-bit, save it,
# show its bit accounting and measure its WikiText-2 perplexity (first 64 windows of 512 tokens).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/spqr quantize -o out/smollm2-spqr-w3 --overwrite --eval --max-windows 64 --json out/smollm2-spqr-w3.json
.venv/bin/spqr info out/smollm2-spqr-w3
.venv/bin/spqr generate out/smollm2-spqr-w3 --prompt "The history of the Roman Republic" --max-new-tokens 32
