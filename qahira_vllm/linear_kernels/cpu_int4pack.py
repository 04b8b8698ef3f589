"""`CpuInt4PackKernel`: torch's own CPU int4 GEMM (aten._weight_int4pack_mm_for_cpu)."""

from __future__ import annotations

import torch

from ..quant_math import unpack_qweight
from .interface import LinearKernel, fp16_scales_only, set_buffer

# torch's CPU int4 kernel: W = (q - 8) * scale + zero per group of `g` input columns.
CPU_INT4_GROUP_SIZES = (32, 64, 128, 256)
CPU_INT4_OUT_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu: "expect N to be dividable by 16"


class CpuInt4PackKernel(LinearKernel):
    """torch.ops.aten._weight_int4pack_mm_for_cpu, for 4-bit and 8-bit, bi in {32,64,128,256},
    any bo, out a multiple of 16, bf16/fp16 activations.

    torch's kernel computes W = (n - 8) * scale + zero for 4-bit n. A qahira layer is written
    as a sum of such "planes":
      4-bit: one plane  n = q,       scale = s,      zero = o + 8 s
      8-bit: two planes n = q >> 4,  scale = 16 s,   zero = o + 128 s
                        n = q & 15,  scale = s,      zero = 8 s
    (16 s hi + s lo + o = s q + o), so INT8 costs two int4 GEMMs instead of a per-call
    dequantization. Repacked at load into torch's opaque int4 layout plus [in/bi, out, 2]
    (scale, zero) in the activation dtype; 2-D blocks are expanded along the output dim (same
    weights). Measured on this project's AVX2 CPU (1 thread): one int4 GEMM is 1.4-3.5x faster
    than bf16 dense for M = 1..512, but 8x slower than dense for fp32 activations, so fp32
    goes to the exact paths (cpu_blockwise, or dequant_torch).
    """

    name = "cpu_int4pack"

    @classmethod
    def can_implement(cls, spec):
        if spec.device_type != "cpu":
            return False, "CPU only"
        if why := fp16_scales_only(spec):
            return False, why
        if spec.bits not in (4, 8):
            return False, "4-bit or 8-bit only"
        if spec.block_size[1] not in CPU_INT4_GROUP_SIZES:
            return False, f"bi must be one of {CPU_INT4_GROUP_SIZES}"
        if spec.act_dtype not in (torch.bfloat16, torch.float16):
            return False, "bf16/fp16 activations only (fp32 is slower than dequant + GEMM)"
        if spec.out_features % CPU_INT4_OUT_MULTIPLE:
            return False, (f"out_features={spec.out_features} is not a multiple of "
                           f"{CPU_INT4_OUT_MULTIPLE} (torch's int4pack layout)")
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            return False, "this torch has no _weight_int4pack_mm_for_cpu"
        return True, None

    def _planes(self, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor):
        """[(n int32 [out, in], scale [out, in/bi], zero [out, in/bi])] summing to s*q + o."""
        if self.spec.bits == 4:
            return [(q, scale, offset + 8.0 * scale)]
        return [(q >> 4, 16.0 * scale, offset + 128.0 * scale), (q & 15, scale, 8.0 * scale)]

    def prepare(self, layer):
        bo = self.spec.block_size[0]
        q = unpack_qweight(layer.qweight.data, self.spec.bits).to(torch.int32)
        scale = layer.scales.data.to(torch.float32).repeat_interleave(bo, 0)    # [out, in/bi]
        offset = layer.offsets.data.to(torch.float32).repeat_interleave(bo, 0)
        for name in ("qweight", "scales", "offsets"):
            delattr(layer, name)
        for k, (n, sc, zero) in enumerate(self._planes(q, scale, offset)):
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(n.contiguous(), 1)
            sz = torch.stack([sc.t(), zero.t()], dim=-1).to(self.spec.act_dtype).contiguous()
            set_buffer(layer, f"int4_packed_{k}", packed)
            set_buffer(layer, f"int4_scale_zero_{k}", sz)  # [in/bi, out, 2]
        self.num_planes = k + 1

    def apply(self, layer, x, bias=None):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.dtype != self.spec.act_dtype:
            x2 = x2.to(self.spec.act_dtype)
        x2 = x2.contiguous()
        bi = self.spec.block_size[1]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, layer.int4_packed_0, bi,
                                                       layer.int4_scale_zero_0)
        if self.num_planes == 2:
            y = y + torch.ops.aten._weight_int4pack_mm_for_cpu(x2, layer.int4_packed_1, bi,
                                                               layer.int4_scale_zero_1)
        if bias is not None:
            y = y + bias
        return y.reshape(*shape[:-1], y.shape[-1]).to(x.dtype)
