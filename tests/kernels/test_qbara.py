"""Multi-adapter Q-BaRA and QA-HiRA kernels (qahira_kernels.qbara) against the fp32 torch
references.

Runs in Triton's interpreter on CPU (TRITON_INTERPRET=1, see conftest.py), with small tiles.

Error bounds:
- shrink, h (fp32) vs reference: 1e-4 relative to max|h|, both dtypes. x and A are in the
  activation dtype, their products are exact in fp32, only the summation order differs.
- expand / apply, y vs reference, max|y - ref| / max|ref|: fp16 2e-3, bf16 2e-2. The kernel
  rounds h to the activation dtype for the tensor-core dot (as vLLM's LoRA expand does) and
  rounds the sum into y; the interpreter truncates to bf16 (up to 2^-7) where the GPU rounds.
The test data make the adapter term dominate y (y starts at 0.1 scale), so a missing, wrong
or misplaced delta fails these bounds.
"""

from __future__ import annotations

import pytest
import torch

from qahira_kernels import qbara as qb
from qahira_kernels._triton_utils import is_interpreted
from qahira_kernels.layouts import pack_qahira_slots
from qahira_kernels.reference import (expand_to_lora, lora_bgmv_ref, qahira_apply_ref,
                                      qbara_expand_ref, qbara_ref, qbara_shrink_ref)

TOL = {torch.float16: 2e-3, torch.bfloat16: 2e-2}
SHRINK_TOL = 1e-4
DTYPES = pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
Q = qb.QbaraConfig

# (pool p, repeat q, rank): different per slot, all in one launch. 3 and 5 are not powers of 2.
MIXED_SLOTS = [(2, 2, 16), (1, 1, 8), (4, 2, 32), (3, 5, 24)]
IN_F, OUT_F = 96, 80     # multiples of every pool / repeat above


def rel_err(y, ref):
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


def make_adapters(slots, in_f, out_f, dtype, pad_value=0.0, seed=0):
    """Stacked buffers; real entries random, padding filled with `pad_value`."""
    g = torch.Generator().manual_seed(seed)
    r_max = max(r for _, _, r in slots)
    in_max = max(in_f // p for p, _, _ in slots)
    out_max = max(out_f // q for _, q, _ in slots)
    A = torch.full((len(slots), r_max, in_max), pad_value)
    B = torch.full((len(slots), out_max, r_max), pad_value)
    for s, (p, q, r) in enumerate(slots):
        A[s, :r, :in_f // p] = 0.3 * torch.randn(r, in_f // p, generator=g)
        B[s, :out_f // q, :r] = 0.3 * torch.randn(out_f // q, r, generator=g)
    pool = torch.tensor([p for p, _, _ in slots], dtype=torch.int32)
    repeat = torch.tensor([q for _, q, _ in slots], dtype=torch.int32)
    rank = torch.tensor([r for _, _, r in slots], dtype=torch.int32)
    scaling = torch.tensor([0.5, 2.0, 0.25, 1.5, 1.0, 0.75][:len(slots)], dtype=torch.float32)
    return A.to(dtype), B.to(dtype), pool, repeat, rank, scaling


def make_tokens(t, in_f, out_f, dtype, slot_idx, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, in_f, generator=g).to(dtype)
    y = (0.1 * torch.randn(t, out_f, generator=g)).to(dtype)
    return x, y, torch.tensor(slot_idx, dtype=torch.int32)


# Slot patterns: -1 (no adapter) mixed in, repeated and unsorted slots, an unused slot (0 in
# "T7"), T = 1, T not a multiple of the token tile, T over several token tiles.
SLOT_PATTERNS = {
    "T1": [2],
    "T1-none": [-1],
    "T7": [3, -1, 1, 3, 2, -1, 3],
    "T37": [((7 * i) % 5) - 1 for i in range(37)],
    "T40-one-slot": [1] * 40,
}


def test_kernels_run_in_interpreter():
    assert is_interpreted(qb._qbara_shrink_kernel) and is_interpreted(qb._qbara_expand_kernel)


def test_reference_equals_expanded_lora():
    """The paper's identity, on the references: Q-BaRA == the LoRA with A' = rep(A, p) / p and
    B' = rep(B, q)."""
    A, B, pool, repeat, rank, scaling = make_adapters(MIXED_SLOTS, IN_F, OUT_F, torch.float32)
    x, y, slot = make_tokens(37, IN_F, OUT_F, torch.float32, SLOT_PATTERNS["T37"])
    A_exp, B_exp = expand_to_lora(A, B, pool, repeat, rank, IN_F, OUT_F)
    torch.testing.assert_close(qbara_ref(y, x, A, B, pool, repeat, rank, scaling, slot),
                               lora_bgmv_ref(y, x, A_exp, B_exp, scaling, slot),
                               rtol=1e-5, atol=1e-5)


@DTYPES
@pytest.mark.parametrize("pattern", list(SLOT_PATTERNS))
@pytest.mark.parametrize("config", [Q(16, 16, 32, 16), Q(16, 16, 16, 32, split_k=3), None],
                         ids=["small", "splitk3", "auto"])
def test_shrink_matches_reference(config, pattern, dtype):
    A, B, pool, repeat, rank, scaling = make_adapters(MIXED_SLOTS, IN_F, OUT_F, dtype)
    x, _, slot = make_tokens(len(SLOT_PATTERNS[pattern]), IN_F, OUT_F, dtype,
                             SLOT_PATTERNS[pattern])
    h = qb.qbara_shrink(x, A, pool, rank, slot, config=config)
    ref = qbara_shrink_ref(x, A, pool, rank, slot)
    assert h.dtype == torch.float32 and h.shape == ref.shape
    assert torch.equal(h[slot < 0], torch.zeros_like(h[slot < 0]))   # no adapter: h = 0
    for s, (_, _, r) in enumerate(MIXED_SLOTS):                      # padded rank: h = 0
        assert torch.equal(h[slot == s, r:], torch.zeros_like(h[slot == s, r:]))
    if (slot >= 0).any():
        assert ((h - ref).abs().max() / ref.abs().max()).item() < SHRINK_TOL


@DTYPES
@pytest.mark.parametrize("pattern", ["T1", "T7", "T37"])
@pytest.mark.parametrize("config", [Q(16, 16, 32, 16), Q(32, 16, 16, 32), None],
                         ids=["small", "wide-n", "auto"])
def test_expand_matches_reference(config, pattern, dtype):
    A, B, pool, repeat, rank, scaling = make_adapters(MIXED_SLOTS, IN_F, OUT_F, dtype)
    x, y0, slot = make_tokens(len(SLOT_PATTERNS[pattern]), IN_F, OUT_F, dtype,
                              SLOT_PATTERNS[pattern])
    h = qbara_shrink_ref(x, A, pool, rank, slot)      # isolate the expand kernel
    ref = qbara_expand_ref(y0, h, B, repeat, rank, scaling, slot)
    y = y0.clone()
    out = qb.qbara_expand(y, h, B, repeat, rank, scaling, slot, config=config)
    assert out is y
    assert rel_err(y, ref) < TOL[dtype]
    assert torch.equal(y[slot < 0], y0[slot < 0])   # tokens without adapter: bitwise untouched
    assert (ref - y0.float()).abs().max() > 0.5 * ref.abs().max()   # the delta is what's tested


@DTYPES
@pytest.mark.parametrize("pattern", list(SLOT_PATTERNS))
def test_apply_matches_reference_and_lora(pattern, dtype):
    A, B, pool, repeat, rank, scaling = make_adapters(MIXED_SLOTS, IN_F, OUT_F, dtype)
    x, y0, slot = make_tokens(len(SLOT_PATTERNS[pattern]), IN_F, OUT_F, dtype,
                              SLOT_PATTERNS[pattern])
    y = y0.clone()
    qb.qbara_apply(y, x, A, B, pool, repeat, rank, scaling, slot, config=Q(16, 16, 32, 32))
    assert torch.equal(y[slot < 0], y0[slot < 0])
    if (slot >= 0).any():
        A_exp, B_exp = expand_to_lora(A, B, pool, repeat, rank, IN_F, OUT_F)
        assert rel_err(y, qbara_ref(y0, x, A, B, pool, repeat, rank, scaling, slot)) < TOL[dtype]
        assert rel_err(y, lora_bgmv_ref(y0, x, A_exp, B_exp, scaling, slot)) < TOL[dtype]
    else:
        assert torch.equal(y, y0)


def test_padding_is_never_read():
    """NaN in every padded entry of A and B: results identical to zero padding."""
    dtype = torch.float16
    x, y0, slot = make_tokens(37, IN_F, OUT_F, dtype, SLOT_PATTERNS["T37"])
    results = []
    for pad in (0.0, float("nan")):
        A, B, pool, repeat, rank, scaling = make_adapters(MIXED_SLOTS, IN_F, OUT_F, dtype, pad)
        y = y0.clone()
        qb.qbara_apply(y, x, A, B, pool, repeat, rank, scaling, slot, config=Q(16, 16, 32, 32))
        results.append(y)
    assert torch.isfinite(results[1]).all()
    assert torch.equal(results[0], results[1])


def test_expand_into_column_slice_of_wider_output():
    """vLLM's merged layers (qkv, gate_up) add each slice's adapter into a column range."""
    dtype = torch.bfloat16
    A, B, pool, repeat, rank, scaling = make_adapters(MIXED_SLOTS, IN_F, OUT_F, dtype)
    x, _, slot = make_tokens(7, IN_F, OUT_F, dtype, SLOT_PATTERNS["T7"])
    wide0 = (0.1 * torch.randn(7, 16 + OUT_F + 24)).to(dtype)
    wide = wide0.clone()
    qb.qbara_apply(wide[:, 16:16 + OUT_F], x, A, B, pool, repeat, rank, scaling, slot,
                   config=Q(16, 16, 32, 32))
    assert torch.equal(wide[:, :16], wide0[:, :16]) and torch.equal(wide[:, 16 + OUT_F:],
                                                                    wide0[:, 16 + OUT_F:])
    ref = qbara_ref(wide0[:, 16:16 + OUT_F], x, A, B, pool, repeat, rank, scaling, slot)
    assert rel_err(wide[:, 16:16 + OUT_F], ref) < TOL[dtype]


def test_many_tokens_auto_config_paper_defaults():
    """Paper defaults (p = q = 2, R = 2r), several adapters, T over several 64-token tiles."""
    dtype = torch.bfloat16
    slots = [(2, 2, 32), (2, 2, 16), (2, 2, 32)]
    in_f, out_f = 192, 160
    A, B, pool, repeat, rank, scaling = make_adapters(slots, in_f, out_f, dtype)
    pattern = [(i % 4) - 1 for i in range(150)]
    x, y0, slot = make_tokens(150, in_f, out_f, dtype, pattern)
    y = y0.clone()
    qb.qbara_apply(y, x, A, B, pool, repeat, rank, scaling, slot)
    assert rel_err(y, qbara_ref(y0, x, A, B, pool, repeat, rank, scaling, slot)) < TOL[dtype]


def test_segment_tokens_groups_by_slot():
    slot = torch.tensor([2, -1, 0, 2, 2, -1, 0], dtype=torch.int32)
    seg = qb.segment_tokens(slot, num_slots=4)
    assert seg.count.tolist() == [2, 0, 3, 0]
    for s in range(4):
        start, count = int(seg.start[s]), int(seg.count[s])
        toks = seg.order[start:start + count].tolist()
        assert toks == [t for t, v in enumerate(slot.tolist()) if v == s]   # stable order
    with pytest.raises((RuntimeError, IndexError)):
        qb.segment_tokens(torch.tensor([0, 4], dtype=torch.int32), num_slots=4)


def test_shared_segments_and_int64_slots():
    dtype = torch.float16
    A, B, pool, repeat, rank, scaling = make_adapters(MIXED_SLOTS, IN_F, OUT_F, dtype)
    x, y0, slot = make_tokens(7, IN_F, OUT_F, dtype, SLOT_PATTERNS["T7"])
    slot64 = slot.to(torch.int64)
    seg = qb.segment_tokens(slot64, A.shape[0])
    cfg = Q(16, 16, 32, 32)
    h = qb.qbara_shrink(x, A, pool, rank, slot64, segments=seg, config=cfg)
    y = qb.qbara_expand(y0.clone(), h, B, repeat, rank, scaling, slot64, segments=seg, config=cfg)
    assert rel_err(y, qbara_ref(y0, x, A, B, pool, repeat, rank, scaling, slot)) < TOL[dtype]


def test_rejects_bad_inputs():
    A, B, pool, repeat, rank, scaling = make_adapters(MIXED_SLOTS, IN_F, OUT_F, torch.float16)
    x, y, slot = make_tokens(7, IN_F, OUT_F, torch.float16, SLOT_PATTERNS["T7"])
    with pytest.raises(ValueError, match="fp16 or bf16"):
        qb.qbara_shrink(x.float(), A, pool, rank, slot)
    with pytest.raises(ValueError, match="one per slot"):
        qb.qbara_shrink(x, A, pool[:2], rank, slot)
    with pytest.raises(ValueError, match="slot_idx"):
        qb.qbara_shrink(x, A, pool, rank, slot[:3])
    with pytest.raises(ValueError, match="fp32"):
        qb.qbara_expand(y, torch.zeros(7, A.shape[1], dtype=torch.float16), B, repeat, rank,
                        scaling, slot)
    with pytest.raises(ValueError, match="disagree"):
        qb.qbara_apply(y, x, A, B[:2], pool, repeat, rank, scaling, slot)
    with pytest.raises(ValueError, match="power of two"):
        qb.qbara_shrink(x, A, pool, rank, slot, config=Q(block_t=8))


@pytest.mark.parametrize("t,in_f,r_max,slots", [(1, 4096, 128, 1), (64, 14336, 128, 64),
                                                (4096, 4096, 128, 8)])
def test_choose_config(t, in_f, r_max, slots):
    cfg = qb.choose_config(t, in_f, r_max, slots, num_sms=132)
    cfg.validate()
    assert cfg.block_r >= min(r_max, 64)
    if t == 1:   # decode with one adapter: split the 4096-wide shrink across SMs
        assert cfg.split_k > 1
    if t >= 4096:
        assert cfg.split_k == 1


def test_precomputed_segments_match_python_api():
    """qbara_apply with the segments computed once per forward pass (what the LoRA layer passes
    to every layer) updates y exactly as without them."""
    dtype = torch.bfloat16
    A, B, pool, repeat, rank, scaling = make_adapters(MIXED_SLOTS, IN_F, OUT_F, dtype)
    x, y0, slot = make_tokens(7, IN_F, OUT_F, dtype, SLOT_PATTERNS["T7"])
    seg = qb.segment_tokens(slot, A.shape[0])
    y_seg, y_api = y0.clone(), y0.clone()
    qb.qbara_apply(y_seg, x, A, B, pool, repeat, rank, scaling, slot, segments=seg)
    qb.qbara_apply(y_api, x, A, B, pool, repeat, rank, scaling, slot)
    assert torch.equal(y_seg, y_api)
    assert rel_err(y_api, qbara_ref(y0, x, A, B, pool, repeat, rank, scaling, slot)) < TOL[dtype]

# ----------------------------------------------------------------------------- QA-HiRA
# qahira_apply vs qahira_apply_ref (fp32 torch, pool-mean / matmul / repeat_interleave), the
# reference itself vs the dense dW of docs/FORMAT.md in float64. Bounds, max|y - ref| / max|ref|:
# fp32 x/y 1e-5 (fp32 dot, only the summation order differs), fp16 2e-3 and bf16 2e-2 as above
# (M rounded to x's dtype for the dot, one rounding into y; the interpreter truncates bf16).
QAHIRA_TOL = {torch.float32: 1e-5, **TOL}
QAHIRA_DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                                        ids=["fp32", "fp16", "bf16"])
# slot -> (pi, qo) of a QA-HiRA, None = not one (a Q-BaRA / LoRA slot or an empty one). pi, qo
# differ per slot, 3 and 5 are not powers of two; slot 4 (1, 1) is the full-width matrix.
QAHIRA_SLOTS = [None, (2, 2), (3, 5), None, (1, 1), (4, 4)]


def make_qahira(slots, in_f, out_f, gap=0, seed=3):
    """Flat buffers (layouts.pack_qahira_slots); gap > 0: `gap` NaNs before every M instead."""
    g = torch.Generator().manual_seed(seed)
    ms = [None if geo is None else 0.3 * torch.randn(out_f // geo[1], in_f // geo[0], generator=g)
          for geo in slots]
    m_flat, m_offset = pack_qahira_slots(ms)
    if gap:
        parts, offsets, at = [], [], 0
        for m in ms:
            parts += [torch.full((gap,), float("nan"))] + ([m.flatten()] if m is not None else [])
            offsets.append(at + gap if m is not None else 0)
            at += gap + (m.numel() if m is not None else 0)
        m_flat, m_offset = torch.cat(parts), torch.tensor(offsets, dtype=torch.int64)
    pool = torch.tensor([geo[0] if geo else 1 for geo in slots], dtype=torch.int32)
    repeat = torch.tensor([geo[1] if geo else 1 for geo in slots], dtype=torch.int32)
    on = torch.tensor([int(geo is not None) for geo in slots], dtype=torch.int32)
    scaling = torch.tensor([0.5, 2.0, 0.25, 1.5, 1.0, 0.75][:len(slots)], dtype=torch.float32)
    return ms, (m_flat, m_offset, pool, repeat, on, scaling)


def test_qahira_reference_equals_dense_delta():
    """qahira_apply_ref == x @ dW^T with dW[o, i] = s * M[o // qo, i // pi] / pi (float64)."""
    ms, bufs = make_qahira(QAHIRA_SLOTS, IN_F, OUT_F)
    x, y0, slot = make_tokens(37, IN_F, OUT_F, torch.float32, SLOT_PATTERNS["T37"])
    want = y0.double().clone()
    for t, s in enumerate(slot.tolist()):
        if s >= 0 and QAHIRA_SLOTS[s] is not None:
            pi, qo = QAHIRA_SLOTS[s]
            o, i = torch.arange(OUT_F)[:, None], torch.arange(IN_F)[None, :]
            dw = float(bufs[5][s]) * ms[s].double()[o // qo, i // pi] / pi
            want[t] += dw @ x[t].double()
    torch.testing.assert_close(qahira_apply_ref(y0, x, *bufs, slot).double(), want,
                               rtol=1e-5, atol=1e-5)


@QAHIRA_DTYPES
@pytest.mark.parametrize("pattern", list(SLOT_PATTERNS))
@pytest.mark.parametrize("config", [Q(16, 16, 32, 16), Q(32, 16, 16, 32), None],
                         ids=["small", "wide-n", "auto"])
def test_qahira_apply_matches_reference(config, pattern, dtype):
    _, bufs = make_qahira(QAHIRA_SLOTS, IN_F, OUT_F)
    x, y0, slot = make_tokens(len(SLOT_PATTERNS[pattern]), IN_F, OUT_F, dtype,
                              SLOT_PATTERNS[pattern])
    y = y0.clone()
    assert qb.qahira_apply(y, x, *bufs, slot, config=config) is y
    off = torch.tensor([s < 0 or QAHIRA_SLOTS[s] is None for s in slot.tolist()])
    assert torch.equal(y[off], y0[off])   # no adapter / not a QA-HiRA slot: bitwise untouched
    if not off.all():
        ref = qahira_apply_ref(y0, x, *bufs, slot)
        assert rel_err(y[~off], ref[~off]) < QAHIRA_TOL[dtype]
        assert (ref - y0.float())[~off].abs().max() > 0.5 * ref[~off].abs().max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_qahira_and_qbara_slots_mixed_in_one_layer(dtype):
    """What the LoRA layer does per slice: qbara_apply (Q-BaRA and LoRA slots) then qahira_apply
    (QA-HiRA slots) on one y, three slices as column blocks of a wider output, each with its own
    buffers; slot 3 is empty, QA-HiRA slot 2 leaves slice 1 alone."""
    qbara_slots = [(2, 2, 16), (1, 1, 8), (1, 1, 0), (1, 1, 0), (1, 1, 0)]   # rank 0 = not Q-BaRA
    qahira_slots = [None, None, (2, 4), None, (3, 1)]
    pattern = [((7 * i) % 6) - 1 for i in range(37)]
    x, _, slot = make_tokens(37, IN_F, OUT_F, dtype, pattern)
    widths = (OUT_F, 40, OUT_F)
    wide0 = (0.1 * torch.randn(37, 8 + sum(widths), generator=torch.Generator().manual_seed(5)))
    wide0 = wide0.to(dtype)
    wide, col = wide0.clone(), 8
    for c, width in enumerate(widths):
        A, B, pool, repeat, rank, scaling = make_adapters(qbara_slots, IN_F, width, dtype, seed=c)
        geo = [None if c == 1 and s == 2 else g for s, g in enumerate(qahira_slots)]
        _, bufs = make_qahira(geo, IN_F, width, seed=10 + c)
        y = wide[:, col:col + width]
        qb.qbara_apply(y, x, A, B, pool, repeat, rank, scaling, slot, config=Q(16, 16, 32, 32))
        qb.qahira_apply(y, x, *bufs, slot, config=Q(16, 16, 32, 32))
        base = wide0[:, col:col + width]
        ref = qahira_apply_ref(qbara_ref(base, x, A, B, pool, repeat, rank, scaling, slot), x,
                               *bufs, slot)
        assert rel_err(y, ref) < TOL[dtype], f"slice {c}"
        untouched = (slot < 0) | (slot == 3) | ((slot == 2) & (c == 1))
        assert torch.equal(y[untouched], base[untouched]), f"slice {c}"
        col += width
    assert torch.equal(wide[:, :8], wide0[:, :8])


def test_qahira_reads_only_each_slots_m():
    """NaN between the slots' M in m_flat (offsets not packed): the same bits as packed."""
    x, y0, slot = make_tokens(37, IN_F, OUT_F, torch.float16, SLOT_PATTERNS["T37"])
    results = []
    for gap in (0, 7):
        _, bufs = make_qahira(QAHIRA_SLOTS, IN_F, OUT_F, gap=gap)
        results.append(qb.qahira_apply(y0.clone(), x, *bufs, slot, config=Q(16, 16, 32, 32)))
    assert torch.isfinite(results[1]).all() and torch.equal(results[0], results[1])


def test_qahira_no_slot_on_or_no_token_is_a_no_op():
    x, y0, slot = make_tokens(7, IN_F, OUT_F, torch.bfloat16, SLOT_PATTERNS["T7"])
    _, bufs = make_qahira([None] * 4, IN_F, OUT_F)
    assert bufs[0].numel() == 0
    y = y0.clone()
    qb.qahira_apply(y, x, *bufs, slot)
    assert torch.equal(y, y0)
    _, bufs = make_qahira(QAHIRA_SLOTS, IN_F, OUT_F)
    qb.qahira_apply(y[:0], x[:0], *bufs, slot[:0])


def test_qahira_rejects_bad_inputs():
    _, (m_flat, m_offset, pool, repeat, on, scaling) = make_qahira(QAHIRA_SLOTS, IN_F, OUT_F)
    x, y, slot = make_tokens(7, IN_F, OUT_F, torch.float16, SLOT_PATTERNS["T7"])
    with pytest.raises(ValueError, match="x is torch.float64: fp16, bf16 or fp32"):
        qb.qahira_apply(y, x.double(), m_flat, m_offset, pool, repeat, on, scaling, slot)
    with pytest.raises(ValueError, match="m_flat must be fp32 1-D"):
        qb.qahira_apply(y, x, m_flat.half(), m_offset, pool, repeat, on, scaling, slot)
    with pytest.raises(ValueError, match="m_offset must be int64"):
        qb.qahira_apply(y, x, m_flat, m_offset.float(), pool, repeat, on, scaling, slot)
    with pytest.raises(ValueError, match=r"on is \[2\], expected \[6\]"):
        qb.qahira_apply(y, x, m_flat, m_offset, pool, repeat, on[:2], scaling, slot)
    with pytest.raises(ValueError, match="contiguous columns"):
        qb.qahira_apply(y.t(), x, m_flat, m_offset, pool, repeat, on, scaling, slot)
    with pytest.raises(ValueError, match="token count"):
        qb.qahira_apply(y, x, m_flat, m_offset, pool, repeat, on, scaling, slot[:3])
