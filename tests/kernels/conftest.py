"""Kernel tests run every Triton kernel on CPU tensors, in Triton's interpreter.

Run them with TRITON_INTERPRET=1 in the environment of the pytest command (the project's test
command sets it for the whole suite; see docs/KERNELS.md):

    TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/kernels -q

Triton decides "interpret or compile" when @triton.jit runs, and its own library functions
(tl.zeros, tl.sum, tl.cdiv, ...) are decorated when triton is first imported. So the variable
must be set before anything imports triton. This conftest sets it too, which is enough when
`pytest tests/kernels` runs alone; it also reloads our kernel modules if another test module
imported them earlier. If triton itself was imported earlier without the variable, the kernel
tests fail with a message saying so (nothing can repair that inside the process).
"""

import importlib
import os
import sys

import pytest

os.environ["TRITON_INTERPRET"] = "1"   # stays set: Triton reads it again while kernels run

from qahira_kernels._triton_utils import is_interpreted  # noqa: E402

_KERNEL_MODULES = {
    "qahira_kernels.blockwise_gemm": "_fused_gemm_kernel",
    "qahira_kernels.qbara": "_qbara_shrink_kernel",
}


def _triton_library_interpreted() -> bool:
    import triton.language as tl

    return is_interpreted(tl.zeros)


if _triton_library_interpreted():
    for _name, _kernel in _KERNEL_MODULES.items():
        _mod = sys.modules.get(_name)
        if _mod is not None and not is_interpreted(getattr(_mod, _kernel)):
            importlib.reload(_mod)


@pytest.fixture(autouse=True)
def _require_triton_interpreter():
    if not _triton_library_interpreted():
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set, so its kernels "
                    "cannot run on CPU: run pytest with TRITON_INTERPRET=1 in the environment",
                    pytrace=False)


@pytest.fixture(params=("avx2", "avx512"))
def variant(request):
    """Each build of the width-built C sources (cpu_intdot.c, cpu_qbara.c) this CPU runs
    (cpu_lib.intdot_variants() = qbara_variants()); the build is in the test id, and one this
    CPU cannot run is reported as skipped with the reason."""
    from qahira_kernels import cpu_lib

    runs = cpu_lib.intdot_variants()
    if request.param not in runs:
        pytest.skip(f"{request.param} build not run: this CPU runs only {runs} "
                    f"(built: {cpu_lib.intdot_built_variants()})")
    return request.param
