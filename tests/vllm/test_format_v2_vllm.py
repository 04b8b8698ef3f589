"""vLLM serves a format-2 checkpoint (per-layer bits / block, float32 scales) exactly, and
Q-BaRA / QA-HiRA adapters per request on it.

The checkpoint is tiny.tiny_qckpt_v2 (tiny.V2_OVERRIDES): q/k/v 8-bit 1x32 (one vLLM layer),
down_proj 8-bit 1x16, layer 1's gate/up 4-bit 2x64, the rest 4-bit 1x32; every scale fp32.
Reference: transformers in fp32 running weights rebuilt here from the stored tensors by
tiny.dequant_v2_ref (the layer's bits / block read from the raw config, s * q + o as two fp32
operations), without qahira_vllm code. vLLM runs fp32 too, so the greedy tokens must match and
the first-token logprobs agree within BASE_TOL.

The same engine (enable_lora) serves one batch: every prompt base-only, then with a Q-BaRA and
with a QA-HiRA adapter (tiny.random_adapter on this checkpoint, every linear layer adapted).
Each adapter's reference is the same dequantized weights plus its dense delta, built here by
index from the adapter file's tensors and config (tiny.expand_ref, float64):
    Q-BaRA   dW = s * B[o // q, :] @ A[:, i // p] / p
    QA-HiRA  dW = s * M[o // qo, i // pi] / pi
(docs/FORMAT.md section 2), not by the serving code or adapter_math. Greedy tokens must equal the
reference's and first-token logprobs agree within ADAPTER_TOL; the base-only requests of the same
batch must still equal the base reference.
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
# Measured (2-core Xeon, AVX-512): base 9.5e-7, Q-BaRA 1.9e-6, QA-HiRA 2.6e-6: fp32 rounding
# only (summation order), so a weight or an adapter delta off by any real amount fails these
# (a scaling 1% too high moved the adapters' logprobs by 7e-2).
BASE_TOL = 1e-4
ADAPTER_TOL = 1e-4
# name -> tiny.random_adapter kwargs, every linear layer adapted. Layers are [out, in] with out
# in {64, 128, 256} and in in {128, 256}: p, q, pi, qo divide them all. The QA-HiRA tiles
# (qo x pi = 4 x 64) also hold whole blocks of every layer's block (1x32, 1x16, 2x64), as an
# exact `qahira merge` would need; serving does not.
ADAPTERS = {
    "qbara": dict(adapter_type="qbara", pool=2, repeat=2, rank=8, scaling=2.0, std=0.2, seed=21),
    "qahira": dict(adapter_type="qahira", pool=64, repeat=4, scaling=2.0, std=2.0, seed=22),
}
# One batch: each prompt base-only, then each prompt with each adapter.
REQUESTS = [(name, i) for name in (None, *ADAPTERS) for i in range(len(tiny.TOKEN_PROMPTS))]
LLM = {**CPU_ENGINE, "dtype": "float32", "enable_lora": True, "max_lora_rank": 8,
       "max_loras": len(ADAPTERS)}


def _dequantized(ckpt):
    """(HF config without quantization_config, fp32 state dict of the dequantized weights)."""
    from transformers import AutoConfig

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
    return config, sd


def _model(config, sd):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return model.eval()


def _with_adapter(sd, adapter_dir):
    """sd with each adapted layer's weight + the adapter's dense delta (float64 sum, then
    fp32), read from the adapter folder by safetensors / json only."""
    from safetensors.torch import load_file

    q = json.loads((adapter_dir / "adapter_config.json").read_text())["qahira"]
    s, p, r = q["scaling"], q["pool"], q["repeat"]
    stored = load_file(str(adapter_dir / "adapter_model.safetensors"))
    by_layer = {}
    for name, t in stored.items():  # base_model.model.{layer}.{kind}.weight
        layer, _, kind = name[len("base_model.model."): -len(".weight")].rpartition(".")
        by_layer.setdefault(layer, {})[kind] = t
    assert sorted(by_layer) == sorted(tiny.linear_layer_names())
    out = dict(sd)
    for layer, t in by_layer.items():
        w = sd[f"{layer}.weight"]
        if q["adapter_type"] == "qahira":
            delta = s * tiny.expand_ref(t["qahira_M"], (r, p), w.shape) / p
        else:
            rank = t["lora_A"].shape[0]
            delta = s * (tiny.expand_ref(t["lora_B"], (r, 1), (w.shape[0], rank))
                         @ tiny.expand_ref(t["lora_A"], (1, p), (rank, w.shape[1]))) / p
        out[f"{layer}.weight"] = (w.double() + delta).float()
    return out


def _worst_first_logprob_diff(out, first_lp) -> float:
    return max(abs(lp - first_lp[int(t)].item()) for t, lp in out["first_logprobs"].items())


def test_vllm_serves_v2_mixed_fp32_scales_like_the_reference(tmp_path):
    ckpt = tiny.tiny_qckpt_v2()
    dirs = {n: tiny.random_adapter(ckpt, tmp_path / n, **kw) for n, kw in ADAPTERS.items()}
    config, sd = _dequantized(ckpt)
    models = {None: _model(config, sd),
              **{n: _model(config, _with_adapter(sd, d)) for n, d in dirs.items()}}
    expected = [greedy_reference(models[n], tiny.TOKEN_PROMPTS[i], MAX_TOKENS)
                for n, i in REQUESTS]
    lora = [None if n is None else {"name": n, "id": 1 + list(ADAPTERS).index(n),
                                    "path": str(dirs[n])} for n, _ in REQUESTS]
    result = run_engine({"model": str(ckpt), "lora": lora, "max_tokens": MAX_TOKENS,
                         "prompts": [tiny.TOKEN_PROMPTS[i] for _, i in REQUESTS], "logprobs": 5,
                         "dump_qahira": str(tmp_path / "served.safetensors"),
                         "llm_kwargs": LLM}, tmp_path)
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
    worst = dict.fromkeys((None, *ADAPTERS), 0.0)
    for (name, i), (tokens, first_lp), out in zip(REQUESTS, expected, result["outputs"]):
        assert out["token_ids"] == tokens, f"prompt {i}, adapter {name}"
        worst[name] = max(worst[name], _worst_first_logprob_diff(out, first_lp))
    print("max |first-token logprob - reference|: "
          + ", ".join(f"{n or 'base'} {w:.2e}" for n, w in worst.items()))
    assert worst[None] < BASE_TOL
    assert max(worst[n] for n in ADAPTERS) < ADAPTER_TOL
    # each adapter changes what is generated (else its requests would test the base again)
    base = {i: tokens for (n, i), (tokens, _) in zip(REQUESTS, expected) if n is None}
    for name in ADAPTERS:
        assert any(tokens != base[i] for (n, i), (tokens, _) in zip(REQUESTS, expected)
                   if n == name), name
