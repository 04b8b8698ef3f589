"""Multi-adapter Q-BaRA kernels: y += s * R_q(B A P_p(x)) per token, one launch per stage.

Q-BaRA (Shen et al., arXiv 2407.17029): P_p averages adjacent groups of p inputs, A is
[R, in/p], B is [out/q, R], R_q repeats each output q times. Every adapter loaded in vLLM sits
in a slot of stacked, zero-padded buffers (the interface the LoRA layer fills):

    A        [slots, R_max, in_max_pooled]   A[s, :rank[s], :in/pool[s]] is slot s's A
    B        [slots, out_max_rep, R_max]     B[s, :out/repeat[s], :rank[s]] is slot s's B
    pool, repeat, rank: int32 [slots]; scaling: float32 [slots] (= lora_alpha / r)
    slot_idx int32/int64 [T]: the slot of each token, -1 = no adapter (its output untouched)

Adapters of different rank, pool and repeat share one launch: the per-slot values are read
inside the kernel, never specialised on.

- shrink: h[t, r] = sum_k x[t, k] * A[s, r, k // p] / p  (= P_p(x) @ A^T): pooling is fused
  by reading A at k // p, so x is read once at full width and A is never expanded in memory.
- expand: y[t, o] += scaling[s] * sum_r h[t, r] * B[s, o // q, r]: the repeat is fused by
  reading B at o // q.

Per-slot values are not checked on the host (that would sync): for every slot that tokens
use, pool and repeat must be >= 1, in % pool == 0, out % repeat == 0, in / pool <=
in_max_pooled, out / repeat <= out_max_rep and rank <= R_max. The shrink casts A to x's dtype
for the dot and returns fp32 h; the expand rounds h to y's dtype for the dot (as vLLM's LoRA
expand does) and accumulates in fp32.

Tokens are grouped by slot first (`segment_tokens`: a stable sort, no host sync), so each
program multiplies a tile of tokens that share one adapter with tl.dot. The grid has one
z-plane per slot; programs beyond a slot's token count exit at once. Only entries inside
[:rank, :in/p] of A and [:out/q, :rank] of B are read: padding may hold anything.

QA-HiRA slots (`qahira_apply`, one launch): y += s * R_qo(M P_pi(x)), M [out/qo, in/pi] fp32,
every slot's M concatenated row-major in one flat buffer:

    m_flat   fp32 [n]          m_offset int64 [slots]: where slot s's M starts
    pool, repeat, on: int32 [slots] (pi, qo, 1 = slot s is a QA-HiRA); scaling fp32 [slots] (s)

Each program computes a tile of tokens of one slot times a tile of M's rows: pooling fused as
in the shrink (input column k meets M's column k // pi), the repeat by storing each result qo
times, so the work is T x out/qo x in.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from ._triton_utils import check_act_dtype, next_pow2, sm_count, upcast_dot_operands


@dataclass(frozen=True)
class TokenSegments:
    """Tokens grouped by slot: order[start[s] : start[s] + count[s]] are slot s's tokens."""

    order: torch.Tensor  # int32 [T]
    start: torch.Tensor  # int32 [slots]
    count: torch.Tensor  # int32 [slots]


def segment_tokens(slot_idx: torch.Tensor, num_slots: int) -> TokenSegments:
    """Group tokens by slot without a host sync (so it also works under CUDA graphs).

    Compute once per forward pass and pass to every layer's qbara_* call. A slot outside
    [-1, num_slots) fails here (scatter index out of range) rather than being ignored.
    """
    if slot_idx.dim() != 1:
        raise ValueError(f"slot_idx must be 1-D [T], got shape {list(slot_idx.shape)}")
    slot = slot_idx.to(torch.int64)
    order = torch.sort(slot, stable=True).indices
    # Bin 0 counts the tokens without adapter; they sort first and belong to no segment.
    counts = torch.zeros(num_slots + 1, dtype=torch.int64, device=slot.device)
    counts.scatter_add_(0, slot + 1, torch.ones_like(slot))
    start = torch.cumsum(counts, 0) - counts
    return TokenSegments(order.to(torch.int32), start[1:].to(torch.int32).contiguous(),
                         counts[1:].to(torch.int32).contiguous())


@dataclass(frozen=True)
class QbaraConfig:
    block_t: int = 16   # tokens per program
    block_r: int = 16   # rank columns per program (shrink) / per dot step (expand)
    block_k: int = 64   # input columns per dot step (shrink)
    block_n: int = 64   # output columns per program (expand)
    split_k: int = 1    # shrink only: programs per K range, combined with fp32 atomics
    num_warps: int = 4

    def validate(self) -> None:
        for name in ("block_t", "block_r", "block_k", "block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name}={v}: tl.dot needs a power of two >= 16")
        if self.split_k < 1:
            raise ValueError(f"split_k={self.split_k} must be >= 1")


def choose_config(num_tokens: int, in_features: int, r_max: int, num_slots: int,
                  num_sms: int = 132) -> QbaraConfig:
    """First guesses (untuned): token tile by T, rank tile covering R_max up to 64, split-K
    for the shrink when few (token tile, rank tile, slot) programs would run."""
    block_t = 16 if num_tokens <= 16 else 32 if num_tokens <= 64 else 64
    block_r = min(max(next_pow2(r_max), 16), 64)
    block_k = 128 if in_features >= 1024 else 64
    busy = (triton.cdiv(num_tokens, block_t) * triton.cdiv(r_max, block_r)
            * max(1, min(num_slots, num_tokens)))
    k_tiles = triton.cdiv(in_features, block_k)
    split_k = 1
    if busy < num_sms:
        split_k = max(1, min(k_tiles // 4, triton.cdiv(num_sms, busy), 32))
    return QbaraConfig(block_t=block_t, block_r=block_r, block_k=block_k, block_n=64,
                       split_k=split_k, num_warps=4)


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _segment_tokens(order_ptr, start_ptr, count_ptr, slot, pid_t, BLOCK_T: tl.constexpr):
    """Token ids of this program's tile of slot `slot` (and their mask)."""
    count = tl.load(count_ptr + slot)
    start = tl.load(start_ptr + slot)
    offs = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs < count
    tok = tl.load(order_ptr + start + offs, mask=t_mask, other=0).to(tl.int64)
    return tok, t_mask


@triton.jit
def _qbara_shrink_kernel(
    x_ptr, a_ptr, h_ptr, order_ptr, start_ptr, count_ptr, pool_ptr, rank_ptr,
    K, stride_xt, stride_as, stride_ar, stride_ht, K_TILES_PER_SPLIT,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ATOMIC: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid_tk = tl.program_id(0)    # token tile * split + K split
    pid_r = tl.program_id(1)
    slot = tl.program_id(2)
    num_splits = tl.cdiv(tl.cdiv(K, BLOCK_K), K_TILES_PER_SPLIT)
    pid_t = pid_tk // num_splits
    pid_k = pid_tk % num_splits
    if pid_t * BLOCK_T >= tl.load(count_ptr + slot):
        return
    rank = tl.load(rank_ptr + slot)
    if pid_r * BLOCK_R >= rank:
        return  # h is zero-initialised: padded rank columns stay 0
    tok, t_mask = _segment_tokens(order_ptr, start_ptr, count_ptr, slot, pid_t, BLOCK_T)
    pool = tl.load(pool_ptr + slot)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    a_base = a_ptr + slot.to(tl.int64) * stride_as + offs_r[None, :] * stride_ar

    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    k_begin = pid_k * K_TILES_PER_SPLIT * BLOCK_K
    k_end = tl.minimum(k_begin + K_TILES_PER_SPLIT * BLOCK_K, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + tok[:, None] * stride_xt + offs_k[None, :],
                    mask=t_mask[:, None] & k_mask[None, :], other=0.0)
        # Fused pooling: input column k meets pooled column k // pool of A.
        a = tl.load(a_base + (offs_k // pool)[:, None],
                    mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        if UPCAST_DOT:
            acc += tl.dot(x.to(tl.float32), a.to(tl.float32))
        else:
            acc += tl.dot(x, a.to(x.dtype))
    acc = acc / pool.to(tl.float32)

    h_ptrs = h_ptr + tok[:, None] * stride_ht + offs_r[None, :]
    mask = t_mask[:, None] & r_mask[None, :]
    if ATOMIC:
        tl.atomic_add(h_ptrs, acc, mask=mask)
    else:
        tl.store(h_ptrs, acc, mask=mask)


@triton.jit
def _qbara_expand_kernel(
    y_ptr, h_ptr, b_ptr, order_ptr, start_ptr, count_ptr, repeat_ptr, rank_ptr, scaling_ptr,
    N, stride_yt, stride_ht, stride_bs, stride_bo,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.program_id(2)
    if pid_t * BLOCK_T >= tl.load(count_ptr + slot):
        return
    tok, t_mask = _segment_tokens(order_ptr, start_ptr, count_ptr, slot, pid_t, BLOCK_T)
    rank = tl.load(rank_ptr + slot)
    repeat = tl.load(repeat_ptr + slot)
    scaling = tl.load(scaling_ptr + slot).to(tl.float32)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    # Fused repeat: output column o reads row o // repeat of B.
    b_base = b_ptr + slot.to(tl.int64) * stride_bs + (offs_n // repeat)[None, :] * stride_bo

    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        h = tl.load(h_ptr + tok[:, None] * stride_ht + offs_r[None, :],
                    mask=t_mask[:, None] & r_mask[None, :], other=0.0)
        b = tl.load(b_base + offs_r[:, None], mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST_DOT:
            acc += tl.dot(h.to(y_ptr.dtype.element_ty).to(tl.float32), b.to(tl.float32))
        else:
            # Tensor-core dot in the output dtype (as vLLM's LoRA expand does).
            acc += tl.dot(h.to(y_ptr.dtype.element_ty), b.to(y_ptr.dtype.element_ty))

    y_ptrs = y_ptr + tok[:, None] * stride_yt + offs_n[None, :]
    mask = t_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + scaling * acc).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qahira_kernel(
    y_ptr, x_ptr, m_ptr, m_offset_ptr, order_ptr, start_ptr, count_ptr, pool_ptr, repeat_ptr,
    on_ptr, scaling_ptr, K, N, stride_xt, stride_yt,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    X_FP32: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)   # tile of M's rows (pooled outputs)
    slot = tl.program_id(2)
    if pid_t * BLOCK_T >= tl.load(count_ptr + slot):
        return
    if tl.load(on_ptr + slot) == 0:
        return
    pool = tl.load(pool_ptr + slot)
    repeat = tl.load(repeat_ptr + slot)
    k_pooled = K // pool
    n_rep = N // repeat
    if pid_n * BLOCK_N >= n_rep:
        return
    tok, t_mask = _segment_tokens(order_ptr, start_ptr, count_ptr, slot, pid_t, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_rep
    m_base = (m_ptr + tl.load(m_offset_ptr + slot).to(tl.int64)
              + offs_n.to(tl.int64)[None, :] * k_pooled)

    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + tok[:, None] * stride_xt + offs_k[None, :],
                    mask=t_mask[:, None] & k_mask[None, :], other=0.0)
        # Fused pooling: input column k meets column k // pool of M (M^T tile [K, N]).
        m = tl.load(m_base + (offs_k // pool)[:, None], mask=k_mask[:, None] & n_mask[None, :],
                    other=0.0)
        if X_FP32:
            acc += tl.dot(x, m, input_precision="ieee")
        elif UPCAST_DOT:
            acc += tl.dot(x.to(tl.float32), m.to(x.dtype).to(tl.float32))
        else:
            acc += tl.dot(x, m.to(x.dtype))   # M rounded to x's dtype, as the shrink rounds A
    acc = acc * (tl.load(scaling_ptr + slot).to(tl.float32) / pool.to(tl.float32))

    # Fused repeat: pooled output o goes to columns o * repeat + u.
    mask = t_mask[:, None] & n_mask[None, :]
    for u in range(0, repeat):
        y_ptrs = y_ptr + tok[:, None] * stride_yt + (offs_n * repeat + u)[None, :]
        y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- Python API

def _check_slot_params(buffer: torch.Tensor, **per_slot: torch.Tensor) -> int:
    """Each per-slot tensor is [slots] on the adapter buffer's device; returns slots."""
    num_slots = buffer.shape[0]
    for name, t in per_slot.items():
        if t.shape != (num_slots,):
            raise ValueError(f"{name} is {list(t.shape)}, expected [{num_slots}] (one per slot)")
        if t.device != buffer.device:
            raise ValueError(f"{name} is on {t.device}, the adapter buffers on {buffer.device}")
    return num_slots


def _rows_contiguous(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [T, features], got {list(t.shape)}")
    return t if t.stride(1) == 1 else t.contiguous()


def qbara_shrink(x: torch.Tensor, A: torch.Tensor, pool: torch.Tensor, rank: torch.Tensor,
                 slot_idx: torch.Tensor, *, segments: TokenSegments | None = None,
                 config: QbaraConfig | None = None) -> torch.Tensor:
    """h [T, R_max] fp32 = P_p(x) @ A_slot^T per token; rows of slot -1 and columns >= rank
    are 0. x: fp16/bf16 [T, in]; in must be a multiple of each used slot's pool."""
    check_act_dtype("x", x)
    x = _rows_contiguous(x, "x")
    if A.dim() != 3:
        raise ValueError(f"A must be [slots, R_max, in_max_pooled], got {list(A.shape)}")
    if A.stride(2) != 1:
        A = A.contiguous()
    num_slots = _check_slot_params(A, pool=pool, rank=rank)
    t_count, k = x.shape
    if slot_idx.shape != (t_count,):
        raise ValueError(f"slot_idx is {list(slot_idx.shape)}, expected [{t_count}]")
    r_max = A.shape[1]
    h = torch.zeros(t_count, r_max, dtype=torch.float32, device=x.device)
    if t_count == 0 or num_slots == 0:
        return h
    segments = segments or segment_tokens(slot_idx, num_slots)
    config = config or choose_config(t_count, k, r_max, num_slots, sm_count(x.device))
    config.validate()
    k_tiles = triton.cdiv(k, config.block_k)
    k_tiles_per_split = triton.cdiv(k_tiles, min(config.split_k, k_tiles))
    splits = triton.cdiv(k_tiles, k_tiles_per_split)
    grid = (triton.cdiv(t_count, config.block_t) * splits, triton.cdiv(r_max, config.block_r),
            num_slots)
    _qbara_shrink_kernel[grid](
        x, A, h, segments.order, segments.start, segments.count, pool, rank,
        k, x.stride(0), A.stride(0), A.stride(1), h.stride(0), k_tiles_per_split,
        BLOCK_T=config.block_t, BLOCK_R=config.block_r, BLOCK_K=config.block_k,
        ATOMIC=splits > 1, UPCAST_DOT=upcast_dot_operands(_qbara_shrink_kernel, x.dtype),
        num_warps=config.num_warps)
    return h


def qbara_expand(y: torch.Tensor, h: torch.Tensor, B: torch.Tensor, repeat: torch.Tensor,
                 rank: torch.Tensor, scaling: torch.Tensor, slot_idx: torch.Tensor, *,
                 segments: TokenSegments | None = None,
                 config: QbaraConfig | None = None) -> torch.Tensor:
    """In place: y[t, o] += scaling[s] * (h[t] @ B[s]^T)[o // repeat[s]], s = slot_idx[t].

    y: fp16/bf16 [T, out], may be a column slice of a wider output (row stride free,
    columns contiguous); out must be a multiple of each used slot's repeat. Returns y.
    """
    check_act_dtype("y", y)
    if y.dim() != 2 or y.stride(1) != 1:
        raise ValueError("y must be 2-D [T, out] with contiguous columns (written in place)")
    if h.dtype != torch.float32 or h.dim() != 2:
        raise ValueError(f"h must be fp32 [T, R_max] (from qbara_shrink), got {h.dtype} "
                         f"{list(h.shape)}")
    h = _rows_contiguous(h, "h")
    if B.dim() != 3:
        raise ValueError(f"B must be [slots, out_max_rep, R_max], got {list(B.shape)}")
    if B.stride(2) != 1:
        B = B.contiguous()
    num_slots = _check_slot_params(B, repeat=repeat, rank=rank, scaling=scaling)
    t_count, n = y.shape
    if h.shape != (t_count, B.shape[2]) or slot_idx.shape != (t_count,):
        raise ValueError(f"h is {list(h.shape)} and slot_idx {list(slot_idx.shape)}: expected "
                         f"[{t_count}, {B.shape[2]}] and [{t_count}]")
    if t_count == 0 or num_slots == 0:
        return y
    segments = segments or segment_tokens(slot_idx, num_slots)
    # in_features only shapes the shrink's K tiling: 0 here.
    config = config or choose_config(t_count, 0, B.shape[2], num_slots, sm_count(y.device))
    config.validate()
    grid = (triton.cdiv(t_count, config.block_t), triton.cdiv(n, config.block_n), num_slots)
    _qbara_expand_kernel[grid](
        y, h, B, segments.order, segments.start, segments.count, repeat, rank, scaling,
        n, y.stride(0), h.stride(0), B.stride(0), B.stride(1),
        BLOCK_T=config.block_t, BLOCK_N=config.block_n, BLOCK_R=config.block_r,
        UPCAST_DOT=upcast_dot_operands(_qbara_expand_kernel, y.dtype),
        num_warps=config.num_warps)
    return y


def qbara_apply(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                pool: torch.Tensor, repeat: torch.Tensor, rank: torch.Tensor,
                scaling: torch.Tensor, slot_idx: torch.Tensor, *,
                segments: TokenSegments | None = None,
                config: QbaraConfig | None = None) -> torch.Tensor:
    """In place y += s * R_q(B A P_p(x)) per token's slot (slot -1: untouched). Returns y."""
    if A.shape[0] != B.shape[0] or A.shape[1] != B.shape[2]:
        raise ValueError(f"A {list(A.shape)} and B {list(B.shape)} disagree on slots or R_max")
    segments = segments or segment_tokens(slot_idx, A.shape[0])
    if config is None:
        config = choose_config(x.shape[0], x.shape[1], A.shape[1], A.shape[0],
                               sm_count(x.device))
    h = qbara_shrink(x, A, pool, rank, slot_idx, segments=segments, config=config)
    return qbara_expand(y, h, B, repeat, rank, scaling, slot_idx, segments=segments,
                        config=config)


QAHIRA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def qahira_config(num_tokens: int, in_features: int, num_slots: int, x_dtype: torch.dtype,
                  num_sms: int = 132) -> QbaraConfig:
    """qahira_apply's tiles: choose_config's token, K and output tiles; K tile 64 for fp32 x
    (fp32 tiles take twice the shared memory: 128 would exceed sm_86/89's 99 KB at T=4096)."""
    cfg = choose_config(num_tokens, in_features, 16, num_slots, num_sms)
    if x_dtype == torch.float32:
        cfg = replace(cfg, block_k=min(cfg.block_k, 64))
    return cfg


def qahira_apply(y: torch.Tensor, x: torch.Tensor, m_flat: torch.Tensor, m_offset: torch.Tensor,
                 pool: torch.Tensor, repeat: torch.Tensor, on: torch.Tensor,
                 scaling: torch.Tensor, slot_idx: torch.Tensor, *,
                 segments: TokenSegments | None = None,
                 config: QbaraConfig | None = None) -> torch.Tensor:
    """In place y[t, o] += scaling[s] / pool[s] * sum_j M_s[o // qo, j] * sum_{u < pi}
    x[t, j*pi + u] for every token t whose slot s = slot_idx[t] has on[s] = 1; returns y.

    y [T, out], x [T, in]: fp16/bf16/fp32 (each its own; y may be a column slice of a wider
    output, columns contiguous). M_s = m_flat[m_offset[s]:][:out/qo * in/pi] as [out/qo, in/pi]
    row-major, m_flat fp32 1-D (layouts.pack_qahira_slots); m_offset int64 [slots]; pool (pi),
    repeat (qo), on: int32 [slots]; scaling fp32 [slots] (s); slot_idx int32/int64 [T], -1 =
    none. Slots with on = 0 (Q-BaRA/LoRA or empty ones) and tokens of slot -1 are untouched.
    Precision: x fp16/bf16: M rounded to x's dtype for the dot, fp32 accumulation; x fp32:
    fp32 dot (no TF32). Not checked on the host (it would sync), for slots with on = 1: pi, qo
    >= 1 dividing in, out, and M inside m_flat. Raises ValueError for dtypes, shapes, devices.
    """
    for name, t in (("x", x), ("y", y)):
        if t.dtype not in QAHIRA_DTYPES:
            raise ValueError(f"qahira_apply: {name} is {t.dtype}: fp16, bf16 or fp32 expected")
    if y.dim() != 2 or y.stride(1) != 1:
        raise ValueError("qahira_apply: y must be 2-D [T, out] with contiguous columns "
                         "(written in place)")
    x = _rows_contiguous(x, "x")
    if m_flat.dim() != 1 or m_flat.dtype != torch.float32:
        raise ValueError(f"qahira_apply: m_flat must be fp32 1-D (every slot's M, flat), got "
                         f"{m_flat.dtype} {list(m_flat.shape)}")
    m_flat = m_flat.contiguous()
    if m_offset.dim() != 1 or m_offset.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"qahira_apply: m_offset must be int64 [slots], got {m_offset.dtype} "
                         f"{list(m_offset.shape)}")
    num_slots = _check_slot_params(m_offset, pool=pool, repeat=repeat, on=on, scaling=scaling)
    if m_flat.device != m_offset.device:
        raise ValueError(f"qahira_apply: m_flat is on {m_flat.device}, m_offset on "
                         f"{m_offset.device}")
    t_count, k = x.shape
    if y.shape[0] != t_count or slot_idx.shape != (t_count,):
        raise ValueError(f"qahira_apply: y {list(y.shape)}, x {list(x.shape)} and slot_idx "
                         f"{list(slot_idx.shape)} disagree on the token count")
    if t_count == 0 or num_slots == 0 or m_flat.numel() == 0:
        return y   # no token, or no QA-HiRA slot can be on
    segments = segments or segment_tokens(slot_idx, num_slots)
    config = config or qahira_config(t_count, k, num_slots, x.dtype, sm_count(x.device))
    config.validate()
    n = y.shape[1]
    grid = (triton.cdiv(t_count, config.block_t), triton.cdiv(n, config.block_n), num_slots)
    _qahira_kernel[grid](
        y, x, m_flat, m_offset, segments.order, segments.start, segments.count, pool, repeat,
        on, scaling, k, n, x.stride(0), y.stride(0),
        BLOCK_T=config.block_t, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        X_FP32=x.dtype == torch.float32,
        UPCAST_DOT=upcast_dot_operands(_qahira_kernel, x.dtype), num_warps=config.num_warps)
    return y


__all__ = ["QbaraConfig", "TokenSegments", "choose_config", "qahira_apply", "qahira_config",
           "qbara_apply", "qbara_expand", "qbara_shrink", "segment_tokens"]
