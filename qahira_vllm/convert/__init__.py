"""`qahira convert`: bring an existing quantized checkpoint into the qahira format, exactly.

Each source format has a reader module (FORMATS: gguf, gptq, awq, compressed_tensors, mlx,
hqq; what they share, the math included, is in `common`) that decodes its blocks into the
format's math, W = scale * q + offset per block (docs/FORMAT.md, "From other formats"), and
hands back `ConvertedLayer`s plus the float tensors; this module detects the source format,
chooses the stored bits and offset dtype, writes the checkpoint through
`checkpoint.write_checkpoint` (a temporary folder, then renamed) and, with verify, compares
the written checkpoint's dequantization with the source's own, layer by layer.

Format 1 is written whenever it holds the source exactly (one block shape, float16-exact
scales); otherwise format 2 (per-layer bits / block_size, float32 scales when needed), with
the members of each vLLM-fused layer on one bits / block (plan_layer_shapes).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
from collections import Counter
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import __version__
from ..format import QahiraFormatError, QahiraQuantConfig
from ..quant_math import dequantize, pack_qweight

# source format -> reader module (qahira_vllm.convert.NAME), imported when used
FORMATS = {"gguf": "gguf", "gptq": "gptq", "awq": "awq",
           "compressed-tensors": "compressed_tensors", "mlx": "mlx",
           "hqq": "hqq"}
FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ConvertedLayer:
    """One linear layer in the format's math, before packing.

    q: uint8 [out, in] (0..2**bits - 1); scales: float16 or float32 [out/bo, in/bi], all > 0
    (float32 ones not exact in float16 make the checkpoint format 2, scale_dtype float32);
    offsets: float32 [out/bo, in/bi] (exact: the offset dtype is chosen later for the whole
    model); bits: the fewest bits that hold q (4 or 8); source: e.g. "gguf Q4_0
    blk.0.attn_q.weight"; reference: a callable returning the source library's own
    dequantization, fp32 [out, in], in the same (HF) layout, for verify; block_size: (bo, bi)
    of this layer's scales, None for the SourceModel's.
    """
    q: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor
    bits: int
    source: str
    reference: Callable[[], torch.Tensor] | None = None
    block_size: tuple[int, int] | None = None


@dataclass
class SourceModel:
    """What a reader returns: the layers to convert (HF module name -> ConvertedLayer), the
    other tensors (HF name -> float or integer tensor, already in the output dtype), the
    config.json dict (without quantization_config), a folder of files to copy beside the
    weights (tokenizer, chat template), the block shape, and notes for the summary."""
    layers: dict[str, ConvertedLayer]
    tensors: dict[str, torch.Tensor]
    config: dict
    files_dir: Path
    block_size: tuple[int, int]
    modules_not_converted: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)


def resolve_source(src: str | os.PathLike, revision: str | None = None) -> Path:
    """The local path of `src`: an existing file or folder as is; otherwise a hub repo id,
    fetched (or found in the cache) by huggingface_hub's snapshot_download, which honours
    HF_HOME / HF_HUB_CACHE and HF_HUB_OFFLINE (checkpoint.resolve_model_dir). Raises
    FileNotFoundError naming src when it is neither (a missing .gguf path is not looked up)."""
    from ..checkpoint import resolve_model_dir

    p = Path(src).expanduser()
    if p.exists():
        return p
    if p.suffix == ".gguf" or str(src).startswith((".", "/", "~")) or str(src).count("/") > 1:
        raise FileNotFoundError(f"{src} does not exist: pass a .gguf file, a model folder or "
                                "a hub repo id (owner/name)")
    return resolve_model_dir(str(src), revision=revision)


def detect_format(src: str | os.PathLike) -> str:
    """The source format of `src`: "gguf" for a .gguf file (or a folder holding exactly one);
    "gptq" / "awq" for a folder whose quantization config says so (gptq.detect_quant_method);
    "compressed-tensors" for a folder whose config.json quant_method says so;
    "mlx" for a folder with mlx-lm's "quantization" dict (mlx.is_mlx_folder); "hqq" for an
    HQQ folder (hqq.is_hqq_folder).
    Raises QahiraFormatError naming src when no supported format is recognised."""
    p = Path(src)
    if p.is_file() and p.suffix == ".gguf":
        return "gguf"
    if p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf"
        if len(ggufs) > 1:
            raise QahiraFormatError(
                f"{p} holds several GGUF files ({', '.join(g.name for g in ggufs[:4])}): pass "
                "the one to convert as SRC")
        from .gptq import detect_quant_method  # config.json quant_method "gptq" / "awq"

        if (method := detect_quant_method(p)) is not None:
            return method
        from .compressed_tensors import is_compressed_tensors  # quant_method, as vLLM reads it

        if is_compressed_tensors(p):
            return "compressed-tensors"
        from .mlx import is_mlx_folder  # config.json "quantization" {group_size, bits}

        if is_mlx_folder(p):
            return "mlx"
        from .hqq import is_hqq_folder  # quant_method "hqq", or hqq's own W_q tensors

        if is_hqq_folder(p):
            return "hqq"
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist: pass a .gguf file or a model folder")
    raise QahiraFormatError(
        f"{p}: no supported source format recognised (supported: {', '.join(FORMATS)}); "
        "pass --from FMT if the folder's config does not say which")


def choose_offset_dtype(layers: dict[str, ConvertedLayer], requested: str | None
                        ) -> tuple[str, float]:
    """(offset dtype, worst |offset - stored offset|). None/"auto": float16 when every
    block's offset is exact in float16, else float32 (always exact: the offsets are fp16
    numbers times small integers). A forced float16 reports its worst rounding; an offset
    that overflows float16 is refused (QahiraFormatError naming the layer)."""
    if requested not in (None, "auto", "float16", "float32"):
        raise ValueError(f"offset dtype {requested!r}: expected float16, float32 or auto")
    if requested == "float32":
        return "float32", 0.0
    worst = 0.0
    for name, layer in layers.items():
        rounded = layer.offsets.to(torch.float16).to(torch.float32)
        if requested == "float16" and not bool(torch.isfinite(rounded).all()):
            raise QahiraFormatError(
                f"layer {name!r} ({layer.source}): an offset overflows float16 "
                f"(|offset| up to {layer.offsets.abs().max().item():g}); use "
                "--offset-dtype float32")
        worst = max(worst, (rounded - layer.offsets).abs().max().item() if layer.offsets.numel()
                    else 0.0)
    if requested == "float16":
        return "float16", worst
    return ("float16", 0.0) if worst == 0.0 else ("float32", 0.0)


def scales_exact_in_fp16(layers: dict[str, ConvertedLayer]) -> bool:
    """Whether every layer's scales are float16 numbers (format 1's scale dtype)."""
    for layer in layers.values():
        s = layer.scales
        if s.dtype != torch.float16 and not torch.equal(s.to(torch.float16).to(s.dtype), s):
            return False
    return True


def plan_layer_shapes(layers: dict[str, ConvertedLayer], default_block: tuple[int, int],
                      architectures: list[str]
                      ) -> tuple[dict[str, tuple[int, tuple[int, int]]], list[str]]:
    """({layer: (bits, block_size)}, notes) for format 2: each layer's own, except that the
    members of a vLLM-fused layer (fused_layers.packed_modules_mapping of `architectures`,
    e.g. Llama's q/k/v -> qkv_proj) share one: vLLM loads them into one tensor with one
    method. Their largest bits and their finest block (the gcd of each dim) are exact for all:
    4-bit values fit 8 bits, and a coarser block's scale and offset are repeated (widen_layer).
    """
    from ..fused_layers import fused_groups, packed_modules_mapping

    shapes = {n: (layer.bits, tuple(layer.block_size or default_block))
              for n, layer in layers.items()}
    notes = []
    mapping = packed_modules_mapping(architectures) or {}
    for fused, members in sorted(fused_groups(sorted(layers), mapping).items()):
        own = {shapes[m] for m in members}
        if len(own) < 2:
            continue
        bits = max(b for b, _ in own)
        block = (math.gcd(*(bs[0] for _, bs in own)), math.gcd(*(bs[1] for _, bs in own)))
        for m in members:
            shapes[m] = (bits, block)
        notes.append(f"{fused}: members stored at {bits} bits, block {list(block)} (vLLM serves "
                     f"them as one layer; exact: coarser blocks' scales and offsets repeated)")
    return shapes, notes


def widen_layer(layer: ConvertedLayer, bits: int, block: tuple[int, int],
                default_block: tuple[int, int]) -> ConvertedLayer:
    """`layer` at `bits` (>= its own) and `block` (dividing its own): q unchanged, each scale
    and offset repeated over the finer blocks it covers. Exact."""
    own = tuple(layer.block_size or default_block)
    fo, fi = own[0] // block[0], own[1] // block[1]
    grow = lambda t: t.repeat_interleave(fo, dim=0).repeat_interleave(fi, dim=1)  # noqa: E731
    return dataclasses.replace(layer, scales=grow(layer.scales), offsets=grow(layer.offsets),
                               bits=bits, block_size=block)


def _stored_layers(layers: dict[str, ConvertedLayer], cfg: QahiraQuantConfig
                   ) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        out[f"{name}.qweight"] = pack_qweight(layer.q, cfg.for_layer(name).bits)
        out[f"{name}.scales"] = layer.scales.to(cfg.scale_torch_dtype)
        out[f"{name}.offsets"] = layer.offsets.to(cfg.offset_torch_dtype)
    return out


def verify_layers(out_dir: Path, layers: dict[str, ConvertedLayer]) -> dict[str, float]:
    """{layer: worst |W_qahira - W_source|} in fp32: the written checkpoint's dequantization
    (read back from out_dir) against the source library's own (ConvertedLayer.reference)."""
    from ..checkpoint import load_quantized_state

    cfg, quant, _ = load_quantized_state(out_dir)
    worst = {}
    for name, layer in layers.items():
        t = quant[name]
        ours = dequantize(t["qweight"], t["scales"], t["offsets"], cfg.for_layer(name))
        worst[name] = (ours - layer.reference()).abs().max().item()
    return worst


def convert(src: str | os.PathLike, out_dir: str | os.PathLike, from_format: str | None = None,
            verify: bool = False, offset_dtype: str | None = None, dtype: str = "float32",
            overwrite: bool = False, progress: bool = True, revision: str | None = None) -> dict:
    """Convert `src` into a qahira checkpoint at `out_dir` (written atomically). Returns a summary.

    src: a .gguf file, a model folder, or a hub repo id (resolve_source; revision: its branch,
    tag or commit).
    from_format: forces the source format (default: detect_format). offset_dtype: None/"auto"
    (float16 only where every offset is exact in it), "float16" (the worst rounding is
    reported) or "float32". dtype: float dtype of the tensors that are not converted linear
    layers (embeddings, norms, an output head), dequantized by the source library (float32:
    exact). verify: dequantize both sides and report the worst difference per layer.
    Raises QahiraFormatError (a ValueError) naming the file / tensor for what cannot be
    converted exactly; FileExistsError when out_dir exists and not overwrite.
    """
    from ..checkpoint import write_checkpoint

    t0 = time.time()
    if Path(out_dir).exists() and not overwrite:  # fail before reading, not after
        raise FileExistsError(f"output folder {Path(out_dir).resolve()} already exists "
                              "(pass --overwrite to replace)")
    source_name = str(src)
    src = resolve_source(src, revision)
    fmt = from_format or detect_format(src)
    if fmt not in FORMATS:
        raise ValueError(f"source format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(FLOAT_DTYPES)}")
    reader = importlib.import_module(f"{__name__}.{FORMATS[fmt]}")
    with reader.read_source(src, FLOAT_DTYPES[dtype], progress=progress) as source:
        if not source.layers:
            raise QahiraFormatError(f"{src}: no linear layer can be converted exactly")
        block_size, layer_overrides = tuple(source.block_size), {}
        fp16_scales = scales_exact_in_fp16(source.layers)  # widening below repeats scales
        v1 = (fp16_scales
              and all(tuple(layer.block_size or block_size) == block_size
                      for layer in source.layers.values()))
        if v1:
            # One bits value per checkpoint (format 1): 4-bit values are exact in 8-bit storage.
            bits = max(layer.bits for layer in source.layers.values())
            if bits == 8 and any(layer.bits == 4 for layer in source.layers.values()):
                source.notes.append("4-bit and 8-bit source types are mixed: every layer is "
                                    "stored at 8 bits (exact; format v1 has one bits value "
                                    "per model)")
        else:
            shapes, shape_notes = plan_layer_shapes(
                source.layers, block_size, source.config.get("architectures") or [])
            source.notes.extend(shape_notes)
            for name, (b, bs) in shapes.items():
                layer = source.layers[name]
                if (b, bs) != (layer.bits, tuple(layer.block_size or block_size)):
                    source.layers[name] = widen_layer(layer, b, bs, block_size)
            # the most common shape is the default; the others are per-layer overrides
            bits, block_size = Counter(shapes[n] for n in sorted(shapes)).most_common(1)[0][0]
            default = {"bits": bits, "block_size": list(block_size)}
            for n, (b, bs) in sorted(shapes.items()):
                diff = {k: v for k, v in (("bits", b), ("block_size", list(bs)))
                        if v != default[k]}
                if diff:
                    layer_overrides[n] = diff
        off_dtype, off_rounding = choose_offset_dtype(source.layers, offset_dtype)
        cfg = QahiraQuantConfig(
            bits=bits, block_size=block_size, offset_dtype=off_dtype,
            modules_not_converted=tuple(sorted(source.modules_not_converted)),
            scale_dtype="float16" if fp16_scales else "float32",
            layers=layer_overrides,
            extra={"source_format": fmt, "source_model": source_name, **source.provenance,
                   "created_by": f"qahira-vllm {__version__}"})
        config = dict(source.config)
        config["quantization_config"] = cfg.to_dict()
        tensors = {**source.tensors, **_stored_layers(source.layers, cfg)}
        out = write_checkpoint(source.files_dir, out_dir, config, tensors, overwrite=overwrite)
        summary = {"out_dir": str(out), "source_format": fmt, "bits": bits,
                   "block_size": list(block_size), "offset_dtype": off_dtype,
                   "offset_rounding_max": off_rounding,
                   "format_version": cfg.format_version, "scale_dtype": cfg.scale_dtype,
                   "layer_overrides": len(layer_overrides),
                   "layers_converted": len(source.layers),
                   "modules_not_converted": list(cfg.modules_not_converted),
                   "notes": source.notes}
        if verify:
            worst = verify_layers(out, source.layers)
            summary["verify_max_abs_diff"] = worst
            summary["verify_worst"] = max(worst.values())
    summary["seconds"] = round(time.time() - t0, 2)
    return summary
