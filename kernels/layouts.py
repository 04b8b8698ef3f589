"""Weight layouts the raw ops read, made from plain tensors (the Triton GEMM's repacking is
`blockwise_gemm.pack_blockwise_weight`, next to its kernel)."""

from __future__ import annotations

import torch

CPU_AVX2_INT4_CHUNK = 32  # activation quantization chunk (columns) of cpu_avx2_int4; bi % it == 0


def pack_cpu_avx2_int4(q: torch.Tensor) -> torch.Tensor:
    """q int [N, K] (values 0..15, K % 32 == 0) -> uint8 [N, K/2], the weight of
    ops.cpu_avx2_int4: per 32-column chunk, byte j = q[j] | q[16 + j] << 4."""
    n, k = q.shape
    c = CPU_AVX2_INT4_CHUNK
    g = q.to(torch.uint8).view(n, k // c, 2, c // 2)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
