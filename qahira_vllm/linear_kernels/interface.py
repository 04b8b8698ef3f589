"""The linear-kernel interface (as vLLM's MPLinearKernel): what a layer needs, what a kernel does.

    ok, why = KernelCls.can_implement(spec)     # (True, None) or (False, reason)
    kernel = KernelCls(spec); kernel.prepare(layer)   # repack layer.qweight/scales/offsets once
    y = kernel.apply(layer, x, bias)

The on-disk format never changes; prepare() may repack in memory (documented per kernel).
Nothing here imports vLLM: the same kernels serve the plugin, the trainer and the tests.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LinearSpec:
    bits: int
    block_size: tuple[int, int]
    out_features: int  # of this partition
    in_features: int   # of this partition
    act_dtype: torch.dtype
    device_type: str   # "cpu" | "cuda" | ...
    scale_dtype: torch.dtype = torch.float16  # stored scales (float32 only in format 2)


class LinearKernel(ABC):
    """One way to compute y = x W^T (+ bias) for a qahira layer.

    `name` is the kernel's one name: its module, its op and its entry in
    QAHIRA_DISABLED_KERNELS (see qahira_vllm.linear_kernels).
    """

    name = "abstract"

    def __init__(self, spec: LinearSpec):
        self.spec = spec

    @classmethod
    @abstractmethod
    def can_implement(cls, spec: LinearSpec) -> tuple[bool, str | None]:
        """(True, None), or (False, why) in a few words a log line can show."""

    @abstractmethod
    def prepare(self, layer: torch.nn.Module) -> None:
        """Turn layer.qweight/scales/offsets (as stored) into what apply() reads."""

    @abstractmethod
    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., in] -> y [..., out] in x's dtype."""


def fp16_scales_only(spec: LinearSpec) -> str | None:
    """can_implement's reason for a kernel that reads float16 scales only, or None: format 2's
    float32 scales then go to a kernel that reads them as stored (cpu_int4 / cpu_int8,
    cpu_blockwise, dequant_torch)."""
    if spec.scale_dtype == torch.float16:
        return None
    return f"float16 scales only ({str(spec.scale_dtype).removeprefix('torch.')} scales)"


def set_buffer(layer: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace a parameter or buffer by a non-persistent buffer (kernels' repacked tensors)."""
    if name in layer._parameters:
        del layer._parameters[name]
    layer.register_buffer(name, value, persistent=False)
