"""`qahira serve` for tests: one engine at a time (the shared engine lock)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from .engine import engine_lock

from qahira_vllm.server_process import free_port, running_server  # noqa: F401


@contextlib.contextmanager
def qahira_server(args: list[str], log_path: Path, env: dict | None = None,
                  startup_timeout: float = 900):
    with engine_lock():
        with running_server(args, log_path, env, startup_timeout) as url:
            yield url
