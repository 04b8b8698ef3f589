"""qahira_vllm.quant_math: packing, dequantization and block-wise quantization, against
references computed independently (python bit arithmetic, explicit index arithmetic, fp64)."""

from __future__ import annotations


import numpy as np
import pytest
import torch


from support import tiny as tm  # noqa: E402
from qahira_vllm import quant_math as qm  # noqa: E402
from qahira_vllm.format import QahiraQuantConfig  # noqa: E402

BLOCKS = [(1, 64), (1, 32), (8, 4), (2, 16), (4, 8)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- packing --------------------------------------------------------------------------------

def _pack_by_hand(q: list[list[int]]) -> list[list[int]]:
    """Python ints: word w of a row = sum_j q[8w+j] << 4j, then read as signed 32-bit."""
    words = []
    for row in q:
        r = []
        for w in range(len(row) // 8):
            v = sum(int(row[8 * w + j]) << (4 * j) for j in range(8))
            r.append(v - (1 << 32) if v >= (1 << 31) else v)
        words.append(r)
    return words


def test_pack_layout_matches_hand_computed_words():
    q = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0, 15],
                      [15] * 8 + [0] * 8,
                      [0, 15, 0, 0, 0, 0, 0, 0, 9, 10, 11, 12, 13, 14, 15, 7]], dtype=torch.uint8)
    packed = qm.pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (3, 2)
    # Spelled-out words: low nibble = column 8w.
    assert packed[0, 0].item() == 0x87654321 - (1 << 32)  # high nibble 8 -> negative int32
    assert packed[0, 1].item() == 0xF0000000 - (1 << 32)
    assert packed[1, 0].item() == -1                       # all 15s: 0xFFFFFFFF
    assert packed[1, 1].item() == 0
    assert packed[2, 0].item() == 0x000000F0
    assert packed[2, 1].item() == 0x7FEDCBA9
    assert packed.tolist() == _pack_by_hand(q.tolist())


def test_pack_random_matches_hand_and_round_trips_exactly():
    q = torch.randint(0, 16, (13, 96), generator=_gen(0), dtype=torch.uint8)
    q[0, :] = 15          # all-15 words: -1
    q[1, :] = 0
    q[2, 7::8] = 15       # high nibble set: negative words
    q[3, 7::8] = 0
    packed = qm.pack_int4(q)
    assert packed.shape == (13, 12) and packed.dtype == torch.int32
    assert packed.tolist() == _pack_by_hand(q.tolist())
    assert (packed[2] < 0).all() and (packed[1] == 0).all() and (packed[0] == -1).all()
    # exact round trip, and agreement with the independent unpacker
    unpacked = qm.unpack_int4(packed)
    assert unpacked.dtype == torch.uint8
    assert torch.equal(unpacked, q)
    assert torch.equal(tm.unpack_int4_ref(packed), q.to(torch.int64))
    # and the generic helpers
    assert torch.equal(qm.unpack_qweight(qm.pack_qweight(q, 4), 4), q)
    q8 = torch.randint(0, 256, (5, 24), generator=_gen(1), dtype=torch.uint8)
    assert qm.pack_qweight(q8, 8).dtype == torch.uint8
    assert torch.equal(qm.unpack_qweight(qm.pack_qweight(q8, 8), 8), q8)


def test_pack_rejects_width_not_multiple_of_8():
    with pytest.raises(ValueError, match="multiple of 8"):
        qm.pack_int4(torch.zeros(2, 12, dtype=torch.uint8))


# ---- dequantization -------------------------------------------------------------------------

@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("bits,offset_dtype", [(4, torch.float16), (8, torch.float32)])
def test_dequantize_matches_index_reference(block, bits, offset_dtype):
    bo, bi = block
    out_f, in_f = 24, 128
    g = _gen(bo * 100 + bi)
    q = torch.randint(0, 1 << bits, (out_f, in_f), generator=g, dtype=torch.uint8)
    scales = (torch.rand(out_f // bo, in_f // bi, generator=g) * 0.1 + 1e-3).to(torch.float16)
    offsets = (torch.randn(out_f // bo, in_f // bi, generator=g)).to(offset_dtype)
    ref = tm.dequant_ref(q, scales, offsets, block)  # float64, explicit arange // b indexing
    cfg = QahiraQuantConfig(bits=bits, block_size=block,
                            offset_dtype="float16" if offset_dtype == torch.float16 else "float32")
    qweight = qm.pack_qweight(q, bits)
    got = qm.dequantize(qweight, scales, offsets, cfg)
    assert got.dtype == torch.float32 and got.shape == (out_f, in_f)
    # fp32 product + sum of fp16/fp32-exact inputs: |err| <= 2^-23 * (|s*q| + |o|) (<= 2 ulp)
    mag = (q.double() * tm.expand_ref(scales, block, q.shape)).abs() + tm.expand_ref(
        offsets, block, q.shape).abs()
    assert ((got.double() - ref).abs() <= 2.0**-23 * mag).all()
    # bit-identical to the plain fp32 formula on [out, in]-expanded block parameters (the
    # broadcast, possibly fused multiply-add of quant_math.dequantize changes no bit)
    expanded = (q.to(torch.float32) * qm.expand_blocks(scales.to(torch.float32), block)
                + qm.expand_blocks(offsets.to(torch.float32), block))
    assert torch.equal(got, expanded)
    # output dtype honoured
    bf16 = qm.dequantize(qweight, scales, offsets, cfg, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16


def test_dequantize_distinguishes_block_axes():
    """bo x bi and bi x bo blocks must give different weights for the same parameter grid."""
    q = torch.ones(8, 8, dtype=torch.uint8)
    params = torch.arange(16, dtype=torch.float16).reshape(4, 4) + 1
    w = qm.dequantize(q, params, torch.zeros(4, 4, dtype=torch.float16),
                      QahiraQuantConfig(bits=8, block_size=(2, 2)))  # 8-bit: q stored as is
    # element [o, i] belongs to block [o // 2, i // 2]
    for o in range(8):
        for i in range(8):
            assert w[o, i].item() == params[o // 2, i // 2].item()
    w2 = qm.dequantize(torch.ones(8, 16, dtype=torch.uint8), torch.arange(16.).reshape(8, 2).half(),
                       torch.zeros(8, 2, dtype=torch.float16),
                       QahiraQuantConfig(bits=8, block_size=(1, 8)))
    assert w2[3, 9].item() == 7.0 and w2[3, 7].item() == 6.0


# ---- quantization ---------------------------------------------------------------------------

def _weights(out_f, in_f, seed):
    g = _gen(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    w[torch.rand(out_f, in_f, generator=g) < 0.01] *= 8  # a few outliers (clip search matters)
    return w


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("offset_dtype", ["float16", "float32"])
def test_minmax_quantize_error_bound(block, bits, offset_dtype):
    cfg = QahiraQuantConfig(bits=bits, block_size=block, offset_dtype=offset_dtype)
    w = _weights(64, 128, seed=bits + block[0] * 7 + block[1])
    q, scales, offsets = qm.quantize(w, cfg, clip_search=False)
    bo, bi = block
    assert q.dtype == torch.uint8 and q.shape == w.shape and int(q.max()) <= cfg.qmax
    assert scales.dtype == torch.float16 and scales.shape == (64 // bo, 128 // bi)
    assert offsets.dtype == cfg.offset_torch_dtype and offsets.shape == (64 // bo, 128 // bi)
    assert (scales > 0).all()
    # min-max: the offset is the block minimum rounded to offset_dtype (exact for fp32 offsets)
    lo = tm.blockwise(w, block).amin(-1)
    assert torch.equal(offsets, lo.to(cfg.offset_torch_dtype))
    # per-element bound derived in support.tiny.error_bound:
    #   |err| <= s'/2 + |o' - lo| + qmax*|s' - s| + fp32 slack  (no clipping term)
    err = (tm.dequant_ref(q, scales, offsets, block) - w.double()).abs()
    bound = tm.error_bound(w, block, bits, offset_dtype, clip=False)
    assert (err <= bound).all(), (err - bound).max()
    # and the grid is actually used: q hits both 0 and qmax in every block (min and max values)
    qb = tm.blockwise(q.to(torch.int64), block)
    assert (qb.amin(-1) == 0).all()
    assert (qb.amax(-1) >= cfg.qmax - 1).all()  # scale rounding may leave the max one step below


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("bits", [4, 8])
def test_mse_clip_never_worse_than_minmax_per_block(block, bits):
    cfg = QahiraQuantConfig(bits=bits, block_size=block)
    w = _weights(64, 128, seed=100 + bits + block[1])
    ref = w.double()
    sse = {}
    for clip in (False, True):
        q, s, o = qm.quantize(w, cfg, clip_search=clip)
        err = tm.dequant_ref(q, s, o, block) - ref
        sse[clip] = tm.blockwise(err.square(), block).sum(-1)
        bound = tm.error_bound(w, block, bits, "float16", clip=clip)
        assert (err.abs() <= bound).all()
    # The quantizer compares block errors in fp32; allow that rounding: 1e-5 relative + 1e-12.
    assert (sse[True] <= sse[False] * (1 + 1e-5) + 1e-12).all()
    if bits == 4:  # with outliers, clipping must actually help somewhere at 4 bits
        assert sse[True].sum() < 0.98 * sse[False].sum()


@pytest.mark.parametrize("block", [(2, 16), (8, 4), (4, 8), (1, 32)])
@pytest.mark.parametrize("bits", [4, 8])
def test_block_geometry_with_distinct_block_ranges(block, bits):
    """Each block gets its own range [base, base + width]; the stored scale/offset of block
    [r, c] must be exactly that block's, so which elements share a block is checked."""
    bo, bi = block
    out_f, in_f = 16, 64
    nr, nc = out_f // bo, in_f // bi
    g = _gen(7)
    k = torch.arange(nr * nc, dtype=torch.float64).reshape(nr, nc)
    base = (k - nr * nc / 2) * 0.37            # distinct offsets per block
    width = 0.05 * (1 + k)                     # distinct ranges per block
    u = torch.rand(out_f, in_f, generator=g, dtype=torch.float64)
    ro = (torch.arange(out_f) // bo)[:, None]
    ci = (torch.arange(in_f) // bi)[None, :]
    # first and last element of every block are its exact min (u=0) and max (u=1)
    first = ((torch.arange(out_f) % bo == 0)[:, None]) & ((torch.arange(in_f) % bi == 0)[None, :])
    last = ((torch.arange(out_f) % bo == bo - 1)[:, None]) & (
        (torch.arange(in_f) % bi == bi - 1)[None, :])
    u[first] = 0.0
    u[last] = 1.0
    w = (base[ro, ci] + width[ro, ci] * u).to(torch.float32)
    cfg = QahiraQuantConfig(bits=bits, block_size=block, offset_dtype="float32")
    q, scales, offsets = qm.quantize(w, cfg, clip_search=False)
    qmax = (1 << bits) - 1
    # offsets: the block minimum (fp32 of base), exact up to fp32 rounding of base
    assert torch.allclose(offsets.double(), base, rtol=0, atol=1e-6)
    # scales: width/qmax rounded to fp16 -> within 2^-11 relative (+ fp32 arithmetic 1e-6)
    exp_scale = width / qmax
    assert ((scales.double() - exp_scale).abs() <= 2.0**-11 * exp_scale + 1e-6).all()
    # the widths differ by >= 2.5% between blocks, far more than that tolerance, so a wrong
    # geometry (transposed / shifted blocks) would fail. Dequantized error within the bound:
    err = (tm.dequant_ref(q, scales, offsets, block) - w.double()).abs()
    assert (err <= tm.error_bound(w, block, bits, "float32")).all()


def test_transposed_geometry_would_be_detected():
    """Sanity check of the test above: 2x16 vs 16x2 blocks give different parameters."""
    w = torch.zeros(32, 32)
    w[0, :16] = torch.linspace(0, 1, 16)  # one 1x16 strip
    cfg_a = QahiraQuantConfig(bits=4, block_size=(2, 16))
    cfg_b = QahiraQuantConfig(bits=4, block_size=(16, 2))
    _, sa, _ = qm.quantize(w, cfg_a, clip_search=False)
    _, sb, _ = qm.quantize(w, cfg_b, clip_search=False)
    assert sa[0, 0].item() == pytest.approx(1 / 15, rel=2**-10)
    assert (sa[1:] == 1).all() and (sa[0, 1:] == 1).all()  # constant blocks: scale 1
    # 16x2 blocks: block [0, c] spans columns 2c, 2c+1 -> range 1/15 per column step
    assert sb[0, 0].item() == pytest.approx(1 / 15 / 15, rel=2**-10)
    assert (sb[1] == 1).all()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("offset_dtype", ["float16", "float32"])
@pytest.mark.parametrize("clip", [False, True])
def test_constant_and_tiny_range_blocks_are_finite(bits, offset_dtype, clip):
    cfg = QahiraQuantConfig(bits=bits, block_size=(1, 32), offset_dtype=offset_dtype)
    w = torch.randn(8, 64, generator=_gen(3)) * 0.1
    w[0, :32] = 0.0                                   # all zeros
    w[1, :32] = 0.37                                  # constant, not fp16-representable
    w[2, :32] = 1.0 + torch.linspace(0, 1e-9, 32)     # range below fp32 resolution at 1
    w[3, :32] = 0.1 + torch.linspace(0, 1e-7, 32)     # tiny range, scale below fp16 subnormals
    w[4, :32] = torch.linspace(-1e-30, 1e-30, 32)     # denormal-scale range
    w[5, :32] = 1000.0 + torch.linspace(0, 1e-4, 32)  # tiny range on a large offset
    w[6, :32] = -3e-5                                 # constant in fp16 subnormal range
    q, scales, offsets = qm.quantize(w, cfg, clip_search=clip)
    assert torch.isfinite(scales).all() and (scales > 0).all()
    assert torch.isfinite(offsets).all()
    deq = tm.dequant_ref(q, scales, offsets, (1, 32))
    assert torch.isfinite(deq).all()
    assert torch.isfinite(qm.dequantize(qm.pack_qweight(q, bits), scales, offsets, cfg)).all()
    err = (deq - w.double()).abs()
    assert (err <= tm.error_bound(w, (1, 32), bits, offset_dtype, clip=clip)).all()
    # all-zero block is reproduced exactly; a constant block within offset rounding only
    assert (deq[0, :32] == 0).all()
    if offset_dtype == "float32":
        assert torch.allclose(deq[1, :32], torch.full((32,), 0.37, dtype=torch.float64),
                              rtol=0, atol=1e-7)  # fp32 rounding of 0.37


def test_offset_dtype_is_respected():
    w = _weights(16, 64, seed=11) + 0.0123456789
    q16, s16, o16 = qm.quantize(w, QahiraQuantConfig(offset_dtype="float16"), clip_search=False)
    q32, s32, o32 = qm.quantize(w, QahiraQuantConfig(offset_dtype="float32"), clip_search=False)
    assert o16.dtype == torch.float16 and o32.dtype == torch.float32
    assert s16.dtype == s32.dtype == torch.float16
    lo = w.amin(dim=1, keepdim=True)  # block 1x64 == one block per row
    assert torch.equal(o32, lo)                     # fp32 offsets keep the exact minimum
    assert torch.equal(o16, lo.half())
    assert not torch.equal(o16.float(), o32)        # so the two really differ


def test_quantize_accepts_bf16_and_fp16_input():
    w = _weights(16, 64, seed=12)
    cfg = QahiraQuantConfig(bits=4, block_size=(1, 64))
    ref = qm.quantize(w.to(torch.bfloat16).float(), cfg)
    got = qm.quantize(w.to(torch.bfloat16), cfg)
    for a, b in zip(ref, got):
        assert torch.equal(a, b)


# ---- the clip search's definition, against a scalar numpy float32 reference ----------------

def _sq_err_in_order_np(d2: np.ndarray) -> np.float32:
    """The documented order, one float32 operation at a time: 16 lanes, lane j adds values
    j, j+16, ... in turn, then halves pairwise (first half + second half) down to one."""
    lanes = [np.float32(0.0)] * qm.SQ_ERR_LANES
    for i, v in enumerate(d2):
        lanes[i % qm.SQ_ERR_LANES] = np.float32(lanes[i % qm.SQ_ERR_LANES] + v)
    while len(lanes) > 1:
        h = len(lanes) // 2
        lanes = [np.float32(a + b) for a, b in zip(lanes[:h], lanes[h:])]
    return lanes[0]


@pytest.mark.parametrize("n", [4, 18, 32, 64, 100, 1024])
def test_block_sq_err_follows_the_documented_order(n):
    d2 = torch.randn(5, n, generator=_gen(30 + n)).square() * 1e3
    got = qm.block_sq_err(d2)
    for b in range(5):
        ref = _sq_err_in_order_np(d2[b].numpy())
        assert got[b].item() == float(ref), (b, got[b].item(), float(ref))
    # and the order matters: a plain left-to-right float32 sum differs somewhere
    seq = [np.float32(0.0)] * 5
    for b in range(5):
        for v in d2[b].numpy():
            seq[b] = np.float32(seq[b] + v)
    if n >= 64:
        assert any(float(seq[b]) != got[b].item() for b in range(5))


def _quantize_block_np(x: np.ndarray, bits: int, offset_dtype, ratios):
    """One block (flat float32 values, block order), scalar by scalar: the best (err, s, z, q)."""
    f = np.float32
    qmax = f(2 ** bits - 1)
    lo, hi = f(x.min()), f(x.max())
    mid, half = f(f(lo + hi) / f(2)), f(f(hi - lo) / f(2))
    best = None
    for r in ratios:
        r = f(r)
        r_lo, r_hi = (lo, hi) if r == f(1.0) else (f(mid - f(r * half)), f(mid + f(r * half)))
        s = f(f(r_hi - r_lo) / qmax)
        s = s if s > 0 else f(1.0)
        s = f(np.float16(min(max(s, f(2.0 ** -24)), f(65504.0))))
        z = f(offset_dtype(r_lo))
        q = np.clip(np.rint(((x - z) / s).astype(np.float32)), 0, qmax).astype(np.float32)
        d = ((q * s).astype(np.float32) + z).astype(np.float32) - x
        err = _sq_err_in_order_np((d * d).astype(np.float32))
        if best is None or err < best[0]:
            best = (err, s, z, q)
    return best


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block,offset_dtype", [((1, 32), "float16"), ((8, 4), "float32"),
                                                ((2, 9), "float16")])
def test_quantize_is_the_scalar_definition(bits, block, offset_dtype):
    bo, bi = block
    out_f, in_f = 4 * bo, 3 * bi
    w = torch.randn(out_f, in_f, generator=_gen(40)) * 0.02
    # a heavy-tailed row (normal / uniform: rare values 10-20x the typical one)
    w[0] = (torch.randn(in_f, generator=_gen(41)) * 0.02
            / torch.rand(in_f, generator=_gen(42)).clamp_min(0.05))
    cfg = QahiraQuantConfig(bits=bits, block_size=block, offset_dtype=offset_dtype)
    q, scales, offsets, err = qm.quantize_with_error(w, cfg)
    odt = np.float16 if offset_dtype == "float16" else np.float32
    for i in range(out_f // bo):
        for j in range(in_f // bi):
            x = w[i * bo:(i + 1) * bo, j * bi:(j + 1) * bi].reshape(-1).numpy()
            e, s, z, qb = _quantize_block_np(x, bits, odt, qm.DEFAULT_CLIP_RATIOS)
            assert err[i, j].item() == float(e)
            assert scales[i, j].item() == float(s) and offsets[i, j].item() == float(z)
            assert np.array_equal(q[i * bo:(i + 1) * bo, j * bi:(j + 1) * bi].reshape(-1)
                                  .numpy(), qb.astype(np.uint8))
