"""Kernels for qahira's block-wise quantized linear layers: one ordered list, one chooser.

    kernel_cls, reasons = choose_kernel(spec)
    kernel = kernel_cls(spec); kernel.prepare(layer)   # repack layer.qweight/scales/offsets once
    y = kernel.apply(layer, x, bias)

`KERNELS` is the order of preference; `choose_kernel` returns the first one that is not
disabled and whose `can_implement(spec)` accepts the layer, with the reason each earlier one
refused (as vLLM's `choose_mp_linear_kernel`). The list is fixed: nothing registers kernels at
run time. Each kernel has one name, used for its module here, its op in qahira_kernels.ops
(`torch.ops.qahira.<name>`, where it has one) and the disable switch:

    QAHIRA_DISABLED_KERNELS=cpu_int4,cpu_int4pack   # comma-separated kernel names

| name               | class                  | serves                                            |
| triton_blockwise   | TritonBlockwiseKernel  | CUDA, fp16/bf16, INT4/INT8, any block             |
| cpu_measured       | CpuMeasuredKernel      | CPU bf16/fp16: of cpu_int4, cpu_int8,             |
|                    |                        | cpu_dequant_gemm, cpu_int4pack, cpu_dequant_dense |
|                    |                        | the one timed fastest here, per M bucket (2+      |
|                    |                        | must apply)                                       |
| cpu_int4           | CpuInt4Kernel          | CPU AVX2/AVX-512, INT4, bi % 32 == 0, bf16/fp16   |
| cpu_int8           | CpuInt8Kernel          | CPU AVX2/AVX-512, INT8, bi % 32 == 0, bf16/fp16   |
| cpu_dequant_gemm   | CpuDequantGemmKernel   | CPU, INT4/INT8, bi even, out % 16 == 0, bf16      |
| cpu_int4pack       | CpuInt4PackKernel      | CPU, torch's int4 GEMM, bi in 32..256, bf16/fp16  |
| cpu_blockwise      | CpuBlockwiseKernel     | CPU AVX2, every format case, exact                |
| cpu_dequant_dense  | CpuDequantDenseKernel  | CPU, INT4/INT8: the weight dequantized per call   |
|                    |                        | into a reused buffer, then torch's dense GEMM     |
| dequant_torch      | DequantTorchKernel     | anything: dequantize + dense GEMM (last resort)   |

Nothing here imports vLLM or Triton: the same kernels serve the plugin, the trainer and tests.
"""

from __future__ import annotations

import os

from .cpu_int4 import CpuInt4Kernel
from .cpu_blockwise import CpuBlockwiseKernel
from .cpu_dequant_dense import CpuDequantDenseKernel
from .cpu_dequant_gemm import CpuDequantGemmKernel
from .cpu_measured import CpuMeasuredKernel
from .cpu_int4pack import CpuInt4PackKernel
from .cpu_int8 import CpuInt8Kernel
from .dequant_torch import DequantTorchKernel
from .interface import LinearKernel, LinearSpec, set_buffer
from .triton_blockwise import TritonBlockwiseKernel

# Order of preference; the general path is last and always applies.
KERNELS: tuple[type[LinearKernel], ...] = (
    TritonBlockwiseKernel,   # CUDA only
    CpuMeasuredKernel,       # CPU: times the CPU kernels below, per M bucket, on this machine
    CpuInt4Kernel,
    CpuInt8Kernel,
    CpuDequantGemmKernel,
    CpuInt4PackKernel,
    CpuBlockwiseKernel,
    CpuDequantDenseKernel,   # for large batches: cpu_measured picks it where it wins
    DequantTorchKernel,
)

DISABLE_ENV = "QAHIRA_DISABLED_KERNELS"
# The multi-adapter layers' compiled CPU kernel (qahira_vllm.lora.layers) obeys the same
# switch; disabled, the torch segment path (qahira_vllm.lora.ops) serves the adapters.
ADAPTER_KERNEL_NAMES = ("cpu_qbara",)


def disabled_kernels() -> frozenset[str]:
    """The kernel names in $QAHIRA_DISABLED_KERNELS (read on every call).

    Raises ValueError for a name that is no kernel's, listing the valid names (a typo would
    otherwise silently disable nothing).
    """
    raw = os.environ.get(DISABLE_ENV, "")
    names = frozenset(n.strip() for n in raw.split(",") if n.strip())
    valid = (*(k.name for k in KERNELS), *ADAPTER_KERNEL_NAMES)
    unknown = names - set(valid)
    if unknown:
        raise ValueError(f"{DISABLE_ENV}={raw!r}: unknown kernel name(s) {sorted(unknown)}; "
                         f"valid names: {', '.join(valid)}")
    return names


def choose_kernel(spec: LinearSpec) -> tuple[type[LinearKernel], list[str]]:
    """(the first kernel of KERNELS that is enabled and can implement `spec`, the reasons each
    earlier kernel gave as "name: why").

    Raises ValueError listing every kernel's reason when none can (only possible when
    dequant_torch is disabled), or for an unknown name in QAHIRA_DISABLED_KERNELS.
    """
    disabled = disabled_kernels()
    reasons: list[str] = []
    for kernel in KERNELS:
        if kernel.name in disabled:
            reasons.append(f"{kernel.name}: disabled by {DISABLE_ENV}")
            continue
        ok, why = kernel.can_implement(spec)
        if ok:
            return kernel, reasons
        reasons.append(f"{kernel.name}: {why}")
    raise ValueError(f"no qahira kernel implements {spec}: " + "; ".join(reasons)
                     + f" (remove some names from {DISABLE_ENV})")


__all__ = ["ADAPTER_KERNEL_NAMES", "DISABLE_ENV", "KERNELS", "CpuBlockwiseKernel",
           "CpuDequantDenseKernel", "CpuDequantGemmKernel", "CpuInt4Kernel", "CpuInt4PackKernel", "CpuInt8Kernel",
           "CpuMeasuredKernel", "DequantTorchKernel", "LinearKernel", "LinearSpec",
           "TritonBlockwiseKernel", "choose_kernel", "disabled_kernels", "set_buffer"]
