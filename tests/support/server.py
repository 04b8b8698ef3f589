"""`qahira serve` or `vllm serve` for tests: one engine at a time (the shared engine lock)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from .engine import engine_lock

from qahira_vllm.server_process import free_port, running_server  # noqa: F401


@contextlib.contextmanager
def qahira_server(args: list[str], log_path: Path, env: dict | None = None,
                  startup_timeout: float = 900, program: str = "qahira"):
    """Yield the base URL of `PROGRAM serve ARGS` (program "qahira" or "vllm") on 127.0.0.1."""
    with engine_lock():
        with running_server(args, log_path, env, startup_timeout, program=program) as url:
            yield url


def complete_token_ids(url: str, model: str, prompt: list[int], max_tokens: int,
                       timeout: float = 600) -> list[int]:
    """Greedy token ids of one /v1/completions request (token-id prompt, EOS ignored)."""
    import json
    import urllib.request

    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0, "ignore_eos": True, "return_token_ids": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", body,
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())["choices"][0]["token_ids"]
