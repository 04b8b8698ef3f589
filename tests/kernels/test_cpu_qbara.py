"""qahira_kernels.cpu_qbara: the compiled whole-layer multi-adapter Q-BaRA kernel vs a float64
dense reference (each slot's adapter expanded to full width, tests/qbara_reference.dense_reference).

Tolerances: the kernel computes in fp32 and rounds y once, so
    fp32 y: |err| <= 1e-5 * (|base| + |delta|) + 1e-5
    bf16 / fp16 y: |err| <= 2^-8 / 2^-11 * |base + delta| + the fp32 term (one rounding).
x in bf16/fp16 is compared against the reference computed from the same rounded x.
This machine class (x86-64, AVX2, gcc) is what CI runs on: the library must build here.
"""

from __future__ import annotations

import pytest
import torch

from qahira_kernels import cpu_lib
from qahira_kernels.cpu_qbara import CpuQbaraLayer
from qahira_vllm.lora.ops import SlotGeometry
from support.qbara_reference import dense_reference

ROUNDING = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
R_MAX, SLOTS = 16, 6
# slot -> (pool, repeat, rank) per slice; None = the slot does not touch that slice. Covers pools
# and repeats 1-4 (the vector paths are p = 2 and q = 1, 2), rank < R, tails of in/p and out/q
# that are not multiples of 8, and an empty slot (5).
GEOMETRY = {0: (2, 2, 16), 1: (1, 1, 8), 2: (3, 4, 5), 3: (4, 3, 16), 4: (2, 1, 1)}


def _layer(in_features, out_sizes, seed=0):
    """Buffers with 1e6 outside each slot's corner (never to be read) and the compact A, B."""
    g = torch.Generator().manual_seed(seed)
    a_st = [torch.full((SLOTS, R_MAX, in_features), 1e6) for _ in out_sizes]
    bt_st = [torch.full((SLOTS, R_MAX, o), 1e6) for o in out_sizes]
    geo = [torch.zeros(SLOTS, 3, dtype=torch.int32) for _ in out_sizes]
    coef = [torch.zeros(SLOTS) for _ in out_sizes]
    compact = {}
    for c, out_c in enumerate(out_sizes):
        for s, geom in GEOMETRY.items():
            if geom is None or (c == 1 and s == 4):  # slot 4 leaves slice 1 alone
                continue
            p, q, r = geom
            scaling = 0.5 + s / 4
            a = torch.randn(r, in_features // p, generator=g)
            b = torch.randn(out_c // q, r, generator=g)
            a_st[c][s, :r, :in_features // p] = a
            bt_st[c][s, :r, :out_c // q] = b.t()
            geo[c][s] = torch.tensor([p, q, r])
            coef[c][s] = scaling / p
            compact[c, s] = (a, b, SlotGeometry(p, q, r, scaling))
    return CpuQbaraLayer.create(a_st, bt_st, geo, coef), compact


def _reference(x, slot_idx, compact, c, out_c):
    slots = range(SLOTS)
    geometry = [compact[c, s][2] if (c, s) in compact else None for s in slots]
    return dense_reference(x.double(), slot_idx, [compact[c, s][0] if (c, s) in compact else None
                                                  for s in slots],
                           [compact[c, s][1] if (c, s) in compact else None for s in slots],
                           geometry, out_c)


def _rows_slots(slot_idx):
    rows = (slot_idx >= 0).nonzero().flatten()
    return rows.to(torch.int64).contiguous(), slot_idx[rows].to(torch.int64).contiguous()


def test_library_builds():
    assert cpu_lib.load_library() is not None, cpu_lib.library_error()


@pytest.mark.parametrize("out_sizes", [(96,), (96, 72), (120, 48, 48)])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("y_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_dense_reference(out_sizes, x_dtype, y_dtype):
    in_features = 72  # in/p: 72, 36, 24, 18 (vector body plus scalar tails)
    kernel, compact = _layer(in_features, out_sizes)
    g = torch.Generator().manual_seed(1)
    t = 37
    slot_idx = torch.tensor([(5 * i) % (SLOTS + 1) - 1 for i in range(t)])  # -1 .. 5, mixed
    slot_idx[10:18] = 3                                                    # a prefill-like run
    x = torch.randn(t, in_features, generator=g).to(x_dtype)
    out = sum(out_sizes)
    wide = torch.randn(t, out + 24, generator=g).to(y_dtype)  # y: a column slice, row stride 24
    base = wide.clone()
    y = wide[:, 8:8 + out]
    kernel.apply(y, x, *_rows_slots(slot_idx))
    col = 0
    for c, out_c in enumerate(out_sizes):
        delta = _reference(x, slot_idx, compact, c, out_c)
        base_c = base[:, 8 + col:8 + col + out_c].double()
        want = base_c + delta
        err = (y[:, col:col + out_c].double() - want).abs()
        tol = ROUNDING[y_dtype] * want.abs() + 1e-5 * (base_c.abs() + delta.abs()) + 1e-5
        assert (err <= tol).all(), f"slice {c}: max err {err.max():.3g}, excess " \
                                   f"{(err - tol).max():.3g}"
        col += out_c
    # Base-only tokens, the empty slot's tokens and the columns outside y: bit for bit untouched.
    untouched = (slot_idx < 0) | (slot_idx == 5)
    assert torch.equal(wide[untouched], base[untouched])
    assert torch.equal(wide[:, :8], base[:, :8]) and torch.equal(wide[:, 8 + out:], base[:, 8 + out:])
    if len(out_sizes) > 1:  # slot 4 does not touch slice 1
        s1 = slice(8 + out_sizes[0], 8 + out_sizes[0] + out_sizes[1])
        assert torch.equal(wide[slot_idx == 4, s1], base[slot_idx == 4, s1])


def test_each_token_is_independent_of_the_batch():
    """A token's result is bit-identical whether it runs alone or among others (any slots)."""
    kernel, _ = _layer(72, (96, 48))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(24, 72, generator=g).bfloat16()
    slot_idx = torch.tensor([i % SLOTS for i in range(24)])
    base = torch.randn(24, 144, generator=g).bfloat16()
    together = base.clone()
    kernel.apply(together, x, *_rows_slots(slot_idx))
    for i in range(24):
        alone = base[i:i + 1].clone()
        kernel.apply(alone, x[i:i + 1], torch.tensor([0]), slot_idx[i:i + 1].clone())
        assert torch.equal(alone[0], together[i]), f"token {i}"


def test_threads_do_not_change_results():
    kernel, _ = _layer(72, (96,))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 72, generator=g)
    slot_idx = torch.tensor([i % SLOTS for i in range(50)])
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y = torch.zeros(50, 96)
            kernel.apply(y, x, *_rows_slots(slot_idx))
            results.append(y)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


def test_nothing_listed_is_a_no_op():
    kernel, _ = _layer(64, (64,))
    y = torch.randn(4, 64)
    base = y.clone()
    kernel.apply(y, torch.randn(4, 64), torch.zeros(0, dtype=torch.int64),
                 torch.zeros(0, dtype=torch.int64))
    assert torch.equal(y, base)


def test_bad_calls_raise_and_leave_y_alone():
    kernel, _ = _layer(64, (64,))
    x, y = torch.randn(4, 64), torch.randn(4, 64)
    base = y.clone()
    with pytest.raises(ValueError, match=r"row index is outside \[0, 4\)"):
        kernel.apply(y, x, torch.tensor([0, 4]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="slot index or a slot's geometry"):
        kernel.apply(y, x, torch.tensor([0, 1]), torch.tensor([0, SLOTS]))
    with pytest.raises(ValueError, match=r"do not match \[T, 64\] / \[T, 64\]"):
        kernel.apply(torch.zeros(4, 63), x, torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="contiguous CPU int64"):
        kernel.apply(y, x, torch.tensor([0], dtype=torch.int32), torch.tensor([0]))
    with pytest.raises(ValueError, match="CPU fp32/bf16/fp16"):
        kernel.apply(y, x.double(), torch.tensor([0]), torch.tensor([0]))
    assert torch.equal(y, base)


def test_geometry_that_does_not_fit_is_refused():
    """A rank above R, or a pool that does not divide the layer, in a slot's geometry row: the
    kernel refuses the call (nothing written) instead of reading past the buffers."""
    a = [torch.zeros(2, 4, 64)]
    bt = [torch.zeros(2, 4, 32)]
    coef = [torch.ones(2)]
    y = torch.zeros(1, 32)
    for bad in ([1, 1, 5], [3, 1, 2], [1, 5, 2]):
        geo = [torch.tensor([[1, 1, 2], bad], dtype=torch.int32)]
        kernel = CpuQbaraLayer.create(a, bt, geo, coef)
        with pytest.raises(ValueError, match="geometry"):
            kernel.apply(y, torch.ones(1, 64), torch.tensor([0]), torch.tensor([1]))
        kernel.apply(y, torch.ones(1, 64), torch.tensor([0]), torch.tensor([0]))  # slot 0 fine
    assert torch.equal(y, torch.zeros(1, 32))  # slot 0's B is zero


def test_buffer_checks_name_the_buffer():
    a = [torch.zeros(2, 4, 64)]
    geo = [torch.zeros(2, 3, dtype=torch.int32)]
    with pytest.raises(ValueError, match=r"bt_stacked\[0\] must be a contiguous CPU "
                                         r"torch.float32 tensor of shape \[2, 4, 32\]"):
        CpuQbaraLayer.create(a, [torch.zeros(2, 32, 4).transpose(1, 2)], geo, [torch.ones(2)])
    with pytest.raises(ValueError, match=r"geo\[0\]"):
        CpuQbaraLayer.create(a, [torch.zeros(2, 4, 32)], [torch.zeros(2, 3)], [torch.ones(2)])
    with pytest.raises(ValueError, match="1 to 3 slices"):
        CpuQbaraLayer.create(a * 4, [torch.zeros(2, 4, 32)] * 4, geo * 4, [torch.ones(2)] * 4)
