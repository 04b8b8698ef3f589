"""Multi-adapter Q-BaRA math in plain torch (the CPU path): segment tokens by slot, then
pool -> shrink -> expand -> repeat-add per segment.

For a token t served by slot s (geometry pool p, repeat q, rank r):

    y[t] += s_scale * R_q(B[s, :out/q, :r] @ A[s, :r, :in/p] @ P_p(x[t]))

P_p: mean of p adjacent inputs; R_q: each output repeated q times (repeat_interleave). Slot -1
is "no adapter": its tokens are never touched. Stacked buffers are zero-padded
(A [slots, R_max, in], B [slots, out, R_max]); only the [:r, :in/p] and [:out/q, :r] corners of
a slot are read, so the adapter is never expanded to full width. No vLLM import here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class SlotGeometry:
    """One slot's compact shape on one layer slice."""

    pool: int
    repeat: int
    rank: int
    scaling: float = 1.0  # vLLM folds lora_alpha / r into B on load, so this stays 1 there


@dataclass(frozen=True)
class Segment:
    """Tokens of one slot: a contiguous row range (slice) or gathered rows (index tensor)."""

    slot: int
    rows: slice | torch.Tensor

    @property
    def contiguous(self) -> bool:
        return isinstance(self.rows, slice)


def segment_by_slot(slot_idx: torch.Tensor) -> list[Segment]:
    """Group the tokens of a batch by slot (-1 left out). One stable sort per batch.

    vLLM lays a request's tokens out contiguously, so a slot used by one request (or by
    neighbouring requests) becomes a slice: no gather, no scatter.
    """
    if slot_idx.numel() == 0:
        return []
    slot_idx = slot_idx.to("cpu", torch.int64)
    order = torch.argsort(slot_idx, stable=True)
    slots, counts = torch.unique_consecutive(slot_idx[order], return_counts=True)
    segments, start = [], 0
    for slot, count in zip(slots.tolist(), counts.tolist()):
        if slot >= 0:
            rows = order[start:start + count]
            first, last = int(rows[0]), int(rows[-1])
            # Stable sort keeps rows ascending: first..last spans exactly count rows iff dense.
            segments.append(Segment(slot, slice(first, last + 1) if last - first + 1 == count
                                    else rows))
        start += count
    return segments


def pool_inputs(x: torch.Tensor, pool: int) -> torch.Tensor:
    """P_p: mean over adjacent groups of `pool` features of the last dim."""
    return x if pool == 1 else x.unflatten(-1, (x.shape[-1] // pool, pool)).mean(dim=-1)


def qbara_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, g: SlotGeometry,
                out_features: int) -> torch.Tensor:
    """Compact delta s * (B A P_p(x)) [T, out/q] (not yet repeated) in the adapter's dtype."""
    in_pooled, out_rep = x.shape[-1] // g.pool, out_features // g.repeat
    h = pool_inputs(x.to(a.dtype), g.pool) @ a[:g.rank, :in_pooled].t()
    d = h @ b[:out_rep, :g.rank].t()
    return d if g.scaling == 1.0 else d * g.scaling


def add_qbara_segments(y: torch.Tensor, x: torch.Tensor, segments: Sequence[Segment],
                       a_stacked: torch.Tensor, b_stacked: torch.Tensor,
                       geometry: Sequence[SlotGeometry | None]) -> torch.Tensor:
    """In place: y[rows] += R_q(delta) for every segment whose slot holds weights. Returns y.

    y: [T, out] (may be a column slice of a wider output); x: [T, in];
    a_stacked [slots, R_max, >= in/p]; b_stacked [slots, >= out/q, R_max].
    """
    out_features = y.shape[-1]
    for seg in segments:
        g = geometry[seg.slot]
        if g is None:  # this slot's adapter does not touch this layer (slice)
            continue
        d = qbara_delta(x[seg.rows], a_stacked[seg.slot], b_stacked[seg.slot], g,
                        out_features).to(y.dtype)
        if seg.contiguous:
            target = y[seg.rows]
            if g.repeat == 1:
                target.add_(d)
            else:  # broadcast-add each compact output onto its q copies: no full-width temp
                target.unflatten(-1, (out_features // g.repeat, g.repeat)).add_(d.unsqueeze(-1))
        else:
            y.index_add_(0, seg.rows, d.repeat_interleave(g.repeat, dim=-1)
                         if g.repeat > 1 else d)
    return y


def add_qbara_per_token(y: torch.Tensor, x: torch.Tensor, slot_idx: torch.Tensor,
                        a_stacked: torch.Tensor, b_stacked: torch.Tensor,
                        geometry: Sequence[SlotGeometry | None]) -> torch.Tensor:
    """The per-token-gather alternative (bgmv style), kept for comparison in tests/benchmarks.

    Tokens are grouped by geometry (pool, repeat) because pooled widths differ; within a group
    each token gathers its own slot's A and B ([T, R, in/p] and [T, out/q, R] copies).
    """
    out_features, slots = y.shape[-1], slot_idx.tolist()
    by_shape: dict[tuple[int, int], list[int]] = {}
    for t, s in enumerate(slots):
        if s >= 0 and geometry[s] is not None:
            by_shape.setdefault((geometry[s].pool, geometry[s].repeat), []).append(t)
    for (pool, repeat), tokens in by_shape.items():
        rows = torch.tensor(tokens, dtype=torch.long)
        sl = slot_idx.to(torch.long)[rows]
        in_p, out_q = x.shape[-1] // pool, out_features // repeat
        a = a_stacked[sl, :, :in_p]                       # [T, R_max, in/p] (zero padded)
        b = b_stacked[sl, :out_q, :]                      # [T, out/q, R_max]
        scale = torch.tensor([geometry[s].scaling for s in sl.tolist()], dtype=a.dtype)
        ranks = torch.tensor([geometry[s].rank for s in sl.tolist()])
        h = torch.einsum("ti,tri->tr", pool_inputs(x[rows].to(a.dtype), pool), a)
        h = h * (torch.arange(a.shape[1])[None, :] < ranks[:, None])  # rank padding -> 0
        d = torch.einsum("tr,tor->to", h, b) * scale[:, None]
        y.index_add_(0, rows, d.repeat_interleave(repeat, dim=-1).to(y.dtype))
    return y


def dense_reference(x: torch.Tensor, slot_idx: torch.Tensor, a_list, b_list,
                    geometry: Sequence[SlotGeometry | None], out_features: int) -> torch.Tensor:
    """Delta [T, out] from each slot's full-width LoRA equivalent (float64): for tests only."""
    y = torch.zeros(x.shape[0], out_features, dtype=torch.float64)
    for t, s in enumerate(slot_idx.tolist()):
        if s < 0 or geometry[s] is None:
            continue
        g = geometry[s]
        a_full = a_list[s].double().repeat_interleave(g.pool, dim=1) / g.pool
        b_full = b_list[s].double().repeat_interleave(g.repeat, dim=0)
        y[t] = g.scaling * (b_full @ (a_full @ x[t].double()))
    return y
