"""Triton block-wise GEMM (qahira_kernels.blockwise_gemm) against the fp32 torch reference
(linear_reference: the format's dequantization, qahira_vllm.quant_math, then a matmul).

Runs in Triton's interpreter on CPU (TRITON_INTERPRET=1, see conftest.py), with small tiles.

Error bound, max|y - ref| / max|ref| with ref = fp32 dequantize + fp32 matmul:
- fp16 activations: 2e-3. The output is rounded to fp16 (2^-11 relative); on the per-element
  path W is rounded to fp16 too; accumulation is fp32.
- bf16 activations: 2e-2. bf16 keeps 8 significant bits, and the interpreter truncates
  fp32 -> bf16 (up to 2^-7 relative) where the GPU rounds to nearest (2^-9).
A wrong scale, offset or nibble in a single block moves some output by far more than this
(one block carries >= 1/12 of a row's terms here), so these bounds do catch layout mistakes.
"""

from __future__ import annotations

import pytest
import torch

from support.linear_reference import dequantize_ref
from support.linear_reference import linear_ref
from qahira_kernels import blockwise_gemm as bg
from qahira_kernels._triton_utils import is_interpreted
from qahira_vllm.quant_math import pack_qweight

TOL = {torch.float16: 2e-3, torch.bfloat16: 2e-2}
C = bg.GemmConfig


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


def make_weight(n, k, bits, block, offset_dtype=torch.float16, seed=0):
    """Random (never zero) format_version 1 tensors: q over the full range, scales > 0,
    offsets of both signs."""
    g = torch.Generator().manual_seed(seed)
    bo, bi = block
    q = torch.randint(0, 2 ** bits, (n, k), generator=g, dtype=torch.uint8)
    scales = (0.004 + 0.02 * torch.rand(n // bo, k // bi, generator=g)).half()
    offsets = (0.15 * torch.randn(n // bo, k // bi, generator=g)).to(offset_dtype)
    return pack_qweight(q, bits), scales, offsets


def make_x(m, k, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g).to(dtype)


def test_kernels_run_in_interpreter():
    assert is_interpreted(bg._fused_gemm_kernel), "TRITON_INTERPRET=1 was not set before import"


# (M, N, K, bits, block [bo, bi], config). N and K are not powers of two where the block
# allows; M is 1, small, or not a multiple of block_m. Comments say which path runs.
FUSED_CASES = [
    # 4-bit
    (1, 48, 64, 4, (1, 32), C(16, 16, 32)),            # per tile (bi == BK), M = 1
    (5, 40, 96, 4, (1, 32), C(16, 32, 16)),            # per tile, two K tiles per block
    (3, 48, 128, 4, (1, 64), C(16, 32, 64)),           # per tile
    (17, 24, 192, 4, (2, 16), C(16, 16, 32)),          # per element (BK > bi), M % BM != 0
    (7, 40, 64, 4, (8, 8), C(16, 32, 16)),             # per element, bi = 8
    (9, 48, 96, 4, (4, 32), C(32, 16, 32)),            # 2-D block, per tile
    (2, 36, 48, 4, (4, 4), C(16, 16, 16)),             # bi = 4 (legal: in % 8 == 0)
    (3, 24, 72, 4, (3, 24), C(16, 16, 16)),            # bo = 3, bi = 24, K % BK != 0
    (33, 40, 160, 4, (1, 32), C(16, 16, 32, split_k=2)),   # split-K, per tile
    (4, 48, 192, 4, (8, 8), C(16, 16, 32, split_k=4)),     # split-K, per element
    (1, 40, 96, 4, (1, 32), C(16, 16, 32, split_k=8)),     # split_k > K tiles: clamped
    # 8-bit
    (1, 40, 64, 8, (1, 64), C(16, 16, 64)),            # per tile
    (6, 48, 96, 8, (8, 4), C(16, 16, 32)),             # 2-D block, per element
    (5, 24, 40, 8, (2, 20), C(16, 16, 16)),            # bi = 20, K % BK != 0
    (20, 30, 50, 8, (1, 1), C(16, 16, 16)),            # one scale per weight, N % 16 != 0
    (3, 40, 192, 8, (1, 64), C(16, 16, 32, split_k=3)),    # split-K
    (3, 48, 64, 8, (2, 32), C(16, 32, 32)),            # 2-D block, per tile
]


def _case_id(case):
    m, n, k, bits, block, cfg = case
    path = "tile" if bg.uses_scale_per_tile(cfg.block_k, block[1]) else "elem"
    return f"{bits}b-{block[0]}x{block[1]}-M{m}N{n}K{k}-{path}-sk{cfg.split_k}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", FUSED_CASES, ids=[_case_id(c) for c in FUSED_CASES])
def test_fused_gemm_matches_reference(case, dtype):
    m, n, k, bits, block, cfg = case
    i = FUSED_CASES.index(case)
    offset_dtype = torch.float32 if i % 2 else torch.float16   # both stored offset dtypes
    qw, sc, of = make_weight(n, k, bits, block, offset_dtype, seed=i)
    bias = torch.randn(n).to(dtype) if i % 3 == 0 else None
    x = make_x(m, k, dtype, seed=100 + i)
    w = bg.pack_blockwise_weight(qw, sc, of, bits, block)
    y = bg.blockwise_gemm(x, w, bias, config=cfg)
    assert y.dtype == dtype and y.shape == (m, n)
    ref = linear_ref(x, qw, sc, of, bits, block, bias)
    assert rel_err(y, ref) < TOL[dtype]


# Default path (choose_config, split-K picked by M; dense dequant + GEMM at large M), on a
# layer with SmolLM2-like widths (576, 1536, 192 are not powers of two).
AUTO_CASES = [
    (1, 192, 576, 4, (1, 64)),
    (3, 96, 192, 4, (1, 32)),
    (5, 64, 192, 4, (2, 16)),
    (40, 64, 96, 8, (1, 32)),
    (70, 48, 64, 4, (1, 64)),
    (1, 96, 64, 8, (8, 4)),
    (2, 64, 128, 4, (8, 64)),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", AUTO_CASES,
                         ids=[f"{c[3]}b-{c[4][0]}x{c[4][1]}-M{c[0]}N{c[1]}K{c[2]}"
                              for c in AUTO_CASES])
def test_auto_config_matches_reference(case, dtype):
    m, n, k, bits, block = case
    qw, sc, of = make_weight(n, k, bits, block, seed=m)
    bias = torch.randn(n).to(dtype)
    x = make_x(m, k, dtype)
    y = bg.blockwise_gemm(x, bg.pack_blockwise_weight(qw, sc, of, bits, block), bias)
    assert rel_err(y, linear_ref(x, qw, sc, of, bits, block, bias)) < TOL[dtype]


def test_smollm2_width_layer():
    """One full-width SmolLM2-135M MLP projection (576 -> 1536), decode-sized M, auto config."""
    qw, sc, of = make_weight(1536, 576, 4, (1, 64))
    x = make_x(2, 576, torch.bfloat16)
    y = bg.blockwise_gemm(x, bg.pack_blockwise_weight(qw, sc, of, 4, (1, 64)))
    assert rel_err(y, linear_ref(x, qw, sc, of, 4, (1, 64))) < TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits,block", [(4, (1, 32)), (4, (8, 8)), (8, (8, 4))])
def test_dense_path_matches_reference(bits, block, dtype):
    qw, sc, of = make_weight(40, 64, bits, block, torch.float32)
    bias = torch.randn(40).to(dtype)
    x = make_x(9, 64, dtype)
    y = bg.blockwise_gemm(x, bg.pack_blockwise_weight(qw, sc, of, bits, block), bias, dense=True)
    assert y.dtype == dtype
    assert rel_err(y, linear_ref(x, qw, sc, of, bits, block, bias)) < TOL[dtype]


@pytest.mark.parametrize("bits,block", [(4, (1, 32)), (4, (2, 24)), (8, (8, 4)), (8, (1, 1))])
def test_dequantize_weight_is_exact_in_fp32(bits, block):
    qw, sc, of = make_weight(24, 96, bits, block, torch.float32)
    w = bg.dequantize_weight(bg.pack_blockwise_weight(qw, sc, of, bits, block), torch.float32,
                             block_n=16, block_k=16)
    torch.testing.assert_close(w, dequantize_ref(qw, sc, of, bits, block), rtol=1e-6, atol=1e-6)


def test_large_m_fused_and_auto_dense():
    """M in the thousands: fused kernel with large tiles, and the auto route (dense) at 8192."""
    qw, sc, of = make_weight(24, 64, 4, (1, 32))
    w = bg.pack_blockwise_weight(qw, sc, of, 4, (1, 32))
    for m, cfg in ((1000, C(128, 32, 32)), (8192, None)):
        x = make_x(m, 64, torch.float16)
        y = bg.blockwise_gemm(x, w, config=cfg)
        assert rel_err(y, linear_ref(x, qw, sc, of, 4, (1, 32))) < TOL[torch.float16]


def test_auto_route_by_m(monkeypatch):
    """Below DENSE_MIN_M the fused kernel runs; at and above it, dequantize + dense GEMM."""
    qw, sc, of = make_weight(16, 32, 8, (1, 32))
    w = bg.pack_blockwise_weight(qw, sc, of, 8, (1, 32))
    calls = []
    real_fused, real_deq = bg.fused_gemm, bg.dequantize_weight
    monkeypatch.setattr(bg, "fused_gemm",
                        lambda *a, **k: calls.append("fused") or real_fused(*a, **k))
    monkeypatch.setattr(bg, "dequantize_weight",
                        lambda *a, **k: calls.append("dense") or real_deq(*a, **k))
    monkeypatch.setattr(bg, "DENSE_MIN_M", 8)
    bg.blockwise_gemm(make_x(7, 32, torch.float16), w)
    bg.blockwise_gemm(make_x(8, 32, torch.float16), w)
    bg.blockwise_gemm(make_x(8, 32, torch.float16), w, config=C(16, 16, 32))  # explicit: fused
    assert calls == ["fused", "dense", "fused"]


def test_leading_dims_strided_x_and_empty():
    qw, sc, of = make_weight(40, 64, 4, (1, 32))
    w = bg.pack_blockwise_weight(qw, sc, of, 4, (1, 32))
    wide = make_x(6, 100, torch.float16)
    x = wide[:, 10:74].reshape(2, 3, 64)          # row stride 100, not contiguous
    y = bg.blockwise_gemm(x, w, config=C(16, 16, 32))
    assert y.shape == (2, 3, 40)
    ref = linear_ref(x.reshape(6, 64), qw, sc, of, 4, (1, 32)).reshape(2, 3, 40)
    assert rel_err(y, ref) < TOL[torch.float16]
    assert bg.blockwise_gemm(x[:0], w).shape == (0, 3, 40)


def test_rejects_bad_inputs():
    qw, sc, of = make_weight(16, 64, 4, (1, 32))
    w = bg.pack_blockwise_weight(qw, sc, of, 4, (1, 32))
    with pytest.raises(ValueError, match="fp16 or bf16"):
        bg.blockwise_gemm(torch.randn(2, 64), w)
    with pytest.raises(ValueError, match="K=64"):
        bg.blockwise_gemm(torch.randn(2, 32).half(), w)
    with pytest.raises(ValueError, match="power of two"):
        bg.blockwise_gemm(torch.randn(2, 64).half(), w, config=C(8, 16, 32))
    with pytest.raises(ValueError, match="scales is"):
        bg.pack_blockwise_weight(qw, sc[:, :1], of, 4, (1, 32))
    with pytest.raises(ValueError, match="int32"):
        bg.pack_blockwise_weight(qw.to(torch.uint8), sc, of, 4, (1, 32))
    with pytest.raises(ValueError, match="float16"):
        bg.pack_blockwise_weight(qw, sc.float(), of, 4, (1, 32))


# ----------------------------------------------------------------------------- configs

@pytest.mark.parametrize("m", [1, 4, 16, 17, 64, 65, 256, 4096])
@pytest.mark.parametrize("n,k", [(4096, 4096), (14336, 4096), (4096, 14336), (576, 1536)])
@pytest.mark.parametrize("block", [(1, 64), (1, 128), (8, 8), (8, 4), (2, 48)])
def test_choose_config(m, n, k, block):
    cfg = bg.choose_config(m, n, k, block, num_sms=132)
    cfg.validate()
    if block[1] % 16 == 0:   # a block_k dividing bi exists: the per-tile path is chosen
        assert bg.uses_scale_per_tile(cfg.block_k, block[1])
    k_tiles = -(-k // cfg.block_k)
    per_split = -(-k_tiles // cfg.split_k)
    assert (cfg.split_k - 1) * per_split < k_tiles      # no empty K split
    if m > 64:
        assert cfg.split_k == 1
    if m == 1 and n == 4096:   # 64 N tiles on 132 SMs: split-K must fill the GPU
        assert cfg.split_k > 1
        assert -(-n // cfg.block_n) * cfg.split_k >= 132
