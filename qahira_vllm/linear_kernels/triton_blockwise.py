"""`TritonBlockwiseKernel` (triton_blockwise): qahira_kernels' Triton block-wise GEMM, CUDA.

This module imports no Triton at import time, so `can_implement` can answer (False) on a
machine without Triton or GPU.
"""

from __future__ import annotations

import importlib.util

import torch

from qahira_kernels import ops  # noqa: F401  (registers torch.ops.qahira.triton_blockwise)

from .interface import LinearKernel, LinearSpec, fp16_scales_only, set_buffer

SUPPORTED_BITS = (4, 8)
SUPPORTED_ACT_DTYPES = (torch.float16, torch.bfloat16)


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


class TritonBlockwiseKernel(LinearKernel):
    """Triton fused dequant GEMM (split-K at small M, dequant + cuBLAS at large M).

    Accepts every block shape the format allows (any bo dividing out, any bi dividing in;
    4-bit also needs in % 8 == 0): bi a multiple of 16 takes the per-tile scale path, other
    bi the per-element path (see qahira_kernels.blockwise_gemm).

    prepare() keeps `qweight` as stored and replaces `scales`/`offsets` with transposed
    copies `scales_t`/`offsets_t` [in/bi, out/bo] (dtypes kept). apply() calls the op
    torch.ops.qahira.triton_blockwise (qahira_kernels.ops).
    """

    name = "triton_blockwise"

    @classmethod
    def can_implement(cls, spec: LinearSpec) -> tuple[bool, str | None]:
        if spec.device_type != "cuda":
            return False, f"CUDA only (layer is on {spec.device_type})"
        if spec.bits not in SUPPORTED_BITS:
            return False, f"bits={spec.bits}: 4 or 8 only"
        if why := fp16_scales_only(spec):
            return False, why
        if spec.act_dtype not in SUPPORTED_ACT_DTYPES:
            return False, f"{spec.act_dtype} activations: fp16/bf16 only"
        bo, bi = spec.block_size
        if bo < 1 or bi < 1 or spec.out_features % bo or spec.in_features % bi:
            return False, (f"block [{bo}, {bi}] does not tile the layer "
                           f"[out={spec.out_features}, in={spec.in_features}]")
        if spec.bits == 4 and spec.in_features % 8:
            return False, f"4-bit needs in % 8 == 0 (int32 packing), in={spec.in_features}"
        if not _triton_available():
            return False, "triton is not installed"
        if (spec.act_dtype == torch.bfloat16 and torch.cuda.is_available()
                and torch.cuda.get_device_capability()[0] < 8):
            return False, "bf16 needs compute capability >= 8.0"
        return True, None

    def prepare(self, layer: torch.nn.Module) -> None:
        from qahira_kernels.blockwise_gemm import pack_blockwise_weight  # imports triton

        spec = self.spec
        w = pack_blockwise_weight(layer.qweight.data, layer.scales.data, layer.offsets.data,
                                  spec.bits, spec.block_size)
        if (w.out_features, w.in_features) != (spec.out_features, spec.in_features):
            raise ValueError(f"layer tensors give W [{w.out_features}, {w.in_features}], spec "
                             f"says [{spec.out_features}, {spec.in_features}]")
        set_buffer(layer, "qweight", w.qweight)
        for name in ("scales", "offsets"):
            delattr(layer, name)
        set_buffer(layer, "scales_t", w.scales_t)
        set_buffer(layer, "offsets_t", w.offsets_t)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        # Through the op: torch.compile sees one node, not the launch code.
        act = self.spec.act_dtype
        bo, bi = self.spec.block_size
        x_act = x if x.dtype == act else x.to(act)
        y = torch.ops.qahira.triton_blockwise(x_act, layer.qweight, layer.scales_t,
                                              layer.offsets_t, bias, self.spec.bits, bo, bi)
        return y if y.dtype == x.dtype else y.to(x.dtype)
