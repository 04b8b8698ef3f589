"""qahira_vllm.quantize (+ checkpoint.dequantized_state_dict / load_reference_model) on tiny
random Llama and Qwen2 models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


from support import tiny as tm  # noqa: E402
from qahira_vllm.checkpoint import (dequantized_state_dict, load_reference_model,  # noqa: E402
                                    validate_checkpoint, read_quant_config)
from qahira_vllm import quant_math as qm  # noqa: E402
from qahira_vllm.format import QahiraFormatError, QahiraQuantConfig  # noqa: E402
from qahira_vllm.quantize import quantize_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [(4, (1, 64)), (8, (1, 64)), (4, (8, 4)), (4, (2, 16))]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """Float source folders: 'llama' (untied lm_head), 'qwen2' (q/k/v bias, tied embeddings),
    'llama_nd' (intermediate 96: down_proj [128, 96] not divisible by bi=64)."""
    root = tmp_path_factory.mktemp("src")
    return {
        "llama": tm.make_model_dir(root / "llama", "llama", seed=0),
        "qwen2": tm.make_model_dir(root / "qwen2", "qwen2", seed=1, tie=True),
        "llama_nd": tm.make_model_dir(root / "llama_nd", "llama", seed=2, **tm.NON_DIVIDING),
    }


@pytest.fixture(scope="module")
def quantized(src, tmp_path_factory):
    """get(arch, bits, block, clip=True) -> (out_dir, summary), built once per combination."""
    root = tmp_path_factory.mktemp("q")
    built = {}

    def get(arch, bits, block, clip=True):
        key = (arch, bits, tuple(block), clip)
        if key not in built:
            out = root / f"{arch}-{bits}-{block[0]}x{block[1]}-{clip}"
            summary = quantize_model(src[arch], out, bits=bits, block_size=block,
                                     clip_search=clip, progress=False)
            built[key] = (out, summary)
        return built[key]

    return get


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")
                  or p.name == name)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("bits,block", CONFIGS)
def test_quantized_checkpoint_contents(src, quantized, arch, bits, block):
    out, summary = quantized(arch, bits, block)
    bo, bi = block
    source = tm.load_safetensors_dir(src[arch])
    got = tm.load_safetensors_dir(out)

    # config.json
    config = json.loads((out / "config.json").read_text())
    src_config = json.loads((src[arch] / "config.json").read_text())
    qc = config.pop("quantization_config")
    assert config == src_config  # everything else unchanged
    assert qc["quant_method"] == "qahira" and qc["format_version"] == 1
    assert qc["bits"] == bits and qc["block_size"] == [bo, bi]
    assert qc["offset_dtype"] == "float16" and qc["modules_not_converted"] == []
    assert qc["quantizer"] == "mse_clip" and qc["source_model"] == str(src[arch])
    assert qc["created_by"].startswith("qahira-vllm ")
    # other files copied
    assert (out / "tokenizer_config.json").read_text() == (
        src[arch] / "tokenizer_config.json").read_text()
    assert (out / "generation_config.json").exists()

    # every converted layer: exactly qweight/scales/offsets with the format's shapes/dtypes
    layers = tm.linear_layer_names()
    assert summary["layers_converted"] == len(layers) == 14
    for layer in layers:
        out_f, in_f = source[f"{layer}.weight"].shape
        assert f"{layer}.weight" not in got
        qw = got[f"{layer}.qweight"]
        if bits == 4:
            assert qw.dtype == torch.int32 and qw.shape == (out_f, in_f // 8)
        else:
            assert qw.dtype == torch.uint8 and qw.shape == (out_f, in_f)
        assert got[f"{layer}.scales"].dtype == torch.float16
        assert got[f"{layer}.scales"].shape == (out_f // bo, in_f // bi)
        assert got[f"{layer}.offsets"].dtype == torch.float16
        assert got[f"{layer}.offsets"].shape == (out_f // bo, in_f // bi)
        assert (got[f"{layer}.scales"] > 0).all()

    # biases, embeddings, norms (and lm_head): byte-identical, nothing else added
    others = {k for k in source if k.rsplit(".", 1)[0] not in layers or k.endswith(".bias")}
    assert {k for k in got if not k.endswith((".qweight", ".scales", ".offsets"))} == others
    for k in others:
        a, b = source[k], got[k]
        assert a.dtype == b.dtype and a.shape == b.shape, k
        assert torch.equal(a.contiguous().view(-1).view(torch.uint8),
                           b.contiguous().view(-1).view(torch.uint8)), k
    if arch == "qwen2":
        assert sum(k.endswith(".bias") for k in others) == 6  # q/k/v of 2 layers
    else:
        assert "lm_head.weight" in others
    assert not any(k.startswith("lm_head.") and k != "lm_head.weight" for k in got)

    # the checkpoint validates and reads back
    assert len(validate_checkpoint(out, read_quant_config(out))) == 14


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("bits,block", CONFIGS)
def test_dequantized_weights_within_bound(src, quantized, arch, bits, block):
    out, summary = quantized(arch, bits, block)
    source = tm.load_safetensors_dir(src[arch])
    deq = dequantized_state_dict(out)
    stored = tm.load_safetensors_dir(out)
    sq_err = sq_ref = 0.0
    for layer in tm.linear_layer_names():
        w = source[f"{layer}.weight"]
        d = deq[f"{layer}.weight"]
        assert d.dtype == torch.float32 and d.shape == w.shape
        # dequantized_state_dict must equal the independent dequantization of the stored
        # tensors up to fp32 rounding of s*q + o (2^-23 relative to |s*q| + |o|, + fp32 of it)
        ref = tm.dequant_packed_ref(stored[f"{layer}.qweight"], stored[f"{layer}.scales"],
                                    stored[f"{layer}.offsets"], block, bits)
        assert torch.allclose(d.double(), ref, rtol=2.0**-22, atol=1e-9), layer
        # mse_clip: |err| <= s'/2 + 0.15*(hi - lo) + fp16 rounding terms (support.tiny.error_bound)
        err = (ref - w.double()).abs()
        assert (err <= tm.error_bound(w, block, bits, "float16", clip=True)).all(), layer
        sq_err += (ref - w.double()).square().sum().item()
        sq_ref += w.double().square().sum().item()
    # summary's relative error matches ours (1e-4 relative: it accumulates in fp32 per layer)
    assert summary["relative_weight_error"] == pytest.approx((sq_err / sq_ref) ** 0.5, rel=1e-4)
    # N(0, 0.08) weights: uniform-grid error ~ range/(qmax*sqrt(12)); loose sanity bound
    assert summary["relative_weight_error"] < (0.15 if bits == 4 else 0.01)
    for k in source:  # non-linear tensors come back as they were (fp32 source)
        if k.rsplit(".", 1)[0] not in tm.linear_layer_names() or k.endswith(".bias"):
            assert torch.equal(deq[k], source[k].float()), k


@pytest.mark.parametrize("bits,block", [(4, (1, 64)), (8, (8, 4))])
def test_minmax_quantizer_tight_bound(src, quantized, bits, block):
    out, _ = quantized("llama", bits, block, clip=False)
    assert read_quant_config(out).extra["quantizer"] == "minmax"
    source = tm.load_safetensors_dir(src["llama"])
    deq = dequantized_state_dict(out)
    for layer in tm.linear_layer_names():
        w = source[f"{layer}.weight"]
        # min-max: |err| <= s'/2 + |o' - lo| + qmax*|s' - s| (+ fp32 slack), see error_bound
        err = (deq[f"{layer}.weight"].double() - w.double()).abs()
        assert (err <= tm.error_bound(w, block, bits, "float16", clip=False)).all(), layer


def test_offset_dtype_float32(src, tmp_path):
    out = tmp_path / "o32"
    quantize_model(src["llama"], out, bits=4, block_size=(1, 32), offset_dtype="float32",
                   progress=False)
    cfg = read_quant_config(out)
    assert cfg.offset_dtype == "float32"
    got = tm.load_safetensors_dir(out)
    assert got["model.layers.0.mlp.up_proj.offsets"].dtype == torch.float32
    assert got["model.layers.0.mlp.up_proj.scales"].dtype == torch.float16


def test_skip_keeps_module_float(src, tmp_path):
    out = tmp_path / "skip"
    summary = quantize_model(src["llama"], out, skip=("o_proj",), progress=False)
    got = tm.load_safetensors_dir(out)
    source = tm.load_safetensors_dir(src["llama"])
    assert summary["layers_converted"] == 12
    for i in range(2):
        name = f"model.layers.{i}.self_attn.o_proj"
        assert torch.equal(got[f"{name}.weight"], source[f"{name}.weight"])
        assert f"{name}.qweight" not in got
    cfg = read_quant_config(out)
    assert "o_proj" in cfg.modules_not_converted
    assert not cfg.is_converted("model.layers.1.self_attn.o_proj")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lm_head_option_converts_the_head_and_unties(src, tmp_path, arch):
    """--lm-head: lm_head stored quantized (from the tied embedding when tied: qwen2 here), the
    input embedding kept as stored, config untied; the reference model runs the dequantized
    head, and the quantized head's rows are within the quantizer's bound of the float ones."""
    out = tmp_path / f"{arch}-head"
    summary = quantize_model(src[arch], out, bits=4, block_size=(1, 32), lm_head=True,
                             progress=False)
    assert summary["layers_converted"] == 15
    got = tm.load_safetensors_dir(out)
    source = tm.load_safetensors_dir(src[arch])
    tied = arch == "qwen2"
    head_src = source["model.embed_tokens.weight" if tied else "lm_head.weight"]
    assert "lm_head.weight" not in got
    assert torch.equal(got["model.embed_tokens.weight"], source["model.embed_tokens.weight"])
    assert got["lm_head.qweight"].shape == (tm.VOCAB, 128 // 8)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert "lm_head" in validate_checkpoint(out, read_quant_config(out))
    deq = tm.dequant_packed_ref(got["lm_head.qweight"], got["lm_head.scales"],
                                got["lm_head.offsets"], (1, 32), 4).float()
    bound = tm.error_bound(head_src.float(), (1, 32), 4, clip=True)
    assert ((deq - head_src.float()).abs() <= bound).all()
    ref = load_reference_model(out)
    assert torch.allclose(ref.lm_head.weight, deq, atol=1e-6)
    assert ref.lm_head.weight.data_ptr() != ref.model.embed_tokens.weight.data_ptr()
    assert torch.equal(ref.model.embed_tokens.weight, source["model.embed_tokens.weight"])
    with pytest.raises(ValueError, match="--skip keeps it in float: choose one"):
        quantize_model(src[arch], tmp_path / "both", lm_head=True, skip=("lm_head",),
                       progress=False)


# ---- layers that the block does not divide ----------------------------------------------------

def test_non_dividing_layer_raises_naming_layer(src, tmp_path):
    out = tmp_path / "nd"
    with pytest.raises(QahiraFormatError) as ei:
        quantize_model(src["llama_nd"], out, bits=4, block_size=(1, 64), progress=False)
    msg = str(ei.value)
    assert "model.layers.0.mlp.down_proj" in msg or "model.layers.1.mlp.down_proj" in msg
    assert "[out=128, in=96]" in msg
    assert "in=96 is not a multiple of bi=64" in msg
    assert "--keep-unconvertible" in msg
    assert list(tmp_path.iterdir()) == []  # no output folder, no temp folder


def test_keep_unconvertible(src, tmp_path):
    out = tmp_path / "keep"
    summary = quantize_model(src["llama_nd"], out, bits=4, block_size=(1, 64),
                             keep_unconvertible=True, progress=False)
    kept = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert summary["modules_not_converted"] == kept
    assert summary["layers_converted"] == 12
    cfg = read_quant_config(out)
    assert list(cfg.modules_not_converted) == kept
    got = tm.load_safetensors_dir(out)
    source = tm.load_safetensors_dir(src["llama_nd"])
    for name in kept:
        assert torch.equal(got[f"{name}.weight"], source[f"{name}.weight"])
        assert got[f"{name}.weight"].dtype == source[f"{name}.weight"].dtype
        assert f"{name}.qweight" not in got and not cfg.is_converted(name)
    assert "model.layers.0.mlp.up_proj.qweight" in got  # the others are converted
    assert len(validate_checkpoint(out, cfg)) == 12
    deq = dequantized_state_dict(out)
    assert torch.equal(deq[f"{kept[0]}.weight"], source[f"{kept[0]}.weight"])
    load_reference_model(out)  # loads without missing/unexpected keys


# ---- output folder handling -------------------------------------------------------------------

def test_existing_output_needs_overwrite(src, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists"):
        quantize_model(src["llama"], out, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert _leftovers(tmp_path, "exists") == ["exists"]
    quantize_model(src["llama"], out, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert _leftovers(tmp_path, "exists") == ["exists"]  # no .tmp- / .old- folders


def test_existing_output_is_checked_before_quantizing(src, tmp_path):
    """The out-dir check comes first: with a model that would fail to quantize, the error is
    FileExistsError (no minutes of quantization before finding the folder exists)."""
    out = tmp_path / "early"
    out.mkdir()
    with pytest.raises(FileExistsError):
        quantize_model(src["llama_nd"], out, block_size=(1, 64), progress=False)


def test_failure_while_writing_leaves_nothing(src, tmp_path, monkeypatch):
    import huggingface_hub

    def boom(*a, **k):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(huggingface_hub, "save_torch_state_dict", boom)
    out = tmp_path / "fail"
    with pytest.raises(RuntimeError, match="simulated"):
        quantize_model(src["llama"], out, progress=False)
    assert list(tmp_path.iterdir()) == []
    # an existing folder survives a failed overwrite untouched
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="simulated"):
        quantize_model(src["llama"], out, overwrite=True, progress=False)
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert _leftovers(tmp_path, "fail") == ["fail"]


def test_failure_with_overwrite_keeps_existing(src, tmp_path):
    out = tmp_path / "nd"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(QahiraFormatError):
        quantize_model(src["llama_nd"], out, block_size=(1, 64), overwrite=True, progress=False)
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert _leftovers(tmp_path, "nd") == ["nd"]


def test_source_errors(src, tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(FileNotFoundError, match="is a file"):
        quantize_model(f, tmp_path / "o1", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((src["llama"] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        quantize_model(empty, tmp_path / "o2", progress=False)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_requantizing_a_checkpoint_is_refused(quantized, tmp_path):
    out, _ = quantized("llama", 4, (1, 64))
    with pytest.raises(QahiraFormatError, match="already has a quantization_config"):
        quantize_model(out, tmp_path / "again", progress=False)


def test_hub_id_offline_gives_clear_error(tmp_path):
    """A repo id that is not a local folder goes through huggingface_hub; offline and not cached
    it must fail with FileNotFoundError naming the id (subprocess: HF_HUB_OFFLINE is read at
    huggingface_hub import)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               HF_HUB_CACHE=str(tmp_path / "hf" / "hub"))
    code = ("from qahira_vllm.quantize import quantize_model\n"
            "try:\n"
            "    quantize_model('qahira-test-org/no-such-model', 'outdir', progress=False)\n"
            "except FileNotFoundError as e:\n"
            "    print('FNF:', e)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "FNF:" in r.stdout and "'qahira-test-org/no-such-model'" in r.stdout
    assert "neither a local folder nor a downloadable hub repo" in r.stdout
    assert not (tmp_path / "outdir").exists()


# ---- reference model ---------------------------------------------------------------------------

@pytest.mark.parametrize("arch,bits,block", [("llama", 4, (1, 64)), ("qwen2", 4, (8, 4)),
                                             ("llama", 8, (2, 16))])
def test_reference_model_logits(src, quantized, arch, bits, block):
    from transformers import AutoConfig, AutoModelForCausalLM

    out, _ = quantized(arch, bits, block)
    ref_model = load_reference_model(out)
    assert not hasattr(ref_model.config, "quantization_config")

    # our own model: float config, weights set from the independent dequantization
    config = AutoConfig.from_pretrained(src[arch])
    mine = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    source = tm.load_safetensors_dir(src[arch])
    stored = tm.load_safetensors_dir(out)
    sd = dict(source)
    for layer in tm.linear_layer_names():
        sd[f"{layer}.weight"] = tm.dequant_packed_ref(
            stored[f"{layer}.qweight"], stored[f"{layer}.scales"], stored[f"{layer}.offsets"],
            block, bits).float()
    missing, unexpected = mine.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    if config.tie_word_embeddings:
        mine.tie_weights()
        assert torch.equal(ref_model.lm_head.weight, source["model.embed_tokens.weight"])

    ids = torch.randint(0, tm.VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ref_model(ids).logits
        b = mine(ids).logits
        f = AutoModelForCausalLM.from_pretrained(src[arch], dtype=torch.float32).eval()(ids).logits
    # same weights up to fp32 rounding of s*q + o (1 ulp) -> logits agree to 1e-5 abs/rel (fp32)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # and the quantized model is not the float one, but close to it
    assert not torch.allclose(a, f, atol=1e-3)
    cos = torch.nn.functional.cosine_similarity(a.flatten(), f.flatten(), dim=0)
    assert cos > (0.9 if bits == 4 else 0.999)


# ---- fused groups (vLLM's packed_modules_mapping) ---------------------------------------------

GQA = dict(hidden=128, intermediate=256, layers=2, heads=2, kv_heads=1)  # q out 128, k/v out 64


@pytest.fixture(scope="module")
def gqa_src(tmp_path_factory):
    return tm.make_model_dir(tmp_path_factory.mktemp("gqa") / "llama", "llama", seed=4, **GQA)


def _vllm_fused_prefixes_consistent(ckpt):
    """vLLM's own rule (is_layer_skipped over the model class's packed_modules_mapping) raises
    for a fused layer whose members are partly converted; returns {fused prefix: skipped}."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import is_layer_skipped
    from vllm.model_executor.models.llama import LlamaForCausalLM

    cfg = read_quant_config(ckpt)
    mapping = LlamaForCausalLM.packed_modules_mapping
    out = {}
    for i in range(GQA["layers"]):
        for fused in (f"model.layers.{i}.self_attn.qkv_proj", f"model.layers.{i}.mlp.gate_up_proj",
                      f"model.layers.{i}.self_attn.o_proj", f"model.layers.{i}.mlp.down_proj"):
            out[fused] = is_layer_skipped(fused, list(cfg.modules_not_converted), mapping,
                                          match_mode="suffix")
    return out


@pytest.mark.parametrize("case", ["skip-q", "skip-gate", "block-128x32-keep"])
def test_partly_converted_fused_group_is_kept_whole(gqa_src, tmp_path, case):
    kwargs = {"skip-q": dict(skip=("q_proj",)), "skip-gate": dict(skip=("gate_proj",)),
              "block-128x32-keep": dict(block_size=(128, 32), keep_unconvertible=True)}[case]
    kwargs = {"block_size": (1, 32), **kwargs}
    out = tmp_path / case
    summary = quantize_model(gqa_src, out, bits=4, progress=False, **kwargs)
    skipped = _vllm_fused_prefixes_consistent(out)  # raises if vLLM would refuse the folder
    float_group = "qkv_proj" if case != "skip-gate" else "gate_up_proj"
    got = tm.load_safetensors_dir(out)
    source = tm.load_safetensors_dir(gqa_src)
    for fused, is_skipped in skipped.items():
        assert is_skipped == fused.endswith(float_group), (fused, is_skipped)
    members = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    for i in range(GQA["layers"]):
        parent = f"model.layers.{i}." + ("self_attn" if float_group == "qkv_proj" else "mlp")
        for m in members[float_group]:
            name = f"{parent}.{m}"
            assert torch.equal(got[f"{name}.weight"], source[f"{name}.weight"]), name
            assert f"{name}.qweight" not in got
        assert any(f"{parent}.{float_group}" in note for note in summary["notes"]), summary
    assert "model.layers.0.self_attn.o_proj.qweight" in got
    assert summary["layers_converted"] == 14 - 2 * len(members[float_group])


def test_partly_converted_fused_group_cli_says_so(gqa_src, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qahira_vllm.cli", "quantize", str(gqa_src),
                           str(tmp_path / "o"), "--block", "1x32", "--skip", "q_proj"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "model.layers.1.self_attn.k_proj, model.layers.1.self_attn.v_proj" in proc.stderr
    assert "qkv_proj" in proc.stderr


# ---- non-finite and out-of-range weights ------------------------------------------------------

def _with_value(src, dst, name, index, value):
    """A copy of the model folder `src` with tensor `name`[index] = value."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    sd[name][index] = value
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


DOWN = "model.layers.0.mlp.down_proj.weight"


@pytest.mark.parametrize("value,phrase", [(float("nan"), "nan at [5, 7]"),
                                          (float("inf"), "inf at [5, 7]"),
                                          (float("-inf"), "-inf at [5, 7]")])
def test_non_finite_weight_is_refused(src, tmp_path, value, phrase):
    bad = _with_value(src["llama"], tmp_path / "bad", DOWN, (5, 7), value)
    with pytest.raises(QahiraFormatError) as ei:
        quantize_model(bad, tmp_path / "out", progress=False)
    assert DOWN in str(ei.value) and phrase in str(ei.value), str(ei.value)
    assert not (tmp_path / "out").exists()


def test_non_finite_float_tensor_kept_as_is_is_refused(src, tmp_path):
    norm = "model.layers.1.post_attention_layernorm.weight"
    bad = _with_value(src["llama"], tmp_path / "bad", norm, (3,), float("nan"))
    with pytest.raises(QahiraFormatError, match=rf"{norm}.*nan at \[3\]"):
        quantize_model(bad, tmp_path / "out", progress=False)


def test_offset_overflowing_float16_says_use_float32(src, tmp_path):
    bad = _with_value(src["llama"], tmp_path / "bad", DOWN, (5, 7), -1e5)
    with pytest.raises(QahiraFormatError) as ei:
        quantize_model(bad, tmp_path / "out16", progress=False)
    msg = str(ei.value)
    assert DOWN in msg and "block [5, 0]" in msg and "--offset-dtype float32" in msg, msg
    # With float32 offsets the block is stored: its minimum is a grid point, exactly.
    quantize_model(bad, tmp_path / "out32", offset_dtype="float32", progress=False)
    deq = dequantized_state_dict(tmp_path / "out32")[DOWN]
    assert deq[5, 7].item() == -1e5
    assert torch.isfinite(deq).all()


def test_scale_overflowing_float16_is_refused(src, tmp_path):
    # INT4: a block spanning more than 15 * 65504 cannot have a float16 scale.
    bad = _with_value(src["llama"], tmp_path / "bad", DOWN, (5, 7), 1e6)
    with pytest.raises(QahiraFormatError) as ei:
        quantize_model(bad, tmp_path / "out", offset_dtype="float32", progress=False)
    assert DOWN in str(ei.value) and "exceeds float16" in str(ei.value), str(ei.value)


# ---- backends: the compiled CPU kernel, the torch definition (fallback, CUDA): the same bits ----

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_checkpoint_is_the_definition_bit_for_bit(src, tmp_path, device):
    summary = quantize_model(src["qwen2"], tmp_path / "o", bits=4, block_size=(2, 16),
                             device=device, progress=False)
    assert summary["quantizer_backend"] == ("cpu-kernel" if device == "cpu" else "torch-cuda")
    source, got = tm.load_safetensors_dir(src["qwen2"]), tm.load_safetensors_dir(tmp_path / "o")
    cfg = QahiraQuantConfig(bits=4, block_size=(2, 16))
    sq_err = sq_ref = 0.0
    for layer in tm.linear_layer_names():
        w = source[f"{layer}.weight"]
        q, scales, offsets = qm.quantize(w, cfg)  # the definition, torch on CPU
        assert torch.equal(got[f"{layer}.qweight"], qm.pack_qweight(q, 4)), layer
        assert torch.equal(got[f"{layer}.scales"], scales), layer
        assert torch.equal(got[f"{layer}.offsets"], offsets), layer
        deq = qm.dequantize(got[f"{layer}.qweight"], scales, offsets, cfg).double()
        sq_err += (deq - w.double()).square().sum().item()
        sq_ref += w.double().square().sum().item()
    # the error statistics come from the search itself: the same within fp32 rounding
    assert summary["relative_weight_error"] == pytest.approx((sq_err / sq_ref) ** 0.5, rel=1e-5)


def test_without_the_compiled_library_the_torch_definition_gives_the_same_bits(
        src, quantized, tmp_path):
    """No usable compiler (CC=/bin/false, an empty kernel cache): the CLI says so once and falls
    back to the torch definition, whose checkpoint equals the compiled kernel's bit for bit."""
    ref_dir, ref_summary = quantized("llama", 4, (1, 64))
    env = dict(os.environ, CC="/bin/false", QAHIRA_KERNEL_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "qahira_vllm.cli", "quantize", str(src["llama"]),
                           str(tmp_path / "o"), "--device", "cpu"],
                          capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("compiled CPU quantizer is unavailable") == 1, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["quantizer_backend"] == "torch-cpu" and summary["device"] == "cpu"
    assert summary["relative_weight_error"] == pytest.approx(
        ref_summary["relative_weight_error"], rel=1e-6)
    ref, got = tm.load_safetensors_dir(ref_dir), tm.load_safetensors_dir(tmp_path / "o")
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


def test_unknown_or_unusable_device_is_refused_before_work(src, tmp_path):
    with pytest.raises(ValueError, match="expected auto, cpu, cuda or cuda:N"):
        quantize_model(src["llama"], tmp_path / "o", device="tpu", progress=False)
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match="CUDA|does not exist"):
        quantize_model(src["llama"], tmp_path / "o", device=f"cuda:{n}", progress=False)
    assert not (tmp_path / "o").exists()


# ---- format 2: --layer overrides, --scale-dtype float32 ---------------------------------------

def test_v2_checkpoint_mixed_layers_fp32_scales():
    """tiny.V2_OVERRIDES: each layer stored with its own bits / block and fp32 scales, the
    override of one q/k/v (gate/up) member widened to its vLLM-fused group, and the minmax
    scales exactly the fp32 (hi - lo) / qmax (no fp16 rounding), computed here by hand."""
    ckpt = tm.tiny_qckpt_v2(quantizer="minmax")
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert (qc["format_version"], qc["scale_dtype"], qc["bits"], qc["block_size"]) == \
        (2, "float32", 4, [1, 32])
    expect = {}
    for i in range(2):
        p = f"model.layers.{i}"
        expect[f"{p}.mlp.down_proj"] = {"bits": 8, "block_size": [1, 16]}
        for m in ("q_proj", "k_proj", "v_proj"):
            expect[f"{p}.self_attn.{m}"] = {"bits": 8}
    for m in ("gate_proj", "up_proj"):
        expect[f"model.layers.1.mlp.{m}"] = {"bits": 4, "block_size": [2, 64]}
    assert qc["layers"] == expect
    sd = tm.load_safetensors_dir(ckpt)
    src = tm.load_safetensors_dir(tm.make_float_model())
    checked = 0
    for name, w in src.items():
        layer = name[: -len(".weight")]
        if f"{layer}.qweight" not in sd:
            continue
        ov = qc["layers"].get(layer, {})
        bits, (bo, bi) = ov.get("bits", 4), ov.get("block_size", [1, 32])
        qw, s, o = (sd[f"{layer}.{k}"] for k in ("qweight", "scales", "offsets"))
        assert qw.dtype == (torch.int32 if bits == 4 else torch.uint8), layer
        assert s.dtype == torch.float32 and o.dtype == torch.float32
        blocks = tm.blockwise(w.float(), (bo, bi))
        lo, hi = blocks.amin(-1), blocks.amax(-1)
        assert torch.equal(s, (hi - lo) / ((1 << bits) - 1)), layer
        assert torch.equal(o, lo), layer
        deq = tm.dequant_v2_ref(qc, layer, qw, s, o)
        assert (deq - w.float()).abs().max() <= s.max() / 2 * 1.0001, layer  # nearest grid point
        checked += 1
    assert checked == 14


def test_v2_dequantized_state_dict_is_the_format_definition():
    """checkpoint.dequantized_state_dict (quant_math.dequantize, per layer) equals the
    independent fp32 s * q + o of every stored layer, bit for bit."""
    ckpt = tm.tiny_qckpt_v2()
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    sd, ours = tm.load_safetensors_dir(ckpt), dequantized_state_dict(ckpt)
    layers = [n[: -len(".qweight")] for n in sd if n.endswith(".qweight")]
    assert len(layers) == 14
    for layer in layers:
        ref = tm.dequant_v2_ref(qc, layer, *(sd[f"{layer}.{k}"]
                                             for k in ("qweight", "scales", "offsets")))
        assert torch.equal(ours[f"{layer}.weight"], ref), layer
    validate_checkpoint(ckpt, read_quant_config(ckpt))


def test_v1_output_unchanged_by_the_new_options(src, quantized, tmp_path):
    """Float16 scales and overrides equal to the defaults write format 1, the same bytes."""
    out = tmp_path / "q"
    quantize_model(src["llama"], out, bits=4, block_size=(1, 64), progress=False,
                   scale_dtype="float16", layer_overrides=(("mlp.down_proj", 4, (1, 64)),))
    ref = quantized("llama", 4, (1, 64))[0]
    assert (out / "config.json").read_bytes() == (ref / "config.json").read_bytes()
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()


def test_layer_override_errors(src, tmp_path):
    with pytest.raises(ValueError, match=r"--layer nope_proj=.*no converted linear layer"):
        quantize_model(src["llama"], tmp_path / "a", progress=False,
                       layer_overrides=(("nope_proj", 8, None),))
    # down_proj is [128, 256]: a 1x96 block does not tile it; the error names the layer
    with pytest.raises(QahiraFormatError, match=r"mlp\.down_proj.*block \[1, 96\] at 8 bits"):
        quantize_model(src["llama"], tmp_path / "b", progress=False,
                       layer_overrides=(("mlp.down_proj", 8, (1, 96)),))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_layer_and_scale_dtype(tmp_path):
    from qahira_vllm.cli import main as cli_main

    out = tmp_path / "q"
    rc = cli_main(["quantize", str(tm.make_float_model()), str(out), "--block", "1x32",
                   "--scale-dtype", "float32", "--offset-dtype", "float32",
                   "--layer", "mlp.down_proj=8:1x16",
                   "--layer", "self_attn.v_proj=8", "--layer",
                   "model.layers.1.mlp.up_proj=4:2x64", "--device", "cpu"])
    assert rc == 0
    ours = json.loads((out / "config.json").read_text())["quantization_config"]
    ref = json.loads((tm.tiny_qckpt_v2() / "config.json").read_text())["quantization_config"]
    assert ours["layers"] == ref["layers"] and ours["scale_dtype"] == "float32"
    a, b = tm.load_safetensors_dir(out), tm.load_safetensors_dir(tm.tiny_qckpt_v2())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for bad in ("mlp.down_proj", "mlp.down_proj=3", "=8", "mlp.down_proj=8:1x"):
        with pytest.raises(SystemExit):
            cli_main(["quantize", "m", str(tmp_path / "x"), "--layer", bad])
