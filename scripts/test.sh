#!/usr/bin/env bash
# Set up, lint, and run the test suite (tiny random models; a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check spqr tests benchmarks
.venv/bin/python -m pytest -q tests
