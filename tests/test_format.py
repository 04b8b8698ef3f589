"""qahira_vllm.format: config parsing/validation, divisibility and per-tensor shape checks."""

from __future__ import annotations

import json

import pytest
import torch

from qahira_vllm.format import (QahiraFormatError, QahiraQuantConfig, check_divides,
                                expected_tensors, layer_dims, validate_layer_tensors)

GOOD = {"quant_method": "qahira", "format_version": 1, "bits": 4, "block_size": [1, 64],
        "offset_dtype": "float16", "modules_not_converted": [], "quantizer": "mse_clip",
        "source_model": "some/model", "created_by": "qahira-vllm 0.1.0"}


def _with(**kw):
    d = dict(GOOD)
    for k, v in kw.items():
        if v is _DROP:
            d.pop(k)
        else:
            d[k] = v
    return d


_DROP = object()


# ---- from_dict / to_dict --------------------------------------------------------------------

def test_from_dict_good_and_round_trip():
    cfg = QahiraQuantConfig.from_dict(GOOD)
    assert (cfg.bits, cfg.block_size, cfg.offset_dtype) == (4, (1, 64), "float16")
    assert (cfg.bo, cfg.bi, cfg.qmax, cfg.offset_torch_dtype) == (1, 64, 15, torch.float16)
    assert cfg.extra == {"quantizer": "mse_clip", "source_model": "some/model",
                         "created_by": "qahira-vllm 0.1.0"}
    d = cfg.to_dict()
    assert d == GOOD                                      # every field, provenance included
    assert json.loads(json.dumps(d)) == d                 # JSON-serialisable (lists, not tuples)
    assert QahiraQuantConfig.from_dict(json.loads(json.dumps(d))) == cfg


@pytest.mark.parametrize("bits,block,odt,skip", [
    (8, (8, 4), "float32", ("model.layers.0.mlp.down_proj",)),
    (4, (2, 16), "float16", ()),
])
def test_round_trip_other_configs(bits, block, odt, skip):
    cfg = QahiraQuantConfig(bits=bits, block_size=block, offset_dtype=odt,
                            modules_not_converted=skip, extra={"merged_adapters": ["a"]})
    d = cfg.to_dict()
    assert d["block_size"] == list(block) and d["modules_not_converted"] == list(skip)
    assert d["quant_method"] == "qahira" and d["format_version"] == 1
    back = QahiraQuantConfig.from_dict(json.loads(json.dumps(d)))
    assert back == cfg and back.extra == {"merged_adapters": ["a"]}
    assert back.qmax == (1 << bits) - 1
    assert back.offset_torch_dtype == {"float16": torch.float16, "float32": torch.float32}[odt]


def test_defaults_for_optional_fields():
    cfg = QahiraQuantConfig.from_dict(_with(offset_dtype=_DROP, modules_not_converted=_DROP))
    assert cfg.offset_dtype == "float16" and cfg.modules_not_converted == ()


@pytest.mark.parametrize("bad,field", [
    (dict(quant_method="gptq"), "quant_method"),
    (dict(quant_method=_DROP), "quant_method"),
    (dict(format_version=3), "format_version"),
    (dict(format_version=True), "format_version"),
    (dict(format_version=_DROP), "format_version"),
    (dict(bits=3), "bits"),
    (dict(bits="4"), "bits"),
    (dict(bits=_DROP), "bits"),
    (dict(block_size=[64]), "block_size"),
    (dict(block_size=[1, 64, 1]), "block_size"),
    (dict(block_size=[1.0, 64]), "block_size"),
    (dict(block_size=[0, 64]), "block_size"),
    (dict(block_size=["1", "64"]), "block_size"),
    (dict(block_size=64), "block_size"),
    (dict(block_size=None), "block_size"),
    (dict(block_size=_DROP), "block_size"),
    (dict(offset_dtype="int8"), "offset_dtype"),
    (dict(offset_dtype="bfloat16"), "offset_dtype"),
    (dict(offset_dtype=None), "offset_dtype"),
    (dict(modules_not_converted="lm_head"), "modules_not_converted"),
    (dict(modules_not_converted=None), "modules_not_converted"),
    (dict(modules_not_converted=[1]), "modules_not_converted"),
])
def test_from_dict_errors_name_the_field(bad, field):
    with pytest.raises(QahiraFormatError) as ei:
        QahiraQuantConfig.from_dict(_with(**bad), source="ckpt/config.json")
    assert field in str(ei.value)


def test_from_dict_error_names_source():
    with pytest.raises(QahiraFormatError, match=r"ckpt/config\.json.*quant_method='awq'"):
        QahiraQuantConfig.from_dict(_with(quant_method="awq"), source="ckpt/config.json")
    with pytest.raises(QahiraFormatError, match=r"format_version=7"):
        QahiraQuantConfig.from_dict(_with(format_version=7))


# ---- format_version 2: scale_dtype, per-layer overrides -------------------------------------

V2 = {"quant_method": "qahira", "format_version": 2, "bits": 4, "block_size": [1, 32],
      "scale_dtype": "float32", "offset_dtype": "float32",
      "layers": {"model.layers.0.mlp.down_proj": {"bits": 8, "block_size": [1, 16]},
                 "model.layers.1.self_attn.v_proj": {"bits": 8}},
      "modules_not_converted": [], "source_model": "x.gguf"}


def test_v1_config_writes_format_1_byte_for_byte():
    cfg = QahiraQuantConfig.from_dict(GOOD)
    assert cfg.format_version == 1 and cfg.scale_dtype == "float16" and dict(cfg.layers) == {}
    # the very bytes a format-1 writer produced: same keys, same order, no v2 keys
    assert json.dumps(cfg.to_dict()) == json.dumps(GOOD)
    assert cfg.for_layer("model.layers.0.mlp.down_proj") is cfg


def test_v2_round_trip_and_for_layer():
    cfg = QahiraQuantConfig.from_dict(json.loads(json.dumps(V2)))
    assert cfg.format_version == 2 and cfg.scale_torch_dtype == torch.float32
    assert json.dumps(cfg.to_dict()) == json.dumps(V2)        # order and values preserved
    assert QahiraQuantConfig.from_dict(cfg.to_dict()) == cfg
    down = cfg.for_layer("model.layers.0.mlp.down_proj")
    assert (down.bits, down.block_size, down.scale_dtype, down.offset_dtype) == \
        (8, (1, 16), "float32", "float32")
    assert dict(down.layers) == {} and down.for_layer("anything") is down
    v = cfg.for_layer("model.layers.1.self_attn.v_proj")
    assert (v.bits, v.block_size) == (8, (1, 32))               # block from the defaults
    other = cfg.for_layer("model.layers.0.mlp.up_proj")          # exact names only
    assert (other.bits, other.block_size, other.scale_dtype) == (4, (1, 32), "float32")
    assert cfg.for_layer("layers.0.mlp.down_proj").bits == 4     # no suffix matching


def test_v2_only_when_needed_and_hashable():
    import copy
    import pickle

    only_scales = QahiraQuantConfig(scale_dtype="float32")
    assert only_scales.to_dict()["format_version"] == 2 and "layers" not in only_scales.to_dict()
    only_layers = QahiraQuantConfig(layers={"a.b": {"bits": 8}})
    d = only_layers.to_dict()
    assert d["format_version"] == 2 and d["scale_dtype"] == "float16"
    assert d["layers"] == {"a.b": {"bits": 8}}
    cfg = QahiraQuantConfig.from_dict(V2)
    assert {cfg: 1}[QahiraQuantConfig.from_dict(V2)] == 1      # equal configs, equal hashes
    assert pickle.loads(pickle.dumps(cfg)) == cfg == copy.deepcopy(cfg)  # vLLM copies configs
    assert cfg != QahiraQuantConfig.from_dict({**V2, "layers": {}})
    with pytest.raises(TypeError):
        cfg.layers["x"] = {"bits": 8}                            # frozen


def test_v2_shapes_and_checks_use_the_layer():
    cfg = QahiraQuantConfig.from_dict(V2)
    down = cfg.for_layer("model.layers.0.mlp.down_proj")
    e = expected_tensors(64, 128, down)
    assert e["qweight"] == ((64, 128), torch.uint8)
    assert e["scales"] == ((64, 8), torch.float32) and e["offsets"] == ((64, 8), torch.float32)
    name = "model.layers.0.mlp.down_proj"
    tensors = {"qweight": torch.zeros(64, 128, dtype=torch.uint8),
               "scales": torch.ones(64, 8), "offsets": torch.zeros(64, 8)}
    validate_layer_tensors(name, tensors, 64, 128, cfg)          # the model cfg: layer taken
    assert layer_dims(name, tensors, cfg) == (64, 128)           # 8-bit: in = columns
    with pytest.raises(QahiraFormatError, match=r"scales.*torch\.float16.*expected torch\.float32"):
        validate_layer_tensors(name, {**tensors, "scales": torch.ones(64, 8).half()}, 64, 128, cfg)
    with pytest.raises(QahiraFormatError, match=r"block \[1, 16\] at 8 bits.*in=24"):
        check_divides(name, 64, 24, cfg)


@pytest.mark.parametrize("bad,field", [
    (dict(scale_dtype="bfloat16"), "scale_dtype"),
    (dict(scale_dtype=None), "scale_dtype"),
    (dict(layers=["model.layers.0.mlp.down_proj"]), "layers"),
    (dict(layers={"m": {"bits": 3}}), r"layers\['m'\]\.bits"),
    (dict(layers={"m": {"bits": True}}), r"layers\['m'\]\.bits"),
    (dict(layers={"m": {"block_size": [0, 4]}}), r"layers\['m'\]\.block_size"),
    (dict(layers={"m": {"block_size": "1x32"}}), r"layers\['m'\]\.block_size"),
    (dict(layers={"m": {"offset_dtype": "float16"}}), r"layers\['m'\].*offset_dtype"),
    (dict(layers={"m": {}}), r"layers\['m'\]"),
    (dict(layers={"m": 8}), r"layers\['m'\]"),
    (dict(layers={"": {"bits": 8}}), "layers"),
])
def test_v2_bad_fields_name_the_field(bad, field):
    with pytest.raises(QahiraFormatError, match=r"ckpt/config\.json: .*" + field):
        QahiraQuantConfig.from_dict({**V2, **bad}, source="ckpt/config.json")


@pytest.mark.parametrize("key", ["scale_dtype", "layers"])
def test_v1_dict_with_v2_fields_refused(key):
    with pytest.raises(QahiraFormatError, match=rf"ckpt/config\.json.*{key}.*format_version 2"):
        QahiraQuantConfig.from_dict({**GOOD, key: V2[key]}, source="ckpt/config.json")


def test_is_converted():
    cfg = QahiraQuantConfig(modules_not_converted=("model.layers.1.mlp.down_proj", "o_proj",
                                                   "model.layers.0.self_attn"))
    assert not cfg.is_converted("model.layers.1.mlp.down_proj")       # exact name
    assert cfg.is_converted("model.layers.0.mlp.down_proj")            # other layer index
    assert cfg.is_converted("model.layers.11.mlp.down_proj")           # no prefix confusion
    assert not cfg.is_converted("model.layers.0.self_attn.o_proj")     # by suffix
    assert not cfg.is_converted("model.layers.5.self_attn.o_proj")
    assert not cfg.is_converted("model.layers.0.self_attn.q_proj")     # under a listed parent
    assert cfg.is_converted("model.layers.1.self_attn.q_proj")
    assert cfg.is_converted("model.layers.0.self_attn_extra.q_proj")   # not a dotted prefix
    assert cfg.is_converted("model.layers.0.mlp.xo_proj")              # not a dotted suffix
    assert QahiraQuantConfig().is_converted("model.layers.0.mlp.up_proj")


# ---- check_divides / expected_tensors / validate_layer_tensors ------------------------------

def test_check_divides_ok():
    for bits, block in [(4, (1, 64)), (8, (8, 4)), (4, (2, 16)), (8, (1, 96))]:
        check_divides("x", 128, 192, QahiraQuantConfig(bits=bits, block_size=block))
    check_divides("x", 128, 4, QahiraQuantConfig(bits=8, block_size=(1, 4)))  # 8-bit: no in%8


@pytest.mark.parametrize("out_f,in_f,bits,block,fragments", [
    (100, 128, 4, (8, 64), ["out=100 is not a multiple of bo=8"]),
    (128, 96, 4, (1, 64), ["in=96 is not a multiple of bi=64"]),
    (128, 12, 4, (1, 4), ["in=12 is not a multiple of 8 (int4 packing)"]),
    (30, 100, 8, (4, 64),
     ["out=30 is not a multiple of bo=4", "in=100 is not a multiple of bi=64"]),
])
def test_check_divides_messages(out_f, in_f, bits, block, fragments):
    cfg = QahiraQuantConfig(bits=bits, block_size=block)
    with pytest.raises(QahiraFormatError) as ei:
        check_divides("model.layers.3.mlp.down_proj", out_f, in_f, cfg)
    msg = str(ei.value)
    assert "'model.layers.3.mlp.down_proj'" in msg
    assert f"[out={out_f}, in={in_f}]" in msg
    assert f"block [{block[0]}, {block[1]}]" in msg and f"{bits} bits" in msg
    for f in fragments:
        assert f in msg


def test_expected_tensors():
    e4 = expected_tensors(256, 128, QahiraQuantConfig(bits=4, block_size=(8, 4)))
    assert e4 == {"qweight": ((256, 16), torch.int32), "scales": ((32, 32), torch.float16),
                  "offsets": ((32, 32), torch.float16)}
    e8 = expected_tensors(64, 128, QahiraQuantConfig(bits=8, block_size=(1, 64),
                                                     offset_dtype="float32"))
    assert e8 == {"qweight": ((64, 128), torch.uint8), "scales": ((64, 2), torch.float16),
                  "offsets": ((64, 2), torch.float32)}


def _good_tensors(out_f, in_f, cfg):
    return {k: torch.zeros(shape, dtype=dt)
            for k, (shape, dt) in expected_tensors(out_f, in_f, cfg).items()}


def test_validate_layer_tensors_accepts_good():
    for bits, block, odt in [(4, (1, 64), "float16"), (8, (2, 16), "float32")]:
        cfg = QahiraQuantConfig(bits=bits, block_size=block, offset_dtype=odt)
        validate_layer_tensors("L", _good_tensors(64, 128, cfg), 64, 128, cfg)


@pytest.mark.parametrize("suffix,bad,expect", [
    ("qweight", torch.zeros(64, 128, dtype=torch.int32), "expected torch.int32 [64, 16]"),
    ("qweight", torch.zeros(64, 16, dtype=torch.uint8), "expected torch.int32 [64, 16]"),
    ("scales", torch.zeros(64, 3, dtype=torch.float16), "expected torch.float16 [64, 2]"),
    ("scales", torch.zeros(64, 2, dtype=torch.float32), "expected torch.float16 [64, 2]"),
    ("offsets", torch.zeros(2, 64, dtype=torch.float16), "expected torch.float16 [64, 2]"),
    ("offsets", torch.zeros(64, 2, dtype=torch.bfloat16), "expected torch.float16 [64, 2]"),
    ("offsets", None, "missing tensor 'model.layers.0.self_attn.k_proj.offsets'"),
])
def test_validate_layer_tensors_messages(suffix, bad, expect):
    cfg = QahiraQuantConfig(bits=4, block_size=(1, 64))
    tensors = _good_tensors(64, 128, cfg)
    if bad is None:
        del tensors[suffix]
    else:
        tensors[suffix] = bad
    layer = "model.layers.0.self_attn.k_proj"
    with pytest.raises(QahiraFormatError) as ei:
        validate_layer_tensors(layer, tensors, 64, 128, cfg, where="model.safetensors")
    msg = str(ei.value)
    assert f"'{layer}.{suffix}'" in msg
    assert expect in msg
    assert "model.safetensors" in msg
    if bad is not None:  # the actual dtype/shape is reported too
        assert f"{bad.dtype} {list(bad.shape)}" in msg


def test_validate_layer_tensors_checks_divisibility_first():
    cfg = QahiraQuantConfig(bits=4, block_size=(1, 64))
    with pytest.raises(QahiraFormatError, match=r"'L'.*in=96 is not a multiple of bi=64"):
        validate_layer_tensors("L", {}, 64, 96, cfg)


@pytest.mark.parametrize("bits,block,out_f,in_f", [(4, (1, 64), 64, 128), (4, (8, 4), 256, 40),
                                                   (8, (2, 16), 32, 48), (8, (1, 1), 3, 5)])
def test_layer_dims_inverts_expected_tensors(bits, block, out_f, in_f):
    cfg = QahiraQuantConfig(bits=bits, block_size=block)
    tensors = _good_tensors(out_f, in_f, cfg)
    assert layer_dims("L", tensors, cfg) == (out_f, in_f)
    # shape-only stand-ins (header entries) work the same
    shapes = {k: type("Meta", (), {"shape": tuple(t.shape)})() for k, t in tensors.items()}
    assert layer_dims("L", shapes, cfg) == (out_f, in_f)


def test_layer_dims_errors_name_the_tensor():
    cfg = QahiraQuantConfig(bits=4, block_size=(1, 64))
    with pytest.raises(QahiraFormatError, match=r"missing tensor 'm.q_proj.qweight'.*'scales'"):
        layer_dims("m.q_proj", {"scales": torch.zeros(2, 2)}, cfg)
    with pytest.raises(QahiraFormatError, match=r"'m.q_proj.qweight' has shape \[4, 2, 2\]"):
        layer_dims("m.q_proj", {"qweight": torch.zeros(4, 2, 2, dtype=torch.int32)}, cfg)
