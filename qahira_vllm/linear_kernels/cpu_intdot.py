"""The integer-dot CPU kernels `cpu_int4` and `cpu_int8`: shared checks, repacking and call.

The arithmetic is qahira_kernels' `cpu_intdot.c` (read its header for the math and the error
bound): stored unsigned weights (nibbles or bytes) times activations quantized to 16 bits per 32
columns, exact int32 dot products (vpmaddwd; vpdpwssd in the AVX-512 build), fp32 accumulation,
the output rounded once to the activation dtype. The source is built for AVX2 and for AVX-512 +
VNNI; the ops run the build CPUID allows (qahira_kernels.cpu_lib.intdot_variant(); both give
bit-identical outputs; QAHIRA_CPU_ISA=avx2 forces the AVX2 one). Each row's arithmetic is the same
at every M, so a request's output does not depend on its neighbours'. fp32 models go to the exact
cpu_blockwise kernel.

Under torch.compile apply() calls the op (`torch.ops.qahira.<name>`), so vLLM's compiled graph
holds one opaque node; in eager mode it calls the implementation directly (the dispatcher costs
~6 us per call).
"""

from __future__ import annotations

from typing import Callable

import torch

from qahira_kernels import cpu_lib, ops
from qahira_kernels.layouts import CPU_INTDOT_CHUNK

from ..quant_math import unpack_qweight
from .interface import LinearKernel, LinearSpec, set_buffer


class CpuIntDotKernel(LinearKernel):
    """Base of cpu_int4 / cpu_int8: `bits`-bit weights, any bo, bi a multiple of 32, bf16/fp16
    activations, on a CPU with AVX2/FMA/F16C.

    prepare() replaces `qweight` by `gemv_weight` uint8 (the same values in the kernel's layout,
    `pack`) and keeps `scales` and `offsets` (fp16/fp32; fp32 scales are format 2's)
    [out/bo, in/bi] as stored.
    """

    bits: int
    pack: Callable[[torch.Tensor], torch.Tensor]  # unpacked q uint8 [out, in] -> gemv_weight

    @classmethod
    def can_implement(cls, spec: LinearSpec):
        if spec.device_type != "cpu":
            return False, "CPU only"
        if spec.bits != cls.bits:
            return False, f"{cls.bits}-bit only"
        if spec.block_size[1] % CPU_INTDOT_CHUNK:
            return False, f"bi must be a multiple of {CPU_INTDOT_CHUNK}"
        if spec.act_dtype not in (torch.bfloat16, torch.float16):
            return False, "bf16/fp16 activations only (fp32 models stay on the exact paths)"
        if cpu_lib.load_library() is None:
            return False, cpu_lib.library_error()
        return True, None

    def prepare(self, layer):
        q = unpack_qweight(layer.qweight.data, self.bits)
        set_buffer(layer, "gemv_weight", type(self).pack(q))
        set_buffer(layer, "scales", layer.scales.data.contiguous())
        set_buffer(layer, "offsets", layer.offsets.data.contiguous())
        delattr(layer, "qweight")

    def apply(self, layer, x, bias=None):
        shape = x.shape
        op = (getattr(torch.ops.qahira, self.name) if torch.compiler.is_compiling()
              else getattr(ops, self.name))
        y = op(x.reshape(-1, shape[-1]), layer.gemv_weight, layer.scales, layer.offsets,
               self.spec.block_size[0], self.spec.block_size[1])
        if bias is not None:
            y = y + bias
        return y.reshape(*shape[:-1], y.shape[-1])
