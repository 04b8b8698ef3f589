"""References and inputs for the linear-kernel tests (qahira_kernels ops, qahira_vllm.linear_kernels).

The fp32 reference is the format's one dequantization, qahira_vllm.quant_math.dequantize (itself
checked against support.tiny's independent fp64 indexing in tests/test_quant_math.py and
tests/linear_kernels/test_dequant_torch_kernel.py), then x @ W^T.
"""

from __future__ import annotations

import torch

from qahira_vllm.format import QahiraQuantConfig
from qahira_vllm.quant_math import dequantize, pack_qweight


def dequantize_ref(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                   bits: int, block_size: tuple[int, int]) -> torch.Tensor:
    """W [N, K] in fp32 from stored (format_version 1) tensors."""
    cfg = QahiraQuantConfig(bits=bits, block_size=tuple(block_size))
    return dequantize(qweight, scales, offsets, cfg, torch.float32)


def linear_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
               offsets: torch.Tensor, bits: int, block_size: tuple[int, int],
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ bias) in fp32, x [..., K]."""
    y = x.to(torch.float32) @ dequantize_ref(qweight, scales, offsets, bits, block_size).t()
    return y if bias is None else y + bias.to(torch.float32)


def stored_tensors(out_f: int, in_f: int, bits: int, block: tuple[int, int],
                   offset_dtype: torch.dtype = torch.float16, seed: int = 0):
    """Random (qweight, scales, offsets) as stored: q over the full range, scales > 0, offsets
    of both signs."""
    bo, bi = block
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2 ** bits, (out_f, in_f), generator=g)
    scales = (0.002 + 0.02 * torch.rand(out_f // bo, in_f // bi, generator=g)).half()
    offsets = (0.1 * torch.randn(out_f // bo, in_f // bi, generator=g)).to(offset_dtype)
    return pack_qweight(q, bits), scales, offsets


def layer_of(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> torch.nn.Module:
    """A plain module holding the stored tensors as frozen Parameters (as vLLM's layers do)."""
    layer = torch.nn.Module()
    for name, t in (("qweight", qweight), ("scales", scales), ("offsets", offsets)):
        layer.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))
    return layer


# ---- cpu_int4: its documented error bound -------------------------------------------------
# The kernel quantizes activations to 16 bits per 32 columns, so outputs are compared with the
# kernel's own error bound, computed per output from the data (see kernels/cpu_intdot.c):
#     |y - y_ref| <= sum_c s_c * sum_{k in c} q_k * max|x_c| / 65534   (+ fp32 accumulation slack)
# plus the output dtype's rounding for bf16/fp16 outputs.

ROUNDING = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def int4_layer(out_f, in_f, block, seed=0, offset_dtype=torch.float16):
    """(layer, q, scales, offsets) of a random INT4 layer."""
    bo, bi = block
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.uint8)
    scales = ((0.15 + 0.1 * torch.rand(out_f // bo, in_f // bi, generator=g)) / 15).half()
    offsets = (-0.1 + 0.02 * torch.randn(out_f // bo, in_f // bi, generator=g)).to(offset_dtype)
    return layer_of(pack_qweight(q, 4), scales, offsets), q, scales, offsets


def _int4_bound(x, q, scales, block):
    """Per-output bound [M, N] of the activation-quantization error, plus fp32 slack."""
    from . import tiny as tm

    bo, bi = block
    x2 = x.reshape(-1, x.shape[-1]).double()
    m, k = x2.shape
    amax = x2.abs().view(m, k // 32, 32).amax(-1)                                  # [M, K/32]
    s = scales.double().repeat_interleave(bo, 0).repeat_interleave(bi // 32, 1)    # [N, K/32]
    qsum = q.double().view(q.shape[0], k // 32, 32).sum(-1)                        # [N, K/32]
    w_abs = tm.dequant_ref(q, scales, torch.zeros_like(scales), block).abs() + 0.2
    return amax / 65534 @ (s * qsum).t() + 1e-6 * (x2.abs() @ w_abs.t())


def check_int4(y, x, q, scales, offsets, block, bias=None) -> torch.Tensor:
    """Assert y is within the kernel's bound of support.tiny's fp64 reference; returns |err|."""
    from . import tiny as tm

    w_ref = tm.dequant_ref(q, scales, offsets, block)
    y_ref = x.double() @ w_ref.t()
    if bias is not None:
        y_ref = y_ref + bias.double()
    err = (y.double() - y_ref).reshape(-1, y.shape[-1]).abs()
    tol = (_int4_bound(x, q, scales, block)
           + ROUNDING[y.dtype] * y_ref.reshape(-1, y.shape[-1]).abs())
    if bias is not None:  # bias added to the rounded GEMM output, then rounded again
        tol = tol + ROUNDING[y.dtype] * (y_ref - bias.double()).reshape(-1, y.shape[-1]).abs()
    assert (err <= tol).all(), f"max excess {(err - tol).max().item():.3g}"
    return err


# ---- any kernel against support.tiny's independent fp64 dequantization ---------------------------

def layer_and_fp64_weight(out_f, in_f, bits, block, seed=0, offset_dtype=torch.float16):
    """A layer of random stored tensors, plus its fp64 weight computed independently
    (support.tiny.dequant_ref: indexing, no quant_math)."""
    from . import tiny as tm

    bo, bi = block
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 1 << bits, (out_f, in_f), generator=g, dtype=torch.uint8)
    qmax = (1 << bits) - 1
    # weights ~ U(-0.1, 0.1)-ish per block: scale ~ 0.2/qmax, offset ~ -0.1
    scales = ((0.15 + 0.1 * torch.rand(out_f // bo, in_f // bi, generator=g)) / qmax).half()
    offsets = (-0.1 + 0.02 * torch.randn(out_f // bo, in_f // bi, generator=g)).to(offset_dtype)
    return layer_of(pack_qweight(q, bits), scales, offsets), tm.dequant_ref(q, scales, offsets,
                                                                           block)


def run_kernel(kernel_cls, out_f, in_f, bits, block, act_dtype, m, with_bias, x_shape=None,
               seed=0):
    """(y fp64, fp64 reference on the exact (already rounded) inputs, the prepared layer)."""
    from qahira_vllm.linear_kernels import LinearSpec

    layer, w_ref = layer_and_fp64_weight(out_f, in_f, bits, block, seed=seed)
    spec = LinearSpec(bits=bits, block_size=block, out_features=out_f, in_features=in_f,
                      act_dtype=act_dtype, device_type="cpu")
    ok, why = kernel_cls.can_implement(spec)
    assert ok, why
    kernel = kernel_cls(spec)
    kernel.prepare(layer)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*(x_shape or (m,)), in_f, generator=g).to(act_dtype)
    bias = (torch.randn(out_f, generator=g) * 0.5).to(act_dtype) if with_bias else None
    y = kernel.apply(layer, x, bias)
    assert y.dtype == act_dtype and y.shape == (*x.shape[:-1], out_f)
    y_ref = x.double() @ w_ref.t()
    if with_bias:
        y_ref = y_ref + bias.double()
    return y.double(), y_ref, layer


def check_traced_as_one_op(kernel, layer, in_features: int) -> None:
    """A prepared kernel's apply() traces under torch.compile (fullgraph) and gives the eager
    result bit for bit."""
    x = torch.randn(4, in_features).bfloat16()
    compiled = torch.compile(lambda t: kernel.apply(layer, t) * 2, backend="aot_eager",
                             fullgraph=True)
    assert torch.equal(compiled(x), kernel.apply(layer, x) * 2)
