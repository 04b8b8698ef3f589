"""Adapter modules against dense weight-space math written independently (float64)."""

import math

import pytest
import torch
from torch import nn

from qahira_vllm.adapter_math import qahira_delta_weight, qbara_delta_weight, qbara_to_lora
from qahira_vllm.training.adapters import LoRA, QAHiRA, QBaRA

IN, OUT = 48, 40


def _randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)
    return module.double()


def test_qbara_forward_is_kron_delta():
    torch.manual_seed(0)
    p, q, R, s = 3, 2, 6, 0.75
    m = _randomize(QBaRA(IN, OUT, R, pool=p, repeat=q, scaling=s))
    x = torch.randn(5, IN, dtype=torch.float64)
    # dW = s * (B A) kron (ones(q, p) / p)   (PAPER.md)
    dense = s * torch.kron(m.lora_B @ m.lora_A, torch.ones(q, p, dtype=torch.float64) / p)
    torch.testing.assert_close(m(x), x @ dense.t(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.delta_weight(), dense, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(qbara_delta_weight(m.lora_A, m.lora_B, p, q, s), dense)


def test_qbara_to_lora_is_equivalent():
    torch.manual_seed(1)
    m = _randomize(QBaRA(IN, OUT, 4, pool=2, repeat=4, scaling=2.0))
    a, b = qbara_to_lora(m.lora_A, m.lora_B, 2, 4)
    assert a.shape == (4, IN) and b.shape == (OUT, 4)
    lora = LoRA(IN, OUT, 4, scaling=2.0).double()
    with torch.no_grad():
        lora.lora_A.copy_(a)
        lora.lora_B.copy_(b)
    x = torch.randn(7, IN, dtype=torch.float64)
    torch.testing.assert_close(lora(x), m(x), rtol=1e-12, atol=1e-12)


def test_qahira_forward_is_tiled_delta():
    torch.manual_seed(2)
    pi, qo, s = 4, 8, 1.5
    m = _randomize(QAHiRA(IN, OUT, pool=pi, repeat=qo, scaling=s))
    rows = torch.arange(OUT) // qo
    cols = torch.arange(IN) // pi
    dense = s * m.qahira_M[rows][:, cols] / pi   # dW[o, i] = s * M[o // qo, i // pi] / pi
    x = torch.randn(3, 2, IN, dtype=torch.float64)
    torch.testing.assert_close(m(x), x @ dense.t(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(qahira_delta_weight(m.qahira_M, pi, qo, s), dense)


def test_lora_matches_peft_layer():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    base = nn.Sequential(nn.Linear(IN, OUT, bias=False)).double()
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    layer = peft_model.base_model.model[0]
    ours = LoRA(IN, OUT, 4, scaling=8 / 4).double()
    with torch.no_grad():
        ours.lora_A.copy_(layer.lora_A["default"].weight)
        ours.lora_B.normal_()
        layer.lora_B["default"].weight.copy_(ours.lora_B)
    x = torch.randn(5, IN, dtype=torch.float64)
    torch.testing.assert_close(x @ layer.base_layer.weight.t() + ours(x), peft_model(x))


def test_init_like_peft():
    torch.manual_seed(4)
    ours = QBaRA(IN, OUT, 8, pool=2, repeat=2)
    torch.manual_seed(4)
    reference = nn.Linear(IN // 2, 8, bias=False)  # PEFT's lora_A: nn.Linear's kaiming(a=sqrt5)
    assert torch.equal(ours.lora_A, reference.weight)
    assert torch.count_nonzero(ours.lora_B) == 0
    assert torch.count_nonzero(QAHiRA(IN, OUT, 4, 8).qahira_M) == 0
    kaiming = QAHiRA(IN, OUT, 4, 8, init="kaiming").qahira_M
    assert 0 < kaiming.abs().max() <= 1 / math.sqrt(IN // 4)
    with pytest.raises(ValueError, match="init"):
        QAHiRA(IN, OUT, 4, 8, init="gaussian")


@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.float32, True),
                                           (torch.bfloat16, False)])
@pytest.mark.parametrize("kind", ["qahira"])
def test_pair_pool_and_repeat_are_bit_identical(kind, dtype, autocast):
    # p = q = 2 runs through strided adds (adapters._PairMean, _PairRepeatScaled); output and
    # every gradient must keep the bits of the plain adapter_math expression, so training with
    # them gives the same adapter. (Q-BaRA multiplies B' = R_q(B) s instead of repeating its
    # output, which rounds differently: test_qbara_expanded_b_within_rounding_tolerance.)
    from qahira_vllm.adapter_math import pool_inputs, repeat_outputs

    torch.manual_seed(5)
    m = (QBaRA(96, 80, 6, pool=2, repeat=2, scaling=1.7) if kind == "qbara"
         else QAHiRA(96, 80, pool=2, repeat=2, scaling=1.7))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    m = m.to(dtype)
    params = list(m.parameters())
    # inputs over 30 decades, so that roundings differ wherever the order of operations would
    x = (torch.randn(3, 5, 96) * torch.logspace(-30, 3, 96)).to(dtype).requires_grad_()
    grad_out = torch.randn(3, 5, 80)

    def reference(x):
        h = pool_inputs(x, 2).to(params[0].dtype)
        y = (h @ m.lora_A.t()) @ m.lora_B.t() if kind == "qbara" else h @ m.qahira_M.t()
        return repeat_outputs(y, 2) * m.scaling

    results = []
    for f in (m, reference):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = f(x)
        results.append((y, *torch.autograd.grad(y, (x, *params), grad_out.to(y.dtype))))
    for got, want in zip(*results):
        assert got.dtype == want.dtype and torch.equal(got, want)


def _qbara_reference(x, a, b, g, y, p, q, s):
    """s R_q((P_p(x) A^T) B^T) (+ y) and its gradients wrt x, A, B: the adapter_math expression
    the module computed before its B' = R_q(B) s form."""
    from qahira_vllm.adapter_math import pool_inputs, repeat_outputs

    leaves = [t.detach().requires_grad_() for t in (x, a, b)]
    h = pool_inputs(leaves[0], p).to(leaves[1].dtype)
    d = repeat_outputs((h @ leaves[1].t()) @ leaves[2].t(), q) * s
    out = d if y is None else y + d.to(y.dtype)
    return (out, *torch.autograd.grad(out, leaves, g.to(out.dtype)))


@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.float32, True),
                                           (torch.bfloat16, False)])
@pytest.mark.parametrize("pq", [(2, 2), (3, 4), (1, 1)])
@pytest.mark.parametrize("entry", ["forward", "add_delta"])
def test_qbara_expanded_b_within_rounding_tolerance(entry, pq, dtype, autocast):
    # QBaRA computes (P_p(x) A^T) (R_q(B) s)^T, and add_delta folds "+ y" into one addmm: the same
    # sums in another order. Each result is compared, relative to the sum of the absolute values
    # of its terms (the same expression in float64 on |x|, |A|, |B|, |g|, |y|), with the exact
    # float64 value: fp32 within 1e-6 (measured <= 8.7e-8, old expression <= 6.7e-8), bf16
    # (autocast or bf16 weights) within 2^-7 (measured <= 1.7e-3, old <= 1.9e-3); the old
    # expression is held to the same bound.
    p, q = pq
    torch.manual_seed(6)
    m = QBaRA(96, 80, 6, pool=p, repeat=q, scaling=1.7)
    with torch.no_grad():
        for t in m.parameters():
            t.normal_()
    m = m.to(dtype)
    x = torch.randn(3, 5, 96).to(dtype)
    g = torch.randn(3, 5, 80)
    y = torch.randn(3, 5, 80).to(torch.bfloat16 if autocast else dtype) if entry == "add_delta" \
        else None
    xl, yl = x.clone().requires_grad_(), None if y is None else y.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = m(xl) if y is None else m.add_delta(yl, xl)
        old = _qbara_reference(x, m.lora_A, m.lora_B, g, y, p, q, m.scaling)
    leaves = [xl, m.lora_A, m.lora_B] + ([] if y is None else [yl])
    got = (out, *torch.autograd.grad(out, leaves, g.to(out.dtype)))
    assert got[0].dtype == old[0].dtype

    def exact(*ts):
        return _qbara_reference(*(t.double() for t in ts[:4]), None, p, q, m.scaling)

    ex, mag = exact(x, m.lora_A, m.lora_B, g), exact(x.abs(), m.lora_A.abs(), m.lora_B.abs(),
                                                     g.abs())
    if y is not None:   # y passes through: + y in the output, and grad_y = g exactly
        ex, mag = (ex[0] + y.double(), *ex[1:]), (mag[0] + y.double().abs(), *mag[1:])
        assert torch.equal(got[4], g.to(got[4].dtype))
    tol = 1e-6 if dtype == torch.float32 and not autocast else 2 ** -7
    for name, a, b, e, mg in zip(("out", "grad_x", "grad_A", "grad_B"), got, old, ex, mag):
        assert ((a.double() - e).abs() / mg).max() <= tol, name
        assert ((b.double() - e).abs() / mg).max() <= tol, name   # the bound is not loose


def test_geometry_must_divide():
    with pytest.raises(ValueError, match="pool=5"):
        QBaRA(IN, OUT, 4, pool=5, repeat=2)
    with pytest.raises(ValueError, match="repeat=3"):
        QAHiRA(IN, OUT, pool=4, repeat=3)
