"""Kernel tests run every Triton kernel on CPU tensors, in Triton's interpreter.

The project's test command sets TRITON_INTERPRET=1 for the whole suite (see docs/KERNELS.md);
it is set here as well so `pytest tests/kernels` works on its own. It must stay set while the
tests run (Triton checks it again inside constexpr helpers), so it is not restored.

Triton decides "interpret or compile" when @triton.jit runs, i.e. when a kernel module is first
imported. If another test module imported one of them earlier without the variable, that
module is reloaded here so its kernels are interpreted.
"""

import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

from qahira_kernels._triton_utils import is_interpreted  # noqa: E402

_KERNEL_MODULES = {
    "qahira_kernels.blockwise_gemm": "_fused_gemm_kernel",
    "qahira_kernels.qbara": "_qbara_shrink_kernel",
}

for _name, _kernel in _KERNEL_MODULES.items():
    _mod = sys.modules.get(_name)
    if _mod is not None and not is_interpreted(getattr(_mod, _kernel)):
        importlib.reload(_mod)
