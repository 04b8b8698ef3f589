"""Build and load qahira's compiled CPU kernels (the `*.c` files next to this module).

    lib = load_library()        # ctypes.CDLL, or None: library_error() says why

The C sources (cpu_avx2_int4.c: INT4 linear layers, fast at decode batch sizes;
cpu_blockwise.c: every format case, exact; cpu_qbara.c: multi-adapter Q-BaRA, one call per
layer; cpu_common.h) are compiled once per machine with the system C compiler (`$CC`, else gcc,
else cc; `-O3 -mavx2 -mfma -mf16c -fopenmp`) into one shared library,
`<cache>/qahira_cpu-<hash>.so`, written to a temporary name and renamed (vLLM workers may build
concurrently; each renames a complete file). `<cache>` is `$QAHIRA_KERNEL_CACHE`, else
`$XDG_CACHE_HOME/qahira/kernels`, else `~/.cache/qahira/kernels`. The hash covers the sources,
compiler and flags, so an edited source is rebuilt. The entry points' ctypes signatures are
declared in `ops.C_FUNCTIONS`. OpenMP: the .so asks for libgomp.so.1, and the copy torch already
loaded answers, so one runtime (and torch's thread settings) applies.

Nothing is built, and every caller falls back to torch, when the CPU lacks AVX2/FMA/F16C, there
is no compiler, or the build fails (the compiler's message is kept).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SOURCES = ("cpu_avx2_int4.c", "cpu_blockwise.c", "cpu_qbara.c")
HEADERS = ("cpu_common.h",)
CFLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC")
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # cpu_common.h

_lib: ctypes.CDLL | None = None
_lib_error: str | None = None


def _cpu_has_avx2() -> bool:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return {"avx2", "fma", "f16c"} <= set(flags)


def cache_dir() -> Path:
    """Where the built library is kept: $QAHIRA_KERNEL_CACHE, else <XDG cache>/qahira/kernels."""
    if os.environ.get("QAHIRA_KERNEL_CACHE"):
        return Path(os.environ["QAHIRA_KERNEL_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "qahira" / "kernels"


def _build(compiler: str) -> Path:
    digest = hashlib.sha256(" ".join([compiler, *CFLAGS]).encode())
    for name in (*SOURCES, *HEADERS):
        digest.update((HERE / name).read_bytes())
    out = cache_dir() / f"qahira_cpu-{digest.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name, suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        cmd = [compiler, *CFLAGS, "-o", tmp, *(str(HERE / s) for s in SOURCES)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{compiler} failed on {', '.join(SOURCES)} in {HERE}:\n"
                               f"{proc.stderr[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _declare(lib: ctypes.CDLL) -> None:
    from .ops import C_FUNCTIONS  # here, not at the top: ops imports this module

    for name, argtypes in C_FUNCTIONS.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int


def load_library() -> ctypes.CDLL | None:
    """The compiled kernels, building them on first use; None (see library_error()) if not."""
    global _lib, _lib_error
    if _lib is not None or _lib_error is not None:
        return _lib
    if not _cpu_has_avx2():
        _lib_error = "this CPU lacks AVX2/FMA/F16C"
    else:
        compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
        if compiler is None:
            _lib_error = "no C compiler (gcc/cc) to build qahira's CPU kernels"
        else:
            try:
                lib = ctypes.CDLL(str(_build(compiler)))
            except (OSError, RuntimeError) as e:
                _lib_error = f"could not build/load qahira's CPU kernels: {e}"
            else:
                _declare(lib)
                _lib = lib
    return _lib


def library_error() -> str | None:
    load_library()
    return _lib_error
