"""qahira_kernels.cpu_qbara: the compiled whole-layer multi-adapter Q-BaRA kernel vs a float64
dense reference (each slot's adapter expanded to full width, tests/qbara_reference.dense_reference).

Tolerances: the kernel computes in fp32 and rounds y once, so
    fp32 y: |err| <= 1e-5 * (|base| + |delta|) + 1e-5
    bf16 / fp16 y: |err| <= 2^-8 / 2^-11 * |base + delta| + the fp32 term (one rounding).
x in bf16/fp16 is compared against the reference computed from the same rounded x.
This machine class (x86-64, AVX2, gcc) is what CI runs on: the library must build here.

cpu_qbara.c is built twice (AVX2; AVX-512). Tests taking the `variant` fixture (conftest.py) run
once per build, the build in the test id ([avx2] / [avx512]; one this CPU cannot run is reported
as skipped with the reason); test_avx2_and_avx512_builds_bit_identical checks that the two agree
bit for bit, and test_avx512_build_compiles_and_links that the AVX-512 object is in the library
on every machine.
"""

from __future__ import annotations

import pytest
import torch

from qahira_kernels import cpu_lib
from qahira_kernels.cpu_qbara import CpuQbaraLayer
from qahira_kernels.layouts import pack_qahira_slots
from qahira_vllm.lora.ops import SlotGeometry
from support.qbara_reference import dense_reference

ROUNDING = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
R_MAX, SLOTS = 16, 6
# slot -> (pool, repeat, rank) per slice; None = the slot does not touch that slice. Covers pools
# and repeats 1-4 (the vector paths are p = 2 and q = 1, 2), rank < R, tails of in/p and out/q
# that are not multiples of 8, and an empty slot (5).
GEOMETRY = {0: (2, 2, 16), 1: (1, 1, 8), 2: (3, 4, 5), 3: (4, 3, 16), 4: (2, 1, 1)}


def _layer(in_features, out_sizes, seed=0, geometry=GEOMETRY, slots=SLOTS, variant=None):
    """Buffers with 1e6 outside each slot's corner (never to be read) and the compact A, B."""
    g = torch.Generator().manual_seed(seed)
    a_st = [torch.full((slots, R_MAX, in_features), 1e6) for _ in out_sizes]
    bt_st = [torch.full((slots, R_MAX, o), 1e6) for o in out_sizes]
    geo = [torch.zeros(slots, 3, dtype=torch.int32) for _ in out_sizes]
    coef = [torch.zeros(slots) for _ in out_sizes]
    compact = {}
    for c, out_c in enumerate(out_sizes):
        for s, geom in geometry.items():
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
    return CpuQbaraLayer.create(a_st, bt_st, geo, coef, variant=variant), compact


def _reference(x, slot_idx, compact, c, out_c, n_slots=SLOTS):
    slots = range(n_slots)
    geometry = [compact[c, s][2] if (c, s) in compact else None for s in slots]
    return dense_reference(x.double(), slot_idx, [compact[c, s][0] if (c, s) in compact else None
                                                  for s in slots],
                           [compact[c, s][1] if (c, s) in compact else None for s in slots],
                           geometry, out_c)


def _assert_slices_close(y, base_y, out_sizes, deltas, y_dtype, fp32=1e-5):
    """y (the kernel's result) vs base_y + deltas[c] on each slice c, within the bounds above
    (fp32: the fp32 term's factor, 1e-5 for the dot lengths <= 72 of most tests)."""
    col = 0
    for c, (out_c, delta) in enumerate(zip(out_sizes, deltas)):
        base_c = base_y[:, col:col + out_c].double()
        want = base_c + delta
        err = (y[:, col:col + out_c].double() - want).abs()
        tol = ROUNDING[y_dtype] * want.abs() + fp32 * (base_c.abs() + delta.abs() + 1)
        assert (err <= tol).all(), f"slice {c}: max err {err.max():.3g}, excess " \
                                   f"{(err - tol).max():.3g}"
        col += out_c


def _rows_slots(slot_idx):
    rows = (slot_idx >= 0).nonzero().flatten()
    return rows.to(torch.int64).contiguous(), slot_idx[rows].to(torch.int64).contiguous()


def test_library_builds():
    assert cpu_lib.load_library() is not None, cpu_lib.library_error()


def test_avx512_build_compiles_and_links():
    """Both objects of cpu_qbara.c are in the library on every machine whose gcc knows the
    AVX-512 flags (CI's included), whether or not this CPU runs the AVX-512 one."""
    import subprocess

    lib = cpu_lib.load_library()
    assert cpu_lib.qbara_built_variants() == ("avx2", "avx512"), cpu_lib._avx512_build_error
    nm = subprocess.run(["nm", "-D", "--defined-only", lib._name], capture_output=True,
                        text=True, check=True).stdout
    assert " T qahira_qbara_layer_avx512" in nm and " T qahira_qbara_layer_avx2" in nm


def test_kernel_runs_the_chosen_build(monkeypatch):
    """Default: the widest build this CPU runs; $QAHIRA_CPU_ISA=avx2 forces AVX2; a variant
    this machine cannot run is refused, naming the ones it can."""
    monkeypatch.delenv(cpu_lib.ISA_ENV, raising=False)
    assert _layer(64, (64,))[0].variant == cpu_lib.qbara_variants()[-1]
    monkeypatch.setenv(cpu_lib.ISA_ENV, "avx2")
    assert _layer(64, (64,))[0].variant == "avx2"
    with pytest.raises(ValueError, match=r"variant 'sse2' is not one this machine runs \(avx2"):
        _layer(64, (64,), variant="sse2")


@pytest.mark.parametrize("out_sizes", [(96,), (96, 72), (120, 48, 48)])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("y_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_dense_reference(variant, out_sizes, x_dtype, y_dtype):
    in_features = 72  # in/p: 72, 36, 24, 18 (vector body plus scalar tails)
    kernel, compact = _layer(in_features, out_sizes, variant=variant)
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
    _assert_slices_close(y, base[:, 8:8 + out], out_sizes,
                         [_reference(x, slot_idx, compact, c, o) for c, o in enumerate(out_sizes)],
                         y_dtype)
    # Base-only tokens, the empty slot's tokens and the columns outside y: bit for bit untouched.
    untouched = (slot_idx < 0) | (slot_idx == 5)
    assert torch.equal(wide[untouched], base[untouched])
    assert torch.equal(wide[:, :8], base[:, :8]) and torch.equal(wide[:, 8 + out:], base[:, 8 + out:])
    if len(out_sizes) > 1:  # slot 4 does not touch slice 1
        s1 = slice(8 + out_sizes[0], 8 + out_sizes[0] + out_sizes[1])
        assert torch.equal(wide[slot_idx == 4, s1], base[slot_idx == 4, s1])


@pytest.mark.parametrize("qahira", [False, True], ids=["qbara", "with-qahira"])
def test_each_token_is_independent_of_the_batch(variant, qahira):
    """A token's result is bit-identical whether it runs alone or among others (any slots;
    with-qahira: Q-BaRA, LoRA, QA-HiRA and base-only tokens, see _mixed_layer)."""
    kernel = (_mixed_layer(72, (96, 48), variant=variant) if qahira
              else _layer(72, (96, 48), variant=variant))[0]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(24, 72, generator=g).bfloat16()
    slot_idx = torch.tensor([i % (MIXED_SLOTS if qahira else SLOTS) for i in range(24)])
    base = torch.randn(24, 144, generator=g).bfloat16()
    together = base.clone()
    kernel.apply(together, x, *_rows_slots(slot_idx))
    for i in range(24):
        alone = base[i:i + 1].clone()
        kernel.apply(alone, x[i:i + 1], torch.tensor([0]), slot_idx[i:i + 1].clone())
        assert torch.equal(alone[0], together[i]), f"token {i}"


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16])
def test_runs_of_one_slot_give_each_token_its_lone_result(variant, weights):
    """Consecutive tokens of one slot (a prompt in prefill, requests sharing an adapter, as the
    LoRA layers list them): runs of 1 to 9 tokens, next to QA-HiRA and base-only tokens, give
    every token the bits it gets alone, and match the dense reference of their adapter (within
    the bound of the module docstring)."""
    kernel, compact, dense = _mixed_layer(300, (264, 144), seed=7, variant=variant)
    if weights == torch.bfloat16:
        kernel, compact = _with_bf16_weights(kernel, compact, variant)
    runs = [(0, 9), (1, 4), (-1, 2), (2, 3), (0, 1), (1, 5), (4, 2), (0, 2), (3, 6)]
    slot_idx = torch.tensor([s for s, n in runs for _ in range(n)])
    g = torch.Generator().manual_seed(8)
    x = torch.randn(slot_idx.numel(), 300, generator=g).bfloat16()
    base = torch.randn(slot_idx.numel(), 408, generator=g).bfloat16()
    together = base.clone()
    kernel.apply(together, x, *_rows_slots(slot_idx))
    for i in range(slot_idx.numel()):
        alone = base[i:i + 1].clone()
        if slot_idx[i] >= 0:
            kernel.apply(alone, x[i:i + 1], torch.tensor([0]), slot_idx[i:i + 1].clone())
        assert torch.equal(alone[0], together[i]), f"token {i} (slot {int(slot_idx[i])})"
    _assert_slices_close(together, base, (264, 144),
                         [_mixed_delta(x, slot_idx, compact, dense, c, o)
                          for c, o in enumerate((264, 144))], torch.bfloat16, 1e-5 * 300 / 72)


def test_threads_do_not_change_results(variant):
    kernel, _ = _layer(72, (96,), variant=variant)
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


def test_nothing_listed_is_a_no_op(variant):
    kernel, _ = _layer(64, (64,), variant=variant)
    y = torch.randn(4, 64)
    base = y.clone()
    kernel.apply(y, torch.randn(4, 64), torch.zeros(0, dtype=torch.int64),
                 torch.zeros(0, dtype=torch.int64))
    assert torch.equal(y, base)


def test_bad_calls_raise_and_leave_y_alone(variant):
    kernel, _ = _layer(64, (64,), variant=variant)
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


def test_geometry_that_does_not_fit_is_refused(variant):
    """A rank above R, or a pool that does not divide the layer, in a slot's geometry row: the
    kernel refuses the call (nothing written) instead of reading past the buffers."""
    a = [torch.zeros(2, 4, 64)]
    bt = [torch.zeros(2, 4, 32)]
    coef = [torch.ones(2)]
    y = torch.zeros(1, 32)
    for bad in ([1, 1, 5], [3, 1, 2], [1, 5, 2]):
        geo = [torch.tensor([[1, 1, 2], bad], dtype=torch.int32)]
        kernel = CpuQbaraLayer.create(a, bt, geo, coef, variant=variant)
        with pytest.raises(ValueError, match="geometry"):
            kernel.apply(y, torch.ones(1, 64), torch.tensor([0]), torch.tensor([1]))
        kernel.apply(y, torch.ones(1, 64), torch.tensor([0]), torch.tensor([0]))  # slot 0 fine
    assert torch.equal(y, torch.zeros(1, 32))  # slot 0's B is zero


@pytest.mark.parametrize("in_features,out_sizes", [(72, (96, 72)), (300, (264, 144, 144))])
@pytest.mark.parametrize("y_dtype", [torch.float32, torch.bfloat16])
def test_bf16_buffers_equal_fp32_buffers_holding_the_same_values(variant, in_features, out_sizes,
                                                                 y_dtype):
    """A and B^T stored in bf16 are widened exactly: the result is bit for bit the fp32 kernel's
    on fp32 buffers holding the same (bf16-rounded) values; the reference is the fp32 kernel,
    itself checked against float64 above. 300 / 264: the vector bodies (4W passes) and tails."""
    fp32_kernel, _ = _layer(in_features, out_sizes, variant=variant)
    a_st, bt_st, geo, coef = fp32_kernel._buffers
    for t in (*a_st, *bt_st):
        t.copy_(t.bfloat16().float())  # the fp32 kernel now reads bf16-representable values
    bf16_kernel = CpuQbaraLayer.create([t.bfloat16() for t in a_st],
                                       [t.bfloat16() for t in bt_st], geo, coef, variant=variant)
    g = torch.Generator().manual_seed(3)
    t = 29
    slot_idx = torch.tensor([(3 * i) % (SLOTS + 1) - 1 for i in range(t)])
    x = torch.randn(t, in_features, generator=g).bfloat16()
    base = torch.randn(t, sum(out_sizes), generator=g).to(y_dtype)
    want, got = base.clone(), base.clone()
    fp32_kernel.apply(want, x, *_rows_slots(slot_idx))
    bf16_kernel.apply(got, x, *_rows_slots(slot_idx))
    assert not torch.equal(want, base)
    assert torch.equal(got, want)


def test_buffers_of_mixed_or_other_dtypes_are_refused(variant):
    geo, coef = [torch.zeros(2, 3, dtype=torch.int32)], [torch.ones(2)]
    with pytest.raises(ValueError, match=r"bt_stacked\[0\] must be a contiguous CPU "
                                         r"torch.bfloat16 tensor"):
        CpuQbaraLayer.create([torch.zeros(2, 4, 64, dtype=torch.bfloat16)],
                             [torch.zeros(2, 4, 32)], geo, coef, variant=variant)
    with pytest.raises(ValueError, match="must be float32 or bfloat16, got torch.float16"):
        CpuQbaraLayer.create([torch.zeros(2, 4, 64, dtype=torch.float16)],
                             [torch.zeros(2, 4, 32, dtype=torch.float16)], geo, coef,
                             variant=variant)


def test_buffer_checks_name_the_buffer(variant):
    a = [torch.zeros(2, 4, 64)]
    geo = [torch.zeros(2, 3, dtype=torch.int32)]
    with pytest.raises(ValueError, match=r"bt_stacked\[0\] must be a contiguous CPU "
                                         r"torch.float32 tensor of shape \[2, 4, 32\]"):
        CpuQbaraLayer.create(a, [torch.zeros(2, 32, 4).transpose(1, 2)], geo, [torch.ones(2)],
                             variant=variant)
    with pytest.raises(ValueError, match=r"geo\[0\]"):
        CpuQbaraLayer.create(a, [torch.zeros(2, 4, 32)], [torch.zeros(2, 3)], [torch.ones(2)],
                             variant=variant)
    with pytest.raises(ValueError, match="1 to 3 slices"):
        CpuQbaraLayer.create(a * 4, [torch.zeros(2, 4, 32)] * 4, geo * 4, [torch.ones(2)] * 4,
                             variant=variant)


# ----------------------------------------------------------------------------- QA-HiRA slots
# Q-BaRA slot 0 and LoRA slot 1 next to QA-HiRA slots 2, 3, 4, 6 (pi, qo differ, and differ from
# the Q-BaRA pool; qo 1, 2, 4, 12 take each repeat path; slot 2 pools by 3 on slices after the
# first, slot 6 only on slice 0), slots
# 5 and 7 empty. QA-HiRA reference: the dense dW[o, i] = s * M[o // qo, i // pi] / pi of
# docs/FORMAT.md in float64, same tolerances as above.
MIXED_QBARA = {0: (2, 2, 16), 1: (1, 1, 8)}
MIXED_QAHIRA = {2: (2, 2), 3: (3, 4), 4: (1, 1), 6: (4, 12)}
MIXED_SLOTS = 8


def _qahira_buffers(in_features, out_c, c, g, qahira=MIXED_QAHIRA):
    ms, dense = [None] * MIXED_SLOTS, {}
    m_geo, m_coef = torch.zeros(MIXED_SLOTS, 3, dtype=torch.int32), torch.zeros(MIXED_SLOTS)
    for s, (pi, qo) in qahira.items():
        if s == 6 and c > 0:
            continue
        if s == 2 and c > 0:  # a pool that changes between slices of one token
            pi = 3
        ms[s] = torch.randn(out_c // qo, in_features // pi, generator=g)
        scaling = 0.25 + s / 8
        m_geo[s], m_coef[s] = torch.tensor([pi, qo, 1]), scaling / pi
        o, i = torch.arange(out_c)[:, None], torch.arange(in_features)[None, :]
        dense[s] = scaling * ms[s].double()[o // qo, i // pi] / pi
    return (*pack_qahira_slots(ms), m_geo, m_coef), dense


def _mixed_layer(in_features, out_sizes, seed=0, variant=None):
    kernel, compact = _layer(in_features, out_sizes, seed, MIXED_QBARA, MIXED_SLOTS, variant)
    g = torch.Generator().manual_seed(seed + 100)
    dense = {}
    for c, out_c in enumerate(out_sizes):
        bufs, dense_c = _qahira_buffers(in_features, out_c, c, g)
        kernel.set_qahira(c, *bufs)
        dense.update({(c, s): d for s, d in dense_c.items()})
    return kernel, compact, dense


def _with_bf16_weights(kernel, compact, variant):
    """The kernel again over bf16 copies of its A and B^T buffers (same geometry, the same
    QA-HiRA buffers), and the compact A, B rounded to bf16 for the reference."""
    a_st, bt_st, geo, coef = kernel._buffers
    bf16 = CpuQbaraLayer.create([t.bfloat16() for t in a_st], [t.bfloat16() for t in bt_st], geo,
                                coef, variant=variant)
    for c, bufs in enumerate(kernel._qahira):
        bf16.set_qahira(c, *bufs) if bufs is not None else bf16.set_qahira(c, None)
    rounded = {k: (a.bfloat16().float(), b.bfloat16().float(), g)
               for k, (a, b, g) in compact.items()}
    return bf16, rounded


def _mixed_delta(x, slot_idx, compact, dense, c, out_c):
    delta = _reference(x, slot_idx, compact, c, out_c, MIXED_SLOTS)
    for t, s in enumerate(slot_idx.tolist()):
        if (c, s) in dense:
            delta[t] = dense[c, s] @ x[t].double()
    return delta


@pytest.mark.parametrize("out_sizes", [(96,), (120, 48, 48), (264, 144)])  # 264: W-blocks of 4
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("y_dtype", [torch.float32, torch.bfloat16])
def test_qahira_slots_mixed_with_qbara_and_lora(variant, out_sizes, x_dtype, y_dtype):
    in_features = 72  # in/pi: 36, 24, 72, 18
    kernel, compact, dense = _mixed_layer(in_features, out_sizes, variant=variant)
    g = torch.Generator().manual_seed(1)
    t = 41
    slot_idx = torch.tensor([(5 * i) % (MIXED_SLOTS + 1) - 1 for i in range(t)])  # -1 .. 7
    slot_idx[20:28] = 3                                                          # a run
    x = torch.randn(t, in_features, generator=g).to(x_dtype)
    out = sum(out_sizes)
    wide = torch.randn(t, out + 24, generator=g).to(y_dtype)  # y: a column slice
    base = wide.clone()
    y = wide[:, 8:8 + out]
    kernel.apply(y, x, *_rows_slots(slot_idx))
    deltas = [_mixed_delta(x, slot_idx, compact, dense, c, o) for c, o in enumerate(out_sizes)]
    _assert_slices_close(y, base[:, 8:8 + out], out_sizes, deltas, y_dtype)
    for delta in deltas:  # QA-HiRA slot 3 adds something on every slice
        assert (delta[slot_idx == 3].abs() > 1e-2).float().mean() > 0.9
    untouched = (slot_idx < 0) | (slot_idx == 5) | (slot_idx == 7)
    assert torch.equal(wide[untouched], base[untouched])
    assert torch.equal(wide[:, :8], base[:, :8]) and torch.equal(wide[:, 8 + out:], base[:, 8 + out:])
    if len(out_sizes) > 1:  # slot 6 is a QA-HiRA on slice 0 only
        assert torch.equal(wide[slot_idx == 6, 8 + out_sizes[0]:], base[slot_idx == 6, 8 + out_sizes[0]:])


def test_qahira_rebuilt_buffers_and_clearing(variant):
    """set_qahira after a rebuild: the kernel reads the new buffers (the old ones freed);
    set_qahira(c, None): no QA-HiRA on that slice any more."""
    kernel, compact, _ = _mixed_layer(72, (96,), variant=variant)
    g = torch.Generator().manual_seed(7)
    bufs, dense = _qahira_buffers(72, 96, 0, g, {3: (2, 4)})  # slot 3 now (2, 4), others reset
    kernel.set_qahira(0, *bufs)
    del bufs
    x = torch.randn(6, 72, generator=g)
    slot_idx = torch.tensor([0, 2, 3, 4, 3, 6])
    y = torch.zeros(6, 96)
    kernel.apply(y, x, *_rows_slots(slot_idx))
    want = _reference(x, slot_idx, compact, 0, 96, MIXED_SLOTS)
    want[slot_idx == 3] = x[slot_idx == 3].double() @ dense[3].t()
    assert torch.allclose(y.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(y[(slot_idx == 2) | (slot_idx == 4) | (slot_idx == 6)], torch.zeros(3, 96))
    kernel.set_qahira(0, None)
    y2 = torch.zeros(6, 96)
    kernel.apply(y2, x, *_rows_slots(slot_idx))
    assert torch.equal(y2[slot_idx != 0], torch.zeros(5, 96)) and torch.equal(y2[0], y[0])


def test_qahira_bad_buffers_and_slots_are_refused(variant):
    kernel, _, _ = _mixed_layer(72, (96,), variant=variant)
    (m_flat, m_offset, m_geo, m_coef), _ = _qahira_buffers(72, 96, 0, torch.Generator())
    with pytest.raises(ValueError, match=r"m_flat\[0\] must be a contiguous CPU torch.float32"):
        kernel.set_qahira(0, m_flat.half(), m_offset, m_geo, m_coef)
    with pytest.raises(ValueError, match=r"m_offset\[0\] must be a contiguous CPU torch.int64 "
                                         r"tensor of shape \[8\]"):
        kernel.set_qahira(0, m_flat, m_offset[:4], m_geo, m_coef)
    with pytest.raises(ValueError, match=r"slice 1 outside \[0, 1\)"):
        kernel.set_qahira(1, m_flat, m_offset, m_geo, m_coef)
    for s, bad in ((2, [5, 2, 1]), (3, [3, 7, 1]), (4, [1, 1, 2])):  # pi, qo not dividing; on = 2
        geo = m_geo.clone()
        geo[s] = torch.tensor(bad)
        with pytest.raises(ValueError, match=f"slice 0 slot {s}: m_geo"):
            kernel.set_qahira(0, m_flat, m_offset, geo, m_coef)
    off = m_offset.clone()
    off[6] = m_flat.numel() - 10  # M of slot 6 would run past m_flat
    with pytest.raises(ValueError, match="slice 0 slot 6: .* m_flat of"):
        kernel.set_qahira(0, m_flat, off, m_geo, m_coef)
    # Changed in place after set_qahira: the call refuses before writing anything.
    kernel.set_qahira(0, m_flat, m_offset, m_geo, m_coef)
    x, y = torch.randn(3, 72), torch.randn(3, 96)
    base = y.clone()
    m_geo[0] = torch.tensor([2, 2, 1])  # slot 0 is a Q-BaRA: now both
    with pytest.raises(ValueError, match="holds both a Q-BaRA/LoRA"):
        kernel.apply(y, x, torch.tensor([0, 1, 2]), torch.tensor([2, 3, 0]))
    m_geo[0] = 0
    m_geo[3, 0] = 5
    with pytest.raises(ValueError, match="QA-HiRA slot's m_geo"):
        kernel.apply(y, x, torch.tensor([0, 1, 2]), torch.tensor([2, 1, 3]))
    assert torch.equal(y, base)
    m_geo[3, 0] = 3
    kernel.apply(y, x, torch.tensor([0, 1, 2]), torch.tensor([2, 1, 3]))
    assert not torch.equal(y, base)


DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


@pytest.mark.parametrize("in_features,out_sizes", [(72, (96, 48)), (300, (264, 144, 144))])
@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16])
def test_avx2_and_avx512_builds_bit_identical(in_features, out_sizes, weights):
    """Every fp32 step is per output lane or in the AVX2 order (cpu_qbara.c, "Widths"): the two
    builds agree bit for bit on a random mixed batch (Q-BaRA, LoRA, QA-HiRA, empty and base-only
    tokens, rows in random order), for every x / y dtype, with A and B^T in fp32 or bf16 (the
    QA-HiRA M stays fp32); both also match the dense reference (of the bf16-rounded A and B
    there). in / pool 150, 100, 300, 75 and out / repeat up to 264 reach the 16- and 64-wide
    bodies, the 8-column step and the scalar tails."""
    runs = cpu_lib.qbara_variants()
    if len(runs) < 2:
        pytest.skip(f"needs both builds; this CPU runs only {runs}")
    kernels, compact, dense = {}, None, None
    for v in runs:
        kernels[v], compact, dense = _mixed_layer(in_features, out_sizes, seed=5, variant=v)
        if weights == torch.bfloat16:
            kernels[v], compact = _with_bf16_weights(kernels[v], compact, v)
    g = torch.Generator().manual_seed(11)
    t, out = 61, sum(out_sizes)
    slot_idx = torch.randint(-1, MIXED_SLOTS, (t,), generator=g)
    rows, slots = _rows_slots(slot_idx)
    order = torch.randperm(rows.numel(), generator=g)
    rows, slots = rows[order].contiguous(), slots[order].contiguous()
    for x_dtype in DTYPES:
        x = (torch.randn(t, in_features, generator=g) * 3).to(x_dtype)
        deltas = [_mixed_delta(x, slot_idx, compact, dense, c, o) for c, o in enumerate(out_sizes)]
        for y_dtype in DTYPES:
            base = torch.randn(t, out, generator=g).to(y_dtype)
            ys = {}
            for v in runs:
                ys[v] = base.clone()
                kernels[v].apply(ys[v], x, rows, slots)
            a, b = (ys[v].view(BITS[y_dtype]) for v in runs)
            assert torch.equal(a, b), (x_dtype, y_dtype, (a != b).sum().item())
            # fp32 accumulation error grows with the dot length: the bound scales with in / 72
            _assert_slices_close(ys["avx2"], base, out_sizes, deltas, y_dtype,
                                 1e-5 * max(1.0, in_features / 72))
