"""Plain PEFT LoRAs using PEFT's targeting and per-layer options, served by a real vLLM engine
on a qahira INT4 base with our native LoRA layers (the default with the plugin), against PEFT's
own forward (PeftModel on the dequantized base, fp32). Issue 11, part 5.

One engine (fp32, eager) serves one adapter per option (tiny.PEFT_OPTIONS: target_modules
as a list and as a regex, layers_to_transform + layers_pattern, exclude_modules, rank_pattern,
alpha_pattern, rsLoRA with a rank_pattern) plus one base-only request, in one batch.

Scaling: vLLM folds each layer's PEFT scaling into B once at load, in the LoRA dtype (here fp32):
B_served = fl32(B * fl32(s)), within 2^-23 relative of s * B (exact for s a power of two); our
layers then apply scaling 1. Tolerance: greedy tokens equal; first-token logprobs within
LOGPROB_TOL of PEFT's (fp32 INT4 kernel vs dequantized fp32 matmul: different summation orders,
measured max 2.4e-6 here).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm

MAX_TOKENS = 8
MAX_RANK = 8
LOGPROB_TOL = 1e-3


# ----------------------------------------------------------------------------- engine script

def _engine_main(spec_path: str, out_path: str) -> None:
    """The engine: the bad adapter first (add_lora, its error recorded), then the batch, and
    the LoRA wrapper classes vLLM put on the model (in this process: the uni executor)."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    spec = json.load(open(spec_path))
    llm = LLM(spec["model"], **spec["llm_kwargs"])
    result = {"bad_lora_error": None}
    try:
        llm.llm_engine.add_lora(LoRARequest("bad", 99, spec["bad_lora"]))
    except Exception as e:  # noqa: BLE001 - the message is what the test checks
        result["bad_lora_error"] = str(e)
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], logprobs=5,
                            ignore_eos=True)
    reqs = [LoRARequest(r["name"], r["id"], r["path"]) if r else None for r in spec["lora"]]
    outs = llm.generate([{"prompt_token_ids": p} for p in spec["prompts"]], params,
                        lora_request=reqs, use_tqdm=False)
    result["outputs"] = [{"token_ids": list(o.outputs[0].token_ids),
                          "first_logprobs": {str(k): v.logprob
                                             for k, v in o.outputs[0].logprobs[0].items()}}
                         for o in outs]
    model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    result["lora_classes"] = sorted({type(m).__name__ for _, m in model.named_modules()
                                     if type(m).__name__.endswith("WithLoRA")})
    json.dump(result, open(out_path, "w"))


# ----------------------------------------------------------------------------- test

@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    from support import tiny

    qckpt = tiny.tiny_qckpt("llama", block_size=(1, 32))
    root = tmp_path_factory.mktemp("peft-targeting")
    dirs = {name: tiny.peft_adapter(qckpt, root / name, seed=i, std=0.1, **kw)
            for i, (name, kw) in enumerate(tiny.PEFT_OPTIONS.items())}
    # Bad: tensors for a layer the config excludes (PEFT would never have saved them).
    bad = root / "bad-excluded-layer"
    shutil.copytree(dirs["exclude"], bad)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(bad / "adapter_model.safetensors"))
    ref = "base_model.model.model.layers.0.mlp.up_proj"
    gate = "base_model.model.model.layers.0.mlp.gate_proj"
    for kind in ("lora_A", "lora_B"):
        tensors[f"{gate}.{kind}.weight"] = tensors[f"{ref}.{kind}.weight"].clone()
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    return qckpt, dirs, bad


def test_peft_options_served_exactly_as_peft(adapters, tmp_path):
    from support import tiny
    from support.engine import CPU_ENGINE, run_engine
    from support.hf_reference import greedy_reference

    from qahira_vllm.checkpoint import load_reference_model

    PROMPTS = tiny.TOKEN_PROMPTS
    qckpt, dirs, bad = adapters
    names = [*dirs, None]  # one request per adapter, then the base alone
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    expected = []
    for name, prompt in zip(names, prompts):
        model = (tiny.peft_reference(qckpt, dirs[name]) if name
                 else load_reference_model(qckpt))
        expected.append(greedy_reference(model, prompt, MAX_TOKENS))
    base = [greedy_reference(load_reference_model(qckpt), p, MAX_TOKENS)[1] for p in prompts]

    spec = {"model": str(qckpt), "prompts": prompts, "max_tokens": MAX_TOKENS, "logprobs": 5,
            "llm_kwargs": {**CPU_ENGINE, "dtype": "float32", "enable_lora": True,
                           "max_lora_rank": MAX_RANK, "max_loras": len(dirs)},
            "lora": [{"name": n, "id": i + 1, "path": str(dirs[n])} if n else None
                     for i, n in enumerate(names)], "bad_lora": str(bad)}
    result = run_engine(spec, tmp_path, script=Path(__file__))
    # Our layers served (not vLLM's stock ones), and our loader's checks ran in the worker.
    assert "QbaraQKVParallelLinearWithLoRA" in result["lora_classes"]
    assert "QKVParallelLinearWithLoRA" not in result["lora_classes"]
    error = result["bad_lora_error"] or ""
    assert "qahira: adapter rejected 'bad'" in error
    assert "model.layers.0.mlp.gate_proj" in error and "PEFT does not adapt them" in error
    worst = 0.0
    for name, (tokens, first_lp), base_lp, served in zip(names, expected, base,
                                                         result["outputs"]):
        assert served["token_ids"] == tokens, name
        for tok, lp in served["first_logprobs"].items():
            worst = max(worst, abs(lp - first_lp[int(tok)].item()))
            assert abs(lp - first_lp[int(tok)].item()) < LOGPROB_TOL, (name, tok)
        if name:  # the adapter really changes the distribution (else nothing is tested)
            assert (first_lp - base_lp).abs().max() > 100 * LOGPROB_TOL, name
    print(f"max |served - PEFT| first-token logprob: {worst:.2e}")


if __name__ == "__main__":
    _engine_main(sys.argv[1], sys.argv[2])
