"""`CpuInt8Kernel` (cpu_int8): qahira INT8 linear layers on x86-64 CPUs, fast at decode batch
sizes.

The arithmetic is qahira_kernels' `cpu_avx2_int4.c` (the INT4 kernel's source, read its header
for the math and the error bound) with byte weights: uint8 weights times 16-bit activations
quantized per 32 columns, exact int32 dot products (vpmaddwd; vpdpwssd in the AVX-512 build),
fp32 accumulation. Called through the op `torch.ops.qahira.cpu_int8` (qahira_kernels.ops). The
build (AVX2, or AVX-512 + VNNI) is chosen by CPUID at first call (qahira_kernels.cpu_lib.
intdot_variant(); both give bit-identical outputs). No compiler, no AVX2, or a failed build:
`can_implement` says so and the next kernel (cpu_int4pack's two int4 planes) serves the layer.
`QAHIRA_DISABLED_KERNELS=cpu_int8` turns it off (for comparisons).

Measured (1 thread, 2048 -> 5632 layer, bf16, AVX-512 machine, loaded): M = 1 is ~2.4x faster
than bf16 F.linear (both builds: memory-bound), M = 8 ~0.95x (AVX-512) (docs/KERNELS.md).
Each row's arithmetic is independent of the batch, as for cpu_avx2_int4.
"""

from __future__ import annotations

import torch

from qahira_kernels import cpu_lib, ops
from qahira_kernels.layouts import CPU_AVX2_INT4_CHUNK, pack_cpu_int8

from ..quant_math import unpack_qweight
from .interface import LinearKernel, LinearSpec, set_buffer


class CpuInt8Kernel(LinearKernel):
    """INT8, any bo, bi a multiple of 32, bf16/fp16 activations, on a CPU with AVX2/FMA/F16C.

    Error: activations rounded to 16 bits per 32 columns (<= 2^-16 of the chunk's largest |x|),
    fp32 accumulation, output rounded once to the activation dtype. fp32 models go to the exact
    cpu_blockwise kernel.

    prepare() replaces `qweight` (uint8 [out, in]) by `gemv_weight` uint8 [out, in] (same
    values, chunk pairs reordered, qahira_kernels.layouts.pack_cpu_int8) and keeps `scales`
    (fp16) and `offsets` (fp16/fp32) [out/bo, in/bi] as stored.
    """

    name = "cpu_int8"

    @classmethod
    def can_implement(cls, spec: LinearSpec):
        if spec.device_type != "cpu":
            return False, "CPU only"
        if spec.bits != 8:
            return False, "8-bit only"
        if spec.block_size[1] % CPU_AVX2_INT4_CHUNK:
            return False, f"bi must be a multiple of {CPU_AVX2_INT4_CHUNK}"
        if spec.act_dtype not in (torch.bfloat16, torch.float16):
            return False, "bf16/fp16 activations only (fp32 models stay on the exact paths)"
        if cpu_lib.load_library() is None:
            return False, cpu_lib.library_error()
        return True, None

    def prepare(self, layer):
        q = unpack_qweight(layer.qweight.data, 8)
        set_buffer(layer, "gemv_weight", pack_cpu_int8(q))
        set_buffer(layer, "scales", layer.scales.data.contiguous())
        set_buffer(layer, "offsets", layer.offsets.data.contiguous())
        delattr(layer, "qweight")

    def apply(self, layer, x, bias=None):
        shape = x.shape
        # Eager: the implementation directly (the dispatcher adds ~6 us per call);
        # under torch.compile: the op, one opaque node.
        op = torch.ops.qahira.cpu_int8 if torch.compiler.is_compiling() else ops.cpu_int8
        y = op(x.reshape(-1, shape[-1]), layer.gemv_weight, layer.scales, layer.offsets,
               self.spec.block_size[0], self.spec.block_size[1])
        if bias is not None:
            y = y + bias
        return y.reshape(*shape[:-1], y.shape[-1])
