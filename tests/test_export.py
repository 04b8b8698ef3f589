"""Q-BaRA -> standard LoRA export: real PEFT computes the same function with the same scaling."""

import json

import pytest
import torch

from support import tiny
from qahira_vllm.adapter_format import AdapterError, load_adapter
from qahira_vllm.checkpoint import load_reference_model
from qahira_vllm.cli import main as cli_main
from qahira_vllm.export import export_peft_lora
from qahira_vllm.training.model import load_model_with_adapter

# Our own adapters carry a "qahira" key that PEFT does not know (it warns, then ignores it).
pytestmark = pytest.mark.filterwarnings("ignore:Unexpected keyword arguments")

TINY = dict(hidden=64, intermediate=128, heads=2, kv_heads=1)
IDS = torch.tensor([[3, 17, 99, 250, 64, 8, 120, 45, 200, 31, 7, 77]])


def _base(arch):
    if arch == "llama":
        return tiny.tiny_qckpt("llama", **TINY)
    return tiny.tiny_qckpt("qwen2", block_size=(4, 8), offset_dtype="float32",
                                   tie=True, **TINY)


def _peft_logits(qckpt, lora_dir):
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_reference_model(qckpt), str(lora_dir)).eval()
    with torch.no_grad():
        return model(IDS).logits, model


@pytest.mark.parametrize("arch", ["llama", "qwen"])
@pytest.mark.parametrize("pool, repeat, scaling", [(2, 2, 2.0), (4, 2, 0.37), (1, 8, 1 / 3)])
def test_qbara_export_equals_native_forward_in_peft(arch, pool, repeat, scaling, tmp_path):
    qckpt = _base(arch)
    qbara = tiny.random_adapter(qckpt, tmp_path / "qbara", "qbara", pool=pool,
                                        repeat=repeat, rank=6, scaling=scaling, std=0.3)
    summary = export_peft_lora(qbara, tmp_path / "lora")
    assert summary["scaling"] == pytest.approx(scaling, rel=1e-15)
    scaling = summary["scaling"]
    assert summary["lora_alpha"] / summary["r"] == scaling
    with torch.no_grad():
        native = load_model_with_adapter(qckpt, qbara)(IDS).logits
        base = load_reference_model(qckpt)(IDS).logits
    peft_logits, peft_model = _peft_logits(qckpt, tmp_path / "lora")
    assert float((native - base).abs().max()) > 0.05        # the adapter matters
    torch.testing.assert_close(peft_logits, native, rtol=1e-5, atol=2e-5)
    q_proj = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == scaling              # applied once, exactly
    exported = load_adapter(tmp_path / "lora")
    a = exported.tensors["model.layers.0.self_attn.q_proj"]
    assert a["lora_A"].shape == (6, 64) and a["lora_B"].shape == (64, 6)
    # Independent check of the expansion: A' = repeat_interleave(A, p, 1) / p, B' = rep(B, q, 0).
    src = load_adapter(qbara).tensors["model.layers.0.self_attn.q_proj"]
    dense = scaling * torch.kron(src["lora_B"].double() @ src["lora_A"].double(),
                                 torch.ones(repeat, pool, dtype=torch.float64) / pool)
    torch.testing.assert_close(scaling * a["lora_B"].double() @ a["lora_A"].double(), dense)


def test_compact_qbara_is_not_silently_loaded_by_peft(tmp_path):
    qckpt = _base("llama")
    qbara = tiny.random_adapter(qckpt, tmp_path / "qbara", "qbara", rank=4)
    with pytest.raises(Exception, match="size mismatch"):
        _peft_logits(qckpt, qbara)


def test_trained_lora_adapter_loads_in_peft_directly(tmp_path):
    qckpt = _base("qwen")
    lora = tiny.random_adapter(qckpt, tmp_path / "lora", "lora", rank=4, scaling=2.0,
                                       std=0.2)
    with torch.no_grad():
        native = load_model_with_adapter(qckpt, lora)(IDS).logits
    torch.testing.assert_close(_peft_logits(qckpt, lora)[0], native, rtol=1e-5, atol=2e-5)


def test_qahira_export_refused(tmp_path):
    qckpt = _base("llama")
    ad = tiny.random_adapter(qckpt, tmp_path / "qa", "qahira", pool=32, repeat=8)
    with pytest.raises(AdapterError, match="QA-HiRA adapter has no low-rank form"):
        export_peft_lora(ad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_export(tmp_path, capsys):
    qckpt = _base("llama")
    qbara = tiny.random_adapter(qckpt, tmp_path / "qbara", "qbara", rank=4)
    assert cli_main(["export", str(qbara), str(tmp_path / "out"), "--format", "peft-lora"]) == 0
    assert json.loads(capsys.readouterr().out)["r"] == 4
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert "qahira" not in cfg and cfg["r"] == 4  # plain PEFT config
    info = json.loads((tmp_path / "out" / "qahira_export.json").read_text())
    assert info["adapter_type"] == "lora" and info["pool"] == 1
    assert info["provenance"]["exported_from"]["adapter_type"] == "qbara"
    assert info["base_fingerprint"] == load_adapter(qbara).config.base_fingerprint
