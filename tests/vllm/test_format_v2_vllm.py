"""vLLM serves a format-2 checkpoint (per-layer bits / block, float32 scales) exactly.

The checkpoint is tiny.tiny_qckpt_v2 (tiny.V2_OVERRIDES): q/k/v 8-bit 1x32 (one vLLM layer),
down_proj 8-bit 1x16, layer 1's gate/up 4-bit 2x64, the rest 4-bit 1x32; every scale fp32.
Reference: transformers in fp32 running weights rebuilt here from the stored tensors by
tiny.dequant_v2_ref (the layer's bits / block read from the raw config, s * q + o as two fp32
operations), without qahira_vllm code. vLLM runs fp32 too, so the greedy tokens must match and
the first-token logprobs agree within 1e-2 (as the other engine tests).
"""

from __future__ import annotations

import json

import pytest
import torch

from support import tiny
from support.engine import CPU_ENGINE, run_engine
from support.hf_reference import greedy_reference

pytestmark = pytest.mark.vllm

MAX_TOKENS = 12


def _reference(ckpt):
    from transformers import AutoConfig, AutoModelForCausalLM

    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    stored = tiny.load_safetensors_dir(ckpt)
    sd = {k: v for k, v in stored.items() if k.rpartition(".")[2] not in
          ("qweight", "scales", "offsets")}
    for name in [n for n in stored if n.endswith(".qweight")]:
        layer = name[: -len(".qweight")]
        sd[f"{layer}.weight"] = tiny.dequant_v2_ref(
            qc, layer, *(stored[f"{layer}.{k}"] for k in ("qweight", "scales", "offsets")))
    config = AutoConfig.from_pretrained(ckpt)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return model.eval()


def test_vllm_serves_v2_mixed_fp32_scales_like_the_reference(tmp_path):
    ckpt = tiny.tiny_qckpt_v2()
    reference = _reference(ckpt)
    expected = [greedy_reference(reference, ids, MAX_TOKENS) for ids in tiny.TOKEN_PROMPTS]
    result = run_engine({"model": str(ckpt), "prompts": tiny.TOKEN_PROMPTS,
                         "max_tokens": MAX_TOKENS, "logprobs": 5,
                         "dump_qahira": str(tmp_path / "served.safetensors"),
                         "llm_kwargs": {**CPU_ENGINE, "dtype": "float32"}}, tmp_path)
    log = result["log"]
    assert set(result["qahira_kernels"].values()) == {"cpu_blockwise"}
    assert len(result["qahira_kernels"]) == 2 * 4  # qkv, o, gate_up, down per decoder layer
    # what vLLM loaded: the stored tensors, fused groups stacked in checkpoint order
    served, stored = tiny.load_safetensors_dir(tmp_path), tiny.load_safetensors_dir(ckpt)
    for i in range(2):
        for fused, members in (("self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj")),
                               ("mlp.gate_up_proj", ("gate_proj", "up_proj"))):
            parent = f"model.layers.{i}.{fused.split('.')[0]}"
            for k in ("qweight", "scales", "offsets"):
                assert torch.equal(served[f"model.layers.{i}.{fused}.{k}"], torch.cat(
                    [stored[f"{parent}.{m}.{k}"] for m in members])), (i, fused, k)
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            for k in ("qweight", "scales", "offsets"):
                key = f"model.layers.{i}.{name}.{k}"
                assert torch.equal(served[key], stored[key]), key
    # fp32 scales: the fp16-scale kernels refuse, the exact general path serves every layer
    assert "qahira: using kernel cpu_blockwise" in log
    assert "float16 scales only (float32 scales)" in log
    for (tokens, first_lp), out in zip(expected, result["outputs"]):
        assert out["token_ids"] == tokens
        for tok_id, lp in out["first_logprobs"].items():
            assert abs(lp - first_lp[int(tok_id)].item()) < 1e-2
