"""The kernels as torch custom ops, so torch.compile (vLLM compiles the model) sees one opaque
node per call instead of tracing the Python launch code.

    torch.ops.qahira.blockwise_gemm(x, qweight, scales_t, offsets_t, bias, bits, bo, bi) -> y
    torch.ops.qahira.qbara_apply(y, x, A, B, pool, repeat, rank, scaling, slot_idx,
                                 seg_order, seg_start, seg_count)            # y updated in place

Arguments are those of qahira_kernels.blockwise_gemm.blockwise_gemm (with the repacked weight
passed as its tensors) and qahira_kernels.qbara.qbara_apply (segments optional, as tensors).
Importing this module registers the ops once per process.
"""

from __future__ import annotations

import torch

from . import blockwise_gemm as _bg
from . import qbara as _qb


@torch.library.custom_op("qahira::blockwise_gemm", mutates_args=())
def blockwise_gemm(x: torch.Tensor, qweight: torch.Tensor, scales_t: torch.Tensor,
                   offsets_t: torch.Tensor, bias: torch.Tensor | None, bits: int, bo: int,
                   bi: int) -> torch.Tensor:
    n = qweight.shape[0]
    k = qweight.shape[1] * (_bg.INT4_PER_WORD if bits == 4 else 1)
    weight = _bg.PackedBlockwiseWeight(qweight, scales_t, offsets_t, bits, (bo, bi), n, k)
    return _bg.blockwise_gemm(x, weight, bias)


@blockwise_gemm.register_fake
def _blockwise_gemm_fake(x, qweight, scales_t, offsets_t, bias, bits, bo, bi):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@torch.library.custom_op("qahira::qbara_apply", mutates_args=("y",))
def qbara_apply(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                pool: torch.Tensor, repeat: torch.Tensor, rank: torch.Tensor,
                scaling: torch.Tensor, slot_idx: torch.Tensor,
                seg_order: torch.Tensor | None = None, seg_start: torch.Tensor | None = None,
                seg_count: torch.Tensor | None = None) -> None:
    segments = None
    if seg_order is not None:
        segments = _qb.TokenSegments(seg_order, seg_start, seg_count)
    _qb.qbara_apply(y, x, A, B, pool, repeat, rank, scaling, slot_idx, segments=segments)


@qbara_apply.register_fake
def _qbara_apply_fake(y, x, A, B, pool, repeat, rank, scaling, slot_idx, seg_order=None,
                      seg_start=None, seg_count=None):
    return None
