"""Reading and writing qahira checkpoints: locate, validate tensor headers, dequantize for
reference models, write a checkpoint folder atomically."""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from .atomic import atomic_dir, write_json
from .format import (QUANT_TENSOR_SUFFIXES, QWEIGHT, QahiraFormatError, QahiraQuantConfig,
                     layer_dims, validate_layer_tensors)
from .quant_math import dequantize, describe_non_finite
from .safetensors_io import check_vllm_reads_same, model_tensors, model_weight_files

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I32": torch.int32, "U8": torch.uint8, "I8": torch.int8, "I64": torch.int64,
              "F64": torch.float64, "I16": torch.int16, "BOOL": torch.bool}


def resolve_model_dir(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a hub repo id through huggingface_hub (cache, offline)."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise FileNotFoundError(f"{p} is a file, expected a model folder")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path), revision=revision))
    except Exception as e:  # offline, missing repo, ...: say what was tried
        raise FileNotFoundError(
            f"{name_or_path!r} is neither a local folder nor a downloadable hub repo: {e}") from e


class _Meta:
    __slots__ = ("shape", "dtype", "file")

    def __init__(self, shape, dtype, file):
        self.shape, self.dtype, self.file = tuple(shape), dtype, file


def read_headers(model_dir: Path) -> dict[str, _Meta]:
    """Tensor name -> shape/dtype/file, from the safetensors headers only (no data read).

    Files and header checks: safetensors_io.model_tensors (QahiraFormatError naming the file
    for a damaged one, or both files for a tensor stored twice)."""
    return {name: _Meta(e.shape, _ST_DTYPES.get(e.dtype, e.dtype), e.file)
            for name, e in model_tensors(model_dir).items()}


class _ShapeOnly:
    """Stands in for a tensor in validate_layer_tensors (shape and dtype only)."""

    def __init__(self, meta: _Meta):
        self.shape, self.dtype = meta.shape, meta.dtype


def quantized_layers(metas: dict[str, _Meta]) -> dict[str, dict[str, _Meta]]:
    layers: dict[str, dict[str, _Meta]] = defaultdict(dict)
    for name, meta in metas.items():
        prefix, _, suffix = name.rpartition(".")
        if suffix in QUANT_TENSOR_SUFFIXES:
            layers[prefix][suffix] = meta
    return dict(layers)


def validate_checkpoint(model_dir: str | os.PathLike, cfg: QahiraQuantConfig) -> list[str]:
    """Check every quantized layer's tensors (headers only), each against its own config
    (`cfg.for_layer`). Returns the layer names, sorted. QahiraFormatError also when a `layers`
    override names a module that is not stored quantized (a typo would silently do nothing)."""
    model_dir = resolve_model_dir(model_dir)
    metas = read_headers(model_dir)
    check_vllm_reads_same(model_dir)  # vLLM must load the very files validated here
    layers = quantized_layers(metas)
    if not layers:
        raise QahiraFormatError(
            f"{model_dir}: config.json declares quant_method 'qahira' but no tensor ends in "
            f"{QUANT_TENSOR_SUFFIXES}")
    for layer, tensors in sorted(layers.items()):
        out_f, in_f = layer_dims(layer, tensors, cfg)
        validate_layer_tensors(layer, {k: _ShapeOnly(v) for k, v in tensors.items()},
                               out_f, in_f, cfg, where=str(tensors[QWEIGHT].file.name))
        if f"{layer}.weight" in metas:
            raise QahiraFormatError(
                f"layer {layer!r} has both a float 'weight' and quantized tensors in {model_dir}")
    stray = sorted(set(cfg.layers) - set(layers))
    if stray:
        raise QahiraFormatError(
            f"{model_dir}: quantization_config.layers names {stray[:5]}, which the checkpoint "
            f"does not store quantized (no .{QWEIGHT}): expected exact module names of "
            f"converted layers, e.g. {sorted(layers)[:2]}")
    return sorted(layers)


# Shard size of written checkpoints (huggingface_hub's save_torch_state_dict).
MAX_SHARD_SIZE = "2GB"
# Files of a source folder that a written checkpoint replaces (weights, config) or must not
# carry (other weight formats, the model cache's own marker file); everything else (tokenizer,
# generation config, chat template, license...) is copied.
_NOT_COPIED_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".gguf")
_NOT_COPIED_NAMES = ("config.json", "qahira_model.json")


def write_checkpoint(src_dir: Path, out_dir: str | os.PathLike, config: dict,
                     tensors: dict[str, torch.Tensor], overwrite: bool = False) -> Path:
    """Write a model folder atomically (atomic.atomic_dir): `tensors` (name -> tensor) as
    model.safetensors, or as shards plus an index above MAX_SHARD_SIZE
    (huggingface_hub.save_torch_state_dict), `config` as config.json, and src_dir's other
    files copied. The quantizer and merge both write through here. Returns the folder.
    FileExistsError when out_dir exists and not overwrite; on any error nothing is left."""
    from huggingface_hub import save_torch_state_dict

    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for f in Path(src_dir).iterdir():
            if f.is_file() and not (f.name.endswith(_NOT_COPIED_SUFFIXES)
                                    or f.name in _NOT_COPIED_NAMES):
                shutil.copy2(f, tmp / f.name)
        save_torch_state_dict({k: v.contiguous() for k, v in tensors.items()}, tmp,
                              max_shard_size=MAX_SHARD_SIZE)
        write_json(tmp / "config.json", config)
    return Path(out_dir).resolve()


def read_quant_config(model_dir: Path) -> QahiraQuantConfig:
    cfg_path = model_dir / "config.json"
    try:
        qc = json.loads(cfg_path.read_text())["quantization_config"]
    except FileNotFoundError:
        raise FileNotFoundError(f"{cfg_path} not found: not a model folder") from None
    except KeyError:
        raise QahiraFormatError(f"{cfg_path} has no quantization_config: not a qahira checkpoint"
                                ) from None
    return QahiraQuantConfig.from_dict(qc, source=str(cfg_path))


def iter_tensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor of the model, file by file. Every header is checked
    (safetensors_io.model_tensors) when this is called, before any tensor data is read."""
    files = model_weight_files(model_dir)
    model_tensors(model_dir)  # check every header (and duplicates) before reading any data
    return _iter_files(files)


def _iter_files(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():
                yield name, fh.get_tensor(name)


def load_quantized_state(model_dir: Path):
    """(cfg, {layer: {qweight, scales, offsets}}, {other tensor name: tensor})."""
    cfg = read_quant_config(model_dir)
    validate_checkpoint(model_dir, cfg)
    quant: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    other: dict[str, torch.Tensor] = {}
    for name, t in iter_tensors(model_dir):
        prefix, _, suffix = name.rpartition(".")
        if suffix in QUANT_TENSOR_SUFFIXES:
            quant[prefix][suffix] = t
        else:
            other[name] = t
    return cfg, dict(quant), other


def dequantized_state_dict(model_dir: str | os.PathLike,
                           dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A plain HF state dict whose converted linear weights are the dequantized W (exact, fp32)."""
    cfg, quant, other = load_quantized_state(resolve_model_dir(model_dir))
    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in other.items()}
    for layer, t in quant.items():
        sd[f"{layer}.weight"] = dequantize(t["qweight"], t["scales"], t["offsets"],
                                           cfg.for_layer(layer), dtype)
    return sd


def load_reference_model(model_dir: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """transformers model running the checkpoint's dequantized weights (the float reference)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = resolve_model_dir(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(dequantized_state_dict(model_dir, dtype),
                                                strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise QahiraFormatError(
            f"{model_dir}: reference model mismatch: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def check_block_params_finite(model_dir: str | os.PathLike) -> None:
    """Raise QahiraFormatError naming the first stored `scales` / `offsets` tensor (and file,
    and block index) that holds NaN or +-inf: one such value turns a whole block of weights
    into NaN, and vLLM would serve NaN logits without an error. Reads only those tensors
    (1/(bo*bi) of the weights each)."""
    model_dir = resolve_model_dir(model_dir)
    for name, meta in sorted(read_headers(model_dir).items()):
        if name.rpartition(".")[2] not in QUANT_TENSOR_SUFFIXES[1:]:
            continue
        with safe_open(str(meta.file), framework="pt") as fh:
            t = fh.get_tensor(name)
        bad = describe_non_finite(t)
        if bad:
            raise QahiraFormatError(
                f"tensor {name!r} in {meta.file} holds {bad.replace(' at ', ' at block ', 1)}: "
                "the checkpoint is damaged; re-create it with `qahira quantize`")
