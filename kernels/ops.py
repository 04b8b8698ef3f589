"""Every raw op of qahira_kernels, declared in this one module (as vLLM's `_custom_ops.py` is).

torch ops, `torch.ops.qahira.<name>` (vLLM compiles the model: each is one opaque graph node),
each also callable here as a plain function of the same name:

    triton_blockwise(x [..., K], qweight, scales_t, offsets_t, bias, bits, bo, bi) -> y [..., N]
        CUDA, Triton (blockwise_gemm.py); the weight as made by
        blockwise_gemm.pack_blockwise_weight (scales/offsets transposed)
    cpu_int4(x [M, K], w, scales, offsets, bo, bi) -> y [M, N]
        CPU, cpu_intdot.c; w as made by layouts.pack_cpu_int4, 4-bit, bi % 32 == 0
    cpu_int8(x [M, K], w, scales, offsets, bo, bi) -> y [M, N]
        CPU, cpu_intdot.c; w as made by layouts.pack_cpu_int8, 8-bit, bi % 32 == 0
        (both: the AVX2 or AVX-512 build, cpu_lib.intdot_variant(); bit-identical results)
    cpu_dequant_gemm(x [M, K] bf16, w, scales, offsets, bits, bi, bo, variant) -> y [M, N] bf16
        CPU, cpu_dequant_gemm.c; tensors in the build's layout (layouts.pack_cpu_dequant_gemm,
        or pack_cpu_dequant_gemm_rows for AMX); the dense bf16 weight's product up to fp32
        summation order
    cpu_blockwise(x [M, K], qweight, scales, offsets, bits, bo, bi) -> y [M, N]
        CPU, cpu_blockwise.c; tensors as stored (docs/FORMAT.md), any bits/block

y has x's dtype (fp32/bf16/fp16 on CPU, fp16/bf16 for Triton). Python-only entry points:
`cpu_blockwise_dequant` (the weight in fp32 / bf16 / fp16, for the trainer), `cpu_quantize` and `cpu_all_finite`
(the quantizer's clip search and finiteness check, for `qahira quantize`) and
`check_cpu_blockwise_stored` / `cpu_blockwise_stored_ok`.

C entry points of the compiled CPU library, with their ctypes signatures (`C_FUNCTIONS`; every
one returns int, 0 = success; cpu_lib.load_library() applies them):

    qahira_cpu_intdot_avx2         cpu_intdot.c   (AVX2 build)
    qahira_cpu_intdot_avx512       cpu_intdot.c   (AVX-512 + VNNI build, where compiled)
    qahira_cpu_avx512_ok           cpu_intdot.c   (CPUID: can the AVX-512 build run here)
    qahira_cpu_dequant_gemm_avx2   cpu_dequant_gemm.c (AVX2 build)
    qahira_cpu_dequant_gemm_avx512 cpu_dequant_gemm.c (AVX-512 build, where compiled)
    qahira_cpu_dequant_gemm_avx512_bf16  cpu_dequant_gemm.c (AVX512-BF16 build, where compiled)
    qahira_cpu_dequant_gemm_amx    cpu_dequant_gemm.c (AMX build, where compiled)
    qahira_cpu_dequant_gemm_{avx2,avx512,avx512_bf16}_block_rows  (those builds: rows per pass)
    qahira_cpu_amx_ok              cpu_dequant_gemm.c (CPUID + OS permission for AMX tiles)
    qahira_cpu_dequant_gemm_amx_chunks_outside  cpu_dequant_gemm.c (AMX build: its loop order)
    qahira_cpu_blockwise           cpu_blockwise.c
    qahira_cpu_blockwise_dequant   cpu_blockwise.c
    qahira_qbara_layer_avx2        cpu_qbara.c   (AVX2 build; called by cpu_qbara.CpuQbaraLayer)
    qahira_qbara_layer_avx512      cpu_qbara.c   (AVX-512 build, where compiled; same bits)
    qahira_cpu_quantize            cpu_quantize.c (called by cpu_quantize below)
    qahira_cpu_all_finite          cpu_quantize.c (called by cpu_all_finite below)

Importing this module registers the torch ops once per process; it imports neither Triton nor
the C library (both load on first call).

Errors: the checked CPU functions raise ValueError naming the tensor for a wrong dtype or
device, RuntimeError when the C library is unavailable (cpu_lib.library_error() says why),
MemoryError when the C code cannot allocate its buffers.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading

import torch

from . import cpu_lib
from .layouts import DEQUANT_GEMM_ROW_LAYOUT

_p, _i, _l = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
C_FUNCTIONS: dict[str, list] = {
    # x, x_dtype, M, K, w, bits, scales, scales_f32, offsets, offsets_f32, N, bo, bi, y
    "qahira_cpu_intdot_avx2": [_p, _i, _i, _i, _p, _i, _p, _i, _p, _i, _i, _i, _i, _p],
    "qahira_cpu_intdot_avx512": [_p, _i, _i, _i, _p, _i, _p, _i, _p, _i, _i, _i, _i, _p],
    "qahira_cpu_avx512_ok": [],
    # x, M, K, w, bits, scales, scales_f32, offsets, offsets_f32, N, bi, bo, y, y_dtype
    **{f"qahira_cpu_dequant_gemm_{v}": [_p, _i, _i, _p, _i, _p, _i, _p, _i, _i, _i, _i, _p, _i]
       for v in ("avx2", "avx512", "avx512_bf16", "amx")},
    **{f"qahira_cpu_dequant_gemm_{v}_block_rows": [] for v in ("avx2", "avx512", "avx512_bf16")},
    "qahira_cpu_amx_ok": [],
    "qahira_cpu_dequant_gemm_amx_chunks_outside": [_i, _i],  # K, M
    # x, x_dtype, M, K, qweight, bits, scales, scales_f32, offsets, offsets_f32, N, bo, bi, y
    "qahira_cpu_blockwise": [_p, _i, _i, _i, _p, _i, _p, _i, _p, _i, _i, _i, _i, _p],
    # qweight, bits, scales, offsets, offsets_f32, N, K, bo, bi, w, w_dtype
    "qahira_cpu_blockwise_dequant": [_p, _i, _p, _i, _p, _i, _i, _i, _i, _i, _p, _i, _i],
    "qahira_cpu_bf16_ok": [],
    # layer struct, x, x_dtype, x_stride, n_rows, n, rows, slots, y, y_dtype, y_stride
    "qahira_qbara_layer_avx2": [_p, _p, _i, _l, _l, _i, _p, _p, _p, _i, _l],
    "qahira_qbara_layer_avx512": [_p, _p, _i, _l, _l, _i, _p, _p, _p, _i, _l],
    # w, w_dtype, N, K, bo, bi, bits, ratios, n_ratios, offsets_f32, n_threads,
    # q, scales, offsets, err, ref
    "qahira_cpu_quantize": [_p, _i, _i, _i, _i, _i, _i, _p, _i, _i, _i, _p, _p, _p, _p, _p],
    # x, x_dtype, n, n_threads
    "qahira_cpu_all_finite": [_p, _i, _l, _i],
}


def _library(what: str) -> ctypes.CDLL:
    lib = cpu_lib.load_library()
    if lib is None:
        raise RuntimeError(f"qahira {what} unavailable: {cpu_lib.library_error()}")
    return lib


# ----------------------------------------------------------------------------- triton_blockwise

@torch.library.custom_op("qahira::triton_blockwise", mutates_args=())
def triton_blockwise(x: torch.Tensor, qweight: torch.Tensor, scales_t: torch.Tensor,
                     offsets_t: torch.Tensor, bias: torch.Tensor | None, bits: int, bo: int,
                     bi: int) -> torch.Tensor:
    from . import blockwise_gemm as bg  # Triton: imported on first call only

    n = qweight.shape[0]
    k = qweight.shape[1] * (bg.INT4_PER_WORD if bits == 4 else 1)
    weight = bg.PackedBlockwiseWeight(qweight, scales_t, offsets_t, bits, (bo, bi), n, k)
    return bg.blockwise_gemm(x, weight, bias)


@triton_blockwise.register_fake
def _triton_blockwise_fake(x, qweight, scales_t, offsets_t, bias, bits, bo, bi):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


# ----------------------------------------------------------------------------- CPU ops
# Plain torch.library ops rather than @custom_op: the latter's Python wrapper cost ~35 us per
# call, as much as the arithmetic of a small layer (measured here, 1 thread).
_lib = torch.library.Library("qahira", "FRAGMENT")


# (library, requested variant or $QAHIRA_CPU_ISA) -> C function: resolving the build on every
# call cost ~2 us, a quarter of a small layer's call.
_intdot_fns: dict = {}


def _intdot(name: str, bits: int, x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor,
            offsets: torch.Tensor, bo: int, bi: int, variant: str | None) -> torch.Tensor:
    lib = _library(name)
    key = (lib, variant, None if variant else os.environ.get(cpu_lib.ISA_ENV))
    fn = _intdot_fns.get(key)
    if fn is None:
        fn = _intdot_fns[key] = getattr(lib, "qahira_cpu_intdot_"
                                        + (variant or cpu_lib.intdot_variant()))
    x = x.contiguous()
    m, k = x.shape
    y = torch.empty(m, w.shape[0], dtype=x.dtype)
    rc = fn(x.data_ptr(), cpu_lib.DTYPE_CODES[x.dtype], m, k, w.data_ptr(), bits,
            scales.data_ptr(), scales.dtype == torch.float32, offsets.data_ptr(),
            offsets.dtype == torch.float32, w.shape[0], bo, bi, y.data_ptr())
    if rc:
        raise MemoryError(f"qahira {name}: no memory for the activations of x {tuple(x.shape)}")
    return y


def cpu_int4(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor,
                  offsets: torch.Tensor, bo: int, bi: int,
                  variant: str | None = None) -> torch.Tensor:
    """x [M, K] -> [M, N] in x.dtype; w uint8 [N, K/2] (layouts.pack_cpu_int4), scales and
    offsets fp16/fp32 [N/bo, K/bi], all contiguous on CPU. `variant` ("avx2" /
    "avx512", one of cpu_lib.intdot_variants()) picks the build; None: cpu_lib.intdot_variant().
    AttributeError for a variant not in the library, MemoryError if the C code cannot allocate."""
    return _intdot("cpu_int4", 4, x, w, scales, offsets, bo, bi, variant)


def cpu_int8(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
             bo: int, bi: int, variant: str | None = None) -> torch.Tensor:
    """x [M, K] -> [M, N] in x.dtype; w uint8 [N, K] (layouts.pack_cpu_int8), scales and
    offsets fp16/fp32 [N/bo, K/bi], all contiguous on CPU; variant and errors as cpu_int4."""
    return _intdot("cpu_int8", 8, x, w, scales, offsets, bo, bi, variant)


for _name, _fn in (("cpu_int4", cpu_int4), ("cpu_int8", cpu_int8)):
    _lib.define(f"{_name}(Tensor x, Tensor w, Tensor scales, Tensor offsets, int bo, int bi) "
                "-> Tensor")
    _lib.impl(_name, _fn, "CPU")


@torch.library.register_fake("qahira::cpu_int4")
def _cpu_int4_fake(x, w, scales, offsets, bo, bi):
    return x.new_empty(x.shape[0], w.shape[0])


@torch.library.register_fake("qahira::cpu_int8")
def _cpu_int8_fake(x, w, scales, offsets, bo, bi):
    return x.new_empty(x.shape[0], w.shape[0])


_dequant_gemm_fns: dict = {}


def cpu_dequant_gemm(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor,
                     offsets: torch.Tensor, bits: int, bi: int, bo: int = 1,
                     variant: str | None = None,
                     out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x bf16 [M, K] -> y [M, N] = x W^T, W the layer's dense bf16 weight (the format's rule,
    rounded to bf16), with fp32 accumulation; y in `out_dtype` (bf16, default, or fp32).

    `variant`: one of cpu_lib.dequant_gemm_variants() ("avx2", "avx512", "avx512_bf16", "amx");
    None: cpu_lib.dequant_gemm_variant(). The tensors are that build's layout (contiguous, CPU):
    the vector builds read layouts.pack_cpu_dequant_gemm's (N % 16 == 0, bi even; bo unused),
    the AMX build (layouts.DEQUANT_GEMM_ROW_LAYOUT) reads pack_cpu_dequant_gemm_rows' weight and
    the stored scales / offsets [N/bo, K/bi] widened to fp32 (N % 16 == 0; INT4: K % 64,
    bi % 32 == 0; INT8: K % 32, bi % 16 == 0). Raises ValueError for a non-bf16 x, a shape the build does not
    serve or a variant this CPU does not run, MemoryError when the per-thread
    buffers cannot be allocated."""
    lib = _library("cpu_dequant_gemm")
    variant = variant or cpu_lib.dequant_gemm_variant()
    fn = _dequant_gemm_fns.get((lib, variant))
    if fn is None:
        # also what asks the OS for the AMX tile state: an AMX instruction without it is SIGILL
        runs = cpu_lib.dequant_gemm_variants()
        if variant not in runs:
            raise ValueError(f"cpu_dequant_gemm: variant {variant!r}: this CPU runs only {runs}")
        fn = _dequant_gemm_fns[(lib, variant)] = getattr(lib, "qahira_cpu_dequant_gemm_"
                                                         + variant)
    if x.dtype != torch.bfloat16:
        raise ValueError(f"cpu_dequant_gemm: x is {x.dtype}, expected torch.bfloat16")
    out_dtype = out_dtype or torch.bfloat16
    x = x.contiguous()
    m, k = x.shape
    n = w.shape[0] if variant in DEQUANT_GEMM_ROW_LAYOUT else w.shape[0] * w.shape[2]
    y = torch.empty(m, n, dtype=out_dtype)
    rc = fn(x.data_ptr(), m, k, w.data_ptr(), bits, scales.data_ptr(),
            scales.dtype == torch.float32, offsets.data_ptr(), offsets.dtype == torch.float32,
            n, bi, bo, y.data_ptr(), cpu_lib.DTYPE_CODES[out_dtype])
    if rc == -1:
        raise ValueError(f"cpu_dequant_gemm[{variant}]: x {tuple(x.shape)}, w {tuple(w.shape)}, "
                         f"bits={bits}, block {bo}x{bi}: a shape this build does not serve "
                         "(see the docstring)")
    _check_rc(rc, "cpu_dequant_gemm")
    return y


def cpu_dequant_gemm_block_rows(variant: str) -> int:
    """The most activation rows one pass over the weight takes in the vector build `variant`
    ("avx2", "avx512", "avx512_bf16") of cpu_dequant_gemm: a larger call is split into equal
    blocks of at most this many rows, each dequantizing the weight again, so that a chunk's
    activations and the fp32 accumulators stay in half of this CPU's L2 (cpu_dequant_gemm.c;
    bit-identical to one pass). AttributeError for a build the library does not have."""
    return getattr(_library("cpu_dequant_gemm"), f"qahira_cpu_dequant_gemm_{variant}_block_rows")()


def cpu_dequant_gemm_amx_chunks_outside(k: int, m: int) -> bool:
    """Whether the AMX build runs a call with these in_features k and rows m chunk-first (its
    activations, k / 2 x m 32-bit words with m padded to 16, exceed half of this CPU's L2:
    cpu_dequant_gemm.c, "Loop order") rather than panel-first. RuntimeError when the library
    has no AMX build."""
    lib = _library("cpu_dequant_gemm")
    if not hasattr(lib, cpu_lib.AMX_LOOP_ORDER_FUNCTION):
        raise RuntimeError("cpu_dequant_gemm_amx_chunks_outside: the library has no AMX build")
    return bool(getattr(lib, cpu_lib.AMX_LOOP_ORDER_FUNCTION)(k, m))


_lib.define("cpu_dequant_gemm(Tensor x, Tensor w, Tensor scales, Tensor offsets, int bits, "
            "int bi, int bo, str variant) -> Tensor")
_lib.impl("cpu_dequant_gemm", lambda x, w, scales, offsets, bits, bi, bo, variant:
          cpu_dequant_gemm(x, w, scales, offsets, bits, bi, bo, variant), "CPU")


@torch.library.register_fake("qahira::cpu_dequant_gemm")
def _cpu_dequant_gemm_fake(x, w, scales, offsets, bits, bi, bo, variant):
    n = w.shape[0] if variant in DEQUANT_GEMM_ROW_LAYOUT else w.shape[0] * w.shape[2]
    return x.new_empty(x.shape[0], n)


def check_cpu_blockwise_stored(qweight: torch.Tensor, scales: torch.Tensor,
                               offsets: torch.Tensor, bits: int) -> None:
    """ValueError unless the tensors have the stored dtypes on CPU (the C code reads exactly
    those; anything else, e.g. after a `model.to(dtype)`, would be misread)."""
    want_q = torch.int32 if bits == 4 else torch.uint8
    problems = [f"{name} is on {t.device}" for name, t in
                (("qweight", qweight), ("scales", scales), ("offsets", offsets))
                if t.device.type != "cpu"]
    if qweight.dtype != want_q:
        problems.append(f"qweight is {qweight.dtype}, expected {want_q} for {bits}-bit")
    if scales.dtype not in (torch.float16, torch.float32):
        problems.append(f"scales are {scales.dtype}, expected torch.float16 or torch.float32")
    if offsets.dtype not in (torch.float16, torch.float32):
        problems.append(f"offsets are {offsets.dtype}, expected torch.float16 or torch.float32")
    if problems:
        raise ValueError("qahira cpu_blockwise: " + "; ".join(problems))


def cpu_blockwise_stored_ok(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                            bits: int) -> bool:
    try:
        check_cpu_blockwise_stored(qweight, scales, offsets, bits)
    except ValueError:
        return False
    return True


def _check_rc(rc: int, what: str) -> None:
    if rc == -2:
        raise MemoryError(f"qahira {what}: out of memory for its per-thread buffers")
    if rc:
        raise RuntimeError(f"qahira {what}: failed with code {rc}")


def _stored(qweight, scales, offsets, bits):
    check_cpu_blockwise_stored(qweight, scales, offsets, bits)
    return qweight.contiguous(), scales.contiguous(), offsets.contiguous()


def cpu_blockwise_prechecked(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                             offsets: torch.Tensor, bits: int, bo: int, bi: int) -> torch.Tensor:
    """cpu_blockwise without the dtype checks, for callers that ran check_cpu_blockwise_stored
    once and keep the tensors contiguous (the linear kernel's prepare()).

    One packed path for every M (batch invariance: row i of y is bit-identical whatever the
    other rows are). Its price, benchmarks/cpu_blockwise.py (2 threads): as fast as dequantize
    + fp32 GEMM up to M = 32, 1.4-2.3x slower at M = 256 (prefill of long batches; e.g. 8.8 vs
    5.0 ms on SmolLM2's 1536x576 INT4 layer)."""
    x = x.contiguous()
    m, k = x.shape
    n = qweight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype)
    if m:
        _check_rc(_library("cpu_blockwise").qahira_cpu_blockwise(
            x.data_ptr(), cpu_lib.DTYPE_CODES[x.dtype], m, k, qweight.data_ptr(), bits,
            scales.data_ptr(), scales.dtype == torch.float32, offsets.data_ptr(),
            offsets.dtype == torch.float32, n, bo, bi,
            y.data_ptr()), "cpu_blockwise")
    return y


def cpu_blockwise(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                  offsets: torch.Tensor, bits: int, bo: int, bi: int) -> torch.Tensor:
    """x [M, K] -> [M, N] in x.dtype (fp32/bf16/fp16), exact up to fp32 summation order;
    qweight/scales/offsets as stored (FORMAT.md), checked (ValueError naming the tensor)."""
    return cpu_blockwise_prechecked(x, *_stored(qweight, scales, offsets, bits), bits, bo, bi)


DEQUANT_BF16_ROUNDINGS = ("avx2", "avx512_bf16")


@functools.lru_cache(maxsize=None)
def cpu_bf16_rounding_available() -> tuple[str, ...]:
    """The fp32 -> bf16 roundings cpu_blockwise_dequant can use here: "avx2" (integer
    nearest-even, every AVX2 CPU) and "avx512_bf16" (the vcvtneps2bf16 instruction, where
    CPUID reports AVX512-BF16 and the compiler built it). Both give the same bits."""
    ok = _library("cpu_blockwise_dequant").qahira_cpu_bf16_ok()
    return DEQUANT_BF16_ROUNDINGS if ok else DEQUANT_BF16_ROUNDINGS[:1]


_buffers = threading.local()


def reused_buffer(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """This thread's CPU buffer of `shape` and `dtype`, allocated on first use and returned
    again on every later call with the same key (its contents are whatever was last written).

    For a dequantized weight that is consumed at once (cpu_blockwise_dequant(out=...)): a fresh
    one per call costs more than the dequantization, since the allocator maps new pages that
    the kernel zero-fills on first touch (~2 ms per 1024 x 2816 fp32 layer, three times the
    dequantization). Memory: one buffer per (shape, dtype) and thread, shared by every caller."""
    cache, key = _buffer_cache(), (tuple(shape), dtype)
    buf = cache.get(key)
    if buf is None:
        buf = cache[key] = torch.empty(shape, dtype=dtype)
    return buf


def _buffer_cache() -> dict:
    """This thread's (shape, dtype) -> buffer dict of reused_buffer."""
    if not hasattr(_buffers, "by_key"):
        _buffers.by_key = {}
    return _buffers.by_key


def reused_buffer_keys() -> set[tuple[tuple[int, ...], torch.dtype]]:
    """The (shape, dtype) keys of this thread's reused buffers (reused_buffer)."""
    return set(_buffer_cache())


def release_reused_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Drop this thread's reused buffer of `shape` and `dtype` (its memory is freed once no
    tensor refers to it; a later reused_buffer call allocates a new one). No-op if absent."""
    _buffer_cache().pop((tuple(shape), dtype), None)


def cpu_blockwise_dequant(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                          bits: int, bo: int, bi: int, in_features: int,
                          dtype: torch.dtype = torch.float32,
                          out: torch.Tensor | None = None,
                          bf16_rounding: str | None = None) -> torch.Tensor:
    """The weight [out, in] of a stored layer in `dtype` (fp32, bf16 or fp16): the format's
    dequantization, fp32 scales * q + offsets, bit for bit, rounded once to dtype (nearest
    even, as torch's .to(dtype): denormals kept, NaN -> 0x7fc0 in bf16). Stored tensors
    checked like cpu_blockwise. `out`: a contiguous CPU tensor of that shape and dtype to
    write into (a reused buffer) instead of a new one. `bf16_rounding`: one of
    cpu_bf16_rounding_available() (default: the last, the fastest; the tests run each).
    Raises ValueError for a bad dtype, `out` or bf16_rounding."""
    if dtype not in cpu_lib.DTYPE_CODES:
        raise ValueError(f"cpu_blockwise_dequant: dtype {dtype}: expected one of "
                         f"{', '.join(map(str, cpu_lib.DTYPE_CODES))}")
    available = cpu_bf16_rounding_available()
    if bf16_rounding is None:
        bf16_rounding = available[-1]
    elif bf16_rounding not in available:
        raise ValueError(f"cpu_blockwise_dequant: bf16_rounding={bf16_rounding!r}: this CPU "
                         f"and build offer {list(available)}")
    qweight, scales, offsets = _stored(qweight, scales, offsets, bits)
    n = qweight.shape[0]
    if out is None:
        out = torch.empty(n, in_features, dtype=dtype)
    elif (out.shape != (n, in_features) or out.dtype != dtype or out.device.type != "cpu"
          or not out.is_contiguous()):
        raise ValueError(f"cpu_blockwise_dequant: out is {out.dtype} {list(out.shape)} on "
                         f"{out.device}: expected a contiguous CPU {dtype} [{n}, {in_features}]")
    _check_rc(_library("cpu_blockwise").qahira_cpu_blockwise_dequant(
        qweight.data_ptr(), bits, scales.data_ptr(), scales.dtype == torch.float32,
        offsets.data_ptr(), offsets.dtype == torch.float32, n, in_features, bo, bi, out.data_ptr(),
        cpu_lib.DTYPE_CODES[dtype], dtype == torch.bfloat16 and bf16_rounding == "avx512_bf16"),
        "cpu_blockwise_dequant")
    return out



class NotStorableError(ValueError):
    """cpu_quantize found a non-finite value, a min-max scale above float16's range or a block
    minimum that overflows the offset dtype (the caller names the tensor and block)."""


def cpu_quantize(w: torch.Tensor, bits: int, bo: int, bi: int, ratios: tuple[float, ...],
                 offsets_f32: bool, n_threads: int | None = None):
    """Block-wise quantization of w [N, K] (fp32/bf16/fp16, CPU) with the MSE clip search over
    `ratios` (fp32 values; 1.0 = min-max), bit-identical to qahira_vllm.quant_math.quantize.

    Returns (qweight as stored: 4-bit int32 [N, K/8], 8-bit uint8 [N, K]; scales fp16
    [N/bo, K/bi]; offsets fp16 or fp32 [N/bo, K/bi]; err fp32 [N/bo, K/bi], each block's
    squared error; ref fp32 [N/bo, K/bi], each block's sum of w^2). bo, bi must divide N, K (and
    K % 8 == 0 for 4 bits; ValueError otherwise). n_threads: OpenMP threads, default
    torch.get_num_threads(). Raises NotStorableError (see there), MemoryError, RuntimeError
    without the library."""
    n, k = w.shape
    if n % bo or k % bi or (bits == 4 and k % 8) or bits not in (4, 8) or not ratios:
        raise ValueError(f"cpu_quantize: w {tuple(w.shape)} with bits={bits}, block {bo}x{bi}: "
                         "the block must divide w (and in % 8 == 0 for 4 bits), and ratios "
                         "must not be empty")
    if w.dtype not in cpu_lib.DTYPE_CODES or w.device.type != "cpu":
        raise ValueError(f"cpu_quantize: w must be an fp32/bf16/fp16 CPU tensor, got "
                         f"{w.dtype} on {w.device}")
    w = w.detach().contiguous()
    r = torch.tensor(tuple(ratios), dtype=torch.float32)
    q = (torch.zeros(n, k // 8, dtype=torch.int32) if bits == 4
         else torch.empty(n, k, dtype=torch.uint8))
    scales = torch.empty(n // bo, k // bi, dtype=torch.float16)
    offsets = torch.empty_like(scales, dtype=torch.float32 if offsets_f32 else torch.float16)
    err, ref = torch.empty_like(scales, dtype=torch.float32), torch.empty_like(
        scales, dtype=torch.float32)
    rc = _library("cpu_quantize").qahira_cpu_quantize(
        w.data_ptr(), cpu_lib.DTYPE_CODES[w.dtype], n, k, bo, bi, bits, r.data_ptr(), len(r),
        bool(offsets_f32), n_threads or torch.get_num_threads(), q.data_ptr(), scales.data_ptr(),
        offsets.data_ptr(), err.data_ptr(), ref.data_ptr())
    if rc == 2:
        raise NotStorableError(f"cpu_quantize: w {tuple(w.shape)} is not storable")
    _check_rc(rc, "cpu_quantize")
    return q, scales, offsets, err, ref


def cpu_all_finite(x: torch.Tensor, n_threads: int | None = None) -> bool:
    """torch.isfinite(x).all() for an fp32/bf16/fp16 CPU tensor, at memory speed. ValueError for
    another dtype or device, RuntimeError without the library."""
    if x.dtype not in cpu_lib.DTYPE_CODES or x.device.type != "cpu":
        raise ValueError(f"cpu_all_finite: x must be an fp32/bf16/fp16 CPU tensor, got "
                         f"{x.dtype} on {x.device}")
    x = x.contiguous()
    return bool(_library("cpu_all_finite").qahira_cpu_all_finite(
        x.data_ptr(), cpu_lib.DTYPE_CODES[x.dtype], x.numel(),
        n_threads or torch.get_num_threads()))


_lib.define("cpu_blockwise(Tensor x, Tensor qweight, Tensor scales, Tensor offsets, int bits, "
            "int bo, int bi) -> Tensor")
_lib.impl("cpu_blockwise", cpu_blockwise, "CPU")


@torch.library.register_fake("qahira::cpu_blockwise")
def _stored_linear_fake(x, qweight, scales, offsets, bits, bo, bi):
    """Shape of x W^T for the ops that take a layer's stored tensors (cpu_blockwise,
    cpu_dequant_dense)."""
    return x.new_empty(x.shape[0], qweight.shape[0])


def cpu_dequant_dense(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                      offsets: torch.Tensor, bits: int, bo: int, bi: int) -> torch.Tensor:
    """x [M, K] (fp32 / bf16 / fp16) -> x W^T [M, N] in x's dtype: W dequantized whole by
    cpu_blockwise_dequant (rounded once to x's dtype) into this thread's reused buffer for
    [N, K] (reused_buffer), then torch's dense GEMM (F.linear: oneDNN / MKL on CPU). Stored
    tensors as cpu_blockwise_dequant takes them; its errors."""
    n, k = qweight.shape[0], x.shape[-1]
    w = cpu_blockwise_dequant(qweight, scales, offsets, bits, bo, bi, k, x.dtype,
                              reused_buffer((n, k), x.dtype))
    return torch.nn.functional.linear(x, w)


_lib.define("cpu_dequant_dense(Tensor x, Tensor qweight, Tensor scales, Tensor offsets, int bits, "
            "int bo, int bi) -> Tensor")
_lib.impl("cpu_dequant_dense", cpu_dequant_dense, "CPU")


torch.library.register_fake("qahira::cpu_dequant_dense")(_stored_linear_fake)


__all__ = ["C_FUNCTIONS", "check_cpu_blockwise_stored", "cpu_int4", "cpu_blockwise",
           "cpu_dequant_gemm_amx_chunks_outside", "cpu_dequant_gemm_block_rows",
           "cpu_dequant_gemm", "cpu_dequant_dense",
           "cpu_blockwise_dequant", "cpu_blockwise_prechecked", "cpu_blockwise_stored_ok",
           "cpu_int8", "cpu_quantize", "cpu_all_finite", "NotStorableError", "reused_buffer",
           "reused_buffer_keys", "release_reused_buffer",
           "triton_blockwise"]
