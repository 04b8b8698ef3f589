"""Pure quantization math for the qahira format (no I/O, no model code): the one home of
packing (pack_int4 / unpack_int4, pack_qweight / unpack_qweight), block expansion
(expand_blocks), quantization (quantize, check_quantizable) and dequantization (dequantize).

Layouts are those of `qahira_vllm.format`: q is unsigned, W = scales * q + offsets per block.
"""

from __future__ import annotations

import torch

from .format import INT4_PER_WORD, QahiraFormatError, QahiraQuantConfig

# Clip ratios tried per block by the MSE search; 1.0 (plain min-max) is always a candidate,
# so the search never has a larger block error than min-max.
DEFAULT_CLIP_RATIOS = tuple(1.0 - 0.025 * k for k in range(13))  # 1.0 .. 0.7


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[out, in] values in 0..15 -> int32 [out, in/8]; column 8w+j in bits 4j..4j+3 of word w."""
    out_f, in_f = q.shape
    if in_f % INT4_PER_WORD:
        raise ValueError(f"pack_int4: in={in_f} is not a multiple of {INT4_PER_WORD}")
    q = q.to(torch.int64).reshape(out_f, in_f // INT4_PER_WORD, INT4_PER_WORD)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=q.device)
    words = (q << shifts).sum(dim=-1)  # < 2**32, fits int64
    # Reinterpret as signed int32 (two's complement) without overflow errors.
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [out, in/8] -> uint8 [out, in] (inverse of pack_int4)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)
    q = (qweight.unsqueeze(-1) >> shifts) & 0xF
    return q.reshape(qweight.shape[0], -1).to(torch.uint8)


def expand_blocks(t: torch.Tensor, block_size: tuple[int, int]) -> torch.Tensor:
    """[out/bo, in/bi] -> [out, in], each entry repeated over its block."""
    bo, bi = block_size
    return t.repeat_interleave(bo, dim=0).repeat_interleave(bi, dim=1)


def unpack_qweight(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Stored qweight (4-bit: int32 [out, in/8]; 8-bit: uint8 [out, in]) -> uint8 [out, in]."""
    return unpack_int4(qweight) if bits == 4 else qweight.to(torch.uint8)


def pack_qweight(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 q [out, in] -> stored qweight (4-bit: int32 [out, in/8]; 8-bit: uint8 [out, in])."""
    return pack_int4(q) if bits == 4 else q.to(torch.uint8)


def _to_blocks(w: torch.Tensor, block_size: tuple[int, int]) -> torch.Tensor:
    """[out, in] -> [out/bo, in/bi, bo*bi] view of each block's values."""
    bo, bi = block_size
    out_f, in_f = w.shape
    return (w.reshape(out_f // bo, bo, in_f // bi, bi).permute(0, 2, 1, 3)
            .reshape(out_f // bo, in_f // bi, bo * bi))


def _params_for_range(lo: torch.Tensor, hi: torch.Tensor, qmax: int, offset_dtype: torch.dtype,
                      scale_dtype: torch.dtype = torch.float16):
    """Stored (rounded) scale and offset for blocks spanning [lo, hi]."""
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant block: any scale
    if scale_dtype == torch.float16:
        # Stay inside fp16's range: tiny scales would flush to zero, which divides badly.
        scale = scale.clamp(min=2.0**-24, max=65504.0).to(scale_dtype)
    else:  # fp32 scales: the fp32 quotient as is (only an fp32 underflow to 0 is lifted)
        scale = scale.clamp(min=torch.finfo(torch.float32).tiny)
    offset = lo.to(offset_dtype)
    return scale, offset


def _round_to_grid(blocks: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, qmax: int):
    s = scale.to(torch.float32).unsqueeze(-1)
    z = offset.to(torch.float32).unsqueeze(-1)
    return torch.clamp(torch.round((blocks - z) / s), 0, qmax)


def describe_non_finite(t: torch.Tensor) -> str | None:
    """None if every value of `t` is finite, else e.g. "nan at [5, 7] (3 non-finite value(s))"
    (the first offending index in row-major order, and the count)."""
    finite = torch.isfinite(t)
    if bool(finite.all()):
        return None
    bad = (~finite).nonzero()
    first = bad[0].tolist()
    return f"{t[tuple(first)].item()} at {first} ({bad.shape[0]} non-finite value(s))"


def check_quantizable(w: torch.Tensor, cfg: QahiraQuantConfig, name: str) -> None:
    """Refuse W [out, in] (any float dtype) if its stored form would not be W's block grid.

    Raises QahiraFormatError naming tensor `name` and the first offending index or block when
    W holds NaN or +-inf; when a block's min-max scale (hi - lo) / (2**bits - 1) exceeds the
    largest value of cfg's scale dtype (float16: 65504, it would be clamped, silently storing
    other weights); or when a block's minimum, the min-max offset, rounds to +-inf in the offset
    dtype (with float16 offsets: |lo| >= 65520; the fix is float32 offsets). Clipped candidates
    of the MSE search lie inside [lo, hi], so they fit whenever min-max fits.
    """
    bad = describe_non_finite(w)
    if bad:
        raise QahiraFormatError(f"tensor {name!r} holds {bad}: fix or replace the source "
                                "weights before quantizing")
    blocks = _to_blocks(w.detach().to(torch.float32), cfg.block_size)
    lo, hi = blocks.amin(dim=-1), blocks.amax(dim=-1)
    scale = (hi - lo) / cfg.qmax
    s_max = torch.finfo(cfg.scale_torch_dtype).max
    too_big = ~(scale <= s_max)  # also an fp32 overflow of hi - lo to inf
    if bool(too_big.any()):
        b = too_big.nonzero()[0].tolist()
        raise QahiraFormatError(
            f"tensor {name!r}: block {b} (block size {list(cfg.block_size)}) spans "
            f"[{lo[tuple(b)].item():g}, {hi[tuple(b)].item():g}], so its scale "
            f"{scale[tuple(b)].item():g} exceeds {cfg.scale_dtype}'s largest value {s_max:g}, "
            "the scale dtype: such weights cannot be stored (check the source"
            + (", or use float32 scales)" if cfg.scale_dtype == "float16" else ")"))
    overflow = torch.isinf(lo.to(cfg.offset_torch_dtype))
    if bool(overflow.any()):
        b = overflow.nonzero()[0].tolist()
        raise QahiraFormatError(
            f"tensor {name!r}: block {b} has minimum {lo[tuple(b)].item():g}, which overflows a "
            f"{cfg.offset_dtype} offset: quantize with --offset-dtype float32")


# The block error's summation order, part of the definition so that every implementation
# (this one on CPU or CUDA, the compiled kernels/cpu_quantize.c) picks the same ratio bit for
# bit: SQ_ERR_LANES partial sums, lane j adding values j, j+16, j+32, ... of the block in turn
# (zeros past its end), then halved pairwise (first half + second half) down to one.
SQ_ERR_LANES = 16


def block_sq_err(d2: torch.Tensor) -> torch.Tensor:
    """[..., n] fp32 squared errors -> [...] their sums in the fixed order above (SQ_ERR_LANES)."""
    n = d2.shape[-1]
    pad = -n % SQ_ERR_LANES
    if pad:
        d2 = torch.nn.functional.pad(d2, (0, pad))
    parts = d2.unflatten(-1, (-1, SQ_ERR_LANES))
    acc = parts[..., 0, :].clone()
    for t in range(1, parts.shape[-2]):
        acc += parts[..., t, :]
    while acc.shape[-1] > 1:
        h = acc.shape[-1] // 2
        acc = acc[..., :h] + acc[..., h:]
    return acc[..., 0]


def fp32_ratios(clip_ratios) -> tuple[float, ...]:
    """The ratios as the fp32 values every implementation multiplies by (torch rounds a Python
    float to the tensor's fp32 when it scales one), so that `r == 1.0` means the same to all."""
    return tuple(torch.tensor(tuple(clip_ratios), dtype=torch.float32).tolist())


def quantize_with_error(w: torch.Tensor, cfg: QahiraQuantConfig, clip_search: bool = True,
                        clip_ratios: tuple[float, ...] = DEFAULT_CLIP_RATIOS):
    """quantize(), plus each block's squared error: (q, scales, offsets, err fp32 [out/bo, in/bi]).

    err[b] = sum over block b of (stored-grid value - w)^2, summed in the order of
    block_sq_err. Runs on w's device (CPU or CUDA: the same operations, the same bits).
    """
    w32 = w.detach().to(torch.float32)
    blocks = _to_blocks(w32, cfg.block_size)
    lo, hi = blocks.amin(dim=-1), blocks.amax(dim=-1)
    qmax, odt, sdt = cfg.qmax, cfg.offset_torch_dtype, cfg.scale_torch_dtype
    ratios = fp32_ratios(clip_ratios if clip_search else (1.0,))

    best_err = best_scale = best_offset = None
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    for r in ratios:
        # r == 1 is min-max itself: use lo/hi as is (mid -/+ half can miss them by an fp32 ulp)
        r_lo, r_hi = (lo, hi) if r == 1.0 else (mid - r * half, mid + r * half)
        scale, offset = _params_for_range(r_lo, r_hi, qmax, odt, sdt)
        q = _round_to_grid(blocks, scale, offset, qmax)
        deq = q * scale.to(torch.float32).unsqueeze(-1) + offset.to(torch.float32).unsqueeze(-1)
        err = block_sq_err((deq - blocks).square())
        if best_err is None:
            best_err, best_scale, best_offset = err, scale, offset
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_offset = torch.where(better, offset, best_offset)

    q = _round_to_grid(blocks, best_scale, best_offset, qmax)
    bo, bi = cfg.block_size
    out_f, in_f = w.shape
    q = (q.reshape(out_f // bo, in_f // bi, bo, bi).permute(0, 2, 1, 3)
         .reshape(out_f, in_f).to(torch.uint8))
    return q, best_scale, best_offset, best_err


def quantize(w: torch.Tensor, cfg: QahiraQuantConfig, clip_search: bool = True,
             clip_ratios: tuple[float, ...] = DEFAULT_CLIP_RATIOS):
    """Asymmetric block-wise quantization of W [out, in] (any float dtype, CPU or CUDA).

    cfg: the layer's config (QahiraQuantConfig.for_layer). Returns (q uint8 [out, in], scales
    cfg.scale_torch_dtype [out/bo, in/bi], offsets offset_dtype [out/bo, in/bi]); with float32
    scales the scale is the fp32 (hi - lo) / qmax, not rounded further.
    q is rounded against the *stored* (already rounded) scale and offset, so dequantizing the
    stored tensors gives the nearest grid point of the block's stored grid (round half to even,
    as torch.round; the index is (w - offset) / scale by true fp32 division).
    With clip_search, each block's range [min, max] is shrunk about its centre by the ratio (from
    clip_ratios) that minimises that block's squared error after rounding (summed in the fixed
    order of block_sq_err; the first of equal errors wins). This is the one definition:
    kernels/cpu_quantize.c (quantize_layer's CPU path) computes the same bits.
    """
    return quantize_with_error(w, cfg, clip_search, clip_ratios)[:3]


_NIBBLE_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
               cfg: QahiraQuantConfig, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stored tensors -> W [out, in] in `dtype`: W = scales * q + offsets per block, in fp32.

    qweight: as stored (4-bit: int32 [out, in/8], nibble 4j..4j+3 of word w is column 8w+j;
    8-bit: uint8 [out, in]); scales, offsets: [out/bo, in/bi], any float dtype (taken to fp32).
    The one dequantization of the format: checkpoint readers, merge, quantize and the trainer
    all call it, and every kernel is tested against it. Shapes are not checked here
    (format.validate_layer_tensors does that); mismatched ones raise torch's RuntimeError.

    The block parameters are broadcast over a [out/bo, bo, in/bi, bi] view instead of being
    expanded to [out, in], which saves memory passes. addcmul may fuse the multiply-add, which
    cannot change the result: scale (fp16, 11-bit significand) * q (<= 8 bits) is exact in
    fp32, so only the add rounds, as in the unfused form. tests/test_quant_math.py checks bit
    equality with the expanded form. float32 scales (format 2): scale * q may round, so the
    product and the sum are two separate fp32 operations (the format's definition, unfused).
    cfg: the layer's config (QahiraQuantConfig.for_layer).
    """
    bo, bi = cfg.block_size
    out_f = qweight.shape[0]
    if cfg.bits == 4:
        shifts = _NIBBLE_SHIFTS.to(qweight.device)
        q = (qweight.unsqueeze(-1) >> shifts).bitwise_and_(0xF).to(torch.float32)
    else:
        q = qweight.to(torch.float32)
    in_f = q.numel() // out_f
    q = q.view(out_f // bo, bo, in_f // bi, bi)
    s = scales.to(torch.float32)[:, None, :, None]
    o = offsets.to(torch.float32)[:, None, :, None]
    if scales.dtype == torch.float16:
        w = torch.addcmul(o, q, s)
    else:  # the product may round: keep it a separate fp32 operation (never an FMA)
        w = (q * s).add_(o)
    return w.view(out_f, in_f).to(dtype)
