"""Run real vLLM engines for tests, one at a time, each in its own child process."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENGINE_LOCK = "/tmp/qahira_engine.lock"  # one vLLM engine at a time on this 2-core machine


_held_here = False  # this process holds ENGINE_LOCK (flock would block on itself: deadlock)


@contextlib.contextmanager
def engine_lock():
    """Hold the one-engine-at-a-time lock. Taking it twice in one process would wait forever
    (e.g. an engine test placed after a module-scoped server fixture in the same file, which
    keeps its engine until the module ends): that raises at once instead."""
    global _held_here
    if _held_here:
        raise RuntimeError("the engine lock is already held by this test process (a running "
                           "server fixture?): order the tests so that every engine run comes "
                           "before the module-scoped server in its file")
    with open(ENGINE_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _held_here = True
        try:
            yield
        finally:
            _held_here = False


class EngineFailed(RuntimeError):
    def __init__(self, log: str):
        super().__init__(log[-4000:])
        self.log = log


def run_engine(spec: dict, tmp_path: Path, env: dict | None = None, timeout: int = 900,
               script: Path = Path(__file__).with_name("vllm_runner.py")) -> dict:
    """Run `script SPEC OUT` (default tests/support/vllm_runner.py) on `spec` in a child process under
    the engine lock; return its JSON result plus "log" (the child's stdout + stderr)."""
    spec, env = single_process(spec, env)
    spec_path, out_path = tmp_path / "spec.json", tmp_path / "out.json"
    spec_path.write_text(json.dumps(spec))
    child_env = {**os.environ, **(env or {})}
    with engine_lock():
        proc = subprocess.run([sys.executable, str(script), str(spec_path), str(out_path)],
                              capture_output=True, text=True, env=child_env, timeout=timeout)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0 or not out_path.exists():
        raise EngineFailed(log)
    return {**json.loads(out_path.read_text()), "log": log}


def single_process(spec: dict, env: dict | None) -> tuple[dict, dict]:
    """The same engine with fewer processes: the engine core runs in the runner's process
    (VLLM_ENABLE_V1_MULTIPROCESSING=0) and, at TP=1, so does the worker (the "uni" executor).
    Each spawned process would import torch and vLLM again: measured here, 40 s -> 20 s per
    engine run. TP=2 keeps vLLM's multiprocess workers (one per rank)."""
    kwargs = dict(spec.get("llm_kwargs", {}))
    if kwargs.get("tensor_parallel_size", 1) == 1:
        kwargs.setdefault("distributed_executor_backend", "uni")
    return ({**spec, "llm_kwargs": kwargs},
            {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", **(env or {})})


# Engine settings for the CPU build. Eager mode skips minutes of torch.compile per engine. An
# explicit KV-cache size (256 MiB: thousands of tokens for these models) skips vLLM's memory
# sizing and the zeroing of gpu_memory_utilization x RAM: measured here, init 22 s -> 0.2 s.
KV_CACHE_BYTES = 256 << 20
CPU_ENGINE = {"kv_cache_memory_bytes": KV_CACHE_BYTES, "max_model_len": 512,
              "enforce_eager": True}
TP2_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
