"""qahira_vllm.fused_layers: vLLM's fused groups, read from vLLM's own model classes."""

from __future__ import annotations

from qahira_vllm.fused_layers import fused_groups, packed_modules_mapping, widen_to_fused_groups
from support import tiny


def test_mapping_is_vllms_own():
    from vllm.model_executor.models.llama import LlamaForCausalLM
    from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

    assert packed_modules_mapping(["LlamaForCausalLM"]) == {
        k: tuple(v) for k, v in LlamaForCausalLM.packed_modules_mapping.items()}
    assert packed_modules_mapping(["NoSuchArch", "Qwen2ForCausalLM"]) == {
        k: tuple(v) for k, v in Qwen2ForCausalLM.packed_modules_mapping.items()}
    assert packed_modules_mapping(["NoSuchArch"]) is None


def test_groups_per_layer_instance():
    names = tiny.linear_layer_names(2)
    groups = fused_groups(names, packed_modules_mapping(["LlamaForCausalLM"]))
    assert groups["model.layers.1.self_attn.qkv_proj"] == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj",
        "model.layers.1.self_attn.v_proj"]
    assert groups["model.layers.0.mlp.gate_up_proj"] == [
        "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    assert len(groups) == 4  # o_proj and down_proj are not fused


def test_partial_groups_are_dropped_whole():
    names = tiny.linear_layer_names(2)
    mapping = packed_modules_mapping(["LlamaForCausalLM"])
    converted = set(names) - {"model.layers.0.self_attn.k_proj", "model.layers.1.mlp.up_proj"}
    kept, widened = widen_to_fused_groups(converted, names, mapping)
    assert widened == {
        "model.layers.0.self_attn.qkv_proj": ["model.layers.0.self_attn.q_proj",
                                              "model.layers.0.self_attn.v_proj"],
        "model.layers.1.mlp.gate_up_proj": ["model.layers.1.mlp.gate_proj"]}
    assert kept == set(names) - {f"model.layers.0.self_attn.{p}_proj" for p in "qkv"} - {
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"}
    assert widen_to_fused_groups(converted, names, None) == (converted, {})
