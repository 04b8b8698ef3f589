"""qahira_vllm.adapter_math against references written by index arithmetic in float64."""

from __future__ import annotations

import pytest
import torch

from qahira_vllm import adapter_math as am
from qahira_vllm.adapter_format import AdapterError


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pool_ref(x: torch.Tensor, pool: int) -> torch.Tensor:
    """float64 [..., in/p]: element j = mean of x[..., j*p + k] over k, by a python loop."""
    cols = [sum(x[..., j * pool + k].double() for k in range(pool)) / pool
            for j in range(x.shape[-1] // pool)]
    return torch.stack(cols, dim=-1)


@pytest.mark.parametrize("pool", [1, 2, 3, 4, 8])
def test_pool_inputs_and_pool_sum(pool):
    x = torch.randn(3, 5, 24, generator=_gen(pool), dtype=torch.float64)
    ref = _pool_ref(x, pool)
    got = am.pool_inputs(x, pool)
    assert got.shape == (3, 5, 24 // pool) and got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=1e-14, atol=1e-14)
    summed = am.pool_sum(x, pool)
    assert summed.shape == got.shape
    torch.testing.assert_close(summed, pool * ref, rtol=1e-14, atol=1e-14)
    if pool == 1:  # no copy on the identity
        assert am.pool_inputs(x, 1) is x and am.pool_sum(x, 1) is x


@pytest.mark.parametrize("repeat", [1, 2, 5])
def test_repeat_outputs(repeat):
    y = torch.randn(4, 6, generator=_gen(10 + repeat))
    got = am.repeat_outputs(y, repeat)
    assert got.shape == (4, 6 * repeat)
    for o in range(6 * repeat):  # output o is input o // q
        assert torch.equal(got[:, o], y[:, o // repeat])


@pytest.mark.parametrize("pool,repeat", [(1, 1), (2, 4), (3, 2)])
def test_qbara_delta_weight_is_kron_and_matches_compact_forward(pool, repeat):
    g = _gen(pool * 10 + repeat)
    r, in_f, out_f, s = 5, 12, 8, 0.75
    a = torch.randn(r, in_f // pool, generator=g, dtype=torch.float64)
    b = torch.randn(out_f // repeat, r, generator=g, dtype=torch.float64)
    dense = s * torch.kron(b @ a, torch.ones(repeat, pool, dtype=torch.float64) / pool)
    dw = am.qbara_delta_weight(a, b, pool, repeat, s)
    torch.testing.assert_close(dw, dense, rtol=1e-13, atol=1e-13)
    a2, b2 = am.qbara_to_lora(a, b, pool, repeat)
    assert a2.shape == (r, in_f) and b2.shape == (out_f, r)
    for i in range(in_f):
        assert torch.equal(a2[:, i], a[:, i // pool] / pool)
    for o in range(out_f):
        assert torch.equal(b2[o], b[o // repeat])
    # the compact forward s * R_q(B A P_p(x)) is x dW^T
    x = torch.randn(7, in_f, generator=g, dtype=torch.float64)
    compact = s * am.repeat_outputs(am.pool_inputs(x, pool) @ a.t() @ b.t(), repeat)
    torch.testing.assert_close(compact, x @ dense.t(), rtol=1e-12, atol=1e-12)


def test_qahira_delta_weight_by_index():
    pi, qo, s = 4, 2, 1.5
    m = torch.randn(3, 5, generator=_gen(3), dtype=torch.float64)
    dw = am.qahira_delta_weight(m, pi, qo, s)
    assert dw.shape == (6, 20)
    for o in range(6):
        for i in range(20):
            assert dw[o, i].item() == pytest.approx(s * m[o // qo, i // pi].item() / pi,
                                                    rel=1e-15)


@pytest.mark.parametrize("block,pi,qo", [((1, 32), 32, 8), ((2, 16), 16, 4), ((4, 8), 16, 8),
                                         ((1, 4), 4, 1)])
def test_qahira_delta_blocks_is_dw_on_each_block(block, pi, qo):
    bo, bi = block
    out_f, in_f, s = 32, 64, 0.625
    m = torch.randn(out_f // qo, in_f // pi, generator=_gen(pi + qo), dtype=torch.float32)
    got = am.qahira_delta_blocks(m, s, pi, qo, block)
    assert got.dtype == torch.float32 and got.shape == (out_f // bo, in_f // bi)
    # block (r, c) starts at [r*bo, c*bi] and lies inside tile [r*bo // qo, c*bi // pi]
    rows = (torch.arange(out_f // bo) * bo // qo)[:, None]
    cols = (torch.arange(in_f // bi) * bi // pi)[None, :]
    expected = (m.double()[rows, cols] * s / pi).float()
    torch.testing.assert_close(got, expected, rtol=2**-22, atol=0)
    # and it is the dense dW, constant on each block
    dense = am.qahira_delta_weight(m.double(), pi, qo, s)
    for r in range(out_f // bo):
        for c in range(in_f // bi):
            blk = dense[r * bo:(r + 1) * bo, c * bi:(c + 1) * bi]
            assert (blk == blk[0, 0]).all()
            assert got[r, c].item() == pytest.approx(blk[0, 0].item(), rel=2**-22)


def test_qahira_delta_blocks_refuses_tiles_that_split_blocks():
    m = torch.zeros(4, 4)
    with pytest.raises(AdapterError, match=r"tile 8 x 16 is not a multiple of block 1 x 32"):
        am.qahira_delta_blocks(m, 1.0, 16, 8, (1, 32))
    with pytest.raises(AdapterError, match=r"tile 2 x 32 is not a multiple of block 4 x 8"):
        am.qahira_delta_blocks(m, 1.0, 32, 2, (4, 8))
