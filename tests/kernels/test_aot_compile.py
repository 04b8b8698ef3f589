"""The kernels compile to sm_90 (H100/H200) cubins with the configs the dispatch picks.

The interpreter tests check the arithmetic; only a real compile catches what the interpreter
accepts but the compiler rejects (layouts, dot shapes, shared memory). Triton ships ptxas, so
this needs no GPU. It runs in a subprocess without TRITON_INTERPRET (interpreted kernels
cannot be compiled); one config per code path keeps it under a minute.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _ptxas_available() -> bool:
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return False
    return (Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _ptxas_available(), reason="triton without its NVIDIA backend/ptxas")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "qahira_kernels.aot_compile", "--arch", "90",
                           "--quick"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("sm_90")]
    compiled = " ".join(lines)
    for name in ("fused_gemm 4b", "fused_gemm 8b", "dequant 4b", "dequant 8b", "splitk_reduce",
                 "qbara_shrink", "qbara_expand", "qahira_apply"):
        assert name in compiled, f"{name} was not compiled:\n{proc.stdout}"
    assert "OVER LIMIT" not in compiled
