"""`DequantTorchKernel`: the general path, correct for every format case and device."""

from __future__ import annotations

import torch.nn.functional as F

from ..format import QahiraQuantConfig
from ..quant_math import dequantize
from .interface import LinearKernel, set_buffer


class DequantTorchKernel(LinearKernel):
    """Dequantize the whole weight per call (quant_math.dequantize), then a dense GEMM.

    Keeps qweight, scales and offsets as stored (memory stays ~bits/8 bytes per weight); the
    per-call unpack makes it the slow path, chosen only when no faster kernel can implement the
    layer (on CPU: when qahira's compiled kernels are unavailable or disabled).
    """

    name = "dequant_torch"

    def __init__(self, spec):
        super().__init__(spec)
        self._cfg = QahiraQuantConfig(bits=spec.bits, block_size=spec.block_size)

    @classmethod
    def can_implement(cls, spec):
        return True, None

    def prepare(self, layer):
        for name in ("qweight", "scales", "offsets"):
            set_buffer(layer, name, getattr(layer, name).data)

    def apply(self, layer, x, bias=None):
        w = dequantize(layer.qweight, layer.scales, layer.offsets, self._cfg, x.dtype)
        return F.linear(x, w, bias)
