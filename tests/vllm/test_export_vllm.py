"""Stock vLLM LoRA serving the PEFT export of a Q-BaRA adapter == the native Q-BaRA forward.

The base is the qahira INT4 checkpoint (served by the qahira plugin); the adapter is the
expanded rank-R LoRA from `qahira export --format peft-lora`. Both sides run in fp32.
"""

from __future__ import annotations

import pytest

from support import tiny
from support.engine import CPU_ENGINE, run_engine
from support.hf_reference import greedy_reference

pytestmark = pytest.mark.vllm

MAX_TOKENS = 16
RANK = 8  # vLLM's max_lora_rank takes 8, 16, 32, ...
PROMPTS = tiny.TOKEN_PROMPTS


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from qahira_vllm.export import export_peft_lora

    qckpt = tiny.tiny_qckpt("llama", block_size=(1, 32))  # head_dim 64
    root = tmp_path_factory.mktemp("export-vllm")
    qbara = tiny.random_adapter(qckpt, root / "qbara", "qbara", pool=2, repeat=2,
                                        rank=RANK, scaling=2.0, std=0.3)
    export_peft_lora(qbara, root / "lora")
    return qckpt, qbara, root / "lora"


def test_exported_lora_served_by_stock_vllm_matches_native_qbara(exported, tmp_path):
    from qahira_vllm.checkpoint import load_reference_model
    from qahira_vllm.training.model import load_model_with_adapter

    qckpt, qbara, lora = exported
    native = load_model_with_adapter(qckpt, qbara)
    expected = [greedy_reference(native, p, MAX_TOKENS) for p in PROMPTS]
    base_tokens = [greedy_reference(load_reference_model(qckpt), p, MAX_TOKENS)[0]
                   for p in PROMPTS]
    assert [e[0] for e in expected] != base_tokens  # the adapter changes the generations

    spec = {"model": str(qckpt), "prompts": PROMPTS, "max_tokens": MAX_TOKENS, "logprobs": 5,
            "llm_kwargs": {**CPU_ENGINE, "dtype": "float32", "enable_lora": True,
                           "max_lora_rank": RANK, "max_loras": 1},
            "lora": [{"name": "qbara-export", "id": 1, "path": str(lora)}] * len(PROMPTS)}
    result = run_engine(spec, tmp_path)
    for (tokens, first_lp), served in zip(expected, result["outputs"]):
        assert served["token_ids"] == tokens
        for tok, lp in served["first_logprobs"].items():
            assert abs(lp - first_lp[int(tok)].item()) < 1e-2
