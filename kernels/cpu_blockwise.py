"""`CpuBlockwiseKernel`: every qahira format case on AVX2 CPUs (INT4/INT8, any block [bo, bi],
fp32/bf16/fp16 activations), exact up to fp32 summation order.

    from qahira_kernels.cpu_blockwise import register; register()

It serves what the faster CPU kernels cannot: fp32 models, INT8 and 2-D blocks whose bi is not
one of torch's int4 group sizes (the paper's 8x4 QA-HiRA tile, for one). The arithmetic is in
`cpu_blockwise.c` (its header has the details): up to GEMV_MAX_M rows, each weight row is
dequantized once per call into a per-thread buffer and dotted with every activation row, so
the weight is read packed and a row's result does not depend on its batch; above that, the
whole weight is dequantized by the same code into one fp32 tensor for a dense GEMM.
The dequantized weight equals torch's reference dequantization bit for bit.

No compiler or no AVX2: `can_implement` says so and the torch general path serves the layer.
prepare() keeps `qweight`, `scales` and `offsets` exactly as stored (contiguous).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qahira_vllm.linear_kernels import LinearKernel, LinearSpec, _set_buffer, register_kernel

from . import cpu_lib

# Rows per call up to which the packed GEMV path runs; above it, dequantize + fp32 GEMM.
# benchmarks/cpu_blockwise.py (2 threads): the GEMV wins up to M = 32 on every case measured;
# at M = 64 dequantize + GEMM wins on SmolLM2's 1536x576 layer (1.2 vs 1.9 ms) but not on a
# 8192x2048 one (87 vs 48 ms); at M = 256 it wins on both. Decode batches up to this size stay
# batch-invariant.
GEMV_MAX_M = 32


def _check(rc: int, what: str) -> None:
    if rc == -2:
        raise MemoryError(f"qahira {what}: out of memory for its per-thread buffers")
    if rc:
        raise RuntimeError(f"qahira {what}: failed with code {rc}")


def blockwise_dequant(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                      bits: int, block_size: tuple[int, int], in_features: int) -> torch.Tensor:
    """The fp32 weight [out, in] of a stored layer (qweight/scales/offsets as in FORMAT.md)."""
    lib = cpu_lib.load_library()
    if lib is None:
        raise RuntimeError(f"qahira cpu_blockwise unavailable: {cpu_lib.library_error()}")
    bo, bi = block_size
    n = qweight.shape[0]
    w = torch.empty(n, in_features, dtype=torch.float32)
    _check(lib.qahira_blockwise_dequant(qweight.data_ptr(), bits, scales.data_ptr(),
                                        offsets.data_ptr(), offsets.dtype == torch.float32, n,
                                        in_features, bo, bi, w.data_ptr()), "blockwise_dequant")
    return w


def blockwise_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                     offsets: torch.Tensor, bits: int, block_size: tuple[int, int]) -> torch.Tensor:
    """x [M, K] -> [M, N] in x.dtype, through the packed GEMV path (any M)."""
    lib = cpu_lib.load_library()
    if lib is None:
        raise RuntimeError(f"qahira cpu_blockwise unavailable: {cpu_lib.library_error()}")
    x = x.contiguous()
    m, k = x.shape
    bo, bi = block_size
    n = qweight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype)
    if m:
        _check(lib.qahira_blockwise_linear(x.data_ptr(), cpu_lib.DTYPE_CODES[x.dtype], m, k,
                                           qweight.data_ptr(), bits, scales.data_ptr(),
                                           offsets.data_ptr(), offsets.dtype == torch.float32,
                                           n, bo, bi, y.data_ptr()), "blockwise_linear")
    return y


class CpuBlockwiseKernel(LinearKernel):
    """Any bits / block / activation dtype on a CPU with AVX2/FMA/F16C (see module doc)."""

    name = "cpu_blockwise"

    @classmethod
    def can_implement(cls, spec: LinearSpec):
        if spec.device_type != "cpu":
            return False, "CPU only"
        if spec.bits not in (4, 8):
            return False, "4-bit or 8-bit only"
        if spec.act_dtype not in cpu_lib.DTYPE_CODES:
            return False, f"{spec.act_dtype} activations: fp32/bf16/fp16 only"
        if cpu_lib.load_library() is None:
            return False, cpu_lib.library_error()
        return True, None

    def prepare(self, layer):
        for name in ("qweight", "scales", "offsets"):
            _set_buffer(layer, name, getattr(layer, name).data.contiguous())

    def apply(self, layer, x, bias=None):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        spec = self.spec
        if x2.shape[0] <= GEMV_MAX_M:
            y = blockwise_linear(x2, layer.qweight, layer.scales, layer.offsets, spec.bits,
                                 spec.block_size)
        else:
            w = blockwise_dequant(layer.qweight, layer.scales, layer.offsets, spec.bits,
                                  spec.block_size, spec.in_features)
            y = F.linear(x2.to(torch.float32), w).to(x.dtype)
        if bias is not None:
            y = y + bias
        return y.reshape(*shape[:-1], y.shape[-1])


def register() -> None:
    """Put CpuBlockwiseKernel just ahead of the torch general path (idempotent)."""
    register_kernel(CpuBlockwiseKernel, first=False)
