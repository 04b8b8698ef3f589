"""QuantLinear: a frozen linear layer that keeps a qahira layer's stored tensors packed.

The weight is W = scales * q + offsets per block in fp32, bit-identical to
qahira_vllm.quant_math.dequantize. It is rebuilt on every forward
and again in backward instead of being saved for it, as QLoRA does, so memory stays at
~bits/8 bytes per weight. These are the same stored tensors and the same fp32
formula vLLM's qahira kernels serve. Gradients flow to the input only.

Where W is rebuilt depends on the buffers' device: on CPU the compiled C kernel
(qahira_kernels.ops.cpu_blockwise_dequant), on CUDA qahira_kernels' Triton dequantization kernel
(blockwise_gemm.dequantize_weight, the dense path of the serving GEMM), writing W in the matmul
dtype (fp32/fp16 directly, bf16 through one fp32 copy: see dequantize_triton). Both compute s * q + z in fp32 and equal quant_math.dequantize bit for bit
(s * q is exact in fp32: an 11-bit fp16 significand times an 8-bit integer, so fusing the add
into an FMA rounds the same way).
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from ..format import QahiraQuantConfig, validate_layer_tensors
from ..quant_math import dequantize


def dequantize_triton(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                      cfg: QahiraQuantConfig, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W [out, in] in `dtype` (fp32, bf16 or fp16) from the stored tensors, by qahira_kernels'
    Triton kernel (blockwise_gemm.dequantize_weight): s * q + z in fp32, rounded once to
    `dtype`, so it equals quant_math.dequantize(...).to(dtype) bit for bit.

    qweight int32 [out, in/8] (4-bit) or uint8 [out, in] (8-bit); scales fp16 and offsets
    fp16/fp32 [out/bo, in/bi]. The CUDA path of QuantLinear; on CPU tensors it runs only in
    Triton's interpreter (TRITON_INTERPRET=1), which is how the tests check it. Raises
    ValueError for tensors that do not match cfg (pack_blockwise_weight's checks).
    """
    from qahira_kernels.blockwise_gemm import dequantize_weight, pack_blockwise_weight

    # The kernel reads scales/offsets transposed; the copy is ~1/(bo*bi*2) of W's bytes, so it
    # is redone per call rather than kept next to the stored buffers.
    packed = pack_blockwise_weight(qweight, scales, offsets, cfg.bits, cfg.block_size)
    if dtype in (torch.float32, torch.float16):
        return dequantize_weight(packed, dtype)
    # bf16: the kernel's fp32 -> bf16 store rounds to nearest-even on a GPU but truncates in
    # Triton's interpreter, so only the fp32 result can be checked here; torch rounds it
    # (a transient fp32 copy of one layer's W).
    return dequantize_weight(packed, torch.float32).to(dtype)


@functools.lru_cache(maxsize=None)
def _has_triton() -> bool:
    # torch's CUDA wheels ship Triton; without it CUDA falls back to quant_math (same bits).
    return importlib.util.find_spec("triton") is not None


def _dequantize(qweight, scales, offsets, cfg: QahiraQuantConfig,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W in `dtype`, the same bits on every path (fp32 math, rounded once to `dtype`).

    CUDA: the Triton kernel (dequantize_triton) when triton is installed. CPU: the
    compiled kernel (qahira_kernels.ops.cpu_blockwise_dequant, ~7x faster than torch here)
    when it is available and the buffers still have their stored dtypes (a `model.to(dtype)`
    also casts them), else quant_math.dequantize."""
    if qweight.device.type == "cuda" and scales.dtype == torch.float16 and _has_triton():
        return dequantize_triton(qweight, scales, offsets, cfg, dtype)
    return _dequantize_fp32(qweight, scales, offsets, cfg).to(dtype)


def _dequantize_fp32(qweight, scales, offsets, cfg: QahiraQuantConfig) -> torch.Tensor:
    if qweight.device.type == "cpu":
        from qahira_kernels import cpu_lib, ops

        if (cpu_lib.load_library() is not None
                and ops.cpu_blockwise_stored_ok(qweight, scales, offsets, cfg.bits)):
            return ops.cpu_blockwise_dequant(qweight, scales, offsets, cfg.bits, *cfg.block_size,
                                             scales.shape[1] * cfg.block_size[1])
    return dequantize(qweight, scales, offsets, cfg)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The activation dtype matmuls run in: autocast's when it is on, else the input's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class _DequantLinear(torch.autograd.Function):
    """y = x W^T (+ bias), with W rebuilt from the packed tensors in backward (not saved)."""

    @staticmethod
    def forward(ctx, x, qweight, scales, offsets, bias, cfg: QahiraQuantConfig):
        dtype = _compute_dtype(x)
        w = _dequantize(qweight, scales, offsets, cfg, dtype)
        ctx.save_for_backward(qweight, scales, offsets)
        ctx.cfg, ctx.dtype, ctx.x_dtype = cfg, dtype, x.dtype
        return F.linear(x.to(dtype), w, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad_y):
        if not ctx.needs_input_grad[0]:
            return (None,) * 6
        qweight, scales, offsets = ctx.saved_tensors
        w = _dequantize(qweight, scales, offsets, ctx.cfg, ctx.dtype)
        grad_x = (grad_y.to(ctx.dtype) @ w).to(ctx.x_dtype)
        return grad_x, None, None, None, None, None


class QuantLinear(nn.Module):
    """Frozen block-quantized linear layer (format_version 1 tensors as buffers)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                 cfg: QahiraQuantConfig, in_features: int, out_features: int,
                 bias: torch.Tensor | None = None, name: str = "layer"):
        super().__init__()
        validate_layer_tensors(name, {"qweight": qweight, "scales": scales, "offsets": offsets},
                               out_features, in_features, cfg)
        self.cfg = cfg
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("offsets", offsets)
        # A frozen bias stays a buffer: nothing in the base is trainable.
        self.register_buffer("bias", None if bias is None else bias.detach())

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The effective weight [out, in] exactly as served (fp32 math)."""
        return dequantize(self.qweight, self.scales, self.offsets, self.cfg, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DequantLinear.apply(x, self.qweight, self.scales, self.offsets, self.bias,
                                    self.cfg)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.cfg.bits}, block_size={list(self.cfg.block_size)}, "
                f"bias={self.bias is not None}")
