"""`LLM(float_model, quantization="qahira")`: online quantization in the real vLLM engine (CPU).

Two engine starts on the tiny float Llama (bf16 on disk, served in fp32), both with the online
defaults: TP=1, reading back the tensors the engine holds, and TP=2. The references are
`qahira quantize` of the same folder with its defaults (the tensors, bitwise) and transformers
running that checkpoint's dequantized weights (the greedy tokens and first logprobs; the
engine serving that checkpoint matches the same reference, tests/vllm/test_quantized_engine.py).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from support.engine import CPU_ENGINE, TP2_ENV, run_engine
from support.hf_reference import PROMPTS, greedy_reference

pytestmark = pytest.mark.vllm

MAX_TOKENS = 16
LOGPROB_TOL = 1e-2  # as tests/vllm/test_quantized_engine.py
# vLLM's fused Llama layers -> the checkpoint modules stacked in them, in order.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _spec(model, prompt_ids, **llm_kwargs):
    return {"model": str(model), "prompts": prompt_ids, "max_tokens": MAX_TOKENS, "logprobs": 5,
            "llm_kwargs": {**CPU_ENGINE, "dtype": "float32", "quantization": "qahira",
                           **llm_kwargs}}


@pytest.fixture(scope="module")
def prompt_ids(tiny_llama_tp):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_tp)
    return [tok(p).input_ids for p in PROMPTS]


@pytest.fixture(scope="module")
def offline_ckpt(tiny_llama_tp, tmp_path_factory):
    """`qahira quantize` of the float model with its defaults."""
    from qahira_vllm.quantize import quantize_model

    out = tmp_path_factory.mktemp("online-ref") / "ckpt"
    quantize_model(tiny_llama_tp, out, progress=False)
    return out


@pytest.fixture(scope="module")
def reference(offline_ckpt, prompt_ids):
    from qahira_vllm.checkpoint import load_reference_model

    ref = load_reference_model(offline_ckpt, torch.float32)
    return [greedy_reference(ref, ids, MAX_TOKENS) for ids in prompt_ids]


@pytest.fixture(scope="module")
def online_tp1(tiny_llama_tp, prompt_ids, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("online-tp1")
    spec = {**_spec(tiny_llama_tp, prompt_ids), "dump_qahira": str(tmp / "held.safetensors")}
    return {**run_engine(spec, tmp), "held": load_file(tmp / "held.safetensors")}


def _assert_matches_reference(result, reference):
    for out, (ref_tokens, ref_lp) in zip(result["outputs"], reference):
        assert out["token_ids"] == ref_tokens
        for tok, lp in out["first_logprobs"].items():
            assert abs(lp - ref_lp[int(tok)].item()) < LOGPROB_TOL


def test_engine_holds_the_tensors_of_qahira_quantize(online_tp1, offline_ckpt):
    held, stored = online_tp1["held"], load_file(offline_ckpt / "model.safetensors")
    assert "quantization of the float weights at load: 4 bits, block [1, 64]" in online_tp1["log"]
    # Every linear layer but lm_head, none left in float; lm_head / embeddings stay float.
    assert sorted(online_tp1["qahira_kernels"]) == sorted(
        f"model.layers.{i}.{m}" for i in range(2)
        for m in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"))
    assert not any(k.startswith("lm_head") for k in stored)
    compared = 0
    for name, t in held.items():
        module, tensor = name.rsplit(".", 1)
        parent, leaf = module.rsplit(".", 1)
        ref = torch.cat([stored[f"{parent}.{m}.{tensor}"] for m in FUSED.get(leaf, (leaf,))])
        assert t.dtype == ref.dtype and torch.equal(t, ref), name
        compared += 1
    assert compared == 3 * len(online_tp1["qahira_kernels"])  # qweight, scales, offsets each


def test_tp1_tokens_match_the_offline_checkpoint(online_tp1, reference):
    _assert_matches_reference(online_tp1, reference)


def test_tp2_matches_tp1(online_tp1, reference, tiny_llama_tp, prompt_ids, tmp_path):
    """Each rank quantizes its own shard: equal to quantizing the whole tensor, since the
    1x64 blocks never straddle a shard (o_proj / down_proj: 128 / 256 input columns per rank)."""
    tp2 = run_engine(_spec(tiny_llama_tp, prompt_ids, tensor_parallel_size=2), tmp_path,
                     env=TP2_ENV)
    for a, b in zip(online_tp1["outputs"], tp2["outputs"]):
        assert a["token_ids"] == b["token_ids"]
        for tok, lp in a["first_logprobs"].items():
            assert abs(lp - b["first_logprobs"][tok]) < LOGPROB_TOL
    _assert_matches_reference(tp2, reference)
