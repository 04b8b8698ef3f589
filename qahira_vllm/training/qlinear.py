"""QuantLinear: a frozen linear layer that keeps a qahira layer's stored tensors packed.

The weight is W = scales * q + offsets per block in fp32, bit-identical to
qahira_vllm.quant_math.dequantize. It is rebuilt on every forward
and again in backward instead of being saved for it, as QLoRA does, so memory stays at
~bits/8 bytes per weight. These are the same stored tensors and the same fp32
formula vLLM's qahira kernels serve. Gradients flow to the input only.

Where W is rebuilt depends on the buffers' device: on CPU the compiled C kernel
(qahira_kernels.ops.cpu_blockwise_dequant), on CUDA qahira_kernels' Triton dequantization kernel
(blockwise_gemm.dequantize_weight, the dense path of the serving GEMM), writing W in the matmul
dtype (fp32/fp16 directly, bf16 through one fp32 copy: see dequantize_triton). Both compute
s * q + z in fp32 and equal quant_math.dequantize bit for bit (with fp16 scales s * q is exact
in fp32, an 11-bit significand times an 8-bit integer, so fusing the add into an FMA rounds the
same way; format 2's fp32 scales round the product first, which the C kernel does and the
Triton path is not used for).
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from ..adapter_math import pool_sum, qahira_delta_blocks, qbara_to_lora
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
                dtype: torch.dtype = torch.float32, reuse: bool = False) -> torch.Tensor:
    """W in `dtype`, the same bits on every path (fp32 math, rounded once to `dtype`).

    CUDA: the Triton kernel (dequantize_triton) when triton is installed. CPU: the
    compiled kernel (qahira_kernels.ops.cpu_blockwise_dequant, ~7x faster than torch here),
    which writes `dtype` directly, when it is available and the buffers still have their
    stored dtypes (a `model.to(dtype)` also casts them), else quant_math.dequantize.
    reuse: write into this thread's buffer for the shape (ops.reused_buffer); the result is then
    valid only until the next reuse call of the same shape, so only for a W that is consumed
    at once and not saved (the autograd functions below)."""
    if qweight.device.type == "cuda" and scales.dtype == torch.float16 and _has_triton():
        return dequantize_triton(qweight, scales, offsets, cfg, dtype)
    if qweight.device.type == "cpu":
        from qahira_kernels import cpu_lib, ops

        if (cpu_lib.load_library() is not None and dtype in cpu_lib.DTYPE_CODES
                and ops.cpu_blockwise_stored_ok(qweight, scales, offsets, cfg.bits)):
            in_features = scales.shape[1] * cfg.block_size[1]
            out = ops.reused_buffer((qweight.shape[0], in_features), dtype) if reuse else None
            return ops.cpu_blockwise_dequant(qweight, scales, offsets, cfg.bits,
                                             *cfg.block_size, in_features, dtype, out)
    return dequantize(qweight, scales, offsets, cfg).to(dtype)


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
        w = _dequantize(qweight, scales, offsets, cfg, dtype, reuse=True)
        ctx.save_for_backward(qweight, scales, offsets)
        ctx.cfg, ctx.dtype, ctx.x_dtype = cfg, dtype, x.dtype
        return F.linear(x.to(dtype), w, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad_y):
        if not ctx.needs_input_grad[0]:
            return (None,) * 6
        qweight, scales, offsets = ctx.saved_tensors
        w = _dequantize(qweight, scales, offsets, ctx.cfg, ctx.dtype, reuse=True)
        grad_x = (grad_y.to(ctx.dtype) @ w).to(ctx.x_dtype)
        return grad_x, None, None, None, None, None


def qahira_merges_into_offsets(cfg: QahiraQuantConfig, pool: int, repeat: int,
                               dropout: float) -> bool:
    """Whether a QA-HiRA (pi = pool, qo = repeat) on a layer quantized with cfg can run as its
    merged layer (_MergedQAHiRALinear): its qo x pi tiles hold whole blocks (the exact-merge
    condition) and it has no dropout (which makes the delta depend on x)."""
    bo, bi = cfg.block_size
    return dropout == 0 and repeat % bo == 0 and pool % bi == 0


def _group_sums(t: torch.Tensor, n: int) -> torch.Tensor:
    """fp32 [..., d/n]: the sum of each n adjacent entries of t's last dim (adapter_math.pool_sum's
    values, another summation order), by one reduction over a contiguous size-n dim: for n = 32
    on [512, 1024] / [512, 2816] CPU tensors 0.13 / 0.39 ms against pool_sum's n strided adds'
    2.0 / 9.2 ms (1 thread), and no fp32 copy of a bf16 t."""
    if n == 1:
        return t.to(torch.float32)
    return t.unflatten(-1, (t.shape[-1] // n, n)).sum(-1, dtype=torch.float32)


class _MergedQAHiRALinear(torch.autograd.Function):
    """base(x) + QA-HiRA(x) as ONE GEMM with the merged weight, W rebuilt from the packed tensors.

    When the adapter's tiles hold whole quantization blocks (qahira_merges_into_offsets), its
    dW = s * M[tile] / pi is constant on each block, so base + adapter is the layer
        W_eff = scales * q + (offsets + delta_blocks(M)),   delta_blocks = s * M[tile] / pi
    with fp32 offsets (adapter_math.qahira_delta_blocks). This is literally training the merged
    model that `qahira merge` writes and vLLM serves; the only difference is that merge rounds
    the shifted offsets to the stored offset dtype (fp16 by default), here they stay fp32.

    Forward: y = x W_eff^T (+ bias), no adapter GEMMs. Backward: grad_x = grad_y W_eff (rebuilt,
    not saved: only M is kept, and pool_sum(x, pi) [T, in/pi] fp32 when M needs a gradient) and
        grad_M = (s / pi) * pool_sum(grad_y, qo)^T @ pool_sum(x, pi)          (fp32)
    the sum over each tile of grad_y[t, o] * x[t, i] (the group sums by _group_sums). x [..., in]
    fp32/bf16/fp16 (matmuls in the autocast dtype when autocast is on, as _DequantLinear);
    M [out/qo, in/pi] fp32. Rounding against base(x) + adapter(x) computed separately: in fp32
    the dW is added to the offsets before the GEMM instead of to y after it (<= ~3e-7 of the
    terms' magnitude); under bf16 autocast W_eff is rounded to bf16 once and the adapter's own
    bf16 GEMM disappears (<= ~5e-3): tests/training/test_merged_qahira.py.
    """

    @staticmethod
    def forward(ctx, x, m, qweight, scales, offsets, bias, cfg: QahiraQuantConfig,
                pool: int, repeat: int, scaling: float):
        dtype = _compute_dtype(x)
        shifted = offsets.float() + qahira_delta_blocks(m.detach(), scaling, pool, repeat,
                                                         cfg.block_size)
        w = _dequantize(qweight, scales, shifted, cfg, dtype, reuse=True)
        x_pooled = _group_sums(x.detach(), pool) if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(m, qweight, scales, offsets, x_pooled)
        ctx.cfg, ctx.dtype, ctx.x_dtype = cfg, dtype, x.dtype
        ctx.geometry = (pool, repeat, scaling)
        return F.linear(x.to(dtype), w, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad_y):
        m, qweight, scales, offsets, x_pooled = ctx.saved_tensors
        pool, repeat, scaling = ctx.geometry
        grad_x = grad_m = None
        if ctx.needs_input_grad[0]:
            shifted = offsets.float() + qahira_delta_blocks(m, scaling, pool, repeat,
                                                             ctx.cfg.block_size)
            w = _dequantize(qweight, scales, shifted, ctx.cfg, ctx.dtype, reuse=True)
            grad_x = (grad_y.to(ctx.dtype) @ w).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            g = _group_sums(grad_y, repeat).flatten(0, -2)
            grad_m = (g.t() @ x_pooled.flatten(0, -2)).mul_(scaling / pool).to(m.dtype)
        return grad_x, grad_m, None, None, None, None, None, None, None, None


class _QBaRALinear(torch.autograd.Function):
    """base(x) + Q-BaRA(x) in one autograd node, W rebuilt from the packed tensors:

        y = x W^T + (x A'^T) B'^T,   A' = R_p(A^T)^T / p [R, in],   B' = R_q(B) s [out, R]

    (adapter_math.qbara_to_lora's rank-R LoRA, so P_p(x) is never formed: on CPU the strided
    pair sums and their broadcast backward cost more than the wider GEMMs), backward
        grad_h = g B'     grad_x = g W + grad_h A' (one addmm)
        grad_A = sum over each p columns of (grad_h^T x) / p     grad_B = s * sum over each q
        rows of (g^T h)
    with W written into the thread's reused buffer (ops.reused_buffer), forward and backward, and
    only x and h = x A'^T [T, R] kept. x [..., in] fp32/bf16/fp16, matmuls in the autocast dtype
    when autocast is on (as PEFT's LoRA under autocast); A [R, in/p], B [out/q, R] parameters,
    gradients in their dtypes. The same sums as QBaRA.add_delta on QuantLinear's output in
    another order: bounded against float64 in tests/training/test_qbara_linear.py.
    """

    @staticmethod
    def forward(ctx, x, a, b, qweight, scales, offsets, bias, cfg: QahiraQuantConfig,
                pool: int, repeat: int, scaling: float):
        dtype = _compute_dtype(x)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        a_expanded, b_expanded = _qbara_expanded(a.detach(), b.detach(), pool, repeat, scaling,
                                                 dtype)
        w = _dequantize(qweight, scales, offsets, cfg, dtype, reuse=True)
        h = x2 @ a_expanded.t()
        # in place: torch.addmm(y, ...) would first copy y into a new [T, out] result
        y = F.linear(x2, w, None if bias is None else bias.to(dtype)).addmm_(h, b_expanded.t())
        ctx.save_for_backward(a, b, qweight, scales, offsets, x2, h)
        ctx.cfg, ctx.dtype, ctx.x_dtype = cfg, dtype, x.dtype
        ctx.geometry = (pool, repeat, scaling)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        a, b, qweight, scales, offsets, x2, h = ctx.saved_tensors
        pool, repeat, scaling = ctx.geometry
        dtype = ctx.dtype
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(dtype)
        a_expanded, b_expanded = _qbara_expanded(a, b, pool, repeat, scaling, dtype)
        grad_x = grad_a = grad_b = None
        grad_h = g @ b_expanded if ctx.needs_input_grad[0] or ctx.needs_input_grad[1] else None
        if ctx.needs_input_grad[0]:
            w = _dequantize(qweight, scales, offsets, ctx.cfg, dtype, reuse=True)
            gx = torch.mm(g, w).addmm_(grad_h, a_expanded)
            grad_x = gx.to(ctx.x_dtype).view(*grad_y.shape[:-1], gx.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_a = (_group_sums(grad_h.t() @ x2, pool) / pool).to(a.dtype)
        if ctx.needs_input_grad[2]:
            # R_q's backward: the sum over each q adjacent rows of the gradient of B'
            grad_b = pool_sum(((g.t() @ h).to(b.dtype) * scaling).t(), repeat).t()
        return grad_x, grad_a, grad_b, None, None, None, None, None, None, None, None


def _qbara_expanded(a: torch.Tensor, b: torch.Tensor, pool: int, repeat: int, scaling: float,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(A' [R, in], B' = R_q(B) s [out, R]) in dtype from A [R, in/p], B [out/q, R]
    (adapter_math.qbara_to_lora): small, rebuilt per call."""
    a_expanded, b_repeated = qbara_to_lora(a, b, pool, repeat)
    return a_expanded.to(dtype), (b_repeated * scaling).to(dtype)


class QuantLinear(nn.Module):
    """Frozen block-quantized linear layer (the stored tensors as buffers).

    cfg: the model's config (or the layer's); the layer keeps `cfg.for_layer(name)`, its own
    bits / block / scale dtype (format 2 may give layers their own), so `name` must be the
    HF module name. Raises QahiraFormatError naming the layer for tensors that do not fit it.
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                 cfg: QahiraQuantConfig, in_features: int, out_features: int,
                 bias: torch.Tensor | None = None, name: str = "layer"):
        super().__init__()
        cfg = cfg.for_layer(name)
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
