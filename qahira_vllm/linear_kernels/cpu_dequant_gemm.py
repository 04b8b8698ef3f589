"""`CpuDequantGemmKernel` (cpu_dequant_gemm): qahira INT4 / INT8 linear layers on x86-64 CPUs
for batches: per call, each thread dequantizes a 64-row panel of the weight to bf16 (the
format's rule, so the weight is the dense bf16 model's, bit for bit) and multiplies it by all M
activation rows with fp32 accumulation (kernels/cpu_dequant_gemm.c). The weight is unpacked
once per call and used M times, so its cost per token falls with the batch where cpu_int4 /
cpu_int8's does not. Builds: AVX2, AVX-512, AVX512-BF16 (vdpbf16ps), AMX (tdpbf16ps, INT4
dequantized by table lookup), the widest this CPU runs and the layer suits unless a variant is
given; which one is fastest differs between CPUs (on the AVX512-BF16 Xeon this project measured,
vdpbf16ps runs at a quarter of the FMA rate), and cpu_measured times each on the serving
machine.
"""

from __future__ import annotations

import torch

from qahira_kernels import cpu_lib, ops
from qahira_kernels.layouts import (CPU_DEQUANT_GEMM_GROUP, DEQUANT_GEMM_ROW_LAYOUT,
                                    pack_cpu_dequant_gemm, pack_cpu_dequant_gemm_rows)

from ..quant_math import unpack_qweight
from .interface import LinearKernel, LinearSpec, set_buffer


class CpuDequantGemmKernel(LinearKernel):
    """INT4 / INT8, any block with an even bi, bf16 activations, out % 16 == 0 (the AMX build:
    INT4 with in % 64 == 0 and bi % 32 == 0, or INT8 with in % 32 == 0 and bi % 16 == 0).

    prepare() replaces qweight, scales and offsets by `dq_weight`, `dq_scales`, `dq_offsets`:
    the vector builds' layout (layouts.pack_cpu_dequant_gemm: 16-row groups of column pairs,
    scales one per output row, in their stored dtypes) or the AMX build's
    (pack_cpu_dequant_gemm_rows, scales and offsets as stored, widened to fp32). `variant` (a build name, or None: the widest of
    `variants(spec)`) lets cpu_measured time each build."""

    name = "cpu_dequant_gemm"

    def __init__(self, spec: LinearSpec, variant: str | None = None):
        super().__init__(spec)
        self.variant = variant

    @staticmethod
    def variant_refuses(spec: LinearSpec, variant: str) -> str | None:
        """Why build `variant` cannot serve spec's shape, or None."""
        if variant not in DEQUANT_GEMM_ROW_LAYOUT:
            return None
        k_mult, bi_mult = (64, 32) if spec.bits == 4 else (32, 16)
        if spec.in_features % k_mult or spec.block_size[1] % bi_mult:
            return f"in_features % {k_mult} and bi % {bi_mult} must be 0"
        return None

    @classmethod
    def variants(cls, spec: LinearSpec) -> tuple[str, ...]:
        """The builds this CPU runs (capped by $QAHIRA_CPU_ISA) that serve spec's shape."""
        runs = cpu_lib.dequant_gemm_variants()
        widest = cpu_lib.dequant_gemm_variant() if runs else None
        cap = runs.index(widest) + 1 if widest else 0
        return tuple(v for v in runs[:cap] if cls.variant_refuses(spec, v) is None)

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
        if not cls.variants(spec):
            return False, "no build of it runs here"
        return True, None

    def prepare(self, layer):
        if self.variant is None:
            self.variant = type(self).variants(self.spec)[-1]
        elif why := self.variant_refuses(self.spec, self.variant):
            raise ValueError(f"cpu_dequant_gemm[{self.variant}] cannot serve {self.spec}: {why}")
        q = unpack_qweight(layer.qweight.data, self.spec.bits)
        if self.variant in DEQUANT_GEMM_ROW_LAYOUT:
            w = pack_cpu_dequant_gemm_rows(q, self.spec.bits)
            s, o = layer.scales.data.float().contiguous(), layer.offsets.data.float().contiguous()
        else:
            w, s, o = pack_cpu_dequant_gemm(q, layer.scales.data, layer.offsets.data,
                                            self.spec.bits, self.spec.block_size[0])
        for name in ("qweight", "scales", "offsets"):
            delattr(layer, name)
        set_buffer(layer, "dq_weight", w)
        set_buffer(layer, "dq_scales", s)
        set_buffer(layer, "dq_offsets", o)

    def apply(self, layer, x, bias=None):
        """x [..., in] -> y [..., out] in x's dtype (the kernel reads bf16: other activations
        are rounded to it, and an fp32 x gets the fp32 accumulator as its output)."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        out_dtype = torch.float32 if x.dtype == torch.float32 else torch.bfloat16
        if x2.dtype != torch.bfloat16:
            x2 = x2.to(torch.bfloat16)
        bo, bi = self.spec.block_size
        if torch.compiler.is_compiling():
            y = torch.ops.qahira.cpu_dequant_gemm(x2, layer.dq_weight, layer.dq_scales,
                                                  layer.dq_offsets, self.spec.bits, bi, bo,
                                                  self.variant)
        else:
            y = ops.cpu_dequant_gemm(x2, layer.dq_weight, layer.dq_scales, layer.dq_offsets,
                                     self.spec.bits, bi, bo, self.variant, out_dtype)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        if bias is not None:
            y = y + bias
        return y.reshape(*shape[:-1], y.shape[-1])
