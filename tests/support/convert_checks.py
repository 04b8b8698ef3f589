"""Checks shared by the `qahira convert` tests: a converted checkpoint read back without
qahira_vllm code (tiny.dequant_packed_ref), and vLLM serving it like a reference model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from support import tiny


def stored_dequant(ckpt: Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(quantization_config, {layer: fp32 W by the independent reference}, all tensors) of a
    converted checkpoint folder; format 2's per-layer `layers` overrides of bits / block_size
    are read from the JSON here (not through qahira_vllm.format)."""
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    sd = tiny.load_safetensors_dir(ckpt)
    layers = {}
    for n in sd:
        if n.endswith(".qweight"):
            name = n[: -len(".qweight")]
            own = {**qc, **qc.get("layers", {}).get(name, {})}
            layers[name] = tiny.dequant_packed_ref(
                sd[n], sd[f"{name}.scales"], sd[f"{name}.offsets"], own["block_size"],
                own["bits"]).float()
    return qc, layers, sd


def assert_served_like(ckpt: Path, reference, tmp_path: Path,
                       prompts: list[list[int]] | None = None, max_tokens: int = 12,
                       llm_kwargs: dict | None = None) -> None:
    """vLLM (the qahira plugin, fp32) serving `ckpt` gives `reference`'s (a transformers
    model, fp32) greedy tokens on `prompts` (token ids; default tiny.TOKEN_PROMPTS) and its
    first-token logprobs within 1e-2. The engine runs in tmp_path / "run"; llm_kwargs: more
    LLM arguments (e.g. skip_tokenizer_init for a checkpoint without a tokenizer)."""
    from support.engine import CPU_ENGINE, run_engine
    from support.hf_reference import greedy_reference

    prompts = tiny.TOKEN_PROMPTS if prompts is None else prompts
    expected = [greedy_reference(reference, ids, max_tokens) for ids in prompts]
    (tmp_path / "run").mkdir(exist_ok=True)
    result = run_engine({"model": str(ckpt), "prompts": prompts,
                         "max_tokens": max_tokens, "logprobs": 5,
                         "llm_kwargs": {**CPU_ENGINE, "dtype": "float32", **(llm_kwargs or {})}},
                        tmp_path / "run")
    assert "qahira: using kernel" in result["log"]  # served by the plugin, not dequantized
    for (tokens, first_lp), served in zip(expected, result["outputs"]):
        assert served["token_ids"] == tokens
        for tok_id, lp in served["first_logprobs"].items():
            assert abs(lp - first_lp[int(tok_id)].item()) < 1e-2
