"""Convert a Hugging Face model folder into a qahira checkpoint (format_version 1; 2 with
per-layer overrides or float32 scales)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import __version__
from .checkpoint import iter_tensors, read_headers, resolve_model_dir, write_checkpoint
from .format import QahiraFormatError, QahiraQuantConfig, check_divides
from .fused_layers import fused_groups, packed_modules_mapping, widen_to_fused_groups
from .quant_math import (DEFAULT_CLIP_RATIOS, check_quantizable, fp32_ratios, pack_qweight,
                         quantize_with_error)

logger = logging.getLogger(__name__)
_fallback_said = False


def linear_module_names(model_dir: Path) -> list[str]:
    """Names of the nn.Linear modules of the architecture (built on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    if hasattr(config, "quantization_config"):
        raise QahiraFormatError(
            f"{model_dir}/config.json already has a quantization_config "
            f"({config.quantization_config.get('quant_method')!r}): quantize a float model")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def lm_head_layout(model_dir: Path) -> tuple[str, str, bool]:
    """(lm_head module name, input embedding weight name, tied?) of the architecture."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = {id(m): n for n, m in model.named_modules()}
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if not isinstance(head, torch.nn.Linear) or embed is None:
        raise QahiraFormatError(f"{model_dir}: {type(model).__name__} has no linear lm_head to "
                                "quantize")
    return (names[id(head)], names[id(embed)] + ".weight",
            bool(getattr(config, "tie_word_embeddings", False)))


def _with_untied_head(tensors, embed_name: str, head: str):
    """The stored tensors, plus `head.weight` = a copy of the tied input embedding."""
    for name, t in tensors:
        yield name, t
        if name == embed_name:
            yield f"{head}.weight", t


def default_targets(linear_names: list[str], skip: tuple[str, ...] = ()) -> list[str]:
    """All linear layers except lm_head (and any the user skips)."""
    return [n for n in linear_names if n != "lm_head" and not n.endswith(".lm_head")
            and not any(n == s or n.endswith("." + s) for s in skip)]


def resolve_layer_overrides(overrides, targets: set[str], linear_names: list[str],
                            fused_mapping: dict[str, tuple[str, ...]] | None
                            ) -> dict[str, dict]:
    """`--layer` overrides -> format 2's `layers` ({module name: {"bits", "block_size"?}}).

    overrides: (suffix, bits, block_size or None) in command-line order; a suffix matches every
    target module whose name is it or ends in "." + it, and one member of a vLLM-fused group
    (q/k/v, gate/up) brings its whole group (vLLM serves the group as one layer, one bits /
    block). A later override of the same module wins. ValueError for a suffix matching no
    target layer."""
    groups = list(fused_groups(linear_names, fused_mapping).values()) if fused_mapping else []
    resolved: dict[str, dict] = {}
    for suffix, bits, block in overrides:
        hits = sorted(n for n in targets if n == suffix or n.endswith("." + suffix))
        if not hits:
            raise ValueError(f"--layer {suffix}=...: no converted linear layer is named or ends "
                             f"in {suffix!r} (e.g. {sorted(targets)[:3]})")
        for n in hits:
            for member in next((g for g in groups if n in g), [n]):
                resolved[member] = {"bits": bits, **({"block_size": tuple(block)} if block
                                                     else {})}
    return resolved


def plan_conversion(linear_names: list[str], weight_shapes: dict[str, tuple[int, int]],
                    targets: set[str], cfg: QahiraQuantConfig, keep_unconvertible: bool,
                    fused_mapping: dict[str, tuple[str, ...]] | None
                    ) -> tuple[set[str], list[str], dict[str, list[str]]]:
    """Which layers to convert, decided from shapes before any weight is read.

    Returns (layers to convert, layers kept in float because the block does not tile them,
    {fused vLLM layer: members kept in float because another member is not converted}).
    A layer its block (cfg.for_layer) does not tile raises QahiraFormatError unless
    keep_unconvertible.
    vLLM serves each fused group (qkv_proj, gate_up_proj, ...) with one method, so a group
    is converted whole or kept whole (fused_layers.widen_to_fused_groups).
    """
    unconvertible = []
    for layer in sorted(targets):
        out_f, in_f = weight_shapes[layer]
        try:
            check_divides(layer, out_f, in_f, cfg)
        except QahiraFormatError as e:
            if not keep_unconvertible:
                raise QahiraFormatError(f"{e} (pass --keep-unconvertible to keep it in float)"
                                        ) from None
            unconvertible.append(layer)
    convert, widened = widen_to_fused_groups(targets - set(unconvertible), linear_names,
                                             fused_mapping)
    return convert, unconvertible, widened


def quantizer_backend(device: torch.device) -> str:
    """What quantize_layer runs on `device`: "cpu-kernel" (kernels/cpu_quantize.c, OpenMP over
    torch.get_num_threads() threads), "torch-cpu" (the definition; said once in the log when
    the compiled library is unavailable) or "torch-cuda"."""
    global _fallback_said
    if device.type == "cuda":
        return "torch-cuda"
    from qahira_kernels import cpu_lib

    if cpu_lib.load_library() is not None:
        return "cpu-kernel"
    if not _fallback_said:
        _fallback_said = True
        logger.warning("qahira quantize: the compiled CPU quantizer is unavailable (%s); "
                       "using the torch definition, which is slower", cpu_lib.library_error())
    return "torch-cpu"


def quantize_layer(t: torch.Tensor, cfg: QahiraQuantConfig, clip_search: bool, name: str,
                   device: torch.device = torch.device("cpu"),
                   clip_ratios: tuple[float, ...] = DEFAULT_CLIP_RATIOS):
    """One layer's stored tensors and error statistics, on CPU.

    t: W [out, in], any float dtype; cfg: the layer's config (QahiraQuantConfig.for_layer).
    Returns (qweight, scales, offsets, sq_err, sq_ref): the
    stored tensors of quant_math.quantize (bit for bit, whichever backend runs: see
    quantizer_backend), the sum of the blocks' squared errors (from the search itself, no
    second dequantization) and sum(W^2), both float (fp64 sums of fp32 per-block sums).
    Raises QahiraFormatError (quant_math.check_quantizable) naming `name` for weights the format
    cannot store.
    """
    ratios = fp32_ratios(clip_ratios if clip_search else (1.0,))
    backend = quantizer_backend(device)
    # cpu_quantize.c rounds scales to fp16: float32 scales (format 2) take the torch definition
    if backend == "cpu-kernel" and cfg.scale_dtype == "float16":
        from qahira_kernels import ops

        bo, bi = cfg.block_size
        # fp64 (rare): the definition quantizes fp32(w) too
        w = t if t.dtype in (torch.float32, torch.bfloat16, torch.float16) else t.float()
        try:
            qweight, scales, offsets, err, ref = ops.cpu_quantize(
                w, cfg.bits, bo, bi, ratios, cfg.offset_dtype == "float32")
        except ops.NotStorableError:
            check_quantizable(t, cfg, name)  # raises, naming the block
            raise
        return (qweight, scales, offsets, err.double().sum().item(),
                ref.double().sum().item())
    w = t.to(device)
    check_quantizable(w, cfg, name)
    q, scales, offsets, err = quantize_with_error(w, cfg, True, ratios)
    sq_ref = w.float().square().sum(dtype=torch.float64).item()
    return (pack_qweight(q, cfg.bits).cpu(), scales.cpu(), offsets.cpu(),
            err.double().sum().item(), sq_ref)


def _all_finite(t: torch.Tensor, backend: str) -> bool:
    if backend == "cpu-kernel" and t.dtype in (torch.float32, torch.bfloat16, torch.float16):
        from qahira_kernels import ops

        return ops.cpu_all_finite(t)  # torch.isfinite on bf16: ~1 s per 65M values here
    return bool(torch.isfinite(t).all())


def quantize_state_dict(tensors, targets: set[str], cfg: QahiraQuantConfig, clip_search: bool,
                        progress: bool = True, device: torch.device = torch.device("cpu")):
    """The quantized checkpoint's tensors: {name: tensor} and error statistics.

    Every float tensor is checked finite (QahiraFormatError naming tensor and index); each
    layer in `targets` is checked storable (quant_math.check_quantizable) and replaced by its
    qweight / scales / offsets (quantize_layer, on `device`); everything else passes through
    unchanged.
    """
    out: dict[str, torch.Tensor] = {}
    stats = {"layers": 0, "sq_err": 0.0, "sq_ref": 0.0, "backend": quantizer_backend(device)}
    bar = tqdm(total=len(targets), desc="quantizing", unit="layer", disable=not progress)
    try:
        for name, t in tensors:
            layer = name[: -len(".weight")] if name.endswith(".weight") else None
            if layer is None or layer not in targets:
                if t.is_floating_point() and not _all_finite(t, stats["backend"]):
                    check_quantizable(t, cfg, name)  # raises, naming the first bad index
                out[name] = t
                continue
            (out[f"{layer}.qweight"], out[f"{layer}.scales"], out[f"{layer}.offsets"],
             sq_err, sq_ref) = quantize_layer(t, cfg.for_layer(layer), clip_search, name, device)
            stats["sq_err"] += sq_err
            stats["sq_ref"] += sq_ref
            stats["layers"] += 1
            bar.update(1)
    finally:
        bar.close()
    missing = targets - {n.rsplit(".", 1)[0] for n in out if n.endswith(".qweight")}
    if missing:
        raise QahiraFormatError(f"linear layers without a stored weight: {sorted(missing)[:5]}")
    return out, stats


def quantize_model(model: str | os.PathLike, out_dir: str | os.PathLike, bits: int = 4,
                   block_size: tuple[int, int] = (1, 64), offset_dtype: str = "float16",
                   clip_search: bool = True, keep_unconvertible: bool = False,
                   skip: tuple[str, ...] = (), overwrite: bool = False,
                   progress: bool = True, lm_head: bool = False, device: str = "auto",
                   scale_dtype: str = "float16", layer_overrides=()) -> dict:
    """Quantize `model` (folder or hub id) into `out_dir`, written atomically. Returns a summary.

    lm_head=True converts the output projection too (as GPTQ's `lm_head` option does): it
    shrinks the largest single matrix of small models and the last weight read of every decode
    step, at some cost in fidelity (measure it). A tied model is then stored untied: the input
    embedding stays in float, lm_head gets its own quantized copy, and config.json says
    tie_word_embeddings false.

    device: auto (CUDA when available) | cpu | cuda | cuda:N, where the clip search runs (CPU:
    the compiled kernel on torch.get_num_threads() threads; CUDA: the torch definition); the
    output is the same bits on every device. ValueError for an unusable device.

    scale_dtype "float32" and layer_overrides ((suffix, bits, block or None), as
    resolve_layer_overrides) write format 2: per-layer bits / block, scales (hi - lo) / qmax
    kept in fp32 (quantized by the torch definition: the compiled search rounds to fp16).
    Overrides equal to the defaults are dropped, so they alone do not force format 2."""
    from .training.trainer import resolve_device

    t0 = time.time()
    dev = resolve_device(device)
    if Path(out_dir).exists() and not overwrite:  # fail before quantizing, not after
        raise FileExistsError(f"output folder {Path(out_dir).resolve()} already exists "
                              "(pass --overwrite to replace)")
    src = resolve_model_dir(model)
    cfg0 = QahiraQuantConfig(bits=bits, block_size=tuple(block_size), offset_dtype=offset_dtype,
                             scale_dtype=scale_dtype)
    # The model's files (the index's shards, else model.safetensors), every header checked
    # (damaged, truncated, git-lfs pointer, a tensor in two files): refused before any work.
    read_headers(src)
    linear_names = linear_module_names(src)
    targets = set(default_targets(linear_names, skip))
    tensors, untie = iter_tensors(src), False
    shapes = {name[: -len(".weight")]: tuple(meta.shape)
              for name, meta in read_headers(src).items() if name.endswith(".weight")}
    if lm_head:
        head, embed_name, untie = lm_head_layout(src)
        if any(head == k or head.endswith("." + k) for k in skip):
            raise ValueError(f"--lm-head converts {head!r} but --skip keeps it in float: "
                             "choose one")
        targets.add(head)
        if untie:
            tensors = _with_untied_head(tensors, embed_name, head)
            shapes[head] = shapes[embed_name[: -len(".weight")]]
    missing = sorted(t for t in targets if t not in shapes)
    if missing:
        raise QahiraFormatError(f"{src}: linear layers without a stored weight: {missing[:5]}")
    architectures = json.loads((src / "config.json").read_text()).get("architectures") or []
    fused_mapping = packed_modules_mapping(architectures)
    overrides = {n: ov for n, ov in resolve_layer_overrides(layer_overrides, targets,
                                                             linear_names, fused_mapping).items()
                 if (ov["bits"], ov.get("block_size", cfg0.block_size)) != (bits, cfg0.block_size)}
    cfg0 = dataclasses.replace(cfg0, layers=overrides)
    convert, kept, widened = plan_conversion(linear_names, shapes, targets, cfg0,
                                             keep_unconvertible, fused_mapping)
    notes = [f"kept {', '.join(members)} in float too: vLLM serves them as one layer "
             f"({fused}) with another member that is not converted"
             for fused, members in sorted(widened.items())]
    state, stats = quantize_state_dict(tensors, convert, cfg0, clip_search, progress, dev)
    widened_members = sorted(m for members in widened.values() for m in members)
    cfg = QahiraQuantConfig(
        bits=bits, block_size=tuple(block_size), offset_dtype=offset_dtype,
        scale_dtype=scale_dtype, layers={n: ov for n, ov in overrides.items() if n in convert},
        modules_not_converted=tuple(sorted(kept)) + tuple(skip) + tuple(widened_members),
        extra={"quantizer": "mse_clip" if clip_search else "minmax",
               "source_model": str(model), "created_by": f"qahira-vllm {__version__}"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = cfg.to_dict()
    if untie:
        config["tie_word_embeddings"] = False
    write_checkpoint(src, out_dir, config, state, overwrite=overwrite)
    rel_err = (stats["sq_err"] / max(stats["sq_ref"], 1e-30)) ** 0.5
    return {"out_dir": str(Path(out_dir).resolve()), "layers_converted": stats["layers"],
            "modules_not_converted": list(cfg.modules_not_converted), "notes": notes,
            "relative_weight_error": rel_err, "device": str(dev),
            "quantizer_backend": stats["backend"], "seconds": round(time.time() - t0, 2)}
