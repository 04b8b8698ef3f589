"""Run real vLLM engines for tests, one at a time, each in its own child process."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENGINE_LOCK = "/tmp/qahira_engine.lock"  # one vLLM engine at a time on this 2-core machine


class EngineFailed(RuntimeError):
    def __init__(self, log: str):
        super().__init__(log[-4000:])
        self.log = log


def run_engine(spec: dict, tmp_path: Path, env: dict | None = None, timeout: int = 900) -> dict:
    """Run tests/vllm_runner.py on `spec` in a child process; return its JSON result."""
    spec_path, out_path = tmp_path / "spec.json", tmp_path / "out.json"
    spec_path.write_text(json.dumps(spec))
    child_env = {**os.environ, **(env or {})}
    with open(ENGINE_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.run([sys.executable, str(REPO / "tests" / "vllm_runner.py"),
                               str(spec_path), str(out_path)], capture_output=True, text=True,
                              env=child_env, timeout=timeout)
    if proc.returncode != 0 or not out_path.exists():
        raise EngineFailed(proc.stdout + proc.stderr)
    return json.loads(out_path.read_text())


# Engine settings for the CPU build: eager mode skips minutes of torch.compile per engine.
CPU_ENGINE = {"gpu_memory_utilization": 0.3, "max_model_len": 512, "enforce_eager": True}
TP2_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
