"""`CpuDequantGemmKernel` (cpu_dequant_gemm): qahira INT4 / INT8 linear layers on x86-64 CPUs
for batches: per call, each thread dequantizes a 64-row panel of the weight to bf16 (the
format's rule, so the weight is the dense bf16 model's, bit for bit) and multiplies it by all M
activation rows with fp32 accumulation (kernels/cpu_dequant_gemm.c). The weight is unpacked
once per call and used M times, so its cost per token falls with the batch where cpu_int4 /
cpu_int8's does not. Builds: AVX2, AVX-512, AVX512-BF16 (vdpbf16ps), picked by
qahira_kernels.cpu_lib.dequant_gemm_variant(); which one is fastest differs between CPUs (on the
AVX512-BF16 Xeon this project measured, vdpbf16ps runs at a quarter of the FMA rate), and
cpu_measured times them on the serving machine.
"""

from __future__ import annotations

import torch

from qahira_kernels import cpu_lib, ops
from qahira_kernels.layouts import CPU_DEQUANT_GEMM_GROUP, pack_cpu_dequant_gemm

from ..quant_math import unpack_qweight
from .interface import LinearKernel, LinearSpec, set_buffer


class CpuDequantGemmKernel(LinearKernel):
    """INT4 / INT8, any block with an even bi, bf16 activations, out % 16 == 0.

    prepare() replaces qweight, scales and offsets by `dq_weight`, `dq_scales`, `dq_offsets`
    (layouts.pack_cpu_dequant_gemm: the same values, 16-row groups of column pairs; scales kept
    in their stored dtype, one per output row). `variant` (a build name, or None: the widest
    this CPU runs) lets cpu_measured time each build."""

    name = "cpu_dequant_gemm"

    def __init__(self, spec: LinearSpec, variant: str | None = None):
        super().__init__(spec)
        self.variant = variant

    @classmethod
    def can_implement(cls, spec: LinearSpec):
        if spec.device_type != "cpu":
            return False, "CPU only"
        if spec.bits not in (4, 8):
            return False, "4- or 8-bit only"
        if spec.act_dtype != torch.bfloat16:
            return False, "bf16 activations only"
        if spec.block_size[1] % 2:
            return False, "bi must be even"
        if spec.out_features % CPU_DEQUANT_GEMM_GROUP:
            return False, f"out_features must be a multiple of {CPU_DEQUANT_GEMM_GROUP}"
        if cpu_lib.load_library() is None:
            return False, cpu_lib.library_error()
        return True, None

    def prepare(self, layer):
        q = unpack_qweight(layer.qweight.data, self.spec.bits)
        w, s, o = pack_cpu_dequant_gemm(q, layer.scales.data, layer.offsets.data,
                                        self.spec.bits, self.spec.block_size[0])
        for name in ("qweight", "scales", "offsets"):
            delattr(layer, name)
        set_buffer(layer, "dq_weight", w)
        set_buffer(layer, "dq_scales", s)
        set_buffer(layer, "dq_offsets", o)

    def apply(self, layer, x, bias=None):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if torch.compiler.is_compiling():
            y = torch.ops.qahira.cpu_dequant_gemm(x2, layer.dq_weight, layer.dq_scales,
                                                  layer.dq_offsets, self.spec.bits,
                                                  self.spec.block_size[1])
        else:
            y = ops.cpu_dequant_gemm(x2, layer.dq_weight, layer.dq_scales, layer.dq_offsets,
                                     self.spec.bits, self.spec.block_size[1], self.variant)
        if bias is not None:
            y = y + bias
        return y.reshape(*shape[:-1], y.shape[-1])
