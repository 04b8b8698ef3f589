"""Build and load qahira's compiled CPU kernels (the `*.c` files next to this module).

    lib = load_library()        # ctypes.CDLL, or None: library_error() says why

The C sources (cpu_intdot.c: INT4 and INT8 integer-dot linear layers, fast at decode batch
sizes; cpu_dequant_gemm.c: INT4 and INT8 layers for batches, dequantize-to-bf16 + GEMM;
cpu_blockwise.c: every format case, exact; cpu_quantize.c: the quantizer's clip search;
cpu_qbara.c: multi-adapter Q-BaRA, one call per layer; cpu_common.h) are compiled once per
machine with the system C compiler (`$CC`, else gcc, else cc; `-O3 -mavx2 -mfma -mf16c
-fopenmp`) into one shared library. cpu_intdot.c, cpu_qbara.c and cpu_dequant_gemm.c
(`WIDTH_SOURCES`) are compiled twice, as is and with `AVX512_FLAGS` (512-bit vectors, VNNI), and
cpu_dequant_gemm.c a third and fourth time with `BF16DOT_FLAGS` (vdpbf16ps) and `AMX_FLAGS`
(AMX tiles): the objects go into the library
wherever the compiler knows the flags (so CI compiles them even on machines that cannot run
them), and `intdot_variant()` (= `qbara_variant()`) / `dequant_gemm_variant()` pick the widest
this CPU runs (CPUID; `$QAHIRA_CPU_ISA=avx2` forces the AVX2 one). The library is
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
SOURCES = ("cpu_intdot.c", "cpu_dequant_gemm.c", "cpu_blockwise.c", "cpu_qbara.c",
           "cpu_quantize.c")
HEADERS = ("cpu_common.h",)
CFLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC")
# The second build of each WIDTH_SOURCES file (entry points *_avx512).
AVX512_FLAGS = ("-DQAHIRA_W512", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                "-mavx512vnni")
WIDTH_SOURCES = ("cpu_intdot.c", "cpu_qbara.c", "cpu_dequant_gemm.c")  # AVX2 + AVX512_FLAGS
# cpu_dequant_gemm.c's third build: AVX512-BF16's vdpbf16ps (entry point *_avx512_bf16).
BF16DOT_SOURCE = "cpu_dequant_gemm.c"
BF16DOT_FLAGS = (*AVX512_FLAGS, "-mavx512bf16", "-DQAHIRA_BF16DOT")
# ... and a fourth: AMX tiles (tdpbf16ps), entry point *_amx.
AMX_FLAGS = (*BF16DOT_FLAGS, "-mamx-tile", "-mamx-bf16", "-DQAHIRA_AMX")
# Entry points of the AVX-512 objects: absent from the library when the compiler lacks the flags.
AVX512_FUNCTIONS = ("qahira_cpu_intdot_avx512", "qahira_qbara_layer_avx512",
                    "qahira_cpu_dequant_gemm_avx512")
BF16DOT_FUNCTION = "qahira_cpu_dequant_gemm_avx512_bf16"
AMX_FUNCTION = "qahira_cpu_dequant_gemm_amx"
AMX_LOOP_ORDER_FUNCTION = "qahira_cpu_dequant_gemm_amx_chunks_outside"  # same object
# Rows per pass of the AVX-512 and AVX512-BF16 builds (in their objects, absent with them).
WIDE_BLOCK_ROWS_FUNCTIONS = ("qahira_cpu_dequant_gemm_avx512_block_rows",
                             "qahira_cpu_dequant_gemm_avx512_bf16_block_rows")
ISA_ENV = "QAHIRA_CPU_ISA"  # caps the builds used: "avx2" forces the AVX2 ones (ISA_ORDER)
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # cpu_common.h

_lib: ctypes.CDLL | None = None
_lib_error: str | None = None
_avx512_build_error: str | None = None
_bf16dot_build_error: str | None = None
_amx_build_error: str | None = None
_variants: tuple[ctypes.CDLL | None, tuple[str, ...]] | None = None
_dq_variants: tuple[ctypes.CDLL | None, tuple[str, ...]] | None = None


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


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{cmd[0]} failed on {what} in {HERE}:\n{proc.stderr[-2000:]}")


def _build(compiler: str) -> Path:
    global _avx512_build_error, _bf16dot_build_error, _amx_build_error
    digest = hashlib.sha256(" ".join([compiler, *CFLAGS, *AVX512_FLAGS, *AMX_FLAGS]).encode())
    for name in (*SOURCES, *HEADERS):
        digest.update((HERE / name).read_bytes())
    out = cache_dir() / f"qahira_cpu-{digest.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name, suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        with tempfile.TemporaryDirectory(dir=out.parent) as objdir:
            # Each WIDTH_SOURCES file twice: AVX2 object, AVX-512 object (same logic, wider
            # vectors). The AVX-512 ones are built on every machine whose compiler knows the
            # flags, so they are compiled (and tested to link) even where they cannot run; all
            # or none of them, so one variant list holds for every kernel.
            objs, wide, wide_error = [], [], None
            for name in WIDTH_SOURCES:
                src, stem = str(HERE / name), str(Path(objdir) / Path(name).stem)
                _run([compiler, *CFLAGS, "-c", src, "-o", stem + "_avx2.o"], name)
                objs.append(stem + "_avx2.o")
                if wide_error is None:
                    try:
                        _run([compiler, *CFLAGS, *AVX512_FLAGS, "-c", src, "-o",
                              stem + "_avx512.o"], f"{name} (AVX-512 build)")
                        wide.append(stem + "_avx512.o")
                    except RuntimeError as e:  # an old compiler: serve with AVX2 builds only
                        wide_error = _avx512_build_error = str(e)
            objs += [] if wide_error else wide
            if wide_error is None:
                stem = str(Path(objdir) / Path(BF16DOT_SOURCE).stem)
                for flags, suffix, what in ((BF16DOT_FLAGS, "_avx512_bf16", "AVX512-BF16"),
                                            (AMX_FLAGS, "_amx", "AMX")):
                    try:
                        _run([compiler, *CFLAGS, *flags, "-c", str(HERE / BF16DOT_SOURCE),
                              "-o", stem + suffix + ".o"], f"{BF16DOT_SOURCE} ({what} build)")
                        objs.append(stem + suffix + ".o")
                    except RuntimeError as e:  # an older compiler: the other builds
                        if what == "AMX":
                            _amx_build_error = str(e)
                        else:
                            _bf16dot_build_error = str(e)
                        break
            others = [str(HERE / s) for s in SOURCES if s not in WIDTH_SOURCES]
            _run([compiler, *CFLAGS, "-o", tmp, *objs, *others], ", ".join(SOURCES))
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _declare(lib: ctypes.CDLL) -> None:
    from .ops import C_FUNCTIONS  # here, not at the top: ops imports this module

    for name, argtypes in C_FUNCTIONS.items():
        if (name in (*AVX512_FUNCTIONS, BF16DOT_FUNCTION, AMX_FUNCTION, AMX_LOOP_ORDER_FUNCTION,
                     *WIDE_BLOCK_ROWS_FUNCTIONS) and not hasattr(lib, name)):
            continue  # not built by this compiler (intdot_variants() says why)
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


def intdot_built_variants() -> tuple[str, ...]:
    """The builds of the WIDTH_SOURCES kernels (cpu_intdot.c's integer-dot ops, cpu_qbara.c's
    multi-adapter layer) in the library: ("avx2", "avx512"), or ("avx2",) when the compiler
    could not build the AVX-512 objects; () without a library."""
    lib = load_library()
    if lib is None:
        return ()
    return ("avx2", "avx512") if all(hasattr(lib, f) for f in AVX512_FUNCTIONS) else ("avx2",)


def intdot_variants() -> tuple[str, ...]:
    """The builds of the integer-dot kernels this CPU can run, slowest first: "avx2" always
    (with the library), "avx512" when built and CPUID reports AVX-512 F/BW/VL/DQ + VNNI with
    OS support."""
    global _variants
    lib = load_library()
    if _variants is None or _variants[0] is not lib:  # CPUID once per loaded library
        built = intdot_built_variants()
        if "avx512" in built and not lib.qahira_cpu_avx512_ok():
            built = built[:1]
        _variants = (lib, built)
    return _variants[1]


ISA_ORDER = ("avx2", "avx512", "avx512_bf16", "amx")  # the names $QAHIRA_CPU_ISA takes


def _pick_variant(variants: tuple[str, ...]) -> str:
    """The widest of `variants` (one kernel family's builds this CPU runs), capped by
    $QAHIRA_CPU_ISA: a family without the named build takes its widest narrower one (so
    QAHIRA_CPU_ISA=amx leaves the integer-dot kernels on avx512).

    Raises RuntimeError without a library, ValueError for a $QAHIRA_CPU_ISA that is not a build
    name or that this CPU or library cannot run (naming the ones it can)."""
    if not variants:
        raise RuntimeError(f"qahira's CPU kernels are unavailable: {library_error()}")
    want = os.environ.get(ISA_ENV, "").strip().lower()
    if not want:
        return variants[-1]
    runs = dequant_gemm_variants()  # every build this machine runs, of any family
    if want not in runs:
        failed = _avx512_build_error or _bf16dot_build_error or _amx_build_error
        why = f" (a build failed: {failed})" if failed else ""
        raise ValueError(f"{ISA_ENV}={want!r}: this machine runs only {', '.join(runs)}{why}; "
                         f"unset it or choose one of those")
    return [v for v in variants if ISA_ORDER.index(v) <= ISA_ORDER.index(want)][-1]


def intdot_variant() -> str:
    """The build the integer-dot ops use: the widest in intdot_variants(), capped by
    $QAHIRA_CPU_ISA (e.g. QAHIRA_CPU_ISA=avx2 for comparisons); raises as _pick_variant."""
    return _pick_variant(intdot_variants())


def dequant_gemm_variants() -> tuple[str, ...]:
    """The builds of cpu_dequant_gemm.c this CPU can run: intdot_variants(), then
    "avx512_bf16" when built and CPUID reports AVX512-BF16 as well, then "amx" when built, CPUID
    reports AMX-TILE/AMX-BF16 and the OS grants this process the tile state."""
    global _dq_variants
    variants = intdot_variants()
    lib = load_library()
    if lib is None or (_dq_variants is not None and _dq_variants[0] is lib):
        return _dq_variants[1] if lib is not None else ()
    if "avx512" in variants and hasattr(lib, BF16DOT_FUNCTION) and lib.qahira_cpu_bf16_ok():
        variants = (*variants, "avx512_bf16")
        if hasattr(lib, AMX_FUNCTION) and lib.qahira_cpu_amx_ok():
            variants = (*variants, "amx")
    _dq_variants = (lib, variants)
    return variants


def dequant_gemm_built_variants() -> tuple[str, ...]:
    """The builds of cpu_dequant_gemm.c in the library (whether or not this CPU runs them)."""
    lib = load_library()
    built = intdot_built_variants()
    extra = [v for v, f in (("avx512_bf16", BF16DOT_FUNCTION), ("amx", AMX_FUNCTION))
             if lib is not None and hasattr(lib, f)]
    return (*built, *extra)


def dequant_gemm_variant() -> str:
    """The build ops.cpu_dequant_gemm uses: the widest of dequant_gemm_variants(), capped by
    $QAHIRA_CPU_ISA; raises as _pick_variant."""
    return _pick_variant(dequant_gemm_variants())


# cpu_qbara.c is built and chosen exactly as cpu_intdot.c (same flags, both AVX-512 objects or
# neither, same CPUID check), so its builds are these: one definition, a name for each caller.
qbara_built_variants, qbara_variants, qbara_variant = \
    intdot_built_variants, intdot_variants, intdot_variant
