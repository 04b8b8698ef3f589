"""`CpuDequantDenseKernel` (cpu_dequant_dense): qahira INT4 / INT8 layers on CPU for large
batches (prefill): per call the whole weight is dequantized by the compiled kernel
(qahira_kernels.ops.cpu_blockwise_dequant: the format's rule in fp32, rounded once to the
activation dtype, so in bf16 it is the dense bf16 model's weight bit for bit) into this thread's
reused buffer for the layer's shape, then multiplied by torch's dense GEMM (F.linear: oneDNN on
CPU). One pass over the weight per call, so it pays off only where the GEMM's own time is far
larger: cpu_measured times it against the other CPU kernels per M bucket.
"""

from __future__ import annotations

import torch

from qahira_kernels import ops

from .cpu_blockwise import CpuBlockwiseKernel


class CpuDequantDenseKernel(CpuBlockwiseKernel):
    """INT4 / INT8, any block, fp32 / bf16 / fp16 activations: what cpu_blockwise serves, from
    the same stored tensors (its can_implement and prepare), by another computation.

    Memory beyond the stored tensors: one dense buffer [out, in] in the activation dtype per
    layer shape and thread (qahira_kernels.ops.reused_buffer), shared by every layer of that
    shape (for a 16384 x 2048 merged gate_up in bf16: 64 MiB)."""

    name = "cpu_dequant_dense"

    def apply(self, layer, x, bias=None):
        """x [..., in] -> y [..., out] = x W^T (+ bias) in x's dtype, W rounded to x's dtype."""
        spec = self.spec
        bo, bi = spec.block_size
        x2 = x.reshape(-1, x.shape[-1])
        if torch.compiler.is_compiling():
            y = torch.ops.qahira.cpu_dequant_dense(x2, layer.qweight, layer.scales, layer.offsets,
                                                   spec.bits, bo, bi)
        else:
            y = ops.cpu_dequant_dense(x2, layer.qweight, layer.scales, layer.offsets, spec.bits,
                                      bo, bi)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1])
