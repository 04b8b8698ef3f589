"""`CpuInt8Kernel` (cpu_int8): qahira INT8 linear layers on x86-64 CPUs (AVX2 or AVX-512),
fast at decode batch sizes. Shared logic and the arithmetic: `cpu_intdot.py`.

`QAHIRA_DISABLED_KERNELS=cpu_int8` turns it off (then cpu_int4pack's two int4 planes serve).
Measured (1 thread, 2048 -> 5632 layer, bf16, AVX-512 machine, loaded): M = 1 is ~2.4x faster
than bf16 F.linear (memory-bound), M = 8 ~0.95x (docs/KERNELS.md).
"""

from __future__ import annotations

from qahira_kernels.layouts import pack_cpu_int8

from .cpu_intdot import CpuIntDotKernel


class CpuInt8Kernel(CpuIntDotKernel):
    """INT8: `gemv_weight` uint8 [out, in], 32-column chunk pairs reordered
    (qahira_kernels.layouts.pack_cpu_int8)."""

    name = "cpu_int8"
    bits = 8
    pack = staticmethod(pack_cpu_int8)
