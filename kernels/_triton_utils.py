"""Small helpers shared by the Triton kernels of this package."""

from __future__ import annotations

import functools

import torch
import triton

# Activation dtypes the kernels take. fp32 activations go to the torch paths instead.
ACT_DTYPES = (torch.float16, torch.bfloat16)


def is_interpreted(kernel) -> bool:
    """Whether `kernel` was decorated under TRITON_INTERPRET=1 (numpy interpreter, CPU tensors).

    The decision is made once, when triton.jit runs (module import), so ask the kernel object
    rather than the environment.
    """
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - very old/new triton
        return False
    return isinstance(kernel, InterpretedFunction)


def upcast_dot_operands(kernel, dtype: torch.dtype) -> bool:
    """The interpreter's tl.dot multiplies the raw bits of bf16 operands: feed it fp32 instead.

    Products of bf16 values are exact in fp32, so the upcast computes what the GPU's
    bf16 x bf16 -> fp32 MMA computes (up to summation order). fp16 keeps the real path.
    """
    return dtype == torch.bfloat16 and is_interpreted(kernel)


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device`; 132 (H100/H200) for the CPU interpreter."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_sm_count(index)
    return 132


def check_act_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in ACT_DTYPES:
        raise ValueError(f"{name} is {t.dtype}: the Triton kernels take fp16 or bf16")


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))
