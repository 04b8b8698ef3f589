"""`CpuBlockwiseKernel` (cpu_blockwise): every qahira format case on AVX2 CPUs (INT4/INT8, any
block [bo, bi], fp32/bf16/fp16 activations), exact up to fp32 summation order.

It serves what the faster CPU kernels cannot: fp32 models, INT8 and 2-D blocks whose bi is not
one of torch's int4 group sizes (the paper's 8x4 QA-HiRA tile, for one). The arithmetic is in
qahira_kernels' `cpu_blockwise.c` (its header has the details), called through the op
`torch.ops.qahira.cpu_blockwise` (qahira_kernels.ops): for every M, each weight row is
dequantized once per call into a per-thread buffer and dotted with every activation row, so the
weight is read packed and a row's result does not depend on its batch (bit for bit). There is no
dense-GEMM path for large M: a GEMM sums in another order, so a prompt prefilled next to others
(M above a threshold) got other logits than alone (tests/vllm/test_multi_adapter.py saw 2e-4 in
a logprob).

No compiler or no AVX2: `can_implement` says so and the torch general path serves the layer.
prepare() checks the stored dtypes once (ValueError naming the tensor) and keeps `qweight`,
`scales` and `offsets` exactly as stored (contiguous).

Under torch.compile (vLLM's default CPU mode) apply() calls the op, one opaque node (a ctypes
call is opaque to Dynamo); in eager mode it calls the implementation directly (no dispatcher
cost).
"""

from __future__ import annotations

import torch

from qahira_kernels import cpu_lib, ops

from .interface import LinearKernel, LinearSpec, set_buffer


class CpuBlockwiseKernel(LinearKernel):
    """Any bits / block / activation dtype / scale dtype (format 2's float32 scales: the product
    s * q rounded before the sum, as the format defines it) on a CPU with AVX2/FMA/F16C (see
    module doc)."""

    name = "cpu_blockwise"

    @classmethod
    def can_implement(cls, spec: LinearSpec):
        if spec.device_type != "cpu":
            return False, "CPU only"
        if spec.bits not in (4, 8):
            return False, "4-bit or 8-bit only"
        if spec.act_dtype not in cpu_lib.DTYPE_CODES:
            return False, (f"activations in {', '.join(map(str, cpu_lib.DTYPE_CODES))} only, "
                           f"not {spec.act_dtype}")
        if cpu_lib.load_library() is None:
            return False, cpu_lib.library_error()
        return True, None

    def prepare(self, layer):
        # Checked once here (a clear error before serving), not on every call.
        stored = [getattr(layer, n).data for n in ("qweight", "scales", "offsets")]
        ops.check_cpu_blockwise_stored(*stored, self.spec.bits)
        for name, t in zip(("qweight", "scales", "offsets"), stored):
            set_buffer(layer, name, t.contiguous())

    def apply(self, layer, x, bias=None):
        shape = x.shape
        # Eager: the unchecked implementation directly; under torch.compile: the op, one
        # opaque node.
        op = (torch.ops.qahira.cpu_blockwise if torch.compiler.is_compiling()
              else ops.cpu_blockwise_prechecked)
        y = op(x.reshape(-1, shape[-1]), layer.qweight, layer.scales, layer.offsets,
               self.spec.bits, *self.spec.block_size)
        if bias is not None:
            y = y + bias
        return y.reshape(*shape[:-1], y.shape[-1])
