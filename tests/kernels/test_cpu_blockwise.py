"""qahira_kernels' cpu_blockwise op: the exact every-case CPU kernel (kernels/cpu_blockwise.c,
ops.cpu_blockwise / ops.cpu_blockwise_dequant).

The dequantized weight must equal the format's dequantization (qahira_vllm.quant_math, through
linear_reference.dequantize_ref) bit for bit (fp32 s * q, rounded, then + o, rounded). Outputs
are compared against an fp64 GEMM on that weight within fp32 summation slack,
1e-6 * sum_k |x_k W_nk| (measured ~1e-7), plus one rounding of the output dtype for bf16/fp16.
This machine class (x86-64 with AVX2 and gcc) is what CI runs on, so the kernel must build here.
"""

from __future__ import annotations

import pytest
import torch

from support.linear_reference import dequantize_ref as _reference_weight
from support.linear_reference import stored_tensors as _stored
from qahira_kernels import ops
from qahira_vllm.quant_math import pack_qweight

ROUNDING = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
FP32_SLACK = 1e-6


def _assert_close(y, x, w):
    y_ref = x.double() @ w.double().t()
    slack = FP32_SLACK * (x.double().abs() @ w.double().abs().t())
    tol = slack + ROUNDING[y.dtype] * y_ref.abs()
    err = (y.double() - y_ref).abs()
    assert (err <= tol).all(), f"max excess {(err - tol).max().item():.3g}"


# Every shape family: bi a multiple of 8 (vector path) or not (per-column params, scalar tail),
# 2-D blocks (the paper's 8x4 tile), odd widths for 8-bit, fp16 and fp32 offsets.
CASES = [
    (4, (1, 32), 48, 256), (4, (1, 64), 40, 576), (4, (8, 4), 64, 96), (4, (2, 8), 6, 40),
    (4, (1, 8), 16, 8), (8, (1, 64), 24, 320), (8, (2, 3), 8, 27), (8, (1, 1), 4, 5),
    (8, (4, 12), 12, 36), (4, (3, 24), 9, 72),
]


# The fp32 -> bf16 roundings this CPU and build offer (ops.cpu_bf16_rounding_available): every
# one is tested, and the test ids name them; an AVX2-only machine runs "avx2" alone.
BF16_ROUNDINGS = ops.cpu_bf16_rounding_available()
DTYPE_ROUNDINGS = [(torch.float32, None), (torch.float16, None),
                   *((torch.bfloat16, r) for r in BF16_ROUNDINGS)]


@pytest.mark.parametrize("bits,block,out_f,in_f", CASES)
@pytest.mark.parametrize("offset_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("dtype,rounding", DTYPE_ROUNDINGS)
def test_dequant_is_bit_identical_to_reference(bits, block, out_f, in_f, offset_dtype, dtype,
                                               rounding):
    # bf16 / fp16: the fp32 weight rounded once, to nearest even, as torch's .to(dtype) rounds
    qw, s, o = _stored(out_f, in_f, bits, block, offset_dtype)
    want = _reference_weight(qw, s, o, bits, block).to(dtype)
    w = ops.cpu_blockwise_dequant(qw, s, o, bits, *block, in_f, dtype, bf16_rounding=rounding)
    assert w.dtype == dtype and w.shape == (out_f, in_f)
    assert torch.equal(w, want)
    buf = torch.full((out_f, in_f), float("nan"), dtype=dtype)
    assert ops.cpu_blockwise_dequant(qw, s, o, bits, *block, in_f, dtype, out=buf,
                                     bf16_rounding=rounding) is buf
    assert torch.equal(buf, want)


@pytest.mark.parametrize("bits,block,out_f,in_f", CASES[:6])
@pytest.mark.parametrize("dtype,rounding", DTYPE_ROUNDINGS)
def test_fp32_scales_round_the_product_first(bits, block, out_f, in_f, dtype, rounding):
    # Format 2's float32 scales: s * q can round, and the format rounds it before adding o
    # (no FMA). Reference: torch's separate mul and add on the unpacked values, by index.
    from support import tiny

    g = torch.Generator().manual_seed(out_f)
    q = torch.randint(0, 1 << bits, (out_f, in_f), generator=g)
    s = torch.rand(out_f // block[0], in_f // block[1], generator=g) * 0.02 + 1e-3
    o = torch.randn(s.shape, generator=g) * 0.1
    w = (q.float() * tiny.expand_ref(s, block, q.shape).float()
         + tiny.expand_ref(o, block, q.shape).float())
    # what one FMA would give (exact product, one rounding): it differs, so the test can fail
    fused = (q.double() * tiny.expand_ref(s, block, q.shape)
             + tiny.expand_ref(o, block, q.shape)).float()
    assert not torch.equal(w, fused)
    got = ops.cpu_blockwise_dequant(pack_qweight(q, bits), s, o, bits, *block, in_f, dtype,
                                    bf16_rounding=rounding)
    assert torch.equal(got, w.to(dtype))


@pytest.mark.parametrize("rounding", BF16_ROUNDINGS)
@pytest.mark.parametrize("bits,bi", [(8, 32), (8, 8), (4, 64)])
def test_dequant_rounds_bf16_ties_to_even(rounding, bits, bi):
    # Weights on bf16's rounding ties and just beside them (s * q + o with s = 2^-8 puts the
    # 9th significant bit on q's low bit): the kernel's vector rounding against torch's, on
    # the 16-column (bi % 16 == 0) and 8-column paths.
    qmax = (1 << bits) - 1
    q = (torch.arange(256) % (qmax + 1)).to(torch.uint8).repeat(4, 1)       # [4, 256]
    s = torch.full((4, 256 // bi), 2.0 ** -8, dtype=torch.float16)
    o = torch.tensor([[1.0], [-1.0], [3.0], [-0.5]]).expand(4, 256 // bi).contiguous()
    qw = q if bits == 8 else pack_qweight(q, 4)
    w = ops.cpu_blockwise_dequant(qw, s, o, bits, 1, bi, 256, torch.bfloat16,
                                  bf16_rounding=rounding)
    assert torch.equal(w, _reference_weight(qw, s, o, bits, (1, bi)).to(torch.bfloat16))


@pytest.mark.parametrize("rounding", BF16_ROUNDINGS)
@pytest.mark.parametrize("bi", [32, 8])
def test_dequant_bf16_keeps_denormals_nan_and_inf_like_torch(rounding, bi):
    # vcvtneps2bf16 flushes denormal inputs to zero; torch keeps them. fp32 offsets put
    # denormals (q = 0 beside normal q > 0), NaN and +-inf into single lanes of otherwise
    # ordinary vectors; compared as raw bits, NaN lanes as NaN (torch's own NaN bits differ
    # between its scalar and vector conversions).
    q = (torch.arange(4 * 64) % 7).to(torch.uint8).view(4, 64)
    nb = 64 // bi
    s = torch.full((4, nb), 2.0 ** -24, dtype=torch.float16)
    o = torch.tensor([1e-39, -3e-39, float("nan"), float("inf"), -float("inf"), 1.2e-38, 0.0,
                      1.0] * 4)[:4 * nb].view(4, nb).contiguous()
    s[3, 0] = float("nan")
    w = ops.cpu_blockwise_dequant(q, s, o, 8, 1, bi, 64, torch.bfloat16, bf16_rounding=rounding)
    want = _reference_weight(q, s, o, 8, (1, bi)).to(torch.bfloat16)
    nan = want.isnan()
    tiny = (want != 0) & (want.float().abs() < 1.1754944e-38)
    assert nan.any() and tiny.any() and want.isinf().any()
    assert torch.equal(w.isnan(), nan)
    assert torch.equal(w.view(torch.int16)[~nan], want.view(torch.int16)[~nan])


def test_dequant_bf16_rounding_choices():
    assert BF16_ROUNDINGS[0] == "avx2" and set(BF16_ROUNDINGS) <= set(ops.DEQUANT_BF16_ROUNDINGS)
    qw, s, o = _stored(16, 64, 4, (1, 32))
    with pytest.raises(ValueError, match="bf16_rounding='fast'"):
        ops.cpu_blockwise_dequant(qw, s, o, 4, 1, 32, 64, torch.bfloat16, bf16_rounding="fast")


def test_dequant_refuses_a_bad_out():
    qw, s, o = _stored(16, 64, 4, (1, 32))
    for bad in (torch.empty(16, 64, dtype=torch.bfloat16), torch.empty(16, 32),
                torch.empty(64, 16).t()):
        with pytest.raises(ValueError, match="out is"):
            ops.cpu_blockwise_dequant(qw, s, o, 4, 1, 32, 64, torch.float32, out=bad)
    with pytest.raises(ValueError, match="dtype torch.float64"):
        ops.cpu_blockwise_dequant(qw, s, o, 4, 1, 32, 64, torch.float64)


@pytest.mark.parametrize("bits,block,out_f,in_f", CASES)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_matches_fp64_on_the_reference_weight(bits, block, out_f, in_f, m, dtype):
    qw, s, o = _stored(out_f, in_f, bits, block, seed=m)
    x = (torch.randn(m, in_f, generator=torch.Generator().manual_seed(m)) * 2).to(dtype)
    y = ops.cpu_blockwise(x, qw, s, o, bits, *block)
    assert y.dtype == dtype and y.shape == (m, out_f)
    _assert_close(y, x, _reference_weight(qw, s, o, bits, block))


def test_no_rows_and_refused_dtypes():
    qw, s, o = _stored(16, 64, 4, (1, 32))
    assert ops.cpu_blockwise(torch.empty(0, 64), qw, s, o, 4, 1, 32).shape == (0, 16)
    # A model.to(dtype) casts float buffers; the C code would misread them, so they are refused.
    for bad, phrase in (((qw, s.bfloat16(), o), "scales are torch.bfloat16"),
                        ((qw, s, o.bfloat16()), "offsets are torch.bfloat16"),
                        ((qw.to(torch.uint8), s, o), "expected torch.int32 for 4-bit")):
        with pytest.raises(ValueError, match=phrase):
            ops.cpu_blockwise_dequant(*bad, 4, 1, 32, 64)
        with pytest.raises(ValueError, match=phrase):
            ops.cpu_blockwise(torch.randn(1, 64), *bad, 4, 1, 32)
        assert not ops.cpu_blockwise_stored_ok(*bad, 4)
    assert ops.cpu_blockwise_stored_ok(qw, s, o, 4)


def test_trainer_dequant_after_model_to_dtype_is_still_right():
    """QuantLinear after `.to(torch.float32)` (buffers cast): the torch path, same weight."""
    from qahira_vllm.format import QahiraQuantConfig
    from qahira_vllm.training.qlinear import QuantLinear

    cfg = QahiraQuantConfig(bits=4, block_size=(8, 4))
    qw, s, o = _stored(32, 64, 4, (8, 4))
    layer = QuantLinear(qw, s, o, cfg, 64, 32)
    x = torch.randn(3, 64)
    before = layer(x)
    assert torch.equal(before, x @ _reference_weight(qw, s, o, 4, (8, 4)).t())
    layer.to(torch.float32)
    assert layer.scales.dtype == torch.float32
    assert torch.equal(layer(x), before)


def test_each_row_independent_of_batch_and_threads():
    """A row's output is bit-identical whatever else is in the batch and with 1 or 2 threads."""
    qw, s, o = _stored(80, 192, 4, (8, 4), seed=7)
    x = torch.randn(32, 192, generator=torch.Generator().manual_seed(8))
    full = ops.cpu_blockwise(x, qw, s, o, 4, 8, 4)
    for i in (0, 5, 31):
        assert torch.equal(ops.cpu_blockwise(x[i:i + 1], qw, s, o, 4, 8, 4)[0], full[i])
    assert torch.equal(ops.cpu_blockwise(x[3:10], qw, s, o, 4, 8, 4), full[3:10])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.cpu_blockwise(x, qw, s, o, 4, 8, 4)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, full)


