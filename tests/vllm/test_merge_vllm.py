"""vLLM serving a QA-HiRA-merged checkpoint == the trainer's forward of base + adapter.

The merged checkpoint is an ordinary qahira checkpoint (no adapter at serving time). Both sides
run in fp32; the merge rounds each offset once to float16, so greedy tokens must match and the
first-token logprobs agree closely.
"""

from __future__ import annotations

import pytest

from support import tiny
from support.engine import CPU_ENGINE, run_engine
from support.hf_reference import greedy_reference

pytestmark = pytest.mark.vllm

MAX_TOKENS = 16
PROMPTS = tiny.TOKEN_PROMPTS


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    from qahira_vllm.merge import merge_qahira

    qckpt = tiny.tiny_qckpt("llama", block_size=(1, 32))  # head_dim 64
    root = tmp_path_factory.mktemp("merge-vllm")
    adapter = tiny.random_adapter(qckpt, root / "qahira", "qahira", pool=32, repeat=8,
                                          scaling=2.0, std=2.0)
    out = root / "merged"
    merge_qahira(qckpt, adapter, out)
    return qckpt, adapter, out


def test_merged_checkpoint_served_by_vllm_matches_trainer_forward(merged, tmp_path):
    from qahira_vllm.checkpoint import load_reference_model
    from qahira_vllm.training.model import load_model_with_adapter

    qckpt, adapter, out = merged
    trainer_model = load_model_with_adapter(qckpt, adapter)
    base_model = load_reference_model(qckpt)
    expected = [greedy_reference(trainer_model, p, MAX_TOKENS) for p in PROMPTS]
    base_tokens = [greedy_reference(base_model, p, MAX_TOKENS)[0] for p in PROMPTS]
    assert [e[0] for e in expected] != base_tokens  # the adapter changes the generations

    result = run_engine({"model": str(out), "prompts": PROMPTS, "max_tokens": MAX_TOKENS,
                         "logprobs": 5, "llm_kwargs": {**CPU_ENGINE, "dtype": "float32"}},
                        tmp_path)
    for (tokens, first_lp), served in zip(expected, result["outputs"]):
        assert served["token_ids"] == tokens
        for tok, lp in served["first_logprobs"].items():
            assert abs(lp - first_lp[int(tok)].item()) < 1e-2
