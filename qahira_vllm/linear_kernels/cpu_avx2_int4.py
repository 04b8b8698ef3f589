"""`CpuAvx2Int4Kernel` (cpu_avx2_int4): qahira INT4 linear layers on AVX2 CPUs, fast at decode
batch sizes.

The arithmetic is in qahira_kernels' `cpu_avx2_int4.c` (read its header for the math and the
error bound), called through the op `torch.ops.qahira.cpu_avx2_int4` (qahira_kernels.ops). The
source is built for AVX2 and for AVX-512 + VNNI; the op runs the build CPUID allows
(qahira_kernels.cpu_lib.intdot_variant(); bit-identical outputs; QAHIRA_CPU_ISA=avx2 forces the
AVX2 one), despite the "avx2" in the kernel's name. No compiler, no AVX2, or a failed build:
`can_implement` says so and the next kernel serves the layer.
`QAHIRA_DISABLED_KERNELS=cpu_avx2_int4` turns it off (for comparisons).

Under torch.compile apply() calls the op, so vLLM's compiled graph holds one opaque node; in
eager mode it calls the implementation directly (the dispatcher costs ~6 us per call). The same
code runs every M: measured on this project's CPU (1 thread, 16384 x 2048 1x32 layer) it beats
torch's int4pack kernel from M = 1 (1.9x) to 256 (1.2x), and it keeps each row's arithmetic
independent of the batch (a request's output does not depend on its neighbours'). Dequantize +
fp32 GEMM would win only above M ~ 100 (0.7x the time at M = 256).
"""

from __future__ import annotations

import torch

from qahira_kernels import cpu_lib, ops
from qahira_kernels.layouts import CPU_AVX2_INT4_CHUNK, pack_cpu_avx2_int4

from ..quant_math import unpack_qweight
from .interface import LinearKernel, LinearSpec, set_buffer


class CpuAvx2Int4Kernel(LinearKernel):
    """INT4, any bo, bi a multiple of 32, bf16/fp16 activations, on a CPU with AVX2/FMA/F16C.

    Integer dot products on the raw nibbles against activations quantized to 16 bits
    per 32 columns (error <= 2^-16 of the chunk's largest |x|, far below bf16's own rounding);
    fp32 accumulation; output rounded once to the activation dtype. Measured on this project's
    CPU, one thread, 1B-shaped decode step at M = 1: see benchmarks/cpu_decode_ceiling.py.
    fp32 models go to the exact cpu_blockwise kernel.

    prepare() replaces `qweight` by `gemv_weight` uint8 [out, in/2] (same bytes, chunk-interleaved
    nibbles, qahira_kernels.layouts.pack_cpu_avx2_int4) and keeps `scales` (fp16) and `offsets`
    (fp16/fp32) [out/bo, in/bi] as stored.
    """

    name = "cpu_avx2_int4"

    @classmethod
    def can_implement(cls, spec: LinearSpec):
        if spec.device_type != "cpu":
            return False, "CPU only"
        if spec.bits != 4:
            return False, "4-bit only"
        if spec.block_size[1] % CPU_AVX2_INT4_CHUNK:
            return False, f"bi must be a multiple of {CPU_AVX2_INT4_CHUNK}"
        if spec.act_dtype not in (torch.bfloat16, torch.float16):
            return False, "bf16/fp16 activations only (fp32 models stay on the exact paths)"
        if cpu_lib.load_library() is None:
            return False, cpu_lib.library_error()
        return True, None

    def prepare(self, layer):
        q = unpack_qweight(layer.qweight.data, 4)
        set_buffer(layer, "gemv_weight", pack_cpu_avx2_int4(q))
        set_buffer(layer, "scales", layer.scales.data.contiguous())
        set_buffer(layer, "offsets", layer.offsets.data.contiguous())
        delattr(layer, "qweight")

    def apply(self, layer, x, bias=None):
        shape = x.shape
        # Eager: call the implementation directly (the dispatcher adds ~6 us per call);
        # under torch.compile: the op, one opaque node.
        op = torch.ops.qahira.cpu_avx2_int4 if torch.compiler.is_compiling() else ops.cpu_avx2_int4
        y = op(x.reshape(-1, shape[-1]), layer.gemv_weight, layer.scales, layer.offsets,
               self.spec.block_size[0], self.spec.block_size[1])
        if bias is not None:
            y = y + bias
        return y.reshape(*shape[:-1], y.shape[-1])
