"""Which linear layers vLLM serves as one fused layer, read from vLLM's own model classes.

vLLM stacks some projections of a checkpoint into one layer (Llama: q/k/v -> `qkv_proj`,
gate/up -> `gate_up_proj`; other architectures declare other groups). Its model class says
which, in `packed_modules_mapping` ({fused name: [checkpoint module names]}). A fused layer has
one quantization method, so its members must all be converted or all kept in float: vLLM
refuses a checkpoint where "some but not all shards" are quantized.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=32)
def _vllm_mapping(architecture: str) -> tuple[tuple[str, tuple[str, ...]], ...] | None:
    try:
        from vllm.model_executor.models import ModelRegistry
    except ImportError:
        return None
    registered = ModelRegistry.models.get(architecture)
    if registered is None:
        return None
    model_cls = registered.load_model_cls()
    mapping = getattr(model_cls, "packed_modules_mapping", None) or {}
    return tuple((k, tuple(v)) for k, v in mapping.items())


def packed_modules_mapping(architectures: list[str]) -> dict[str, tuple[str, ...]] | None:
    """vLLM's {fused layer name: member module names} for the first architecture vLLM knows.

    Returns None when vLLM is not installed or serves none of `architectures` natively (then
    nothing is fused). Importing vLLM's model class takes a few seconds; cached per process.
    """
    for arch in architectures or ():
        mapping = _vllm_mapping(arch)
        if mapping is not None:
            return dict(mapping)
    return None


def fused_groups(linear_names: list[str],
                 mapping: dict[str, tuple[str, ...]]) -> dict[str, list[str]]:
    """{fused layer name: its member modules present in `linear_names`}, per layer instance,
    e.g. "model.layers.0.self_attn.qkv_proj" -> [".q_proj", ".k_proj", ".v_proj" of layer 0]."""
    present = set(linear_names)
    groups: dict[str, list[str]] = {}
    for name in linear_names:
        parent, _, leaf = name.rpartition(".")
        for fused, members in mapping.items():
            if leaf in members:
                key = f"{parent}.{fused}" if parent else fused
                groups.setdefault(key, [f"{parent}.{m}" if parent else m for m in members
                                        if (f"{parent}.{m}" if parent else m) in present])
    return groups


def widen_to_fused_groups(converted: set[str], linear_names: list[str],
                          mapping: dict[str, tuple[str, ...]] | None
                          ) -> tuple[set[str], dict[str, list[str]]]:
    """Drop from `converted` every fused group that is only partly in it.

    Returns (the converted set with whole groups only, {fused layer: members now kept in
    float because some other member was not converted}).
    """
    if not mapping:
        return set(converted), {}
    kept_groups: dict[str, list[str]] = {}
    result = set(converted)
    for fused, members in fused_groups(linear_names, mapping).items():
        inside = [m for m in members if m in converted]
        if inside and len(inside) < len(members):
            kept_groups[fused] = inside
            result.difference_update(members)
    return result, kept_groups
