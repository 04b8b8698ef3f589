"""The real vLLM engine (CPU build) serving qahira checkpoints of SmolLM2-135M.

Reference: transformers running the checkpoint's dequantized weights in fp32. The engine runs
in fp32 too, so both compute the same function: greedy tokens must match exactly, and the
first-token logprobs of vLLM's top-5 within LOGPROB_TOL (observed ~1e-4; the bound leaves room
for different attention/GEMM summation orders).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from support.engine import CPU_ENGINE, TP2_ENV, EngineFailed, run_engine
from support.hf_reference import PROMPTS, greedy_reference

pytestmark = pytest.mark.vllm

MAX_TOKENS = 16
LOGPROB_TOL = 1e-2


def _engine_spec(model, prompt_ids, **llm_kwargs):
    return {"model": str(model), "prompts": prompt_ids, "max_tokens": MAX_TOKENS, "logprobs": 5,
            "llm_kwargs": {**CPU_ENGINE, "dtype": "float32", **llm_kwargs}}


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return [tokenizer(p).input_ids for p in PROMPTS]


def _compare_to_reference(result, ckpt, prompt_ids):
    from qahira_vllm.checkpoint import load_reference_model

    ref = load_reference_model(ckpt, torch.float32)
    worst = 0.0
    for ids, out in zip(prompt_ids, result["outputs"]):
        ref_tokens, ref_lp = greedy_reference(ref, ids, MAX_TOKENS)
        assert out["token_ids"] == ref_tokens, (ckpt, ids)
        for tok, lp in out["first_logprobs"].items():
            worst = max(worst, abs(lp - ref_lp[int(tok)].item()))
    assert worst < LOGPROB_TOL
    return worst


@pytest.mark.parametrize("bits,block,lm_head", [(4, (1, 64), False), (8, (1, 64), False),
                                               (4, (8, 4), False), (4, (1, 64), True)],
                         ids=["int4-1x64", "int8-1x64", "int4-8x4", "int4-1x64-lm_head"])
def test_engine_matches_dequantized_reference(bits, block, lm_head, smollm2_quantized,
                                              prompt_ids, tmp_path):
    """lm_head=True: SmolLM2 ties its embeddings; the checkpoint is untied and lm_head runs
    through qahira's linear method (vocab-parallel), the embedding lookup stays float."""
    ckpt = smollm2_quantized(bits, block, lm_head)
    # No quantization argument: the method is auto-detected from config.json.
    result = run_engine(_engine_spec(ckpt, prompt_ids), tmp_path)
    _compare_to_reference(result, ckpt, prompt_ids)


@pytest.fixture(scope="module")
def tiny_tp_int4(tiny_llama_tp, tmp_path_factory):
    """INT4 1x64 with lm_head also converted: every layer the plugin shards at TP=2 (column- and
    row-parallel, fused qkv / gate_up, and lm_head's vocabulary rows split across ranks) in one
    checkpoint; a float lm_head is vLLM's own layer."""
    from qahira_vllm.quantize import quantize_model

    out = tmp_path_factory.mktemp("tiny-tp-int4") / "ckpt"
    quantize_model(tiny_llama_tp, out, bits=4, block_size=(1, 64), progress=False,
                   lm_head=True)
    return out


def test_tensor_parallel_2_matches_tp1(tiny_tp_int4, prompt_ids, tmp_path):
    (tmp_path / "tp1").mkdir()
    (tmp_path / "tp2").mkdir()
    tp1 = run_engine(_engine_spec(tiny_tp_int4, prompt_ids, quantization="qahira"),
                     tmp_path / "tp1")
    tp2 = run_engine(_engine_spec(tiny_tp_int4, prompt_ids, quantization="qahira",
                                  tensor_parallel_size=2), tmp_path / "tp2", env=TP2_ENV)
    for a, b in zip(tp1["outputs"], tp2["outputs"]):
        assert a["token_ids"] == b["token_ids"]
        for tok, lp in a["first_logprobs"].items():
            assert abs(lp - b["first_logprobs"][tok]) < LOGPROB_TOL
    _compare_to_reference(tp2, tiny_tp_int4, prompt_ids)


def test_tensor_parallel_block_straddling_shard_is_refused(tiny_llama_tp, prompt_ids,
                                                           tmp_path):
    # o_proj has 256 input columns: 128 per rank at TP=2, not a multiple of bi=256.
    from qahira_vllm.quantize import quantize_model

    ckpt = tmp_path / "int4-1x256"
    quantize_model(tiny_llama_tp, ckpt, bits=4, block_size=(1, 256), progress=False)
    with pytest.raises(EngineFailed) as err:
        run_engine(_engine_spec(ckpt, prompt_ids[:1], tensor_parallel_size=2), tmp_path,
                   env=TP2_ENV)
    log = err.value.log
    assert "o_proj" in log and "input shard of 128 columns" in log and "bi=256" in log, log[-3000:]


def test_misshaped_tensor_is_refused_before_serving(smollm2_quantized, prompt_ids, tmp_path):
    import shutil

    src = smollm2_quantized(4, (1, 64))
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    sd = load_file(bad / "model.safetensors")
    name = "model.layers.3.mlp.down_proj.scales"
    sd[name] = sd[name][:, :-1].contiguous()  # [576, 24] -> [576, 23]
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(EngineFailed) as err:
        run_engine(_engine_spec(bad, prompt_ids[:1]), tmp_path)
    log = err.value.log
    assert name in log and "[576, 24]" in log and "torch.float16" in log, log[-3000:]


def test_unknown_bits_is_refused(smollm2_quantized, prompt_ids, tmp_path):
    import shutil

    src = smollm2_quantized(4, (1, 64))
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 3
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EngineFailed) as err:
        run_engine(_engine_spec(bad, prompt_ids[:1]), tmp_path)
    assert "bits=3" in err.value.log and "(4, 8)" in err.value.log


def test_qwen2_style_with_qkv_bias(tmp_path):
    """Qwen2 projections carry a bias; vLLM merges q/k/v (and their biases) into one layer.

    The same engine run serves the checkpoint sharded (index + shards) with a stale
    model.safetensors of another model beside the shards: vLLM's loader reads only the files
    the index names (weight_utils.filter_duplicate_safetensors_files), as our readers (the
    reference) do, so the stale file must change nothing."""
    import shutil

    from huggingface_hub import save_torch_state_dict
    from support.tiny import make_model_dir

    from qahira_vllm.checkpoint import load_reference_model
    from qahira_vllm.quantize import quantize_model

    src = make_model_dir(tmp_path / "qwen2", arch="qwen2", seed=3)
    ckpt = tmp_path / "qwen2-int4-2x32"
    quantize_model(src, ckpt, bits=4, block_size=(2, 32), progress=False)
    stale = tmp_path / "stale"
    quantize_model(make_model_dir(tmp_path / "qwen2-other", arch="qwen2", seed=4), stale,
                   bits=4, block_size=(2, 32), progress=False)
    tensors = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    save_torch_state_dict(tensors, ckpt, max_shard_size="200KB")
    assert (ckpt / "model.safetensors.index.json").exists()
    shutil.copy(stale / "model.safetensors", ckpt / "model.safetensors")
    prompts = [[5, 17, 42, 99, 3], [200, 11, 7], [64, 65, 66, 67, 68, 69]]
    spec = _engine_spec(ckpt, prompts, skip_tokenizer_init=True, max_model_len=128)
    result = run_engine(spec, tmp_path)
    _compare_to_reference(result, ckpt, prompts)
    # Had the stale file been served, the tokens would differ: the check above has teeth.
    ref_stale = load_reference_model(stale, torch.float32)
    assert any(out["token_ids"] != greedy_reference(ref_stale, ids, MAX_TOKENS)[0]
               for ids, out in zip(prompts, result["outputs"]))


GQA = dict(hidden=128, intermediate=256, layers=2, heads=2, kv_heads=1)  # q out 128, k/v out 64
TOKEN_PROMPTS = [[5, 17, 42, 99, 3], [200, 11, 7], [64, 65, 66, 67, 68, 69]]


@pytest.fixture(scope="module")
def gqa_src(tmp_path_factory):
    from support.tiny import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("gqa") / "llama", "llama", seed=4, **GQA)


@pytest.mark.parametrize("kwargs", [
    dict(block_size=(1, 32), skip=("model.layers.0.self_attn.q_proj",
                                   "model.layers.1.mlp.gate_proj")),
    dict(block_size=(128, 32), keep_unconvertible=True),  # fits q, not k/v
], ids=["skip-one-member", "block-fits-one-member"])
def test_partly_converted_fused_groups_serve(gqa_src, tmp_path, kwargs):
    """`quantize` keeps a fused group (qkv_proj, gate_up_proj) whole; vLLM serves the result."""
    from qahira_vllm.quantize import quantize_model

    ckpt = tmp_path / "ckpt"
    summary = quantize_model(gqa_src, ckpt, bits=4, progress=False, **kwargs)
    assert summary["notes"]
    result = run_engine(_engine_spec(ckpt, TOKEN_PROMPTS, skip_tokenizer_init=True,
                                     max_model_len=128), tmp_path)
    _compare_to_reference(result, ckpt, TOKEN_PROMPTS)


def test_non_finite_offsets_are_refused_before_serving(gqa_src, tmp_path):
    from qahira_vllm.quantize import quantize_model

    ckpt = tmp_path / "ckpt"
    quantize_model(gqa_src, ckpt, bits=4, block_size=(1, 32), progress=False)
    name = "model.layers.1.mlp.down_proj.offsets"
    sd = load_file(ckpt / "model.safetensors")
    sd[name][3, 2] = float("nan")
    save_file(sd, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(EngineFailed) as err:
        run_engine(_engine_spec(ckpt, TOKEN_PROMPTS[:1], skip_tokenizer_init=True,
                                max_model_len=128), tmp_path)
    log = err.value.log
    assert name in log and "nan at block [3, 2]" in log, log[-3000:]
