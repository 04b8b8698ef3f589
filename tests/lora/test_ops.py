"""Segment math of the native Q-BaRA LoRA path vs a dense float64 reference (pure torch)."""

from __future__ import annotations

import pytest
import torch

from qahira_vllm.adapter_math import pool_sum
from qahira_vllm.lora.ops import (Segment, SlotGeometry, add_qbara_gathered, add_qbara_segments,
                                  segment_by_slot)
from support.qbara_reference import dense_reference

IN, OUT, R_MAX, SLOTS = 64, 96, 16, 4
GEOMETRY = [SlotGeometry(2, 2, 8, 2.0), SlotGeometry(4, 1, 16, 0.5), None,
            SlotGeometry(1, 1, 4, 1.5)]  # slot 2 empty; slot 3 a plain LoRA


def add_qbara_per_token(y, x, slot_idx, a_stacked, b_stacked, geometry):
    """Every token through the gathered path (ops.add_qbara_gathered), one segment each."""
    segments = [Segment(int(s), torch.tensor([t])) for t, s in enumerate(slot_idx.tolist())
                if s >= 0 and geometry[s] is not None]
    groups: dict[tuple[int, int], list[Segment]] = {}
    for seg in segments:
        g = geometry[seg.slot]
        groups.setdefault((g.pool, g.repeat), []).append(seg)
    for (pool, repeat), segs in groups.items():
        add_qbara_gathered(y, pool_sum(x.to(a_stacked.dtype), pool), segs, a_stacked, b_stacked,
                           geometry, pool, repeat, {})
    return y


def _stacked(seed=0):
    g = torch.Generator().manual_seed(seed)
    a_stacked = torch.zeros(SLOTS, R_MAX, IN)
    b_stacked = torch.zeros(SLOTS, OUT, R_MAX)
    a_list, b_list = [None] * SLOTS, [None] * SLOTS
    for s, geo in enumerate(GEOMETRY):
        if geo is None:
            continue
        a = torch.randn(geo.rank, IN // geo.pool, generator=g)
        b = torch.randn(OUT // geo.repeat, geo.rank, generator=g)
        a_stacked[s, :geo.rank, :a.shape[1]] = a
        b_stacked[s, :b.shape[0], :geo.rank] = b
        a_list[s], b_list[s] = a, b
    # Padding outside each slot's corner must never be read: fill it with garbage.
    a_stacked[a_stacked == 0] = 1e6
    b_stacked[b_stacked == 0] = 1e6
    for s, geo in enumerate(GEOMETRY):
        if geo is not None:
            a_stacked[s, :geo.rank, :IN // geo.pool] = a_list[s]
            b_stacked[s, :OUT // geo.repeat, :geo.rank] = b_list[s]
    return a_stacked, b_stacked, a_list, b_list


SLOT_PATTERNS = {
    "mixed_runs": [-1, -1, 0, 0, 0, 1, 1, -1, 3, 3, 0, 2, 2, -1],
    "interleaved_decode": [0, 1, -1, 3, 0, 1, -1, 3, 0],
    "all_base": [-1] * 5,
    "one_adapter": [1] * 7,
}


@pytest.mark.parametrize("pattern", list(SLOT_PATTERNS))
@pytest.mark.parametrize("impl", ["segments", "segments_packed", "per_token"])
def test_matches_dense_reference(pattern, impl):
    a_stacked, b_stacked, a_list, b_list = _stacked()
    slot_idx = torch.tensor(SLOT_PATTERNS[pattern])
    x = torch.randn(len(slot_idx), IN, generator=torch.Generator().manual_seed(1))
    base = torch.randn(len(slot_idx), OUT)
    y = base.clone()
    if impl == "segments":
        add_qbara_segments(y, x, segment_by_slot(slot_idx), a_stacked, b_stacked, GEOMETRY)
    elif impl == "segments_packed":  # with a pack cache: many short segments take the GEMM
        add_qbara_segments(y, x, segment_by_slot(slot_idx), a_stacked, b_stacked, GEOMETRY,
                           {}, None, {})
    else:
        add_qbara_per_token(y, x, slot_idx, a_stacked, b_stacked, GEOMETRY)
    expected = base.double() + dense_reference(x, slot_idx, a_list, b_list, GEOMETRY, OUT)
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-3)
    # Base-only (-1) and empty-slot tokens are bit-for-bit untouched.
    untouched = [t for t, s in enumerate(slot_idx.tolist()) if s < 0 or GEOMETRY[s] is None]
    assert torch.equal(y[untouched], base[untouched])


def test_segments_are_slices_for_contiguous_runs():
    segs = segment_by_slot(torch.tensor([-1, 0, 0, 1, 1, 1, 0]))
    by_slot = {s.slot: s for s in segs}
    assert set(by_slot) == {0, 1}
    assert by_slot[1].rows == slice(3, 6)
    assert by_slot[0].rows.tolist() == [1, 2, 6]  # not dense: gathered


def test_column_slice_output_and_trainer_equivalence():
    """y may be a column slice of a wider output (merged q/k/v); delta == trainer's QBaRA."""
    from qahira_vllm.training.adapters import QBaRA

    torch.manual_seed(0)
    adapter = QBaRA(IN, OUT, rank=8, pool=2, repeat=4, scaling=2.0)
    with torch.no_grad():
        adapter.lora_B.normal_()
    a_stacked = torch.zeros(1, R_MAX, IN)
    b_stacked = torch.zeros(1, OUT, R_MAX)
    a_stacked[0, :8, :IN // 2] = adapter.lora_A.detach()
    b_stacked[0, :OUT // 4, :8] = adapter.lora_B.detach()
    x = torch.randn(5, IN)
    wide = torch.zeros(5, OUT + 32)
    add_qbara_segments(wide[:, 16:16 + OUT], x, segment_by_slot(torch.zeros(5, dtype=torch.long)),
                       a_stacked, b_stacked, [SlotGeometry(2, 4, 8, 2.0)])
    torch.testing.assert_close(wide[:, 16:16 + OUT], adapter(x).detach(), rtol=1e-5, atol=1e-5)
    assert torch.equal(wide[:, :16], torch.zeros(5, 16))
    assert torch.equal(wide[:, 16 + OUT:], torch.zeros(5, 16))


def test_bf16_activations():
    a_stacked, b_stacked, a_list, b_list = _stacked()
    slot_idx = torch.tensor([0, 1, 3, -1])
    x = torch.randn(4, IN)
    y = torch.zeros(4, OUT, dtype=torch.bfloat16)
    add_qbara_segments(y, x.bfloat16(), segment_by_slot(slot_idx), a_stacked, b_stacked, GEOMETRY)
    expected = dense_reference(x.bfloat16().float(), slot_idx, a_list, b_list, GEOMETRY, OUT)
    torch.testing.assert_close(y.double(), expected, rtol=2e-2, atol=0.5)


@pytest.mark.parametrize("path", ["add_qbara_gathered", "add_qbara_slot_gemm"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_many_short_segments_take_the_batched_paths_and_match(path, out_dtype):
    """Decode with many adapters (>= GATHER_MIN_SEGMENTS one-token segments per geometry): the
    per-token gather (no `packed` cache) or the all-slots GEMM (with one) runs and agrees
    with the dense reference. Buffers outside each slot's corner hold garbage (1e6), which the
    all-slots GEMM multiplies by an exact 0. bf16 y: the delta is rounded to bf16, then the sum
    (tolerance: two bf16 roundings)."""
    from qahira_vllm.lora import ops

    slots, g = 16, torch.Generator().manual_seed(3)
    geometry = [SlotGeometry(2, 2, 8 if s % 3 else 16, 1.0 + s / 8) if s % 2 else
                SlotGeometry(4, 1, 4, 0.5) for s in range(slots)]
    a_stacked = torch.full((slots, R_MAX, IN), 1e6)
    b_stacked = torch.full((slots, OUT, R_MAX), 1e6)
    a_list, b_list = [], []
    for s, geo in enumerate(geometry):
        a = torch.randn(geo.rank, IN // geo.pool, generator=g)
        b = torch.randn(OUT // geo.repeat, geo.rank, generator=g)
        a_stacked[s, :geo.rank, :a.shape[1]], b_stacked[s, :b.shape[0], :geo.rank] = a, b
        a_list.append(a)
        b_list.append(b)
    slot_idx = torch.tensor([(7 * t) % slots if t % 5 else -1 for t in range(40)])
    x = torch.randn(40, IN, generator=g)
    expected = dense_reference(x, slot_idx, a_list, b_list, geometry, OUT)
    calls = []
    original = getattr(ops, path)
    setattr(ops, path, lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    try:
        base = torch.randn(40, OUT + 8, generator=g).to(out_dtype)
        y_wide = base.clone()
        add_qbara_segments(y_wide[:, 8:], x, segment_by_slot(slot_idx), a_stacked, b_stacked,
                           geometry, {}, None, None if path == "add_qbara_gathered" else {})
    finally:
        setattr(ops, path, original)
    assert calls, f"{path} did not run"
    y = y_wide[:, 8:].double() - base[:, 8:].double()
    if out_dtype == torch.float32:
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-3)
    else:
        tol = 2.0 ** -7 * (base[:, 8:].double().abs() + expected.abs()) + 1e-3
        assert ((y - expected).abs() <= tol).all()
    assert torch.equal(y_wide[slot_idx < 0], base[slot_idx < 0])  # base-only rows untouched
    assert torch.equal(y_wide[:, :8], base[:, :8])                 # outside the column slice
