"""transformers' from_pretrained on qahira checkpoints (qahira_vllm.hf_quantizer).

References: the stored tensors as safetensors reads them, and load_reference_model (transformers
running the dequantized fp32 weights, built without the quantizer). Logit tolerance LOGIT_TOL
(fp32 vs fp32): QuantLinear rebuilds W bit for bit (the C kernel equals quant_math.dequantize)
and runs the same F.linear, so the measured difference is 0.0 on every checkpoint below (Xeon,
2 cores, avx512 + amx); the bound leaves room for a BLAS that blocks differently.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from support import tiny
from support.lm_eval_task import write_task
import qahira_vllm  # noqa: F401  (registers quant_method "qahira" with transformers)
from qahira_vllm.adapter_format import checkpoint_fingerprint
from qahira_vllm.checkpoint import load_reference_model, read_headers
from qahira_vllm.format import QUANT_TENSOR_SUFFIXES, QahiraFormatError
from qahira_vllm.training.qlinear import QuantLinear

LOGIT_TOL = dict(rtol=1e-5, atol=1e-5)
IDS = torch.tensor([[5, 80, 33, 101, 7, 250, 64, 12, 90, 3]])
SMALL = dict(hidden=64, intermediate=128, heads=2, kv_heads=1)

CASES = {
    "llama-4bit-1x32-fp16": dict(arch="llama"),
    "qwen2-8bit-4x8-fp32": dict(arch="qwen2", bits=8, block_size=(4, 8), offset_dtype="float32",
                                tie=True),
    "qwen2-4bit-2x16-fp32-lmhead": dict(arch="qwen2", block_size=(2, 16),
                                        offset_dtype="float32", lm_head=True, tie=True),
}


def _ckpt(name: str) -> Path:
    return tiny.tiny_qckpt(**CASES[name], **SMALL)


def _from_pretrained(path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **kw)


@pytest.mark.parametrize("name", list(CASES))
def test_from_pretrained_keeps_packed_tensors_and_matches_reference(name):
    path = _ckpt(name)
    model = _from_pretrained(path)
    stored = tiny.load_safetensors_dir(path)
    quantized = {n.rpartition(".")[0] for n in read_headers(path) if n.endswith(".qweight")}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert set(layers) == quantized and len(quantized) == 14 + ("lmhead" in name)
    if "lmhead" in name:
        assert isinstance(model.lm_head, QuantLinear)
    for n, m in layers.items():
        for s in QUANT_TENSOR_SUFFIXES:  # dtypes and bits exactly as stored
            t = getattr(m, s)
            assert t.dtype == stored[f"{n}.{s}"].dtype and torch.equal(t, stored[f"{n}.{s}"])
        assert (m.bias is None) == (f"{n}.bias" not in stored)
    assert model.config.quantization_config.bits == CASES[name].get("bits", 4)
    ref = load_reference_model(path)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref(IDS).logits, **LOGIT_TOL)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(IDS, **kw), ref.generate(IDS, **kw))


def test_bf16_load_keeps_stored_dtypes():
    path = _ckpt("qwen2-8bit-4x8-fp32")
    model = _from_pretrained(path, dtype=torch.bfloat16)
    q = model.model.layers[0].self_attn.q_proj
    assert (q.qweight.dtype, q.scales.dtype, q.offsets.dtype, q.bias.dtype) == (
        torch.uint8, torch.float16, torch.float32, torch.bfloat16)
    ref = load_reference_model(path)
    with torch.no_grad():  # bf16 activations vs the fp32 reference: loose, but the same model
        torch.testing.assert_close(model(IDS).logits.float(), ref(IDS).logits, rtol=0.05,
                                   atol=0.05)


def test_save_pretrained_round_trips_the_checkpoint(tmp_path):
    path = _ckpt("qwen2-4bit-2x16-fp32-lmhead")
    model = _from_pretrained(path)
    model.save_pretrained(tmp_path / "resaved")
    assert checkpoint_fingerprint(tmp_path / "resaved") == checkpoint_fingerprint(path)
    again = _from_pretrained(tmp_path / "resaved")
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, model(IDS).logits)


def _edited_copy(src: Path, dst: Path, tensors=None, config=None) -> Path:
    shutil.copytree(src, dst)
    if tensors is not None:
        sd = tiny.load_safetensors_dir(dst)
        tensors(sd)
        for f in dst.glob("*.safetensors"):
            f.unlink()
        save_file({k: v.contiguous() for k, v in sd.items()}, str(dst / "model.safetensors"))
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


LAYER = "model.layers.1.self_attn.k_proj"


def _set(sd, key, value):
    sd[key] = value


@pytest.mark.parametrize("what,edit,fragments", [
    ("scales-dtype", dict(tensors=lambda sd: _set(sd, f"{LAYER}.scales",
                                                 sd[f"{LAYER}.scales"].float())),
     [f"{LAYER}.scales", "torch.float32", "expected torch.float16"]),
    ("missing-offsets", dict(tensors=lambda sd: sd.pop(f"{LAYER}.offsets")),
     [f"{LAYER}.offsets", "missing"]),
    ("float-shape", dict(tensors=lambda sd: _set(sd, "model.norm.weight", torch.ones(32))),
     ["model.norm.weight", "[32]", "expects [64]"]),
    ("not-converted", dict(config=lambda c: c["quantization_config"].update(
        modules_not_converted=["k_proj"])),
     ["'model.layers.0.self_attn.k_proj'", "modules_not_converted ['k_proj']"]),
    ("format-version", dict(config=lambda c: c["quantization_config"].update(format_version=3)),
     ["format_version=3"]),
])
def test_bad_checkpoints_are_refused_by_name(tmp_path, what, edit, fragments):
    bad = _edited_copy(_ckpt("llama-4bit-1x32-fp16"), tmp_path / what, **edit)
    with pytest.raises(QahiraFormatError) as e:
        _from_pretrained(bad)
    for f in fragments:
        assert f in str(e.value), (f, str(e.value))


def _peft(model, seed: int):
    from peft import LoraConfig, get_peft_model

    from qahira_vllm.hf_quantizer import peft_lora_config

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return get_peft_model(model, peft_lora_config(config))


def test_peft_lora_on_quant_layers_equals_lora_on_the_reference():
    """PEFT's get_peft_model with a LoraConfig on q_proj/v_proj attaches to QuantLinear, and
    forward and one training step equal PEFT's own LoRA on the float reference (same A, B);
    gradients reach the LoRA tensors only."""
    path = _ckpt("qwen2-8bit-4x8-fp32")
    model = _peft(_from_pretrained(path), seed=0)
    ref = _peft(load_reference_model(path), seed=0)
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(lora) == 2 * 2 * 2  # 2 layers x {q, v} x {A, B}
    assert [n for n, p in model.named_parameters() if p.requires_grad] == list(lora)
    torch.manual_seed(1)
    with torch.no_grad():  # B starts at zero: give the adapter a visible effect
        for n, p in lora.items():
            p.copy_(torch.randn_like(p) * 0.1)
        ref.load_state_dict({n: p for n, p in lora.items()}, strict=False)
    ids = IDS.repeat(2, 1)
    out, out_ref = model(ids, labels=ids), ref(ids, labels=ids)
    torch.testing.assert_close(out.logits, out_ref.logits, **LOGIT_TOL)
    with torch.no_grad():
        model.disable_adapter_layers()
        assert not torch.allclose(model(ids).logits, out.logits)  # the adapter did something
        model.enable_adapter_layers()
    out.loss.backward()
    out_ref.loss.backward()
    ref_params = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in lora), n
    for n, p in lora.items():
        assert p.grad.abs().sum() > 0
        torch.testing.assert_close(p.grad, ref_params[n].grad, rtol=1e-4, atol=1e-6)
    before = {n: b.clone() for n, b in model.named_buffers()}
    torch.optim.SGD(lora.values(), lr=0.1).step()
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())


LM_EVAL_TASK = "qahira_hf_last_word"
LM_EVAL_SCRIPT = """\
import json, sys
import qahira_vllm  # the only step a user adds: registers quant_method "qahira"
assert "transformers" not in sys.modules and "vllm" not in sys.modules  # registered lazily
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
task, task_dir, out = sys.argv[1], sys.argv[2], {}
tasks = TaskManager(include_path=task_dir, include_defaults=False)  # no index of built-ins
for name, path in zip(("qahira", "reference"), sys.argv[3:]):
    r = simple_evaluate(model="hf", model_args=f"pretrained={path},dtype=float32",
                        tasks=[task], task_manager=tasks, batch_size=4, device="cpu",
                        log_samples=True)
    out[name] = {"acc": r["results"][task]["acc,none"],
                 "docs": {s["doc_id"]: [float(s["resps"][0][0][0]), s["resps"][0][0][1]]
                          for s in r["samples"][task]}}
from transformers import AutoModelForCausalLM
out["layer"] = type(AutoModelForCausalLM.from_pretrained(sys.argv[3]).lm_head).__name__
print("RESULT " + json.dumps(out))
"""


def test_lm_eval_hf_backend_runs_the_qahira_checkpoint(tmp_path):
    """lm-eval 0.4.13's `hf` backend, given the qahira folder as `pretrained` (in a fresh
    process that imported qahira_vllm, which imports neither transformers nor vLLM: the
    registration is the post-import hook), equals the same backend on the float reference
    saved as a plain transformers folder: per-doc loglikelihood within 1e-5 nats (measured
    0.0), greedy flags and acc equal. A converted lm_head checkpoint, so the head is a
    QuantLinear too."""
    from transformers import AutoTokenizer

    path = _ckpt("qwen2-4bit-2x16-fp32-lmhead")
    float_dir = tmp_path / "float-reference"
    load_reference_model(path).save_pretrained(float_dir)
    AutoTokenizer.from_pretrained(path).save_pretrained(float_dir)
    rows = [{"context": c, "target": t} for c, t in [
        ("the cat sat on the", " mat"), ("water boils at one hundred", " degrees"),
        ("ab", "c"), ("the capital of France is", " Paris")]]
    task_dir = write_task(tmp_path / "task", LM_EVAL_TASK, rows)
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    proc = subprocess.run([sys.executable, "-c", LM_EVAL_SCRIPT, LM_EVAL_TASK, str(task_dir),
                           str(path), str(float_dir)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    out = json.loads(next(line for line in proc.stdout.splitlines()
                          if line.startswith("RESULT "))[len("RESULT "):])
    q, ref = out["qahira"], out["reference"]
    assert out["layer"] == "QuantLinear"
    assert q["docs"].keys() == ref["docs"].keys() and len(ref["docs"]) == len(rows)
    for d, (ll, greedy) in ref["docs"].items():
        assert abs(q["docs"][d][0] - ll) <= 1e-5 and q["docs"][d][1] == greedy, (d, q, ref)
    assert q["acc"] == ref["acc"]


def test_stray_single_file_beside_an_index_is_refused(tmp_path):
    """transformers would read model.safetensors; the format (and vLLM) read the index's
    shards: the quantizer refuses the folder, naming both, instead of loading another model."""
    src = _ckpt("llama-4bit-1x32-fp16")
    bad = shutil.copytree(src, tmp_path / "stray")
    shard = "model-00001-of-00001.safetensors"
    shutil.copy(bad / "model.safetensors", bad / shard)
    names = read_headers(src)
    (bad / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: shard for n in names}}))
    with pytest.raises(QahiraFormatError) as e:
        _from_pretrained(bad)
    assert "['model.safetensors']" in str(e.value) and f"['{shard}']" in str(e.value)


def test_trainer_loader_goes_through_from_pretrained_and_refuses_missing_tensors(tmp_path):
    """training.model.load_quantized_model is this path (its model carries the quantizer) and
    still refuses, by name, float tensors the model lacks or does not get (transformers alone
    would only warn and initialize them randomly)."""
    from qahira_vllm.hf_quantizer import QahiraHfQuantizer
    from qahira_vllm.training.model import load_quantized_model

    src = _ckpt("llama-4bit-1x32-fp16")
    model, cfg = load_quantized_model(src)
    assert isinstance(model.hf_quantizer, QahiraHfQuantizer) and cfg.block_size == (1, 32)
    assert not any(p.requires_grad for p in model.parameters())

    def edit(sd):
        sd.pop("model.norm.weight")
        sd["model.extra.weight"] = torch.zeros(2)

    bad = _edited_copy(src, tmp_path / "bad", tensors=edit)
    with pytest.raises(QahiraFormatError, match=r"missing \['model.norm.weight'\], unexpected "
                                                r"\['model.extra.weight'\]"):
        load_quantized_model(bad)


def test_from_pretrained_v2_mixed_checkpoint():
    """Format 2 (tiny.V2_OVERRIDES: 4- and 8-bit layers, three block shapes, fp32 scales):
    each QuantLinear keeps its layer's config and stored tensors, rebuilds the independent fp32
    s * q + o bit for bit, and the model's logits equal the dequantized reference's."""
    path = tiny.tiny_qckpt_v2()
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    model = _from_pretrained(path)
    stored = tiny.load_safetensors_dir(path)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 14
    seen = set()
    for name, m in layers.items():
        ov = qc["layers"].get(name, {})
        assert (m.cfg.bits, list(m.cfg.block_size), m.cfg.scale_dtype) == \
            (ov.get("bits", 4), ov.get("block_size", [1, 32]), "float32")
        seen.add((m.cfg.bits, m.cfg.block_size))
        assert m.scales.dtype == torch.float32 and torch.equal(m.scales, stored[f"{name}.scales"])
        ref = tiny.dequant_v2_ref(qc, name, m.qweight, m.scales, m.offsets)
        assert torch.equal(m.dequantized_weight(), ref), name
        x = torch.randn(3, m.in_features)
        assert torch.equal(m(x), torch.nn.functional.linear(x, ref)), name  # forward's W
    assert seen == {(4, (1, 32)), (8, (1, 16)), (8, (1, 32)), (4, (2, 64))}
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, load_reference_model(path)(IDS).logits,
                                   **LOGIT_TOL)
