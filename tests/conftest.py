"""Shared fixtures: the real SmolLM2-135M model, its quantized checkpoints, engine runs."""

from __future__ import annotations

from pathlib import Path

import pytest

def pytest_configure(config):
    config.addinivalue_line("markers", "vllm: starts a real vLLM engine (CPU build)")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from qahira_vllm.models import fetch_model

    return fetch_model("smollm2-135m", verbose=False)


@pytest.fixture(scope="session")
def smollm2_quantized(smollm2_dir, tmp_path_factory):
    """get(bits, (bo, bi), lm_head=False) -> SmolLM2-135M quantized to that qahira format
    (built once)."""
    from qahira_vllm.quantize import quantize_model

    built: dict = {}

    def get(bits: int, block: tuple[int, int], lm_head: bool = False) -> Path:
        key = (bits, block, lm_head)
        if key not in built:
            name = f"smollm2-int{bits}-{block[0]}x{block[1]}" + ("-lm_head" if lm_head else "")
            out = tmp_path_factory.mktemp(name) / "ckpt"
            quantize_model(smollm2_dir, out, bits=bits, block_size=block, progress=False,
                           lm_head=lm_head)
            built[key] = out
        return built[key]

    return get


@pytest.fixture(scope="session")
def tiny_llama_tp(smollm2_dir, tmp_path_factory) -> Path:
    """A random Llama with SmolLM2's tokenizer whose head counts allow tensor parallel 2
    (SmolLM2-135M has 9 heads, so it cannot be split in two). Weights are drawn wider than
    usual so that greedy choices have clear margins."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama-tp") / "model"
    cfg = AutoConfig.from_pretrained(smollm2_dir)
    cfg.update(dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                    initializer_range=0.08))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(out)
    for f in smollm2_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name == "chat_template.jinja":
            shutil.copy2(f, out / f.name)
    return out
