"""A Q-BaRA on a QuantLinear trains as one autograd node (qlinear._QBaRALinear): the same function
and gradients as base(x) + adapter(x) computed by the separate modules, both against a float64
reference built from tests/support's own unpacking and adapter_math's P_p / R_q."""

import pytest
import torch

from support import tiny
from qahira_vllm.adapter_math import pool_inputs, repeat_outputs
from qahira_vllm.format import QahiraQuantConfig
from qahira_vllm.quant_math import pack_qweight, quantize
from qahira_vllm.training.adapters import AdaptedLinear, QBaRA
from qahira_vllm.training.qlinear import QuantLinear

OUT, IN, RANK = 48, 96, 6


def _adapted(block, offset_dtype, pool, repeat, bias=True, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    cfg = QahiraQuantConfig(bits=4, block_size=block, offset_dtype=offset_dtype)
    q, scales, offsets = quantize(torch.randn(OUT, IN), cfg, clip_search=False)
    base = QuantLinear(pack_qweight(q, 4), scales, offsets, cfg, IN, OUT,
                       bias=torch.randn(OUT) if bias else None)
    adapter = QBaRA(IN, OUT, RANK, pool=pool, repeat=repeat, scaling=1.7, dropout=dropout)
    with torch.no_grad():
        adapter.lora_B.normal_(0, 0.5)
    return AdaptedLinear(base, adapter), cfg


def _params(layer):
    return layer.adapter.lora_A, layer.adapter.lora_B


def _reference(layer, cfg, x, g, absolute=False):
    """float64 y = x W^T + b + s R_q((P_p(x) A^T) B^T) and its gradients wrt x, A, B; with
    absolute, the same expression on |x|, |W|, |A|, |B|, |g|, |b| (the terms' magnitude)."""
    base, a = layer.base, layer.adapter
    f = torch.abs if absolute else (lambda t: t)
    w = f(tiny.dequant_packed_ref(base.qweight, base.scales, base.offsets, cfg.block_size,
                                  bits=4).double())
    leaves = [f(t.detach().double()).requires_grad_() for t in (x, *_params(layer))]
    xd, ad, bd = leaves
    y = xd @ w.t() + repeat_outputs((pool_inputs(xd, a.pool) @ ad.t()) @ bd.t(), a.repeat) * \
        a.scaling
    if base.bias is not None:
        y = y + f(base.bias.double())
    return (y, *torch.autograd.grad(y, leaves, f(g.double())))


def _run(layer, x, g, autocast, unfused=False):
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        # unfused: QuantLinear, then QBaRA.add_delta (the separate modules)
        y = layer.adapter.add_delta(layer.base(x), x) if unfused else layer(x)
    grads = torch.autograd.grad(y, (x, *_params(layer)), g.to(y.dtype))
    return tuple(t.double() for t in (y, *grads))


# Each result is compared relative to its terms' magnitude (a sum's rounding is bounded by
# eps * sum |terms|). fp32: fused 1.8e-7, unfused 1.8e-7 from float64 here (measured), bounded
# by 1e-6. bf16 autocast (x, W, A', B' and g rounded to bf16, as PEFT's LoRA under autocast):
# fused 4.6e-3, unfused 2.4e-3 (measured), bounded by 2^-7.
TOL = {False: 1e-6, True: 2 ** -7}


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("block,offset_dtype,pool,repeat,bias", [
    ((1, 32), "float16", 2, 2, True),     # the trainer's default geometry
    ((1, 32), "float16", 3, 4, False),
    ((4, 8), "float32", 1, 1, True)])
def test_fused_equals_unfused_and_float64(block, offset_dtype, pool, repeat, bias, autocast):
    layer, cfg = _adapted(block, offset_dtype, pool, repeat, bias)
    assert layer.fuses_qbara
    torch.manual_seed(1)
    x, g = torch.randn(3, 5, IN), torch.randn(3, 5, OUT)
    fused, unfused = _run(layer, x, g, autocast), _run(layer, x, g, autocast, unfused=True)
    exact, mag = _reference(layer, cfg, x, g), _reference(layer, cfg, x, g, absolute=True)
    assert fused[0].shape == (3, 5, OUT) and fused[1].shape == (3, 5, IN)
    for name, f, u, e, m in zip(("y", "grad_x", "grad_A", "grad_B"), fused, unfused, exact, mag):
        assert ((f - e).abs() / m).max() <= TOL[autocast], name
        assert ((u - e).abs() / m).max() <= TOL[autocast], name


def test_output_and_gradient_dtypes():
    layer, _ = _adapted((1, 32), "float16", 2, 2)
    x = torch.randn(4, IN, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    a, b = _params(layer)
    assert x.grad.dtype == torch.bfloat16
    assert a.grad.dtype == b.grad.dtype == torch.float32


def test_frozen_parts_get_no_gradient():
    layer, _ = _adapted((1, 32), "float16", 2, 2)
    a, b = _params(layer)
    a.requires_grad_(False)
    x = torch.randn(4, IN, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and a.grad is None and b.grad.abs().sum() > 0
    a.requires_grad_(True)
    b.grad = None
    layer(torch.randn(4, IN)).sum().backward()   # x needs no grad: A and B only
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_the_rebuilt_weight_buffer_is_not_kept_between_layers():
    # Two layers of the same shape share the thread's W buffer: each layer's backward must see
    # its own weight, rebuilt, not the one the other layer's forward left there.
    first, cfg = _adapted((1, 32), "float16", 2, 2, seed=0)
    second, _ = _adapted((1, 32), "float16", 2, 2, seed=1)
    torch.manual_seed(2)
    x, g = torch.randn(5, IN), torch.randn(5, OUT)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    y1, y2 = first(xs[0]), second(xs[1])       # both forwards before either backward
    torch.autograd.backward((y1, y2), (g, g))
    for layer, xi, y in ((first, xs[0], y1), (second, xs[1], y2)):
        exact, mag = _reference(layer, cfg, x, g), _reference(layer, cfg, x, g, absolute=True)
        assert ((y.double() - exact[0]).abs() / mag[0]).max() <= TOL[False]
        assert ((xi.grad.double() - exact[1]).abs() / mag[1]).max() <= TOL[False]


def test_dropout_in_training_uses_the_separate_modules():
    layer, _ = _adapted((1, 32), "float16", 2, 2, dropout=0.1)
    layer.eval()
    assert layer.fuses_qbara           # dropout is inactive in eval mode
    layer.train()
    assert not layer.fuses_qbara
    x = torch.randn(6, IN)
    torch.manual_seed(4)
    got = layer(x)
    torch.manual_seed(4)   # the same dropout mask
    assert torch.equal(got, layer.adapter.add_delta(layer.base(x), x))
