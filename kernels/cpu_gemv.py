"""`CpuAvx2Int4Kernel`: qahira INT4 linear layers on AVX2 CPUs, fast at decode batch sizes.

    from qahira_kernels.cpu_gemv import register; register()
    # select_kernel(spec) now returns CpuAvx2Int4Kernel for CPU 4-bit bf16/fp16 layers, bi % 32 == 0

The arithmetic is in `cpu_int4_gemv.c` (read its header for the math and the error bound),
built and loaded by `qahira_kernels.cpu_lib`. No compiler, no AVX2, or a failed build:
`can_implement` says so and the torch kernels serve the layer. `QAHIRA_CPU_GEMV=0` turns the
compiled CPU kernels off (for comparisons).

Under torch.compile apply() calls the op `torch.ops.qahira.cpu_int4_linear`, so vLLM's compiled
graph holds one opaque node; in eager mode it calls the implementation directly (the
dispatcher costs ~6 us per call). The same code runs every M: measured on this project's CPU (1 thread, 16384 x 2048
1x32 layer) it beats torch's int4pack kernel from M = 1 (1.9x) to 256 (1.2x), and it keeps each
row's arithmetic independent of the batch (a request's output does not depend on its
neighbours'). Dequantize + fp32 GEMM would win only above M ~ 100 (0.7x the time at M = 256).
"""

from __future__ import annotations

import torch

from qahira_vllm.linear_kernels import LinearKernel, LinearSpec, _set_buffer, register_kernel

from . import cpu_lib

CHUNK = 32  # activation quantization chunk (columns); bi must be a multiple


def prepare_weight(q: torch.Tensor) -> torch.Tensor:
    """q int [N, K] (values 0..15) -> uint8 [N, K/2]: per 32-column chunk, byte j = q[j] | q[16+j] << 4."""
    n, k = q.shape
    g = q.to(torch.uint8).view(n, k // CHUNK, 2, CHUNK // 2)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


# A plain torch.library op rather than @custom_op: the latter's Python wrapper cost ~35 us per
# call, as much as the arithmetic of a small layer (measured here, 1 thread).
_op_lib = torch.library.Library("qahira", "FRAGMENT")
_op_lib.define("cpu_int4_linear(Tensor x, Tensor w, Tensor scales, Tensor offsets, int bo, "
               "int bi) -> Tensor")


def cpu_int4_linear(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor,
                    offsets: torch.Tensor, bo: int, bi: int) -> torch.Tensor:
    """x [M, K] -> [M, N] in x.dtype; w, scales, offsets as made by CpuAvx2Int4Kernel.prepare."""
    lib = cpu_lib.load_library()
    if lib is None:
        raise RuntimeError(f"qahira cpu_int4_linear unavailable: {cpu_lib.library_error()}")
    x = x.contiguous()
    m, k = x.shape
    y = torch.empty(m, w.shape[0], dtype=x.dtype)
    rc = lib.qahira_int4_linear(x.data_ptr(), cpu_lib.DTYPE_CODES[x.dtype], m, k, w.data_ptr(),
                                 scales.data_ptr(), offsets.data_ptr(),
                                 offsets.dtype == torch.float32, w.shape[0], bo, bi, y.data_ptr())
    if rc:
        raise MemoryError(f"qahira cpu_int4_linear: no memory for the activations of x {tuple(x.shape)}")
    return y


_op_lib.impl("cpu_int4_linear", cpu_int4_linear, "CPU")


@torch.library.register_fake("qahira::cpu_int4_linear")
def _cpu_int4_linear_fake(x, w, scales, offsets, bo, bi):
    return x.new_empty(x.shape[0], w.shape[0])


class CpuAvx2Int4Kernel(LinearKernel):
    """INT4, any bo, bi a multiple of 32, bf16/fp16 activations, on a CPU with AVX2/FMA/F16C.

    Integer dot products on the raw nibbles against activations quantized to 16 bits
    per 32 columns (error <= 2^-16 of the chunk's largest |x|, far below bf16's own rounding);
    fp32 accumulation; output rounded once to the activation dtype. Measured on this project's
    CPU, one thread, 1B-shaped decode step at M = 1: see benchmarks/cpu_decode_ceiling.py.
    fp32 models go to the exact cpu_blockwise kernel.

    prepare() replaces `qweight` by `gemv_weight` uint8 [out, in/2] (same bytes, chunk-interleaved
    nibbles) and keeps `scales` (fp16) and `offsets` (fp16/fp32) [out/bo, in/bi] as stored.
    """

    name = "cpu_avx2_int4"

    @classmethod
    def can_implement(cls, spec: LinearSpec):
        if spec.device_type != "cpu":
            return False, "CPU only"
        if spec.bits != 4:
            return False, "4-bit only"
        if spec.block_size[1] % CHUNK:
            return False, f"bi must be a multiple of {CHUNK}"
        if spec.act_dtype not in (torch.bfloat16, torch.float16):
            return False, "bf16/fp16 activations only (fp32 models stay on the exact paths)"
        if cpu_lib.load_library() is None:
            return False, cpu_lib.library_error()
        return True, None

    def prepare(self, layer):
        from qahira_vllm.quant_math import unpack_qweight

        q = unpack_qweight(layer.qweight.data, 4)
        _set_buffer(layer, "gemv_weight", prepare_weight(q))
        _set_buffer(layer, "scales", layer.scales.data.contiguous())
        _set_buffer(layer, "offsets", layer.offsets.data.contiguous())
        delattr(layer, "qweight")

    def apply(self, layer, x, bias=None):
        shape = x.shape
        # Eager: call the implementation directly (the dispatcher adds ~6 us per call);
        # under torch.compile: the op, one opaque node.
        op = torch.ops.qahira.cpu_int4_linear if torch.compiler.is_compiling() else cpu_int4_linear
        y = op(x.reshape(-1, shape[-1]), layer.gemv_weight, layer.scales, layer.offsets,
               self.spec.block_size[0], self.spec.block_size[1])
        if bias is not None:
            y = y + bias
        return y.reshape(*shape[:-1], y.shape[-1])


def register() -> None:
    """Put CpuAvx2Int4Kernel ahead of the torch CPU kernels (idempotent)."""
    register_kernel(CpuAvx2Int4Kernel, first=True)
