#!/usr/bin/env bash
# Set up .venv (if needed), then quantize and serve the embedded SmolLM2-135M and query it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m qahira_vllm.demo "$@"
