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


# Many short segments (decode with many adapters): one gathered batch per geometry beats a
# loop of tiny matmuls (measured on 2 CPU cores, 32 tokens x 32 adapters: ~2x faster); long
# segments (prefill) stay a loop of plain GEMMs, which never copy an adapter.
GATHER_MIN_SEGMENTS = 8
GATHER_MAX_AVG_TOKENS = 4


def _rows_len(seg: Segment) -> int:
    return seg.rows.stop - seg.rows.start if seg.contiguous else seg.rows.numel()


def add_qbara_segments(y: torch.Tensor, x: torch.Tensor, segments: Sequence[Segment],
                       a_stacked: torch.Tensor, b_stacked: torch.Tensor,
                       geometry: Sequence[SlotGeometry | None],
                       cache: dict | None = None) -> torch.Tensor:
    """In place: y[rows] += R_q(delta) for every segment whose slot holds weights. Returns y.

    y: [T, out] (may be a column slice of a wider output); x: [T, in];
    a_stacked [slots, R_max, >= in/p]; b_stacked [slots, >= out/q, R_max], zero-padded.
    Segments are grouped by geometry (p, q); a group of many short segments is computed as
    one per-token gather (add_qbara_gathered), otherwise segment by segment. `cache`: a dict
    that lives for one batch (index tensors of the gathered groups).
    """
    groups: dict[tuple[int, int], list[Segment]] = {}
    for seg in segments:
        g = geometry[seg.slot]
        if g is not None:  # None: this slot's adapter does not touch this layer (slice)
            groups.setdefault((g.pool, g.repeat), []).append(seg)
    for (pool, repeat), segs in groups.items():
        if (len(segs) >= GATHER_MIN_SEGMENTS
                and sum(map(_rows_len, segs)) <= GATHER_MAX_AVG_TOKENS * len(segs)):
            add_qbara_gathered(y, x, segs, a_stacked, b_stacked, geometry, pool, repeat,
                               cache if cache is not None else {})
        else:
            for seg in segs:
                _add_segment(y, x, seg, a_stacked, b_stacked, geometry[seg.slot])
    return y


def _add_segment(y, x, seg: Segment, a_stacked, b_stacked, g: SlotGeometry) -> None:
    out_features = y.shape[-1]
    d = qbara_delta(x[seg.rows], a_stacked[seg.slot], b_stacked[seg.slot], g,
                    out_features).to(y.dtype)
    if seg.contiguous:
        target = y[seg.rows]
        if g.repeat == 1:
            target.add_(d)
        else:  # broadcast-add each compact output onto its q copies: no full-width temp
            target.unflatten(-1, (out_features // g.repeat, g.repeat)).add_(d.unsqueeze(-1))
    else:
        y.index_add_(0, seg.rows, d.repeat_interleave(g.repeat, dim=-1) if g.repeat > 1 else d)


def _gather_index(segs: Sequence[Segment], geometry, cache: dict):
    key = tuple((seg.slot, geometry[seg.slot].rank, geometry[seg.slot].scaling) for seg in segs)
    if key not in cache:
        rows = torch.cat([torch.arange(s.rows.start, s.rows.stop) if s.contiguous else s.rows
                          for s in segs])
        counts = torch.tensor([_rows_len(s) for s in segs])
        slots = torch.repeat_interleave(torch.tensor([k[0] for k in key]), counts)
        ranks = torch.repeat_interleave(torch.tensor([k[1] for k in key]), counts)
        scale = torch.repeat_interleave(torch.tensor([k[2] for k in key]), counts)
        cache[key] = (rows, slots, ranks, scale)
    return cache[key]


def add_qbara_gathered(y, x, segs: Sequence[Segment], a_stacked, b_stacked, geometry,
                       pool: int, repeat: int, cache: dict) -> None:
    """Segments sharing (p, q): each token gathers its slot's compact A and B (bgmv style)."""
    rows, slots, ranks, scale = _gather_index(segs, geometry, cache)
    r_max = int(ranks.max())
    in_p, out_q = x.shape[-1] // pool, y.shape[-1] // repeat
    a = a_stacked[slots, :r_max, :in_p]                    # [T, r, in/p]
    b = b_stacked[slots, :out_q, :r_max]                   # [T, out/q, r]
    h = torch.bmm(a, pool_inputs(x[rows].to(a.dtype), pool).unsqueeze(-1)).squeeze(-1)
    if bool((ranks < r_max).any()):
        h = h * (torch.arange(r_max)[None, :] < ranks[:, None])  # never read rank padding
    if bool((scale != 1.0).any()):
        h = h * scale[:, None].to(h.dtype)
    d = torch.bmm(b, h.unsqueeze(-1)).squeeze(-1)
    y.index_add_(0, rows, (d.repeat_interleave(repeat, dim=-1) if repeat > 1 else d).to(y.dtype))


def add_qbara_per_token(y: torch.Tensor, x: torch.Tensor, slot_idx: torch.Tensor,
                        a_stacked: torch.Tensor, b_stacked: torch.Tensor,
                        geometry: Sequence[SlotGeometry | None]) -> torch.Tensor:
    """Every token through the gathered path (for tests and comparisons)."""
    segments = [Segment(int(s), torch.tensor([t])) for t, s in enumerate(slot_idx.tolist())
                if s >= 0 and geometry[s] is not None]
    groups: dict[tuple[int, int], list[Segment]] = {}
    for seg in segments:
        g = geometry[seg.slot]
        groups.setdefault((g.pool, g.repeat), []).append(seg)
    for (pool, repeat), segs in groups.items():
        add_qbara_gathered(y, x, segs, a_stacked, b_stacked, geometry, pool, repeat, {})
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
