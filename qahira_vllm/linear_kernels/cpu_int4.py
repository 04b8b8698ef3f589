"""`CpuInt4Kernel` (cpu_int4): qahira INT4 linear layers on x86-64 CPUs (AVX2 or AVX-512),
fast at decode batch sizes. Shared logic and the arithmetic: `cpu_intdot.py`.

`QAHIRA_DISABLED_KERNELS=cpu_int4` turns it off (for comparisons). Measured on an AVX2-only
machine (1 thread, 16384 x 2048 1x32 layer): faster than torch's int4pack kernel from M = 1
(1.9x) to 256 (1.2x); dequantize + fp32 GEMM would win only above M ~ 100 (0.7x the time at
M = 256), at the price of batch invariance.
"""

from __future__ import annotations

from qahira_kernels.layouts import pack_cpu_int4

from .cpu_intdot import CpuIntDotKernel


class CpuInt4Kernel(CpuIntDotKernel):
    """INT4: `gemv_weight` uint8 [out, in/2], chunk-interleaved nibbles
    (qahira_kernels.layouts.pack_cpu_int4)."""

    name = "cpu_int4"
    bits = 4
    pack = staticmethod(pack_cpu_int4)
