"""qahira_kernels: Triton kernels for qahira's GPU path (ships from the repo's kernels/ folder).

- `qahira_kernels.blockwise_gemm`: y = x @ W^T for block-wise INT4/INT8 weights with float offsets.
- `qahira_kernels.qbara`: multi-adapter Q-BaRA shrink (fused pooling) and expand (fused repeat).
- `qahira_kernels.linear`: TritonBlockwiseLinearKernel for qahira_vllm.linear_kernels; register().
- `qahira_kernels.reference`: fp32 torch references of all of the above.

Importing this package imports neither Triton nor CUDA: submodules load on first use, so it
works on CPU-only machines. Kernels are decorated when their module is first imported; under
TRITON_INTERPRET=1 (set before that import) they run on CPU tensors in Triton's interpreter.
See docs/KERNELS.md.
"""

from __future__ import annotations

import importlib

_SUBMODULES = ("blockwise_gemm", "qbara", "linear", "reference")


def register() -> None:
    """Register TritonBlockwiseLinearKernel ahead of the torch kernels (it claims CUDA only)."""
    from .linear import register as _register

    _register()


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["register", *_SUBMODULES]
