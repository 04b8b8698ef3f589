"""Start `qahira serve` on 127.0.0.1 for tests and wait until it answers /health."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from engine import ENGINE_LOCK


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def qahira_server(args: list[str], log_path: Path, env: dict | None = None,
                  startup_timeout: float = 900):
    """Yield the base URL of a running `qahira serve ARGS` (killed with its workers after)."""
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "qahira"), "serve", *args,  # the console script
           "--host", "127.0.0.1", "--port", str(port)]
    lock = open(ENGINE_LOCK, "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n"
                                   + log_path.read_text()[-4000:])
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise TimeoutError("server did not start:\n" + log_path.read_text()[-4000:])
            time.sleep(1)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        lock.close()
