"""Triton GEMM for qahira block-wise quantized weights: y = x @ W^T (+ bias).

W [N, K] is stored as in format_version 1 (see docs/FORMAT.md):

    W[n, k] = scales[n // bo, k // bi] * q[n, k] + offsets[n // bo, k // bi]
    q: 4-bit int32 [N, K/8] (column 8w+j in bits 4j..4j+3 of word w), or 8-bit uint8 [N, K]

Load-time repacking (`pack_blockwise_weight`): qweight is kept exactly as stored; scales and
offsets are transposed to [K/bi, N/bo] (dtypes kept) so that the block parameters of one K
step and a run of output columns are contiguous in memory. Nothing on disk changes.

Kernels:
- `_fused_gemm_kernel`: loads a [BLOCK_N, BLOCK_K] tile of q, dequantizes it in registers and
  feeds tl.dot with fp32 accumulation. Block parameters are applied one of two ways:
    * per tile, when bi % BLOCK_K == 0 (the K tile sits inside one block column). With bo = 1
      this is the identity y = x @ (s*q)^T + blocksum(x) @ offsets^T, done per K step:
          acc += (x_tile @ q_tile^T) * s[n] + rowsum(x_tile) * z[n]
      so each weight costs only an int->float convert, and W is never rounded to 16 bits.
    * per element, for every other bi (bi < 16, bi not a power of two, ...): gather s and z
      for each weight, w = s*q + z in fp32, round to the activation dtype, then tl.dot.
  With split_k > 1 (small M) each program covers a slice of K and writes an fp32 partial;
  `_splitk_reduce_kernel` sums the partials, adds the bias and casts.
- `_dequant_kernel`: W -> dense [N, K] in the activation dtype. For large M the GEMM is
  compute-bound and a dense cuBLAS GEMM on the dequantized weight wins (see DENSE_MIN_M).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._triton_utils import check_act_dtype, sm_count, upcast_dot_operands

INT4_PER_WORD = 8

# M at and above which blockwise_gemm dequantizes W and calls torch's dense GEMM.
# Untuned first guess (no GPU measurement yet): at M=4096 on 4096x14336 the dequant writes
# ~0.15 GB (~35 us at 4.8 TB/s) against ~0.7 ms of bf16 GEMM; benchmarks/gpu_kernels.py times
# both paths at every M so this can be moved.
DENSE_MIN_M = 1024


# ----------------------------------------------------------------------------- repacked weight

@dataclass(frozen=True)
class PackedBlockwiseWeight:
    """A qahira layer's weight as the kernels read it (see module docstring for the layout)."""

    qweight: torch.Tensor    # 4-bit: int32 [N, K/8]; 8-bit: uint8 [N, K] (as stored)
    scales_t: torch.Tensor   # fp16 [K/bi, N/bo] (transposed, contiguous)
    offsets_t: torch.Tensor  # fp16 or fp32 [K/bi, N/bo] (transposed, contiguous)
    bits: int
    block_size: tuple[int, int]
    out_features: int        # N
    in_features: int         # K


def pack_blockwise_weight(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                          bits: int, block_size: tuple[int, int]) -> PackedBlockwiseWeight:
    """Repack format_version 1 tensors for the kernels; checks shapes and dtypes."""
    bo, bi = (int(b) for b in block_size)
    n = qweight.shape[0]
    if bits == 4:
        if qweight.dtype != torch.int32:
            raise ValueError(f"4-bit qweight must be int32 [N, K/8], got {qweight.dtype}")
        k = qweight.shape[1] * INT4_PER_WORD
    elif bits == 8:
        if qweight.dtype != torch.uint8:
            raise ValueError(f"8-bit qweight must be uint8 [N, K], got {qweight.dtype}")
        k = qweight.shape[1]
    else:
        raise ValueError(f"bits={bits}: expected 4 or 8")
    if n % bo or k % bi:
        raise ValueError(f"block [{bo}, {bi}] does not tile W [{n}, {k}]")
    blocks = (n // bo, k // bi)
    for name, t in (("scales", scales), ("offsets", offsets)):
        if tuple(t.shape) != blocks:
            raise ValueError(f"{name} is {list(t.shape)}, expected {list(blocks)} for W [{n}, {k}] "
                             f"and block [{bo}, {bi}]")
    if scales.dtype != torch.float16:
        raise ValueError(f"scales must be float16, got {scales.dtype}")
    if offsets.dtype not in (torch.float16, torch.float32):
        raise ValueError(f"offsets must be float16 or float32, got {offsets.dtype}")
    return PackedBlockwiseWeight(
        qweight=qweight.contiguous(), scales_t=scales.t().contiguous(),
        offsets_t=offsets.t().contiguous(), bits=bits, block_size=(bo, bi),
        out_features=n, in_features=k)


# ----------------------------------------------------------------------------- configs

@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def validate(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name}={v}: tl.dot needs a power of two >= 16")
        if self.split_k < 1:
            raise ValueError(f"split_k={self.split_k} must be >= 1")


# M buckets: (largest M, block_m, block_n, largest block_k, num_warps, num_stages).
# Small M is memory-bound: narrow N tiles, long K steps, split-K to fill the SMs.
# Large M is compute-bound: square 128x128 tiles. First guesses, to be tuned on the H200.
_M_BUCKETS = (
    (16, 16, 64, 128, 4, 4),
    (32, 32, 64, 128, 4, 4),
    (64, 64, 64, 64, 4, 4),
    (128, 64, 128, 64, 4, 4),
    (256, 128, 128, 64, 8, 3),
    (1 << 62, 128, 128, 64, 8, 3),
)
_SPLIT_K_MAX_M = 64   # split-K only for these M
_SPLIT_K_MAX = 16


def uses_scale_per_tile(block_k: int, bi: int) -> bool:
    """Each K tile inside one block column: apply scale/offset on the accumulator."""
    return bi % block_k == 0


def _pick_block_k(bi: int, largest: int) -> int:
    """Largest power of two in [16, largest] dividing bi (per-tile path), else
    min(largest, 64) (per-element path)."""
    bk = largest
    while bk >= 16:
        if bi % bk == 0:
            return bk
        bk //= 2
    return min(largest, 64)


def choose_config(m: int, n: int, k: int, block_size: tuple[int, int],
                  num_sms: int = 132) -> GemmConfig:
    """Tile sizes by M bucket, block_k by the block width, split-K to fill the SMs at small M."""
    for max_m, bm, bn, largest_bk, warps, stages in _M_BUCKETS:
        if m <= max_m:
            break
    bk = _pick_block_k(block_size[1], largest_bk)
    split = 1
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    k_tiles = triton.cdiv(k, bk)
    if m <= _SPLIT_K_MAX_M and tiles < num_sms:
        split = min(k_tiles, triton.cdiv(2 * num_sms, tiles), _SPLIT_K_MAX)
        split = triton.cdiv(k_tiles, triton.cdiv(k_tiles, max(split, 1)))  # no empty splits
    return GemmConfig(bm, bn, bk, split, warps, stages)


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _load_q_tile(qw_ptr, stride_qn, offs_n, n_mask, k0, K, BITS: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """q[offs_n, k0:k0+BLOCK_K] as int32 [BLOCK_N, BLOCK_K] (0 where masked)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    if BITS == 4:
        # Load each int32 word once, then copy it 8x along K and shift its nibble into place.
        offs_w = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        words = tl.load(qw_ptr + offs_n[:, None] * stride_qn + offs_w[None, :],
                        mask=n_mask[:, None] & (offs_w < K // 8)[None, :], other=0)
        words = tl.interleave(words, words)
        words = tl.interleave(words, words)
        words = tl.interleave(words, words)  # column c holds word c // 8
        shifts = (offs_k % 8) * 4
        q = (words >> shifts[None, :]) & 0xF
    else:
        q = tl.load(qw_ptr + offs_n[:, None] * stride_qn + offs_k[None, :],
                    mask=n_mask[:, None] & (offs_k < K)[None, :], other=0).to(tl.int32)
    return q


@triton.jit
def _dequant_tile(q, s_ptr, z_ptr, offs_n, n_mask, k0, K, NB, BO: tl.constexpr,
                  BI: tl.constexpr, BLOCK_K: tl.constexpr):
    """s*q + z in fp32 for a [BLOCK_N, BLOCK_K] tile, gathering each weight's block params."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    idx = (offs_k // BI)[None, :] * NB + (offs_n // BO)[:, None]
    mask = n_mask[:, None] & (offs_k < K)[None, :]
    s = tl.load(s_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    return q.to(tl.float32) * s + z


@triton.jit
def _fused_gemm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, K, NB, K_TILES_PER_SPLIT,
    stride_xm, stride_qn, stride_om, stride_split,
    BITS: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SCALE_PER_TILE: tl.constexpr, WRITE_PARTIAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    # M tiles vary fastest: programs running together share one W tile (read from HBM once).
    pid = tl.program_id(0)
    num_m_tiles = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_m_tiles
    pid_n = pid // num_m_tiles
    pid_k = tl.program_id(1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    rows = offs_m.to(tl.int64)   # M * K can pass 2^31 in long prefills

    k_tiles = tl.cdiv(K, BLOCK_K)
    t_begin = pid_k * K_TILES_PER_SPLIT
    t_end = tl.minimum(t_begin + K_TILES_PER_SPLIT, k_tiles)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(t_begin, t_end):
        k0 = t * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :],
                    mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)
        q = _load_q_tile(qw_ptr, stride_qn, offs_n, n_mask, k0, K, BITS, BLOCK_K)
        if SCALE_PER_TILE:
            # q is 0..255: exact in fp16 and bf16. (int -> fp32 -> 16 bit: the interpreter
            # mis-converts int -> bf16 directly.)
            w = q.to(tl.float32).to(x.dtype)
        else:
            w = _dequant_tile(q, s_ptr, z_ptr, offs_n, n_mask, k0, K, NB, BO, BI,
                              BLOCK_K).to(x.dtype)
        if UPCAST_DOT:
            part = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)))
        else:
            part = tl.dot(x, tl.trans(w))
        if SCALE_PER_TILE:
            blk = (k0 // BI) * NB + offs_n // BO
            s = tl.load(s_ptr + blk, mask=n_mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + blk, mask=n_mask, other=0.0).to(tl.float32)
            x_sum = tl.sum(x.to(tl.float32), axis=1)
            acc += part * s[None, :] + x_sum[:, None] * z[None, :]
        else:
            acc += part

    out_offs = rows[:, None] * stride_om + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if WRITE_PARTIAL:
        tl.store(out_ptr + pid_k * stride_split + out_offs, acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _splitk_reduce_kernel(part_ptr, bias_ptr, out_ptr, MN, N, SPLIT_K,
                          HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """out[m, n] = sum_s part[s, m, n] (+ bias[n]); all contiguous."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLIT_K):
        acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequant_kernel(qw_ptr, s_ptr, z_ptr, w_ptr, N, K, NB, stride_qn,
                    BITS: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """w[N, K] (contiguous, activation dtype) = s*q + z."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    q = _load_q_tile(qw_ptr, stride_qn, offs_n, n_mask, k0, K, BITS, BLOCK_K)
    w = _dequant_tile(q, s_ptr, z_ptr, offs_n, n_mask, k0, K, NB, BO, BI, BLOCK_K)
    w_offs = offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
    tl.store(w_ptr + w_offs, w.to(w_ptr.dtype.element_ty),
             mask=n_mask[:, None] & (offs_k < K)[None, :])


# ----------------------------------------------------------------------------- Python API

def dequantize_weight(weight: PackedBlockwiseWeight, dtype: torch.dtype,
                      block_n: int = 64, block_k: int = 128) -> torch.Tensor:
    """Dense W [N, K] in `dtype` (fp16/bf16/fp32), computed in fp32 by a Triton kernel."""
    n, k = weight.out_features, weight.in_features
    bo, bi = weight.block_size
    w = torch.empty(n, k, dtype=dtype, device=weight.qweight.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _dequant_kernel[grid](
        weight.qweight, weight.scales_t, weight.offsets_t, w, n, k, n // bo,
        weight.qweight.stride(0), BITS=weight.bits, BO=bo, BI=bi,
        BLOCK_N=block_n, BLOCK_K=block_k)
    return w


def fused_gemm(x2: torch.Tensor, weight: PackedBlockwiseWeight, bias: torch.Tensor | None,
               config: GemmConfig) -> torch.Tensor:
    """[M, K] @ W^T (+ bias) -> [M, N] in x2.dtype with the fused dequant kernel."""
    config.validate()
    if x2.dim() != 2 or x2.stride(1) != 1:
        raise ValueError("fused_gemm takes a 2-D x with contiguous rows")
    m, k = x2.shape
    n = weight.out_features
    bo, bi = weight.block_size
    out = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    k_tiles = triton.cdiv(k, config.block_k)
    split = min(config.split_k, k_tiles)
    k_tiles_per_split = triton.cdiv(k_tiles, split)
    split = triton.cdiv(k_tiles, k_tiles_per_split)
    partial = (torch.empty(split, m, n, dtype=torch.float32, device=x2.device)
               if split > 1 else None)
    target = partial if partial is not None else out
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n), split)
    _fused_gemm_kernel[grid](
        x2, weight.qweight, weight.scales_t, weight.offsets_t,
        bias if bias is not None else out, target,
        m, n, k, n // bo, k_tiles_per_split,
        x2.stride(0), weight.qweight.stride(0), n, m * n,
        BITS=weight.bits, BO=bo, BI=bi,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        SCALE_PER_TILE=uses_scale_per_tile(config.block_k, bi),
        WRITE_PARTIAL=partial is not None, HAS_BIAS=bias is not None,
        UPCAST_DOT=upcast_dot_operands(_fused_gemm_kernel, x2.dtype),
        num_warps=config.num_warps, num_stages=config.num_stages)
    if partial is not None:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](
            partial, bias if bias is not None else out, out, m * n, n, split,
            HAS_BIAS=bias is not None, BLOCK=block)
    return out


def blockwise_gemm(x: torch.Tensor, weight: PackedBlockwiseWeight,
                   bias: torch.Tensor | None = None, *, config: GemmConfig | None = None,
                   dense: bool | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) for x [..., K] in fp16/bf16; y has x's dtype and leading dims.

    dense=None picks by M: the fused kernel below DENSE_MIN_M, else Triton dequantize + torch
    GEMM. config=None picks tiles with choose_config (ignored on the dense path).
    """
    check_act_dtype("x", x)
    k, n = weight.in_features, weight.out_features
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects K={k}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias is {list(bias.shape)}, expected [{n}]")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*lead, n)
    if bias is not None:
        bias = bias.contiguous()
    if dense is None:
        dense = config is None and m >= DENSE_MIN_M
    if dense:
        y = F.linear(x2, dequantize_weight(weight, x2.dtype),
                     None if bias is None else bias.to(x2.dtype))
    else:
        if config is None:
            config = choose_config(m, n, k, weight.block_size, sm_count(x2.device))
        y = fused_gemm(x2, weight, bias, config)
    return y.reshape(*lead, n)


__all__ = ["DENSE_MIN_M", "GemmConfig", "PackedBlockwiseWeight", "blockwise_gemm",
           "choose_config", "dequantize_weight", "fused_gemm", "pack_blockwise_weight",
           "uses_scale_per_tile"]
