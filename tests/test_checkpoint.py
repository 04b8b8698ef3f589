"""qahira_vllm.checkpoint: header validation on corrupted copies of a real tiny checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file


from support import tiny as tm  # noqa: E402
from qahira_vllm.checkpoint import (read_headers, read_quant_config,  # noqa: E402
                                    resolve_model_dir, validate_checkpoint, write_checkpoint)
from qahira_vllm.format import QahiraFormatError, QahiraQuantConfig  # noqa: E402
from qahira_vllm.quantize import quantize_model  # noqa: E402

LAYER = "model.layers.1.self_attn.k_proj"  # [out=64, in=128]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    src = tm.make_model_dir(root / "src", "qwen2", seed=3)
    out = {"src": src}
    for name, bits, block, odt in [("q4", 4, (1, 64), "float16"),
                                   ("q8", 8, (8, 4), "float32")]:
        out[name] = root / name
        quantize_model(src, out[name], bits=bits, block_size=block, offset_dtype=odt,
                       progress=False)
    return out


def _corrupt(base: Path, dst: Path, edit) -> Path:
    """Copy `base` to `dst`, applying edit(state_dict) to its tensors before re-saving."""
    shutil.copytree(base, dst)
    sd = tm.load_safetensors_dir(dst)
    edit(sd)
    for f in dst.glob("*.safetensors"):
        f.unlink()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(dst / "model.safetensors"))
    return dst


def test_valid_checkpoints(ckpts):
    for name in ("q4", "q8"):
        cfg = read_quant_config(ckpts[name])
        assert len(validate_checkpoint(ckpts[name], cfg)) == 14
        assert len(validate_checkpoint(str(ckpts[name]), cfg)) == 14  # str paths too
    cfg8 = read_quant_config(ckpts["q8"])
    assert (cfg8.bits, cfg8.block_size, cfg8.offset_dtype) == (8, (8, 4), "float32")
    metas = read_headers(ckpts["q4"])
    assert metas[f"{LAYER}.qweight"].shape == (64, 16)
    assert metas[f"{LAYER}.qweight"].dtype == torch.int32
    assert metas[f"{LAYER}.bias"].dtype == torch.float32


@pytest.mark.parametrize("name,edit,fragments", [
    ("scales_shape",
     lambda sd: sd.__setitem__(f"{LAYER}.scales", torch.ones(64, 3, dtype=torch.float16)),
     [f"'{LAYER}.scales'", "torch.float16 [64, 3]", "expected torch.float16 [64, 2]"]),
    ("scales_transposed",
     lambda sd: sd.__setitem__(f"{LAYER}.scales", sd[f"{LAYER}.scales"].t()),
     [f"'{LAYER}.scales'", "expected torch.float16 [64, 2]"]),
    ("offsets_dtype",
     lambda sd: sd.__setitem__(f"{LAYER}.offsets", sd[f"{LAYER}.offsets"].float()),
     [f"'{LAYER}.offsets'", "is torch.float32 [64, 2]", "expected torch.float16 [64, 2]"]),
    ("qweight_dtype",
     lambda sd: sd.__setitem__(f"{LAYER}.qweight", sd[f"{LAYER}.qweight"].to(torch.int64)),
     [f"'{LAYER}.qweight'", "is torch.int64 [64, 16]", "expected torch.int32 [64, 16]"]),
    ("qweight_unpacked",
     lambda sd: sd.__setitem__(f"{LAYER}.qweight", torch.zeros(64, 128, dtype=torch.uint8)),
     [f"'{LAYER}.qweight'", "expected torch.int32"]),
    ("missing_offsets",
     lambda sd: sd.pop(f"{LAYER}.offsets"),
     [f"missing tensor '{LAYER}.offsets'", "expected torch.float16 [64, 2]"]),
    ("missing_qweight",
     lambda sd: sd.pop(f"{LAYER}.qweight"),
     [f"'{LAYER}.qweight'"]),
    ("weight_and_qweight",
     lambda sd: sd.__setitem__(f"{LAYER}.weight", torch.zeros(64, 128)),
     [f"'{LAYER}'", "float 'weight'", "quantized tensors"]),
])
def test_corrupted_4bit(ckpts, tmp_path, name, edit, fragments):
    bad = _corrupt(ckpts["q4"], tmp_path / name, edit)
    cfg = read_quant_config(bad)
    with pytest.raises(QahiraFormatError) as ei:
        validate_checkpoint(bad, cfg)
    msg = str(ei.value)
    for f in fragments:
        assert f in msg, (f, msg)


@pytest.mark.parametrize("name,edit,fragments", [
    ("qweight_int32",
     lambda sd: sd.__setitem__(f"{LAYER}.qweight", sd[f"{LAYER}.qweight"].to(torch.int32)),
     [f"'{LAYER}.qweight'", "is torch.int32 [64, 128]", "expected torch.uint8 [64, 128]"]),
    ("offsets_fp16",
     lambda sd: sd.__setitem__(f"{LAYER}.offsets", sd[f"{LAYER}.offsets"].half()),
     [f"'{LAYER}.offsets'", "expected torch.float32 [8, 32]"]),
    ("scales_per_row",
     lambda sd: sd.__setitem__(f"{LAYER}.scales", torch.ones(64, 32, dtype=torch.float16)),
     [f"'{LAYER}.scales'", "expected torch.float16 [8, 32]"]),
])
def test_corrupted_8bit_2d_block(ckpts, tmp_path, name, edit, fragments):
    bad = _corrupt(ckpts["q8"], tmp_path / name, edit)
    with pytest.raises(QahiraFormatError) as ei:
        validate_checkpoint(bad, read_quant_config(bad))
    for f in fragments:
        assert f in str(ei.value), (f, str(ei.value))


def test_config_that_disagrees_with_tensors(ckpts):
    """Validating a 4-bit 1x64 checkpoint against an 8-bit or 8x4 config must fail."""
    with pytest.raises(QahiraFormatError, match="expected torch.uint8"):
        validate_checkpoint(ckpts["q4"], QahiraQuantConfig(bits=8, block_size=(1, 8)))
    with pytest.raises(QahiraFormatError,
                       match=r"down_proj.scales.*expected torch.float16 \[16, 64\]"):
        validate_checkpoint(ckpts["q4"], QahiraQuantConfig(bits=4, block_size=(8, 4)))


def test_float_model_has_no_quantized_tensors(ckpts):
    with pytest.raises(QahiraFormatError, match="no tensor ends in"):
        validate_checkpoint(ckpts["src"], QahiraQuantConfig())


def test_read_quant_config_errors(ckpts, tmp_path):
    with pytest.raises(QahiraFormatError, match="has no quantization_config"):
        read_quant_config(ckpts["src"])
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        read_quant_config(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(ckpts["q4"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 3
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QahiraFormatError, match=r"config\.json.*format_version=3"):
        read_quant_config(bad)
    cfg["quantization_config"].update(format_version=1, block_size=[3])
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QahiraFormatError, match="block_size"):
        read_quant_config(bad)


def test_resolve_model_dir(tmp_path):
    assert resolve_model_dir(tmp_path) == tmp_path
    f = tmp_path / "x.json"
    f.write_text("{}")
    with pytest.raises(FileNotFoundError, match="is a file"):
        resolve_model_dir(f)


def test_write_checkpoint(tmp_path):
    from safetensors.torch import load_file

    src = tmp_path / "src"
    src.mkdir()
    for name in ("config.json", "model.safetensors", "model.safetensors.index.json",
                 "pytorch_model.bin", "m.gguf", "qahira_model.json"):
        (src / name).write_text("stale")  # replaced or not carried over
    (src / "tokenizer.json").write_bytes(b'{"tok": 1}')
    (src / "sub").mkdir()  # folders are not copied
    tensors = {"a.qweight": torch.arange(24, dtype=torch.int32).reshape(3, 8)[:, ::2],
               "b.weight": torch.randn(4, 5)}
    config = {"architectures": ["X"], "quantization_config": {"bits": 4}}
    out = tmp_path / "out"
    assert write_checkpoint(src, out, config, tensors) == out.resolve()
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors",
                                                     "tokenizer.json"]
    assert json.loads((out / "config.json").read_text()) == config
    assert (out / "tokenizer.json").read_bytes() == b'{"tok": 1}'
    back = load_file(str(out / "model.safetensors"))  # safetensors' own reader
    assert back.keys() == tensors.keys()
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t)
    # an existing folder is kept unless overwrite
    with pytest.raises(FileExistsError, match="already exists"):
        write_checkpoint(src, out, {"other": 1}, tensors)
    assert json.loads((out / "config.json").read_text()) == config
    write_checkpoint(src, out, {"other": 1}, tensors, overwrite=True)
    assert json.loads((out / "config.json").read_text()) == {"other": 1}
    # a failed write leaves nothing behind, not even its temporary folder
    with pytest.raises(AttributeError, match="contiguous"):
        write_checkpoint(src, tmp_path / "failed", config, {"x": "not a tensor"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


# ---- format 2: each layer checked against its own config -------------------------------------

def _v2_copy(tmp_path, edit):
    dst = tmp_path / "v2"
    shutil.copytree(tm.tiny_qckpt_v2(), dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg["quantization_config"])
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_v2_layers_validated_each_with_its_config(tmp_path):
    good = tm.tiny_qckpt_v2()
    layers = validate_checkpoint(good, read_quant_config(good))
    assert len(layers) == 14
    # the stored down_proj is 8-bit 1x16: read as the 4-bit 1x32 default it must not pass
    down = "model.layers.0.mlp.down_proj"
    bad = _v2_copy(tmp_path, lambda qc: qc["layers"].pop(down))
    with pytest.raises(QahiraFormatError, match=rf"tensor '{down}\.(qweight|scales)'.*expected"):
        validate_checkpoint(bad, read_quant_config(bad))


def test_v2_scale_dtype_checked(tmp_path):
    bad = _v2_copy(tmp_path, lambda qc: qc.update(scale_dtype="float16"))
    with pytest.raises(QahiraFormatError, match=r"scales'.* is torch\.float32.*expected "
                                                r"torch\.float16"):
        validate_checkpoint(bad, read_quant_config(bad))


def test_v2_override_of_a_missing_layer_is_refused(tmp_path):
    bad = _v2_copy(tmp_path, lambda qc: qc["layers"].update(
        {"model.layers.0.mlp.down_prj": {"bits": 8}}))
    with pytest.raises(QahiraFormatError, match=r"layers names \['model\.layers\.0\.mlp\."
                                                r"down_prj'\].*not store quantized"):
        validate_checkpoint(bad, read_quant_config(bad))
