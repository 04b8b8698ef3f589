#!/usr/bin/env bash
# Set up .venv (if needed), fetch the embedded model (cached), run the whole test suite.
# TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors; it must be set before anything
# imports triton, hence here rather than in a fixture.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/qahira models fetch smollm2-135m
TRITON_INTERPRET=1 .venv/bin/python -m pytest tests -q -p no:cacheprovider --durations=15 "$@"
