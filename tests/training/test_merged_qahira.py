"""A QA-HiRA whose tiles hold whole blocks trains as its merged layer (qlinear._MergedQAHiRALinear):
the same function and gradients as base + adapter computed separately, and the same weight as the
offsets `qahira merge` writes."""

import pytest
import torch

from support import tiny
from qahira_vllm.format import QahiraQuantConfig
from qahira_vllm.quant_math import pack_qweight, quantize
from qahira_vllm.training.adapters import AdaptedLinear, QAHiRA
from qahira_vllm.training.qlinear import QuantLinear

OUT, IN = 48, 128


def _layer(block, offset_dtype, bias=True, seed=0):
    torch.manual_seed(seed)
    cfg = QahiraQuantConfig(bits=4, block_size=block, offset_dtype=offset_dtype)
    q, scales, offsets = quantize(torch.randn(OUT, IN), cfg, clip_search=False)
    b = torch.randn(OUT) if bias else None
    return QuantLinear(pack_qweight(q, 4), scales, offsets, cfg, IN, OUT, bias=b), cfg


def _adapted(block, offset_dtype, pool, repeat, dropout=0.0, seed=0):
    base, cfg = _layer(block, offset_dtype, seed=seed)
    adapter = QAHiRA(IN, OUT, pool=pool, repeat=repeat, scaling=1.7, dropout=dropout)
    with torch.no_grad():
        adapter.qahira_M.normal_(0, 0.5)
    return AdaptedLinear(base, adapter), cfg


def _dense_reference(layer, cfg, x, g):
    """float64: y = x (W + dW)^T + b, W from tests/support's own unpacking, dW[o, i] =
    s M[o // qo, i // pi] / pi; grads by autograd through that dense expression."""
    base, a = layer.base, layer.adapter
    w = tiny.dequant_packed_ref(base.qweight, base.scales, base.offsets, cfg.block_size,
                                bits=4).double()
    m = a.qahira_M.detach().double().requires_grad_()
    rows, cols = torch.arange(OUT) // a.repeat, torch.arange(IN) // a.pool
    dw = a.scaling * m[rows][:, cols] / a.pool
    x = x.detach().double().requires_grad_()
    y = x @ (w + dw).t() + base.bias.double()
    return (y, *torch.autograd.grad(y, (x, m), g.double()))


def _run(layer, x, g, autocast, unfused=False):
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        # unfused: the adapter's own path, base(x) + adapter(x) (what AdaptedLinear ran before)
        y = layer.base(x) + layer.adapter(x).to(layer.base(x).dtype) if unfused else layer(x)
    gx, gm = torch.autograd.grad(y, (x, layer.adapter.qahira_M), g.to(y.dtype))
    return y.double(), gx.double(), gm.double()


# Error model for a sum over `IN` products: |err| <= c * eps * sum |terms|, so each result is
# compared relative to the magnitude of its terms (|x| |W_eff|^T etc.), not to its own value.
def _magnitudes(layer, cfg, x, g):
    base, a = layer.base, layer.adapter
    w = tiny.dequant_packed_ref(base.qweight, base.scales, base.offsets, cfg.block_size,
                                bits=4).double().abs() + a.delta_weight().detach().double().abs()
    xa, ga = x.double().abs(), g.double().abs()
    gm_mag = a.scaling / a.pool * (ga.flatten(0, -2).t() @ xa.flatten(0, -2))
    gm_mag = gm_mag.unflatten(0, (-1, a.repeat)).sum(1).unflatten(1, (-1, a.pool)).sum(2)
    return xa @ w.t() + base.bias.double().abs(), ga @ w, gm_mag


# fp32: fused vs unfused differ by at most 2.7e-7 of the terms' magnitude here (measured; the
# dW is added to the offsets before the GEMM, not to y after it), both within 2.3e-7 of float64;
# bounded by 2e-6 (~32 fp32 ulps) and 1e-6. bf16 autocast: both within 3.1e-3 of float64
# (measured; x, W_eff and g each rounded once to bf16), bounded by 2^-7; fused vs unfused
# measured 4.6e-3, bounded by 2^-6.
TOL = {False: 2e-6, True: 2 ** -6}


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("block,offset_dtype,pool,repeat", [
    ((1, 32), "float16", 32, 1),      # the trainer's default geometry for the benchmark's blocks
    ((1, 32), "float16", 64, 2),
    ((4, 8), "float32", 16, 4)])
def test_fused_equals_unfused_and_float64(block, offset_dtype, pool, repeat, autocast):
    layer, cfg = _adapted(block, offset_dtype, pool, repeat)
    assert layer.merges_into_offsets
    torch.manual_seed(1)
    x, g = torch.randn(3, 5, IN), torch.randn(3, 5, OUT)
    fused = _run(layer, x, g, autocast)
    unfused = _run(layer, x, g, autocast, unfused=True)
    exact = _dense_reference(layer, cfg, x, g)
    for name, f, u, e, mag in zip(("y", "grad_x", "grad_M"), fused, unfused, exact,
                                  _magnitudes(layer, cfg, x, g)):
        assert ((f - u).abs() / mag).max() <= TOL[autocast], name
        if autocast:
            assert ((f - e).abs() / mag).max() <= 2 ** -7, name
            assert ((u - e).abs() / mag).max() <= 2 ** -7, name
        else:
            assert ((f - e).abs() / mag).max() <= 1e-6, name


def test_forward_is_the_merged_layer_bit_for_bit():
    # fp32 offsets: `qahira merge` stores offsets + s * M[tile] / pi exactly (no rounding), so
    # the trained layer must be that QuantLinear bit for bit (forward and grad_x).
    layer, cfg = _adapted((4, 8), "float32", 16, 4)
    a, base = layer.adapter, layer.base
    m = a.qahira_M.detach()
    per_block = m.repeat_interleave(a.repeat // 4, 0).repeat_interleave(a.pool // 8, 1)
    merged = QuantLinear(base.qweight, base.scales, base.offsets + per_block * a.scaling / a.pool,
                         cfg, IN, OUT, bias=base.bias)
    x = torch.randn(7, IN)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ys = [layer(xs[0]), merged(xs[1])]
    assert torch.equal(ys[0], ys[1])
    g = torch.randn(7, OUT)
    assert torch.equal(*(torch.autograd.grad(y, xi, g)[0] for y, xi in zip(ys, xs)))


def test_frozen_adapter_and_no_input_grad():
    layer, _ = _adapted((1, 32), "float16", 32, 1)
    layer.adapter.qahira_M.requires_grad_(False)
    x = torch.randn(4, IN, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.adapter.qahira_M.grad is None
    layer.adapter.qahira_M.requires_grad_(True)
    layer(torch.randn(4, IN)).sum().backward()   # x needs no grad: grad_M only
    assert layer.adapter.qahira_M.grad.abs().sum() > 0


@pytest.mark.parametrize("case", ["tile_not_whole_blocks", "dropout_training"])
def test_falls_back_to_the_adapter_path(case):
    if case == "tile_not_whole_blocks":  # pi = 4 splits the 8-wide blocks
        layer, _ = _adapted((4, 8), "float32", 4, 4)
    else:
        layer, _ = _adapted((1, 32), "float16", 32, 1, dropout=0.1)
        layer.eval()
        assert layer.merges_into_offsets     # dropout is inactive in eval mode
        layer.train()
    assert not layer.merges_into_offsets
    torch.manual_seed(3)
    x = torch.randn(6, IN)
    torch.manual_seed(4)
    got = layer(x)
    torch.manual_seed(4)   # the same dropout mask
    assert torch.equal(got, layer.base(x) + layer.adapter(x))
