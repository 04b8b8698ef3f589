"""adapter_config.json, tensor layout, fingerprint, and every validation error."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from support import tiny
from qahira_vllm.adapter_format import (CONFIG_NAME, WEIGHTS_NAME, AdapterConfig, AdapterError,
                                        base_layer_dims, checkpoint_fingerprint, load_adapter,
                                        peft_alpha_for, peft_compatible_scaling,
                                        validate_adapter)

LAYER = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def qckpt():
    return tiny.tiny_qckpt("llama", hidden=64, intermediate=128, heads=2, kv_heads=1)


@pytest.fixture
def qbara_dir(qckpt, tmp_path):
    return tiny.random_adapter(qckpt, tmp_path / "qbara", "qbara", rank=4)


def _edit_config(adapter_dir, fn):
    path = adapter_dir / CONFIG_NAME
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def _edit_tensors(adapter_dir, fn):
    path = adapter_dir / WEIGHTS_NAME
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))


def _check(adapter_dir, qckpt, **kw):
    validate_adapter(load_adapter(adapter_dir), base_layer_dims(qckpt),
                     checkpoint_fingerprint(qckpt), **kw)


@pytest.mark.parametrize("scaling", [2.0, 0.1, 1 / 3, 0.7, 1e-3, 12.345])
@pytest.mark.parametrize("r", [1, 3, 7, 16, 48, 100])
def test_peft_arithmetic_gives_scaling_exactly(scaling, r):
    usable = peft_compatible_scaling(scaling, r)
    assert abs(usable - scaling) <= math.ulp(scaling)
    assert peft_alpha_for(usable, r) / r == usable


@pytest.mark.parametrize("alpha, r_lora", [(16, 8), (16, 64), (7, 3), (1, 6), (32, 12)])
def test_paper_convention_is_always_exact(alpha, r_lora):
    # Q-BaRA: s = alpha / r_lora, stored rank R = 2 r_lora, lora_alpha = 2 alpha.
    assert peft_alpha_for(alpha / r_lora, 2 * r_lora) / (2 * r_lora) == alpha / r_lora


def test_config_fields_and_round_trip(qbara_dir, qckpt):
    d = json.loads((qbara_dir / CONFIG_NAME).read_text())
    assert d["peft_type"] == "LORA" and d["task_type"] == "CAUSAL_LM" and d["bias"] == "none"
    assert d["r"] == 4 and d["lora_alpha"] / d["r"] == d["qahira"]["scaling"] == 2.0
    q = d["qahira"]
    assert (q["adapter_type"], q["format_version"], q["pool"], q["repeat"], q["rank"]) == \
        ("qbara", 1, 2, 2, 4)
    assert q["base_fingerprint"] == checkpoint_fingerprint(qckpt)
    cfg = load_adapter(qbara_dir).config
    assert AdapterConfig.from_json_dict(cfg.to_json_dict()) == cfg
    keys = load_file(str(qbara_dir / WEIGHTS_NAME))
    assert keys[f"base_model.model.{LAYER}.lora_A.weight"].shape == (4, 32)   # [R, in/p]
    assert keys[f"base_model.model.{LAYER}.lora_B.weight"].shape == (32, 4)   # [out/q, R]
    _check(qbara_dir, qckpt, max_rank=4)


def test_plain_peft_lora_uses_peft_scaling():
    base = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}
    assert AdapterConfig.from_json_dict(base).scaling == 2.0
    rs = AdapterConfig.from_json_dict({**base, "use_rslora": True})
    assert rs.scaling == 16 / math.sqrt(8) and rs.adapter_type == "lora"


def test_fingerprint_is_deterministic_and_tracks_weights(qckpt, tmp_path):
    fp = checkpoint_fingerprint(qckpt)
    assert fp == checkpoint_fingerprint(qckpt)
    copy = tmp_path / "copy"
    shutil.copytree(qckpt, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["quantization_config"]["created_by"] = "someone else"   # provenance only
    (copy / "config.json").write_text(json.dumps(cfg))
    assert checkpoint_fingerprint(copy) == fp
    tensors = load_file(str(copy / "model.safetensors"))
    tensors[f"{LAYER}.offsets"][0, 0] += 0.001
    save_file(tensors, str(copy / "model.safetensors"))
    assert checkpoint_fingerprint(copy) != fp


def test_fingerprint_ignores_sharding(qckpt, tmp_path):
    from huggingface_hub import save_torch_state_dict

    sharded = tmp_path / "sharded"
    shutil.copytree(qckpt, sharded)
    tensors = load_file(str(sharded / "model.safetensors"))
    (sharded / "model.safetensors").unlink()
    save_torch_state_dict(tensors, sharded, max_shard_size="20KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    assert checkpoint_fingerprint(sharded) == checkpoint_fingerprint(qckpt)


@pytest.mark.parametrize("edit, expected", [
    (lambda d: d["qahira"].update(adapter_type="dora"), "qahira.adapter_type='dora'"),
    (lambda d: d["qahira"].update(format_version=2), "qahira.format_version=2, this build reads 1"),
    (lambda d: d["qahira"].pop("scaling"), "qahira section misses ['scaling']"),
    (lambda d: d.update(lora_alpha=d["lora_alpha"] * 2), "would apply different scalings"),
    (lambda d: d.update(use_dora=True), "unsupported PEFT features ['use_dora']"),
    (lambda d: d.update(use_rslora=True), "use_rslora=true contradicts qahira.scaling"),
    (lambda d: d["qahira"].update(pool=0), "pool=0, expected a positive integer"),
    (lambda d: d["qahira"].update(scaling=float("nan")), "qahira.scaling=nan, expected a finite"),
])
def test_config_errors(qbara_dir, edit, expected):
    _edit_config(qbara_dir, edit)
    with pytest.raises(AdapterError) as e:
        load_adapter(qbara_dir)
    assert expected in str(e.value) and CONFIG_NAME in str(e.value)


def test_folder_errors(tmp_path, qbara_dir):
    with pytest.raises(AdapterError, match="does not exist"):
        load_adapter(tmp_path / "missing")
    (qbara_dir / WEIGHTS_NAME).unlink()
    with pytest.raises(AdapterError, match="adapter_model.safetensors not found"):
        load_adapter(qbara_dir)
    (qbara_dir / CONFIG_NAME).write_text("{oops")
    with pytest.raises(AdapterError, match="invalid JSON"):
        load_adapter(qbara_dir)
    (qbara_dir / CONFIG_NAME).unlink()
    with pytest.raises(AdapterError, match="adapter_config.json not found"):
        load_adapter(qbara_dir)


def test_unexpected_tensor_name(qbara_dir):
    _edit_tensors(qbara_dir, lambda t: t.update(
        {f"base_model.model.{LAYER}.qahira_M.weight": torch.zeros(2, 2)}))
    with pytest.raises(AdapterError, match="unexpected tensor .*qahira_M.* in a 'qbara' adapter"):
        load_adapter(qbara_dir)


def test_fingerprint_mismatch(qbara_dir, qckpt):
    other = tiny.tiny_qckpt("llama", offset_dtype="float32", hidden=64, intermediate=128,
                                    heads=2, kv_heads=1)
    with pytest.raises(AdapterError, match="trained on a base with fingerprint"):
        _check(qbara_dir, other)


def test_missing_tensor(qbara_dir, qckpt):
    _edit_tensors(qbara_dir, lambda t: t.pop(f"base_model.model.{LAYER}.lora_B.weight"))
    with pytest.raises(AdapterError) as e:
        _check(qbara_dir, qckpt)
    expected = f"missing tensor 'base_model.model.{LAYER}.lora_B.weight': expected [32, 4]"
    assert expected in str(e.value)


def test_wrong_compact_shape(qbara_dir, qckpt):
    key = f"base_model.model.{LAYER}.lora_A.weight"
    _edit_tensors(qbara_dir, lambda t: t.update({key: torch.zeros(4, 64)}))  # expanded, not [4, 32]
    with pytest.raises(AdapterError) as e:
        _check(qbara_dir, qckpt)
    assert f"tensor {key!r} has shape [4, 64]: expected [4, 32]" in str(e.value)


def test_pool_repeat_must_divide(qckpt, tmp_path):
    path = tiny.random_adapter(qckpt, tmp_path / "a", "qbara", rank=4)
    _edit_config(path, lambda d: d["qahira"].update(pool=3))
    with pytest.raises(AdapterError, match=r"layer 'model\.layers\.0\.mlp\.down_proj' "
                                           r"\[out=64, in=128\]: pool=3 does not divide in=128"):
        _check(path, qckpt)
    _edit_config(path, lambda d: d["qahira"].update(pool=2, repeat=5))
    with pytest.raises(AdapterError, match="repeat=5 does not divide out=64"):
        _check(path, qckpt)


def test_rank_above_max(qbara_dir, qckpt):
    with pytest.raises(AdapterError, match="rank 4 is above the maximum 2"):
        _check(qbara_dir, qckpt, max_rank=2)


def test_non_finite(qbara_dir, qckpt):
    key = f"base_model.model.{LAYER}.lora_B.weight"

    def poison(t):
        t[key][0, 0] = float("inf")
    _edit_tensors(qbara_dir, poison)
    with pytest.raises(AdapterError, match=rf"{key}' holds inf at \[0, 0\] \(1 non-finite value"):
        _check(qbara_dir, qckpt)


def test_tensor_for_unknown_layer(qbara_dir, qckpt):
    _edit_tensors(qbara_dir, lambda t: t.update({
        "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32),
        "base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight": torch.zeros(32, 4)}))
    with pytest.raises(AdapterError, match="targets layer 'model.layers.9.self_attn.q_proj', "
                                           "which is not a quantized linear layer"):
        _check(qbara_dir, qckpt)


def test_wrong_adapter_type_for_tensors(qbara_dir, qckpt):
    _edit_config(qbara_dir, lambda d: d["qahira"].update(adapter_type="qahira", rank=None))
    with pytest.raises(AdapterError, match="unexpected tensor .*lora_A.* in a 'qahira' adapter"):
        load_adapter(qbara_dir)


def test_corrupt_weights_file(qbara_dir):
    (qbara_dir / WEIGHTS_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        load_adapter(qbara_dir)


def test_converted_lm_head_is_not_an_adapter_target():
    """A `quantize --lm-head` base stores lm_head quantized, but adapters never target it
    (vLLM serves lm_head adapters through its own full-width path, not the compact one)."""
    from qahira_vllm.checkpoint import quantized_layers, read_headers

    base = tiny.tiny_qckpt("llama", lm_head=True, hidden=64, intermediate=128, heads=2,
                                   kv_heads=1)
    assert "lm_head" in quantized_layers(read_headers(base))
    dims = base_layer_dims(base)
    assert len(dims) == 14 and "lm_head" not in dims


# ----------------------------------------------------------------------------- PEFT's rules
# Real PEFT adapters (get_peft_model + LoraConfig, random A and B), one per option; the
# reference is PEFT itself: the modules it adapted (the tensors it saved), each module's r and
# scaling, and its forward (PeftModel.from_pretrained on the dequantized base, fp32).

PEFT_FORWARD_TOL = 1e-4  # fp32 logits, trainer QuantLinear vs PEFT on the same dequantized W
PEFT_OPTION_CASES = {**tiny.PEFT_OPTIONS,
                     "layers_no_pattern": dict(r=4, lora_alpha=8, layers_to_transform=1,
                                               target_modules=["q_proj", "gate_proj"])}


@pytest.fixture(scope="module")
def peft_adapters(qckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("peft-options")
    return {name: tiny.peft_adapter(qckpt, root / name, seed=i, **kw)
            for i, (name, kw) in enumerate(PEFT_OPTION_CASES.items())}


@pytest.mark.parametrize("option", list(PEFT_OPTION_CASES))
def test_peft_option_adapts_what_peft_adapts(option, peft_adapters, qckpt):
    from peft.tuners.lora import LoraLayer

    from qahira_vllm.training.model import load_model_with_adapter

    path = peft_adapters[option]
    adapter = load_adapter(path)
    dims = base_layer_dims(qckpt)
    validate_adapter(adapter, dims, checkpoint_fingerprint(qckpt), max_rank=8)
    cfg = adapter.config
    assert set(cfg.targeted(dims)) == set(adapter.tensors)  # PEFT saved what it adapted
    peft_model = tiny.peft_reference(qckpt, path)
    peft_layers = {n.removeprefix("base_model.model."): m
                   for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    assert set(peft_layers) == set(adapter.tensors)
    for name, m in peft_layers.items():  # exactly PEFT's per-layer r and scaling
        assert (cfg.layer_rank(name), cfg.layer_scaling(name)) == \
            (m.r["default"], m.scaling["default"]), name
    ids = torch.tensor([tiny.TOKEN_PROMPTS[0]])
    with torch.no_grad():
        expected = peft_model(ids).logits
        base = peft_model.get_base_model()
        with peft_model.disable_adapter():
            base_logits = base(ids).logits
        ours = load_model_with_adapter(qckpt, path)(ids).logits
    assert (expected - base_logits).abs().max() > 0.1  # the adapter matters
    assert (ours - expected).abs().max() < PEFT_FORWARD_TOL


def test_per_layer_scaling_is_not_the_global_one(peft_adapters):
    """The options under test really change the numbers (else the tests above prove nothing)."""
    alpha = load_adapter(peft_adapters["alpha_pattern"]).config
    assert alpha.layer_scaling("model.layers.1.self_attn.v_proj") == 48 / 8 != alpha.scaling
    assert alpha.layer_scaling("model.layers.0.mlp.up_proj") == 4 / 8
    assert alpha.layer_scaling("model.layers.1.mlp.up_proj") == alpha.scaling == 2.0
    rs = load_adapter(peft_adapters["rslora"]).config
    assert rs.layer_scaling("model.layers.0.self_attn.k_proj") == 12 / math.sqrt(2)
    assert rs.scaling == 12 / math.sqrt(8)
    ranks = load_adapter(peft_adapters["rank_pattern"]).config
    assert [ranks.layer_rank(f"model.layers.{i}.mlp.down_proj") for i in (0, 1)] == [8, 2]
    assert ranks.layer_scaling("model.layers.1.mlp.down_proj") == 16 / 2


def test_peft_config_round_trip_and_all_linear(peft_adapters, qckpt):
    for path in peft_adapters.values():
        cfg = load_adapter(path).config
        again = AdapterConfig.from_json_dict(cfg.to_json_dict(include_qahira=False))
        targets = cfg.target_modules
        assert again == AdapterConfig.from_json_dict(
            {**cfg.to_json_dict(include_qahira=False),
             "target_modules": targets if isinstance(targets, str) else sorted(targets)})
        assert again.targeted(base_layer_dims(qckpt)) == cfg.targeted(base_layer_dims(qckpt))
    d = json.loads((peft_adapters["list"] / CONFIG_NAME).read_text())
    everything = AdapterConfig.from_json_dict({**d, "target_modules": "all-linear"})
    assert everything.targeted(base_layer_dims(qckpt)) == list(base_layer_dims(qckpt))


@pytest.mark.parametrize("field, value", [
    ("use_dora", True), ("lora_bias", True), ("modules_to_save", ["lm_head"]),
    ("trainable_token_indices", [1, 2]), ("target_parameters", ["mlp.experts.down_proj"]),
    ("layer_replication", [[0, 2]]), ("alora_invocation_tokens", [5]), ("use_qalora", True),
    ("use_bdlora", {"target_modules_bd_a": ["q_proj"]}), ("arrow_config", {"top_k": 2}),
    ("kasa_config", {"beta": 0.1}), ("velora_config", {"rank": 4}),
    ("monteclora_config", {"num_samples": 2}), ("bias", "all"),
    ("init_lora_weights", "pissa"), ("init_lora_weights", "olora"),
    ("init_lora_weights", "loftq"), ("init_lora_weights", "corda"),
])
def test_peft_features_that_change_the_forward_are_refused_by_name(field, value, peft_adapters,
                                                                   tmp_path):
    path = tmp_path / "a"
    shutil.copytree(peft_adapters["list"], path)
    _edit_config(path, lambda d: d.update({field: value}))
    with pytest.raises(AdapterError, match="unsupported PEFT features") as e:
        load_adapter(path)
    assert field in str(e.value) and CONFIG_NAME in str(e.value)


@pytest.mark.parametrize("field, value", [
    ("init_lora_weights", "gaussian"), ("init_lora_weights", False), ("fan_in_fan_out", True),
    ("lora_dropout", 0.1), ("megatron_core", "megatron.core"), ("eva_config", None),
])
def test_peft_fields_that_do_not_change_the_forward_are_accepted(field, value, peft_adapters,
                                                                 tmp_path, qckpt):
    path = tmp_path / "a"
    shutil.copytree(peft_adapters["list"], path)
    _edit_config(path, lambda d: d.update({field: value}))
    _check(path, qckpt)


def test_peft_targeting_errors(peft_adapters, qckpt, tmp_path):
    layers = tmp_path / "layers"
    shutil.copytree(peft_adapters["layers"], layers)
    # Layer 1 is not adapted by layers_to_transform=[0]: extra tensors for it are refused ...
    one = "base_model.model.model.layers.1.self_attn.q_proj"
    _edit_tensors(layers, lambda t: t.update({f"{one}.lora_A.weight": torch.zeros(8, 64),
                                              f"{one}.lora_B.weight": torch.zeros(64, 8)}))
    with pytest.raises(AdapterError, match=r"layers \['model.layers.1.self_attn.q_proj'\] have "
                                           r"tensors but PEFT does not adapt them by .*"
                                           r"layers_to_transform \[0\]"):
        _check(layers, qckpt)
    # ... and with layers_to_transform=[0, 1] the layer-1 tensors are required.
    shutil.rmtree(layers)
    shutil.copytree(peft_adapters["layers"], layers)
    _edit_config(layers, lambda d: d.update(layers_to_transform=[0, 1]))
    with pytest.raises(AdapterError, match=r"missing tensor 'base_model.model.model.layers.1\."
                                           r".*which PEFT adapts by"):
        _check(layers, qckpt)
    _edit_config(layers, lambda d: d.update(layers_to_transform=None))
    with pytest.raises(AdapterError, match="PEFT refuses this adapter's LoraConfig: When "
                                           "`layers_pattern` is specified"):
        _check(layers, qckpt)
    regex = tmp_path / "regex"
    shutil.copytree(peft_adapters["regex"], regex)
    _edit_config(regex, lambda d: d.update(target_modules=r".*\.layers\.7\..*"))
    with pytest.raises(AdapterError, match=r"match no quantized linear layer"):
        _check(regex, qckpt)
    ranks = peft_adapters["rank_pattern"]
    with pytest.raises(AdapterError, match=r"rank 8 is above the maximum 4"):
        _check(ranks, qckpt, max_rank=4)
    _check(ranks, qckpt, max_rank=8)


def test_patterns_and_rslora_need_a_plain_peft_config(qbara_dir):
    _edit_config(qbara_dir, lambda d: d.update(rank_pattern={"q_proj": 2}))
    with pytest.raises(AdapterError, match=r"\['rank_pattern'\] contradict qahira.scaling"):
        load_adapter(qbara_dir)
    cfg = AdapterConfig.from_json_dict({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"],
                                        "alpha_pattern": {"q_proj": 4}})
    with pytest.raises(AdapterError, match="a qahira section holds one scaling"):
        cfg.to_json_dict(include_qahira=True)
    with pytest.raises(AdapterError, match="exist only in plain PEFT LoRAs"):
        AdapterConfig(adapter_type="qbara", target_modules=("q_proj",), scaling=2.0, rank=4,
                      pool=2, repeat=2, rank_pattern={"q_proj": 2}, lora_alpha=8.0)
