"""qahira_kernels: the raw kernels of qahira (ships from the repo's kernels/ folder).

A leaf library: it imports nothing of its users, only torch (and Triton, for the GPU kernels,
on first use).

- `qahira_kernels.ops`: every raw op in one place: the torch ops `torch.ops.qahira.*`
  (triton_blockwise, cpu_int4, cpu_int8, cpu_blockwise) and the C library's entry points.
- `qahira_kernels.blockwise_gemm`: Triton y = x @ W^T for block-wise INT4/INT8 weights.
- `qahira_kernels.qbara`: Triton multi-adapter Q-BaRA shrink (fused pooling) and expand (fused
  repeat), and QA-HiRA (`qahira_apply`).
- `qahira_kernels.cpu_lib`: builds and loads the C kernels (cpu_intdot.c, cpu_blockwise.c,
  cpu_qbara.c) once per machine; `cpu_qbara`: the compiled multi-adapter Q-BaRA layer.
- `qahira_kernels.layouts`: weight layouts the ops read, made from plain tensors.
- `qahira_kernels.reference`: fp32 torch references of the Q-BaRA and QA-HiRA kernels.
- `qahira_kernels.aot_compile`: compiles the Triton kernels to cubins without a GPU.

The kernel interface and the choice among kernels belong to the user (docs/KERNELS.md).
Importing this package imports neither Triton nor CUDA: submodules load on first use, so it
works on CPU-only machines. Kernels are decorated when their module is first imported; under
TRITON_INTERPRET=1 (set before that import) they run on CPU tensors in Triton's interpreter.
See docs/KERNELS.md.
"""

from __future__ import annotations

import importlib

_SUBMODULES = ("ops", "blockwise_gemm", "qbara", "cpu_lib", "cpu_qbara", "layouts", "reference")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_SUBMODULES)
