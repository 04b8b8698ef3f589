"""Adapter checks run in vLLM's worker before an adapter is used (load request, --lora-modules).

A qahira engine (one whose linear layers are our Q-BaRA LoRA layers) accepts an adapter only if:
  adapter_format.load_adapter     type / format version / config / tensor names
  adapter_format.validate_adapter base fingerprint, every targeted tensor present with its exact
                                  compact shape, rank <= --max-lora-rank, pool/repeat dividing
                                  the layer dims, finite values
  check_engine_fit                the adapter's geometry fits the engine's layers, including
                                  tensor-parallel shard boundaries
  check_vllm_scaling              (plain PEFT LoRAs) the per-layer rank and scaling vLLM's
                                  loader will fold into B are PEFT's (rank_pattern,
                                  alpha_pattern, rsLoRA)
Failures raise AdapterRejected, whose message starts with REJECTED so the HTTP layer can answer
400 instead of vLLM's generic 500 (install.py). vLLM's own loader runs afterwards, unchanged,
except for QA-HiRA adapters, whose one tensor per layer (qahira_M) vLLM's file reader does not
know: `qahira_lora_model` builds their LoRAModel with vLLM's own from_lora_tensors instead
(lora_a = M, lora_b = a one-element float64 1, which vLLM's optimize() turns into the exact
scaling; lora/layers.py recognises that pair).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from ..adapter_format import (CONFIG_NAME, LORA_A, LORA_B, QAHIRA_M, Adapter, AdapterConfig,
                              AdapterError, base_layer_dims, checkpoint_fingerprint,
                              load_adapter, tensor_name, validate_adapter)
from ..format import QahiraFormatError
from .layers import QbaraSlotsMixin

REJECTED = "qahira: adapter rejected"


class AdapterRejected(ValueError):
    """An adapter that must not be served on this engine (the message says why)."""


@functools.lru_cache(maxsize=4)
def _base_layer_dims(model_dir: str) -> dict[str, tuple[int, int]]:
    return base_layer_dims(model_dir)


@functools.lru_cache(maxsize=4)
def _base_fingerprint(model_dir: str) -> str:
    return checkpoint_fingerprint(model_dir)  # reads the quantized tensors once per process


def find_engine_layer(modules: dict, packed_modules_mapping: dict, module: str):
    """(engine layer, slice index) serving HF module `module`, or (None, None)."""
    if module in modules:
        return modules[module], 0
    parent, _, leaf = module.rpartition(".")
    for packed, parts in packed_modules_mapping.items():
        name = f"{parent}.{packed}" if parent else packed
        if leaf in parts and name in modules:
            return modules[name], parts.index(leaf)
    return None, None


def check_engine_fit(adapter: Adapter, modules: dict, packed_modules_mapping: dict) -> None:
    """Every adapted layer is served by one of our layers (any geometry) or by a stock vLLM
    LoRA layer (plain LoRA only), and its geometry fits that layer's tensor-parallel shard."""
    cfg = adapter.config
    for module, group in sorted(adapter.tensors.items()):
        layer, i = find_engine_layer(modules, packed_modules_mapping, module)
        if layer is None:
            raise AdapterError(f"layer {module!r} has no LoRA slot in this engine (check "
                               "--lora-target-modules)")
        if isinstance(layer, QbaraSlotsMixin) and cfg.adapter_type == "qahira":
            layer.qahira_geometry(i, group[QAHIRA_M], where=f"layer {module!r}")
        elif isinstance(layer, QbaraSlotsMixin):
            layer.slice_geometry(i, group[LORA_A], group[LORA_B], where=f"layer {module!r}")
        elif cfg.adapter_type == "qahira":
            raise AdapterError(f"layer {module!r} is served by vLLM's {type(layer).__name__}, "
                               "which holds only plain LoRA; a QA-HiRA adapter needs a qahira "
                               "layer")
        elif (cfg.pool, cfg.repeat) != (1, 1):
            raise AdapterError(
                f"layer {module!r} is served by vLLM's {type(layer).__name__}, which holds "
                f"only plain LoRA; this adapter has pool={cfg.pool}, repeat={cfg.repeat}")


def check_vllm_scaling(adapter: Adapter) -> None:
    """vLLM's loader multiplies each layer's B by the scaling its PEFTHelper resolves
    (rank_pattern / alpha_pattern / rsLoRA) and our layers serve B as given (slot scaling 1):
    refuse the adapter unless that is PEFT's scaling for every adapted layer, bit for bit.
    Plain PEFT LoRAs only: a qahira section's scaling is checked against lora_alpha / r
    by AdapterConfig.from_json_dict."""
    import json

    from vllm.lora.peft_helper import PEFTHelper

    cfg = adapter.config
    if cfg.lora_alpha is None or adapter.path is None:
        return
    helper = PEFTHelper.from_dict(json.loads((adapter.path / CONFIG_NAME).read_text()))
    for module in sorted(adapter.tensors):
        rank, scaling = helper.get_rank_and_scaling(module)
        if (rank, scaling) != (cfg.layer_rank(module), cfg.layer_scaling(module)):
            raise AdapterError(
                f"layer {module!r}: vLLM's loader would apply rank {rank}, scaling {scaling!r}, "
                f"PEFT rank {cfg.layer_rank(module)}, scaling {cfg.layer_scaling(module)!r} "
                "(rank_pattern / alpha_pattern keys read differently)")


def check_adapter_for_engine(lora_path: str, lora_name: str, model_dir: str, max_rank: int,
                             modules: dict, packed_modules_mapping: dict) -> Adapter:
    """Run every check; raise AdapterRejected with a message naming the adapter and the fault."""
    try:
        adapter = load_adapter(lora_path)
        validate_adapter(adapter, _base_layer_dims(model_dir), _base_fingerprint(model_dir),
                         max_rank=max_rank)
        check_engine_fit(adapter, modules, packed_modules_mapping)
        check_vllm_scaling(adapter)
    except (AdapterError, QahiraFormatError) as e:  # damaged files raise the latter
        raise AdapterRejected(f"{REJECTED} {lora_name!r} ({lora_path}): {e}") from None
    return adapter


def check_adapter_path(path: Path, lora_name: str) -> None:
    """An existing adapter path that is no adapter folder is the client's error (400), on any
    engine: vLLM itself answers 500 ("Not a directory", a missing-file traceback)."""
    if not path.is_dir():
        raise AdapterRejected(f"{REJECTED} {lora_name!r} ({path}): is a file; expected an "
                              f"adapter folder holding {CONFIG_NAME} and the adapter weights")
    if not (path / CONFIG_NAME).is_file():
        raise AdapterRejected(f"{REJECTED} {lora_name!r} ({path}): the folder has no "
                              f"{CONFIG_NAME}: not an adapter folder")


def engine_serves_qbara(lora_model_manager) -> bool:
    return any(isinstance(m, QbaraSlotsMixin) for m in lora_model_manager.modules.values())


def _refuse_qahira_adapter(path: Path, lora_name: str) -> None:
    """On an engine without qahira layers: a QA-HiRA adapter is the client's error (400)."""
    import json

    try:
        cfg = AdapterConfig.from_json_dict(json.loads((path / CONFIG_NAME).read_text()))
    except (ValueError, AdapterError):
        return  # not ours to judge: vLLM's own loader reports it
    if cfg.adapter_type == "qahira":
        raise AdapterRejected(f"{REJECTED} {lora_name!r} ({path}): a QA-HiRA adapter is served "
                              "only on a qahira-quantized base (its layers hold the pooled "
                              "matrix M); this engine serves vLLM's stock LoRA layers")


def validate_lora_request(worker_lora_manager, lora_request) -> Adapter | None:
    """The check run by the patched WorkerLoRAManager._load_adapter (install.py); returns the
    checked adapter on a qahira engine (None where vLLM's own checks apply)."""
    from vllm.lora.utils import get_adapter_absolute_path

    manager = worker_lora_manager._adapter_manager
    path = get_adapter_absolute_path(lora_request.lora_path)
    if not Path(path).exists():
        return None  # vLLM answers "not found" itself (404)
    check_adapter_path(Path(path), lora_request.lora_name)
    if not engine_serves_qbara(manager):
        _refuse_qahira_adapter(Path(path), lora_request.lora_name)
        return None  # not a qahira engine: vLLM's own checks
    model_dir = getattr(worker_lora_manager, "_qahira_model_dir", None)
    if model_dir is None:
        raise AdapterRejected(f"{REJECTED} {lora_request.lora_name!r}: the served model folder "
                              "is unknown (LoRA manager created outside create_lora_manager)")
    return check_adapter_for_engine(path, lora_request.lora_name, model_dir,
                                    worker_lora_manager.lora_config.max_lora_rank,
                                    manager.modules, manager.packed_modules_mapping)


def qahira_lora_model(worker_lora_manager, lora_request, adapter: Adapter):
    """vLLM's LoRAModel of a checked QA-HiRA adapter: the steps of vLLM's
    WorkerLoRAManager._load_adapter (PEFT config checks, the model's weight-name mapper and
    skipped prefixes, the manager's format checks), with the tensors given to vLLM's own
    LoRAModel.from_lora_tensors instead of read from the file: per layer P,
    P.lora_A = M [out/qo, in/pi] (float32) and P.lora_B = [1.0] (float64, so that the scaling
    vLLM folds into it stays exact)."""
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.utils import get_adapter_absolute_path

    manager = worker_lora_manager._adapter_manager
    path = get_adapter_absolute_path(lora_request.lora_path)
    peft_helper = PEFTHelper.from_local_dir(path, worker_lora_manager.max_position_embeddings)
    peft_helper.validate_legal(worker_lora_manager.lora_config)
    model = manager.model
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    if mapper is not None:
        mapper = mapper.get_rename_mapper()
    tensors = {}
    for module, group in adapter.tensors.items():
        tensors[tensor_name(module, LORA_A)] = group[QAHIRA_M].to(torch.float32)
        tensors[tensor_name(module, LORA_B)] = torch.ones(1, dtype=torch.float64)
    lora = worker_lora_manager._lora_model_cls.from_lora_tensors(
        lora_model_id=lora_request.lora_int_id, tensors=tensors, peft_helper=peft_helper,
        device="cpu", dtype=None, model_vocab_size=worker_lora_manager.vocab_size,
        weights_mapper=mapper, skip_prefixes=getattr(model, "lora_skip_prefixes", None))
    lora.is_3d_lora_weight = lora_request.is_3d_lora_weight
    manager._validate_moe_lora_format(lora)
    manager._validate_modules_to_save(lora)
    manager._validate_token_classification_lora(lora)
    return lora
