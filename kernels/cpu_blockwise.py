"""`CpuBlockwiseKernel`: every qahira format case on AVX2 CPUs (INT4/INT8, any block [bo, bi],
fp32/bf16/fp16 activations), exact up to fp32 summation order.

    from qahira_kernels.cpu_blockwise import register; register()

It serves what the faster CPU kernels cannot: fp32 models, INT8 and 2-D blocks whose bi is not
one of torch's int4 group sizes (the paper's 8x4 QA-HiRA tile, for one). The arithmetic is in
`cpu_blockwise.c` (its header has the details): for every M, each weight row is dequantized
once per call into a per-thread buffer and dotted with every activation row, so the weight is
read packed and a row's result does not depend on its batch (bit for bit). There is no
dense-GEMM path for large M: a GEMM sums in another order, so a prompt prefilled next to
others (M above a threshold) got other logits than alone (tests/vllm/test_multi_adapter.py saw
2e-4 in a logprob). The whole-weight dequantization (same code, same bits as torch's reference
dequantization) serves the trainer.

No compiler or no AVX2: `can_implement` says so and the torch general path serves the layer.
prepare() keeps `qweight`, `scales` and `offsets` exactly as stored (contiguous).

Under torch.compile (vLLM's default CPU mode) apply() calls the op
`torch.ops.qahira.cpu_blockwise_linear`, one opaque node (a ctypes call is opaque to Dynamo);
in eager mode it calls the implementation directly (no dispatcher cost).
"""

from __future__ import annotations

import torch

from qahira_vllm.linear_kernels import LinearKernel, LinearSpec, _set_buffer, register_kernel

from . import cpu_lib


def _check_stored(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                  bits: int) -> None:
    """The C code reads the stored dtypes (FORMAT.md); anything else would be misread."""
    want_q = torch.int32 if bits == 4 else torch.uint8
    problems = [f"{name} is on {t.device}" for name, t in
                (("qweight", qweight), ("scales", scales), ("offsets", offsets))
                if t.device.type != "cpu"]
    if qweight.dtype != want_q:
        problems.append(f"qweight is {qweight.dtype}, expected {want_q} for {bits}-bit")
    if scales.dtype != torch.float16:
        problems.append(f"scales are {scales.dtype}, expected torch.float16")
    if offsets.dtype not in (torch.float16, torch.float32):
        problems.append(f"offsets are {offsets.dtype}, expected torch.float16 or torch.float32")
    if problems:
        raise ValueError("qahira cpu_blockwise: " + "; ".join(problems))


def stored_layout_ok(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                     bits: int) -> bool:
    try:
        _check_stored(qweight, scales, offsets, bits)
    except ValueError:
        return False
    return True


def _check(rc: int, what: str) -> None:
    if rc == -2:
        raise MemoryError(f"qahira {what}: out of memory for its per-thread buffers")
    if rc:
        raise RuntimeError(f"qahira {what}: failed with code {rc}")


def _library():
    lib = cpu_lib.load_library()
    if lib is None:
        raise RuntimeError(f"qahira cpu_blockwise unavailable: {cpu_lib.library_error()}")
    return lib


def _stored(qweight, scales, offsets, bits):
    _check_stored(qweight, scales, offsets, bits)
    return qweight.contiguous(), scales.contiguous(), offsets.contiguous()


# The unchecked calls: stored dtypes, CPU, contiguous (the kernel's prepare() checks once).
def _dequant(qweight, scales, offsets, bits, bo, bi, in_features) -> torch.Tensor:
    n = qweight.shape[0]
    w = torch.empty(n, in_features, dtype=torch.float32)
    _check(_library().qahira_blockwise_dequant(
        qweight.data_ptr(), bits, scales.data_ptr(), offsets.data_ptr(),
        offsets.dtype == torch.float32, n, in_features, bo, bi, w.data_ptr()),
        "blockwise_dequant")
    return w


def _packed_linear(x, qweight, scales, offsets, bits, bo, bi) -> torch.Tensor:
    x = x.contiguous()
    m, k = x.shape
    n = qweight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype)
    if m:
        _check(_library().qahira_blockwise_linear(
            x.data_ptr(), cpu_lib.DTYPE_CODES[x.dtype], m, k, qweight.data_ptr(), bits,
            scales.data_ptr(), offsets.data_ptr(), offsets.dtype == torch.float32, n, bo, bi,
            y.data_ptr()), "blockwise_linear")
    return y


# One path for every M (batch invariance). Its price, benchmarks/cpu_blockwise.py (2 threads):
# the GEMV is as fast as dequantize + fp32 GEMM up to M = 32, 1.4-2.3x slower at M = 256
# (prefill of long batches; e.g. 8.8 vs 5.0 ms on SmolLM2's 1536x576 INT4 layer).
_linear = _packed_linear


def blockwise_dequant(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                      bits: int, block_size: tuple[int, int], in_features: int) -> torch.Tensor:
    """The fp32 weight [out, in] of a stored layer (qweight/scales/offsets as in FORMAT.md)."""
    return _dequant(*_stored(qweight, scales, offsets, bits), bits, *block_size, in_features)


def blockwise_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                     offsets: torch.Tensor, bits: int, block_size: tuple[int, int]) -> torch.Tensor:
    """x [M, K] -> [M, N] in x.dtype, through the packed GEMV path (any M)."""
    return _packed_linear(x, *_stored(qweight, scales, offsets, bits), bits, *block_size)


def cpu_blockwise_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                         offsets: torch.Tensor, bits: int, bo: int, bi: int) -> torch.Tensor:
    """x [M, K] -> [M, N] in x.dtype (the op's implementation; the packed path for every M,
    so row i of the result is bit-identical whatever the other rows are)."""
    return _linear(x, *_stored(qweight, scales, offsets, bits), bits, bo, bi)


# A plain torch.library op (as qahira_kernels.cpu_gemv does): a ctypes call is opaque to Dynamo.
_op_lib = torch.library.Library("qahira", "FRAGMENT")
_op_lib.define("cpu_blockwise_linear(Tensor x, Tensor qweight, Tensor scales, Tensor offsets, "
               "int bits, int bo, int bi) -> Tensor")
_op_lib.impl("cpu_blockwise_linear", cpu_blockwise_linear, "CPU")


@torch.library.register_fake("qahira::cpu_blockwise_linear")
def _cpu_blockwise_linear_fake(x, qweight, scales, offsets, bits, bo, bi):
    return x.new_empty(x.shape[0], qweight.shape[0])


class CpuBlockwiseKernel(LinearKernel):
    """Any bits / block / activation dtype on a CPU with AVX2/FMA/F16C (see module doc)."""

    name = "cpu_blockwise"

    @classmethod
    def can_implement(cls, spec: LinearSpec):
        if spec.device_type != "cpu":
            return False, "CPU only"
        if spec.bits not in (4, 8):
            return False, "4-bit or 8-bit only"
        if spec.act_dtype not in cpu_lib.DTYPE_CODES:
            return False, f"{spec.act_dtype} activations: fp32/bf16/fp16 only"
        if cpu_lib.load_library() is None:
            return False, cpu_lib.library_error()
        return True, None

    def prepare(self, layer):
        # Checked once here (a clear error before serving), not on every call.
        stored = _stored(layer.qweight.data, layer.scales.data, layer.offsets.data,
                         self.spec.bits)
        for name, t in zip(("qweight", "scales", "offsets"), stored):
            _set_buffer(layer, name, t)

    def apply(self, layer, x, bias=None):
        shape = x.shape
        # Eager: the unchecked implementation directly; under torch.compile: the op, one
        # opaque node.
        op = torch.ops.qahira.cpu_blockwise_linear if torch.compiler.is_compiling() else _linear
        y = op(x.reshape(-1, shape[-1]), layer.qweight, layer.scales, layer.offsets,
               self.spec.bits, *self.spec.block_size)
        if bias is not None:
            y = y + bias
        return y.reshape(*shape[:-1], y.shape[-1])


def register() -> None:
    """Put CpuBlockwiseKernel just ahead of the torch general path (idempotent)."""
    register_kernel(CpuBlockwiseKernel, first=False)
