"""The vLLM plugin without an engine: entry point, registration, config, shard checks."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest

from qahira_vllm.format import QahiraFormatError, QahiraQuantConfig


def test_entry_point_is_declared():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    (ep,) = [e for e in eps if e.name == "qahira"]
    assert ep.value == "qahira_vllm.vllm_plugin:register"


def test_registration_is_idempotent_and_cheap():
    # Fresh interpreter: registering twice adds "qahira" once and imports no model code.
    code = (
        "import sys, time\n"
        "import vllm.model_executor.layers.quantization as q\n"
        "from qahira_vllm.vllm_plugin import register\n"
        "t = time.perf_counter(); register(); register(); dt = time.perf_counter() - t\n"
        "from vllm.model_executor.layers.quantization import get_quantization_config\n"
        "print(q.QUANTIZATION_METHODS.count('qahira'),\n"
        "      'vllm.model_executor.layers.linear' in sys.modules,\n"
        "      get_quantization_config('qahira').__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[-3:] == ["1", "False", "QahiraConfig"]


@pytest.fixture(scope="module")
def qahira_config_cls():
    from qahira_vllm.vllm_plugin import register

    register()
    from qahira_vllm.vllm_plugin.config import QahiraConfig

    return QahiraConfig


def test_from_config_reads_the_format(qahira_config_cls):
    cfg = qahira_config_cls.from_config({"quant_method": "qahira", "format_version": 1,
                                         "bits": 8, "block_size": [8, 4],
                                         "offset_dtype": "float32"})
    assert cfg.get_name() == "qahira"
    assert (cfg.fmt.bits, cfg.fmt.block_size, cfg.fmt.offset_dtype) == (8, (8, 4), "float32")


@pytest.mark.parametrize("bad,needle", [
    ({"bits": 3}, "bits=3"),
    ({"format_version": 3}, "format_version=3"),
    ({"block_size": [0, 64]}, "block_size"),
])
def test_from_config_errors(qahira_config_cls, bad, needle):
    d = {"quant_method": "qahira", "format_version": 1, "bits": 4, "block_size": [1, 64], **bad}
    with pytest.raises(QahiraFormatError, match=needle):
        qahira_config_cls.from_config(d)


def _method(block, bits=4):
    from qahira_vllm.vllm_plugin.linear_method import QahiraLinearMethod

    return QahiraLinearMethod(QahiraQuantConfig(bits=bits, block_size=block),
                              "model.layers.0.self_attn.qkv_proj")


def test_partition_check_accepts_aligned_shards():
    # qkv at TP=2 of a 256-hidden model: q 128 + k 64 + v 64 rows, 256 input columns.
    _method((8, 64))._check_partition(256, [128, 64, 64], 256, 512)


@pytest.mark.parametrize("block,in_pp,parts,in_full,out_full,needle", [
    ((1, 256), 128, [256], 256, 256, "input shard of 128 columns (tensor-parallel shard)"),
    ((16, 32), 256, [128, 24, 24], 256, 352, "output shard of 24 rows"),
    ((1, 48), 256, [256], 256, 256, "does not divide the layer"),
    ((1, 4), 252, [64], 252, 64, "multiple of 8 (int4 packing)"),
])
def test_partition_check_names_layer_and_shard(block, in_pp, parts, in_full, out_full, needle):
    with pytest.raises(QahiraFormatError) as err:
        _method(block)._check_partition(in_pp, parts, in_full, out_full)
    assert needle in str(err.value) and "qkv_proj" in str(err.value)


# ---- format 2: per-layer configs, fused layers, fp32 scales ----------------------------------

V2 = {"quant_method": "qahira", "format_version": 2, "bits": 4, "block_size": [1, 32],
      "scale_dtype": "float32", "offset_dtype": "float16",
      "layers": {f"model.layers.0.self_attn.{m}": {"bits": 8} for m in ("q_proj", "k_proj",
                                                                        "v_proj")}
      | {"model.layers.0.mlp.gate_proj": {"block_size": [1, 16]},
         "model.layers.0.mlp.down_proj": {"bits": 8, "block_size": [2, 64]}}}
LLAMA_PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj",
                                                                             "up_proj"]}


def _v2_config(qahira_config_cls, layers=None):
    cfg = qahira_config_cls.from_config({**V2, "layers": V2["layers"] if layers is None
                                         else layers})
    cfg.packed_modules_mapping = dict(LLAMA_PACKED)  # what vLLM sets from the model class
    return cfg


def test_v2_layer_configs_for_vllm_layers(qahira_config_cls):
    cfg = _v2_config(qahira_config_cls)
    qkv = cfg.layer_fmt("model.layers.0.self_attn.qkv_proj")
    assert (qkv.bits, qkv.block_size, qkv.scale_dtype) == (8, (1, 32), "float32")
    down = cfg.layer_fmt("model.layers.0.mlp.down_proj")
    assert (down.bits, down.block_size) == (8, (2, 64))
    other = cfg.layer_fmt("model.layers.1.self_attn.qkv_proj")
    assert (other.bits, other.block_size) == (4, (1, 32))
    assert "scale_dtype=float32" in repr(cfg)


def test_v2_fused_members_must_agree(qahira_config_cls):
    cfg = _v2_config(qahira_config_cls)
    with pytest.raises(QahiraFormatError, match=r"fuses \['model\.layers\.0\.mlp\.gate_proj', "
                       r"'model\.layers\.0\.mlp\.up_proj'\] into one layer "
                       r"'model\.layers\.0\.mlp\.gate_up_proj'.*gate_proj: 4 bits, block "
                       r"\[1, 16\], model\.layers\.0\.mlp\.up_proj: 4 bits, block \[1, 32\]"):
        cfg.layer_fmt("model.layers.0.mlp.gate_up_proj")


def test_v2_fields_refused_online():
    from qahira_vllm.vllm_plugin.online import OnlineSettings

    for bad in ({"scale_dtype": "float32"}, {"layers": {"x": {"bits": 8}}}):
        with pytest.raises(QahiraFormatError, match=r"online.*cannot be used online.*"
                                                    r"--layer SUFFIX=BITS"):
            OnlineSettings.from_dict(bad, "online settings")
