"""QA-HiRA merges exactly; Q-BaRA/LoRA merges are refused or re-quantized with a report."""

import json

import pytest
import torch
from safetensors import safe_open

from support import tiny
from qahira_vllm.adapter_format import AdapterError, checkpoint_fingerprint, load_adapter
from qahira_vllm.cli import main as cli_main
from qahira_vllm.merge import merge_qahira
from qahira_vllm.safetensors_io import model_weight_files

TINY = dict(hidden=64, intermediate=128, heads=2, kv_heads=1)
BASES = {  # name -> (arch, block, offset dtype, QA-HiRA pool pi, repeat qo)
    "llama-1x32-fp16": ("llama", (1, 32), "float16", 32, 8),
    "llama-2x16-fp16": ("llama", (2, 16), "float16", 16, 4),
    "qwen-4x8-fp32": ("qwen2", (4, 8), "float32", 8, 8),
}


def _base(name):
    arch, block, odt, _, _ = BASES[name]
    kw = dict(TINY, tie=True) if arch == "qwen2" else TINY
    return tiny.tiny_qckpt(arch, block_size=block, offset_dtype=odt, **kw)


def _tensors(model_dir):
    out = {}
    for f in model_weight_files(model_dir):
        with safe_open(str(f), framework="pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def _same_bytes(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _delta_reference(m, scaling, pi, qo, out_f, in_f):
    """float64 dW[o, i] = s * M[o // qo, i // pi] / pi, by explicit index maps."""
    rows, cols = torch.arange(out_f) // qo, torch.arange(in_f) // pi
    return scaling * m.double()[rows][:, cols] / pi


@pytest.mark.parametrize("name", list(BASES))
@pytest.mark.parametrize("targets", ["all", "q,v"])
def test_qahira_merge_is_exact(name, targets, tmp_path):
    qckpt = _base(name)
    _, block, odt, pi, qo = BASES[name]
    tg = (("q_proj", "v_proj") if targets == "q,v" else
          ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    adapter_dir = tiny.random_adapter(qckpt, tmp_path / "ad", "qahira", pool=pi,
                                              repeat=qo, scaling=1.7, std=0.5, targets=tg)
    summary = merge_qahira(qckpt, adapter_dir, tmp_path / "merged")
    assert summary["method"] == "exact_offsets"
    base, merged = _tensors(qckpt), _tensors(tmp_path / "merged")
    assert set(base) == set(merged)
    adapter = load_adapter(adapter_dir)
    odtype = torch.float16 if odt == "float16" else torch.float32
    for key in base:
        layer, _, suffix = key.rpartition(".")
        if suffix != "offsets" or layer not in adapter.tensors:
            assert _same_bytes(base[key], merged[key]), key   # qweight, scales, the rest
            continue
        q = base[f"{layer}.qweight"]
        w_base = tiny.dequant_packed_ref(q, base[f"{layer}.scales"], base[key], block)
        w_merged = tiny.dequant_packed_ref(q, merged[f"{layer}.scales"], merged[key], block)
        delta = _delta_reference(adapter.tensors[layer]["qahira_M"], 1.7, pi, qo, *w_base.shape)
        # One rounding of offset_dtype per block (|error| <= one ulp at the stored offset),
        # plus the fp32 rounding of s * M / pi itself (relative 2^-23 of the delta).
        stored = merged[key]
        ulp = (torch.nextafter(stored.abs(), torch.tensor(float("inf"), dtype=odtype))
               - stored.abs()).double()
        bound = (ulp.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
                 + delta.abs() * 2.0**-23)
        err = (w_merged - w_base - delta).abs()
        assert bool((err <= bound).all()), (layer, float((err - bound).max()))
        assert float(delta.abs().max()) > 10 * float(bound.max())  # the test has teeth
    qc = json.loads((tmp_path / "merged" / "config.json").read_text())["quantization_config"]
    [record] = qc["merged_adapters"]
    assert record["adapter_type"] == "qahira" and record["method"] == "exact_offsets"
    assert record["base_fingerprint"] == checkpoint_fingerprint(qckpt)
    assert (tmp_path / "merged" / "tokenizer.json").exists()


def test_verify_reports_tiny_logit_difference(tmp_path):
    for name, tol in (("llama-1x32-fp16", 5e-3), ("qwen-4x8-fp32", 1e-4)):
        qckpt = _base(name)
        _, _, _, pi, qo = BASES[name]
        ad = tiny.random_adapter(qckpt, tmp_path / f"ad-{name}", "qahira", pool=pi,
                                         repeat=qo, scaling=2.0, std=0.5)
        s = merge_qahira(qckpt, ad, tmp_path / f"m-{name}", verify=True)
        assert s["max_abs_logit_diff"] < tol, s
        assert s["same_argmax_fraction"] == 1.0


def test_cannot_merge_twice(tmp_path):
    qckpt = _base("llama-1x32-fp16")
    ad = tiny.random_adapter(qckpt, tmp_path / "ad", "qahira", pool=32, repeat=8)
    merge_qahira(qckpt, ad, tmp_path / "m1")
    with pytest.raises(AdapterError, match="trained on a base with fingerprint"):
        merge_qahira(tmp_path / "m1", ad, tmp_path / "m2")


@pytest.mark.parametrize("kind", ["qbara", "lora"])
def test_low_rank_merge_refused_without_requantize(kind, tmp_path):
    qckpt = _base("llama-1x32-fp16")
    ad = tiny.random_adapter(qckpt, tmp_path / "ad", kind, rank=4)
    with pytest.raises(AdapterError, match=f"a '{kind}' adapter cannot be merged exactly"):
        merge_qahira(qckpt, ad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # nothing half-written


def test_requantize_reports_measured_error(tmp_path):
    qckpt = _base("llama-1x32-fp16")
    block = BASES["llama-1x32-fp16"][1]
    ad = tiny.random_adapter(qckpt, tmp_path / "ad", "qbara", rank=4, std=0.2,
                                     targets=("q_proj", "down_proj"))
    s = merge_qahira(qckpt, ad, tmp_path / "rq", requantize=True)
    assert s["method"] == "requantized"
    base, merged = _tensors(qckpt), _tensors(tmp_path / "rq")
    adapter = load_adapter(ad)
    sq_err = sq_delta = 0.0
    for layer, t in adapter.tensors.items():
        a, b = t["lora_A"].double(), t["lora_B"].double()
        delta = 2.0 * torch.kron(b @ a, torch.ones(2, 2, dtype=torch.float64) / 2)
        target = tiny.dequant_packed_ref(base[f"{layer}.qweight"], base[f"{layer}.scales"],
                                                base[f"{layer}.offsets"], block) + delta
        got = tiny.dequant_packed_ref(merged[f"{layer}.qweight"],
                                             merged[f"{layer}.scales"],
                                             merged[f"{layer}.offsets"], block)
        sq_err += float((got - target).square().sum())
        sq_delta += float(delta.square().sum())
    assert s["rms_weight_error_over_rms_delta"] == pytest.approx((sq_err / sq_delta) ** 0.5,
                                                                 rel=1e-4)
    assert 0 < s["rms_weight_error_over_rms_delta"] < 1
    untouched = "model.layers.0.self_attn.k_proj.qweight"
    assert _same_bytes(base[untouched], merged[untouched])


def test_geometry_mismatch_refused_then_requantized(tmp_path):
    qckpt = _base("llama-1x32-fp16")  # block [1, 32]: pi must be a multiple of 32
    ad = tiny.random_adapter(qckpt, tmp_path / "ad", "qahira", pool=16, repeat=8)
    with pytest.raises(AdapterError) as e:
        merge_qahira(qckpt, ad, tmp_path / "out")
    assert "pool pi=16 is not a multiple of the block's bi=32" in str(e.value)
    assert "Valid pool (pi): [32, 64]" in str(e.value) and "--requantize" in str(e.value)
    s = merge_qahira(qckpt, ad, tmp_path / "out", requantize=True)
    assert s["method"] == "requantized"


def test_shape_mismatch_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    qckpt = _base("llama-1x32-fp16")
    ad = tiny.random_adapter(qckpt, tmp_path / "ad", "qahira", pool=32, repeat=8)
    key = "base_model.model.model.layers.1.mlp.up_proj.qahira_M.weight"
    t = load_file(str(ad / "adapter_model.safetensors"))
    t[key] = torch.zeros(32, 2)  # expected [128/8, 64/32] = [16, 2]
    save_file(t, str(ad / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=r"has shape \[32, 2\]: expected \[16, 2\]"):
        merge_qahira(qckpt, ad, tmp_path / "out")


def test_cli_merge(tmp_path, capsys):
    qckpt = _base("qwen-4x8-fp32")
    ad = tiny.random_adapter(qckpt, tmp_path / "ad", "qahira", pool=8, repeat=8)
    assert cli_main(["merge", str(qckpt), str(ad), str(tmp_path / "m"), "--verify"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["max_abs_logit_diff"] < 1e-4
    assert cli_main(["merge", str(qckpt), str(ad), str(tmp_path / "m")]) == 2
    assert "already exists" in capsys.readouterr().err
    qb = tiny.random_adapter(qckpt, tmp_path / "qb", "qbara", rank=2)
    assert cli_main(["merge", str(qckpt), str(qb), str(tmp_path / "m3")]) == 2
    assert "--requantize" in capsys.readouterr().err


def test_v2_mixed_checkpoint_merges_per_layer(tmp_path):
    """Format 2 (tiny.V2_OVERRIDES): an exact QA-HiRA merge shifts each layer's offsets by the
    adapter's dW on that layer's own blocks (qweight and fp32 scales byte-identical), and a
    re-quantized Q-BaRA merge keeps every layer's bits / block / dtypes."""
    from qahira_vllm.checkpoint import read_quant_config, validate_checkpoint

    qckpt = tiny.tiny_qckpt_v2()
    qc = json.loads((qckpt / "config.json").read_text())["quantization_config"]
    adapter_dir = tiny.random_adapter(qckpt, tmp_path / "ad", "qahira", pool=64, repeat=8,
                                      scaling=1.3, std=0.5)
    summary = merge_qahira(qckpt, adapter_dir, tmp_path / "merged")
    assert summary["method"] == "exact_offsets"
    base, merged = _tensors(qckpt), _tensors(tmp_path / "merged")
    mqc = json.loads((tmp_path / "merged" / "config.json").read_text())["quantization_config"]
    assert mqc["layers"] == qc["layers"] and mqc["scale_dtype"] == "float32"
    adapter = load_adapter(adapter_dir)
    for layer, t in adapter.tensors.items():
        for suffix in ("qweight", "scales"):
            assert _same_bytes(base[f"{layer}.{suffix}"], merged[f"{layer}.{suffix}"])
        w0 = tiny.dequant_v2_ref(qc, layer, *(base[f"{layer}.{k}"]
                                             for k in ("qweight", "scales", "offsets")))
        w1 = tiny.dequant_v2_ref(qc, layer, *(merged[f"{layer}.{k}"]
                                             for k in ("qweight", "scales", "offsets")))
        dw = _delta_reference(t["qahira_M"], adapter.config.scaling, 64, 8, *w0.shape)
        assert (w1.double() - w0.double() - dw).abs().max() < 1e-5, layer
    lora = tiny.random_adapter(qckpt, tmp_path / "qb", "qbara", std=0.02)
    summary = merge_qahira(qckpt, lora, tmp_path / "requant", requantize=True)
    assert summary["method"] == "requantized"
    requant = _tensors(tmp_path / "requant")
    for name, t in base.items():
        assert (requant[name].dtype, requant[name].shape) == (t.dtype, t.shape), name
    validate_checkpoint(tmp_path / "requant", read_quant_config(tmp_path / "requant"))
