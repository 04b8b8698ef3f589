"""Start `qahira serve` (or `vllm serve`) as a child process on 127.0.0.1 and wait until it
answers /health."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def console_script(name: str) -> str:
    exe = Path(sys.executable).parent / name  # the console script of this environment
    return str(exe) if exe.exists() else name


@contextlib.contextmanager
def running_server(args: list[str], log_path: Path, env: dict | None = None,
                   startup_timeout: float = 900, port: int | None = None,
                   program: str = "qahira"):
    """Yield the base URL of `PROGRAM serve ARGS` (program: "qahira", or "vllm", whose console
    script works on CPU installs once the `vllm` metadata alias is installed: scripts/setup.sh);
    the server and its workers stop afterwards. Raises RuntimeError (with the log's tail) when
    the server exits during startup, TimeoutError when it does not answer in startup_timeout s."""
    port = port or free_port()
    cmd = [console_script(program), "serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n"
                                   + Path(log_path).read_text()[-4000:])
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise TimeoutError("server did not start:\n" + Path(log_path).read_text()[-4000:])
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
