"""QA-HiRA adapters served per request through vLLM's LoRA API (qahira_vllm.lora), real engines.

Per request, a QA-HiRA adds s * R_qo(M P_pi(x)) to each adapted layer; merged, the same delta is
added to the base's offsets (`qahira merge`, exact up to the offset dtype's rounding). So:
- a mixed batch [base, QA-HiRA a, Q-BaRA b, QA-HiRA c] equals each request served alone (bit for
  bit: every kernel computes a token the same way whatever its neighbours) and the trainer's
  forward (base + adapter, fp32), tokens exactly, first-token logprobs within REF_TOL;
- served per request == its merged checkpoint served without adapters: tokens equal; first-token
  logprobs within MERGED_TOL_FP16 on a float16-offset base (the merge rounds each merged offset
  once to float16: 2**-11 relative, ~1e-3 absolute on these weights) and MERGED_TOL_FP32 with
  float32 offsets (only summation order differs).
All engines are fp32, eager, one at a time (support.engine).
"""

from __future__ import annotations

import pytest

from support import tiny
from support.engine import CPU_ENGINE, run_engine
from support.hf_reference import greedy_reference

pytestmark = pytest.mark.vllm

MAX_TOKENS = 8
REF_TOL = 2e-3          # engine vs trainer forward, both fp32 (different kernels and orders)
MERGED_TOL_FP16 = 2e-2  # per request vs merged into float16 offsets
MERGED_TOL_FP32 = 2e-3  # per request vs merged into float32 offsets
LLM = {**CPU_ENGINE, "dtype": "float32", "enable_lora": True, "max_lora_rank": 8, "max_loras": 3}
# name -> random_adapter kwargs. The tiny Llama's block is 1 x 32: QA-HiRA tiles (repeat x pool)
# that hold whole blocks merge exactly.
ADAPTERS = {
    "qahira-a": dict(adapter_type="qahira", pool=32, repeat=8, scaling=2.0, std=2.0, seed=11),
    "qbara-b": dict(adapter_type="qbara", pool=2, repeat=2, rank=8, scaling=2.0, std=0.2,
                    seed=12),
    "qahira-c": dict(adapter_type="qahira", pool=64, repeat=4, scaling=1.5, std=2.0, seed=13),
}
MIXED = [None, "qahira-a", "qbara-b", "qahira-c"]


def _prompt(i: int) -> list[int]:
    return tiny.TOKEN_PROMPTS[i % len(tiny.TOKEN_PROMPTS)]


def _lora(name, dirs):
    return None if name is None else {"name": name, "id": 1 + list(ADAPTERS).index(name),
                                      "path": str(dirs[name])}


def _setup(offset_dtype: str, root):
    from qahira_vllm.merge import merge_qahira

    qckpt = tiny.tiny_qckpt("llama", block_size=(1, 32), offset_dtype=offset_dtype)
    dirs = {n: tiny.random_adapter(qckpt, root / n, **kw) for n, kw in ADAPTERS.items()}
    merged = root / "merged-a"
    merge_qahira(qckpt, dirs["qahira-a"], merged)
    return qckpt, dirs, merged


def _served(qckpt, dirs, names, tmp_path, solo=False):
    tmp_path.mkdir(parents=True, exist_ok=True)
    return run_engine({"model": str(qckpt), "max_tokens": MAX_TOKENS, "logprobs": 5,
                       "prompts": [_prompt(i) for i in range(len(names))],
                       "lora": [_lora(n, dirs) for n in names], "solo": solo,
                       "llm_kwargs": LLM}, tmp_path)


def _merged_served(merged, n_prompts, tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    return run_engine({"model": str(merged), "max_tokens": MAX_TOKENS, "logprobs": 5,
                       "prompts": [_prompt(i) for i in range(n_prompts)],
                       "llm_kwargs": {**CPU_ENGINE, "dtype": "float32"}}, tmp_path)


def _worst_logprob_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(abs(a[k] - b[k]) for k in a)


@pytest.fixture(scope="module")
def fp16_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("qahira-fp16")
    qckpt, dirs, merged = _setup("float16", root)
    served = _served(qckpt, dirs, MIXED, root / "engine", solo=True)
    return qckpt, dirs, merged, served


def test_mixed_batch_equals_each_request_alone(fp16_base):
    served = fp16_base[3]
    for i, (batched, solo) in enumerate(zip(served["outputs"], served["solo_outputs"])):
        assert batched["token_ids"] == solo["token_ids"], f"request {i} ({MIXED[i]})"
        assert batched["first_logprobs"] == solo["first_logprobs"], f"request {i} ({MIXED[i]})"


def test_mixed_batch_equals_trainer_forward(fp16_base):
    from qahira_vllm.training.model import load_model_with_adapter, load_quantized_model

    qckpt, dirs, _, served = fp16_base
    worst = 0.0
    tokens_seen = set()
    for i, name in enumerate(MIXED):
        model = (load_quantized_model(qckpt)[0] if name is None
                 else load_model_with_adapter(qckpt, dirs[name]))
        tokens, first_lp = greedy_reference(model, _prompt(i), MAX_TOKENS)
        out = served["outputs"][i]
        assert out["token_ids"] == tokens, f"request {i} ({name})"
        worst = max(worst, max(abs(lp - first_lp[int(t)].item())
                               for t, lp in out["first_logprobs"].items()))
        if name is not None:  # the adapter changes this prompt's generation
            base = greedy_reference(load_quantized_model(qckpt)[0], _prompt(i), MAX_TOKENS)[0]
            tokens_seen.add(tuple(base) != tuple(tokens))
    print(f"max |logprob - trainer forward| = {worst:.2e}")
    assert worst < REF_TOL
    assert tokens_seen == {True}


def test_per_request_equals_merged_checkpoint_fp16_offsets(fp16_base, tmp_path):
    qckpt, dirs, merged, _ = fp16_base
    names = ["qahira-a"] * len(tiny.TOKEN_PROMPTS)
    per_request = _served(qckpt, dirs, names, tmp_path / "per-request")
    merged_out = _merged_served(merged, len(names), tmp_path / "merged")
    worst = 0.0
    for i, (a, b) in enumerate(zip(per_request["outputs"], merged_out["outputs"])):
        assert a["token_ids"] == b["token_ids"], f"prompt {i}"
        worst = max(worst, _worst_logprob_diff(a["first_logprobs"], b["first_logprobs"]))
    print(f"fp16 offsets: max |logprob per request - merged| = {worst:.2e}")
    assert worst < MERGED_TOL_FP16


def test_per_request_equals_merged_checkpoint_fp32_offsets(tmp_path):
    from qahira_vllm.training.model import load_model_with_adapter

    qckpt, dirs, merged = _setup("float32", tmp_path)
    names = ["qahira-a"] * len(tiny.TOKEN_PROMPTS)
    per_request = _served(qckpt, dirs, names, tmp_path / "per-request")
    merged_out = _merged_served(merged, len(names), tmp_path / "merged")
    reference = load_model_with_adapter(qckpt, dirs["qahira-a"])
    worst_merged = worst_ref = 0.0
    for i, (a, b) in enumerate(zip(per_request["outputs"], merged_out["outputs"])):
        tokens, first_lp = greedy_reference(reference, _prompt(i), MAX_TOKENS)
        assert a["token_ids"] == b["token_ids"] == tokens, f"prompt {i}"
        worst_merged = max(worst_merged,
                           _worst_logprob_diff(a["first_logprobs"], b["first_logprobs"]))
        worst_ref = max(worst_ref, max(abs(lp - first_lp[int(t)].item())
                                       for t, lp in a["first_logprobs"].items()))
    print(f"fp32 offsets: max |logprob per request - merged| = {worst_merged:.2e}, "
          f"- fp32 reference = {worst_ref:.2e}")
    assert worst_merged < MERGED_TOL_FP32
    assert worst_ref < REF_TOL
