"""Building the training model: exact base, frozen, adapters where asked, valid geometry."""

import pytest
import torch

from support import tiny
from qahira_vllm.adapter_format import AdapterError
from qahira_vllm.checkpoint import load_reference_model
from qahira_vllm.training.adapters import AdaptedLinear
from qahira_vllm.training.model import (AdapterSpec, build_training_model, load_quantized_model,
                                        normalize_targets)
from qahira_vllm.training.qlinear import QuantLinear

IDS = torch.tensor([[5, 80, 33, 101, 7, 250, 64, 12, 90, 3]])


@pytest.mark.parametrize("which", ["llama", "qwen"])
def test_base_forward_equals_dequantized_reference(which, qckpt, qckpt_qwen):
    path = qckpt if which == "llama" else qckpt_qwen
    model, cfg = load_quantized_model(path)
    n_quant = sum(isinstance(m, QuantLinear) for m in model.modules())
    assert n_quant == 2 * 7
    assert not any(p.requires_grad for p in model.parameters())
    ref = load_reference_model(path)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref(IDS).logits, rtol=1e-5, atol=1e-5)
    if which == "qwen":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_converted_lm_head_is_a_frozen_quant_layer_never_adapted():
    """A checkpoint made with `quantize --lm-head` (tied Qwen2, so stored untied): the trainer's
    base runs the quantized head like the reference does, and adapters still skip lm_head."""
    path = tiny.tiny_qckpt("qwen2", block_size=(4, 8), lm_head=True, hidden=64,
                                   intermediate=128, heads=2, kv_heads=1, tie=True)
    model, _ = load_quantized_model(path)
    assert isinstance(model.lm_head, QuantLinear)
    ref = load_reference_model(path)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref(IDS).logits, rtol=1e-5, atol=1e-5)
    adapted_model, _ = build_training_model(path, AdapterSpec(method="qbara"))
    adapted = [n for n, m in adapted_model.named_modules() if isinstance(m, AdaptedLinear)]
    assert len(adapted) == 14 and not any("lm_head" in n for n in adapted)


@pytest.mark.parametrize("method", ["qbara", "qahira", "lora"])
def test_zero_init_starts_at_base_and_only_adapters_train(method, qckpt):
    model, config = build_training_model(qckpt, AdapterSpec(method=method))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".adapter." in n for n in trainable)
    adapted = [n for n, m in model.named_modules() if isinstance(m, AdaptedLinear)]
    assert len(adapted) == 14 and not any("lm_head" in n for n in adapted)
    base, _ = load_quantized_model(qckpt)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, base(IDS).logits)
    assert config.base_fingerprint.startswith("qahira-fp1:sha256:")


def test_target_subset_and_short_names(qckpt):
    model, config = build_training_model(qckpt, AdapterSpec(method="lora", targets="q,v"))
    adapted = sorted(n for n, m in model.named_modules() if isinstance(m, AdaptedLinear))
    assert adapted == [f"model.layers.{i}.self_attn.{p}"
                       for i in (0, 1) for p in ("q_proj", "v_proj")]
    assert config.target_modules == ("q_proj", "v_proj")


def test_lm_head_is_never_a_target():
    with pytest.raises(ValueError, match="lm_head is never adapted"):
        normalize_targets("q,lm_head")


def test_unknown_target(qckpt):
    with pytest.raises(ValueError, match="match no quantized linear layer"):
        build_training_model(qckpt, AdapterSpec(method="lora", targets=("wq",)))


def test_qahira_default_geometry_follows_blocks(qckpt, qckpt_qwen):
    # block [1, 32]: pi must be a multiple of 32 (smallest >= 4), qo = paper's 8.
    _, c = build_training_model(qckpt, AdapterSpec(method="qahira"))
    assert (c.pool, c.repeat) == (32, 8)
    # block [4, 8]: pi = 8, qo = 8 (a multiple of 4).
    _, c = build_training_model(qckpt_qwen, AdapterSpec(method="qahira"))
    assert (c.pool, c.repeat) == (8, 8)
    paper = tiny.tiny_qckpt("llama", block_size=(8, 4), hidden=64, intermediate=128,
                                    heads=2, kv_heads=1)
    _, c = build_training_model(paper, AdapterSpec(method="qahira"))
    assert (c.pool, c.repeat) == (4, 8)  # the paper's default fits [8, 4] blocks


def test_qahira_invalid_geometry_names_valid_one(qckpt):
    with pytest.raises(AdapterError) as e:
        build_training_model(qckpt, AdapterSpec(method="qahira", pool=4, repeat=8))
    msg = str(e.value)
    assert "pool pi=4 is not a multiple of the block's bi=32" in msg
    assert "Valid pool (pi): [32, 64]" in msg


def test_qbara_invalid_pool(qckpt):
    with pytest.raises(ValueError, match="valid p: "):
        build_training_model(qckpt, AdapterSpec(method="qbara", pool=5))


def test_gradient_checkpointing_same_gradients(qckpt):
    grads = []
    for ckpt in (False, True):
        model, _ = build_training_model(qckpt, AdapterSpec(method="qbara"), seed=3,
                                        gradient_checkpointing=ckpt)
        model.train()
        model(IDS, labels=IDS).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7)


def test_v2_mixed_checkpoint_base_and_qahira_geometry():
    """Format 2 (tiny.V2_OVERRIDES: blocks 1x32, 1x16, 2x64; fp32 scales): the trainer's base
    equals the dequantized reference, each QuantLinear has its layer's config, and QA-HiRA's
    default tile holds whole blocks of every layer (pi a multiple of lcm(32, 16, 64) = 64, qo
    of lcm(1, 2) = 2)."""
    path = tiny.tiny_qckpt_v2()
    model, cfg = load_quantized_model(path)
    assert cfg.format_version == 2
    assert model.model.layers[1].mlp.up_proj.cfg.block_size == (2, 64)
    assert model.model.layers[0].mlp.down_proj.cfg.bits == 8
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, load_reference_model(path)(IDS).logits,
                                   rtol=1e-5, atol=1e-5)
    _, c = build_training_model(path, AdapterSpec(method="qahira"))
    assert (c.pool, c.repeat) == (64, 8)
    with pytest.raises(AdapterError, match=r"pool pi=32 is not a multiple of the block's bi=64"):
        build_training_model(path, AdapterSpec(method="qahira", pool=32, repeat=8))
