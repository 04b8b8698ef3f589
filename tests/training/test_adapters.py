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


def test_geometry_must_divide():
    with pytest.raises(ValueError, match="pool=5"):
        QBaRA(IN, OUT, 4, pool=5, repeat=2)
    with pytest.raises(ValueError, match="repeat=3"):
        QAHiRA(IN, OUT, pool=4, repeat=3)
