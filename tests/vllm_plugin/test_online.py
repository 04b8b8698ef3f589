"""Online quantization (`--quantization qahira` on a float model) without an engine: the
settings, vLLM's route to them, the layer-wise quantization of one layer, and the refusals."""

from __future__ import annotations

import inspect
import json
import socket

import pytest
import torch

from qahira_vllm.format import QahiraFormatError
from support.tiny import dequant_packed_ref, error_bound, make_model_dir


@pytest.fixture(scope="module")
def plugin():
    from qahira_vllm.vllm_plugin import register

    register()
    from qahira_vllm.vllm_plugin import config, online

    return config.QahiraConfig, online


def test_defaults_are_those_of_qahira_quantize(plugin):
    """What vLLM builds for `quantization="qahira"` on a float model: QahiraConfig()."""
    from qahira_vllm.quantize import quantize_model

    QahiraConfig, _ = plugin
    cfg = QahiraConfig()
    defaults = inspect.signature(quantize_model).parameters
    assert cfg.online is not None
    assert cfg.fmt.bits == defaults["bits"].default == 4
    assert cfg.fmt.block_size == tuple(defaults["block_size"].default) == (1, 64)
    assert cfg.fmt.offset_dtype == defaults["offset_dtype"].default == "float16"
    assert cfg.online.clip_search is defaults["clip_search"].default is True
    assert cfg.fmt.modules_not_converted == ()


def test_vllm_reads_the_settings_from_hf_overrides(plugin, tmp_path):
    """vLLM's own get_quant_config (no engine): no override -> defaults; the JSON string and
    the file override -> those settings; a qahira checkpoint stays a checkpoint."""
    from vllm.config import LoadConfig, ModelConfig
    from vllm.model_executor.model_loader.weight_utils import get_quant_config

    from qahira_vllm.quantize import quantize_model

    src = make_model_dir(tmp_path / "float", seed=1)
    settings_file = tmp_path / "online.json"
    settings_file.write_text(json.dumps({"bits": 8, "block_size": "2x32", "quantizer": "minmax",
                                         "modules_not_converted": ["down_proj"]}))

    def quant_config(model, overrides):
        mc = ModelConfig(model=str(model), quantization="qahira", hf_overrides=overrides,
                         skip_tokenizer_init=True)
        return get_quant_config(mc, LoadConfig())

    q = quant_config(src, {})
    assert q.online and (q.fmt.bits, q.fmt.block_size, q.online.clip_search) == (4, (1, 64), True)
    q = quant_config(src, {"quantization_config_dict_json": json.dumps(
        {"bits": 8, "block_size": [2, 32], "offset_dtype": "float32"})})
    assert q.online and (q.fmt.bits, q.fmt.block_size, q.fmt.offset_dtype) == (8, (2, 32),
                                                                              "float32")
    q = quant_config(src, {"quantization_config_file": str(settings_file)})
    assert q.online and (q.fmt.bits, q.fmt.block_size, q.online.clip_search,
                         q.fmt.modules_not_converted) == (8, (2, 32), False, ("down_proj",))
    ckpt = tmp_path / "ckpt"
    quantize_model(src, ckpt, bits=8, block_size=(1, 32), progress=False)
    q = quant_config(ckpt, {})
    assert q.online is None and (q.fmt.bits, q.fmt.block_size) == (8, (1, 32))


@pytest.mark.parametrize("settings,needles", [
    ({"bits": 3}, ["bits=3", "(4, 8)"]),
    ({"block_size": [0, 64]}, ["block_size"]),
    ({"block_size": "1by64"}, ["'1by64'", "BOxBI"]),
    ({"quantizer": "gptq"}, ["quantizer='gptq'", "mse_clip"]),
    ({"group_size": 64}, ["group_size", "block_size"]),
    ({"format_version": 1}, ["format_version"]),
    ({"lm_head": True}, ["lm_head", "qahira quantize", "--lm-head"]),
    ({"quant_method": "gptq"}, ["quant_method='gptq'"]),
])
def test_bad_settings_are_refused(plugin, settings, needles):
    QahiraConfig, _ = plugin
    with pytest.raises(QahiraFormatError) as err:
        QahiraConfig.from_config_dict_json(json.dumps(settings))
    msg = str(err.value)
    assert "quantization_config_dict_json" in msg
    for n in needles:
        assert n in msg, msg


def test_bad_settings_file_and_json(plugin, tmp_path):
    QahiraConfig, _ = plugin
    with pytest.raises(QahiraFormatError, match="not valid JSON"):
        QahiraConfig.from_config_dict_json("{bits: 8")
    with pytest.raises(QahiraFormatError, match="expected a JSON object"):
        QahiraConfig.from_config_dict_json("[8]")
    missing = tmp_path / "nope.json"
    with pytest.raises(QahiraFormatError, match="nope.json"):
        QahiraConfig.from_config_file(str(missing))


def _method(plugin, prefix, bits=4, block=(1, 64)):
    QahiraConfig, online = plugin
    cfg = QahiraConfig.from_config_dict_json(json.dumps({"bits": bits, "block_size": block}))
    return online.QahiraOnlineLinearMethod(cfg.fmt, prefix, cfg.online.clip_search)


@pytest.mark.parametrize("block,in_pp,parts,in_full,out_full,needle", [
    # down_proj of a model with intermediate 96: the block does not tile the layer.
    ((1, 64), 96, [128], 96, 128, "does not divide the layer"),
    # o_proj at TP=2: 128 input columns per rank, bi=256 would straddle the shard boundary.
    ((1, 256), 128, [256], 256, 256, "input shard of 128 columns (tensor-parallel shard)"),
    # qkv_proj with k/v of 24 rows: bo=16 would straddle the q|k and k|v sub-matrix boundaries.
    ((16, 32), 256, [128, 24, 24], 256, 176, "output shard of 24 rows"),
])
def test_untileable_layer_is_refused_naming_it(plugin, block, in_pp, parts, in_full, out_full,
                                               needle):
    prefix = "model.layers.1.self_attn.qkv_proj"
    m = _method(plugin, prefix, block=block)
    with pytest.raises(QahiraFormatError) as err:
        m.create_weights(torch.nn.Module(), in_pp, parts, in_full, out_full, torch.bfloat16,
                         weight_loader=None)
    msg = str(err.value)
    for n in (prefix, needle, "online quantization", "qahira quantize", "block_size",
              "modules_not_converted", "--keep-unconvertible"):
        assert n in msg, msg


def test_skipping_one_member_keeps_the_fused_layer_float(plugin):
    """As `qahira quantize --skip k_proj`: vLLM serves q/k/v as one layer, kept whole."""
    _, online = plugin
    mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj",
                                                                            "up_proj"]}
    assert online.is_skipped("model.layers.0.self_attn.qkv_proj", ("k_proj",), mapping)
    assert online.is_skipped("model.layers.0.mlp.down_proj", ("mlp.down_proj",), mapping)
    assert not online.is_skipped("model.layers.0.mlp.gate_up_proj", ("k_proj",), mapping)
    assert not online.is_skipped("model.layers.0.mlp.down_proj", ("proj",), mapping)


@pytest.fixture(scope="module")
def vllm_tp1():
    """vLLM's real tensor-parallel state for one process (ModelWeightParameter reads its
    rank), on gloo; torn down after the module."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import (destroy_distributed_environment, destroy_model_parallel,
                                  init_distributed_environment, initialize_model_parallel)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{port}")
        initialize_model_parallel(1)
    yield
    destroy_model_parallel()
    destroy_distributed_environment()


def _fused_layer(plugin, parts, in_f, block, bits=4):
    """A qkv-like layer: the online method's params and vLLM's layer-wise loader, fed shard by
    shard as a fused layer's weight_loader would (each shard into its row range)."""
    m = _method(plugin, "model.layers.0.self_attn.qkv_proj", bits=bits, block=block)
    layer = torch.nn.Module()
    layer.quant_method = m
    starts = [sum(parts[:k]) for k in range(len(parts))]

    def shard_loader(param, loaded, shard_id):
        param.data[starts[shard_id]:starts[shard_id] + parts[shard_id]].copy_(loaded)

    m.create_weights(layer, in_f, parts, in_f, sum(parts), torch.bfloat16,
                     weight_loader=shard_loader)
    return layer


def test_layer_is_quantized_once_all_shards_arrived(plugin, vllm_tp1):
    parts, in_f, block = [128, 64, 64], 256, (2, 32)
    layer = _fused_layer(plugin, parts, in_f, block)
    assert layer.weight.is_meta and layer.weight.dtype == torch.float32
    torch.manual_seed(0)
    shards = [torch.randn(p, in_f, dtype=torch.bfloat16) * 0.05 for p in parts]
    for k, w in enumerate(shards[:-1]):
        layer.weight.weight_loader(layer.weight, w, k)
        assert layer.weight.is_meta  # still waiting for the rest of the layer
    layer.weight.weight_loader(layer.weight, shards[-1], len(parts) - 1)

    assert not hasattr(layer, "weight")  # the float copy is gone
    assert layer.qahira_kernel.name in ("cpu_measured", "cpu_blockwise", "dequant_torch",
                                        "cpu_int4pack", "cpu_int4")
    full = torch.cat(shards).float()
    if layer.qahira_kernel.name == "cpu_blockwise":  # keeps the stored layout
        assert layer.qweight.shape == (256, in_f // 8) and layer.qweight.dtype == torch.int32
        assert layer.scales.shape == (128, in_f // 32) and layer.scales.dtype == torch.float16
        deq = dequant_packed_ref(layer.qweight, layer.scales, layer.offsets, block, 4)
        assert bool(((deq - full.double()).abs() <= error_bound(full, block, 4,
                                                                 clip=True)).all())
    # The layer computes x W^T with the quantized W (within the quantization error).
    x = torch.randn(3, in_f)
    y = layer.quant_method.apply(layer, x)
    bound = (x.double().abs() @ error_bound(full, block, 4, clip=True).T)
    assert bool(((y.double() - x.double() @ full.double().T).abs() <= bound + 1e-4).all())


def test_non_finite_weight_is_refused_naming_the_layer(plugin, vllm_tp1):
    layer = _fused_layer(plugin, [64], 128, (1, 64))
    w = torch.randn(64, 128)
    w[5, 7] = float("nan")
    with pytest.raises(QahiraFormatError) as err:
        layer.weight.weight_loader(layer.weight, w, 0)
    assert "model.layers.0.self_attn.qkv_proj.weight" in str(err.value)
    assert "[5, 7]" in str(err.value)
