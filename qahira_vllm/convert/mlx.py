"""MLX (mlx-lm) affine quantization -> qahira, exactly.

The layout mlx-lm saves (mlx_lm.utils.quantize_model / save_model / save_config): a model
folder with `model*.safetensors` (metadata {"format": "mlx"}) and a config.json holding a
`"quantization"` dict (copied to `"quantization_config"`, no `quant_method`): the default
`group_size`, `bits`, `mode`, plus per-module overrides keyed by module path (a dict of the
same fields, or false for a module left in float). A quantized module `P` stores

    P.weight  uint32 [out, in * bits / 32]   element j of a row at bits j*bits .. j*bits+bits-1
                                             of the row's little-endian bit stream
    P.scales  [out, in / g]  the model dtype (float16 / bfloat16 / float32)
    P.biases  [out, in / g]  same dtype

with w = s q + b per group of g consecutive inputs (mx.dequantize, mode "affine"; q
0..2**bits - 1). mlx's quantizer writes a negative s when the group's largest |w| is its
minimum, and s = -tiny for a constant group.

In the format (W = s' q' + o, s' > 0, float16 scales): s > 0 is an exact copy (s' = s, q' = q,
o = b); s < 0 flips, s' = |s|, q' = qmax - q, o = b - qmax |s| (checked exact in float32); a
group with s = 0 holds only b (s' = 1, q' = 0, o = b). Every s q and s' q' is exact in fp32
(a float16 scale times an integer below 2**8), so s' q' + o rounds the same real number once,
as mx.dequantize does in fp32: the dequantization equals mlx's bit for bit in fp32. A scale
that is not exact in float16 (bfloat16 below float16's range, float32 scales) is refused by
tensor name (the flip of a negative scale, b - qmax |s|, would round). Bits 1..8 are all
exact (stored at 4 bits up to 4, else at 8); groups of different sizes are split into the
smallest (their scale and offset repeated), so one block size serves the model.

Names are transformers' (mlx-lm keeps HF parameter names for the architectures it shares with
transformers; a tensor transformers' model does not have is refused). The reference for
verify is mlx itself (mx.dequantize of the stored tensors, scales and biases taken to float32).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from ..format import QahiraFormatError
from . import ConvertedLayer, SourceModel
from .common import (FolderTensors, bias_to_format, check_names, hf_skeleton, output_config,
                     plan_layers, read_config, split_groups)

MLX_BITS = range(1, 9)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ROW_CHUNK = 1024  # rows unpacked at once: bounds the int64 temporaries


def quantization_dict(config: dict) -> dict | None:
    """mlx-lm's quantization dict of a config.json, or None when it has none: `quantization`
    (what mlx-lm writes and reads first), else a `quantization_config` without quant_method
    that carries group_size and bits (mlx-lm's copy for the HF model tree)."""
    for key in ("quantization", "quantization_config"):
        q = config.get(key)
        if isinstance(q, dict) and "quant_method" not in q and "group_size" in q and "bits" in q:
            return q
    return None


def is_mlx_folder(path: Path) -> bool:
    """Whether `path` is a folder with an mlx-lm quantized config.json."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return quantization_dict(json.loads(cfg.read_text())) is not None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """mlx's packed weight, uint32 (or int32) [out, in * bits / 32] -> uint8 q [out, in].

    mlx packs each row as one little-endian bit stream (element j at bits j*bits ..), so
    every 8 elements occupy exactly `bits` bytes whatever the bit width. (Not
    common.unpack_int32: for 3, 5 and 6 bits an element crosses word boundaries.)"""
    out_f = packed.shape[0]
    raw = packed.contiguous().view(torch.uint8).reshape(out_f, in_features // 8, bits)
    byte_shift = torch.arange(0, 8 * bits, 8, dtype=torch.int64)
    elem_shift = torch.arange(0, 8 * bits, bits, dtype=torch.int64)
    mask = (1 << bits) - 1
    rows = []
    for r in range(0, out_f, ROW_CHUNK):
        word = (raw[r:r + ROW_CHUNK].to(torch.int64) << byte_shift).sum(-1)  # < 2**64 / 2**16
        rows.append(((word.unsqueeze(-1) >> elem_shift) & mask).to(torch.uint8)
                    .reshape(word.shape[0], in_features))
    return torch.cat(rows) if rows else torch.empty(0, in_features, dtype=torch.uint8)


class MlxTensors(FolderTensors):
    """The folder's tensors (common.FolderTensors), also as mlx loads them (for mlx's own
    dequantization in verify and for the tensors that stay float)."""

    def __init__(self, folder: Path):
        super().__init__(folder)
        self._mx: dict[Path, dict] = {}

    def mx(self, name: str):
        """The tensor as mlx loads it (mx.load: lazy, per file)."""
        import mlx.core as mx

        f = self.where[name]
        if f not in self._mx:
            self._mx[f] = mx.load(str(f))
        return self._mx[f][name]


def mlx_dequantize(tensors: MlxTensors, module: str, group: int, bits: int) -> torch.Tensor:
    """mlx's own dequantization of `module` (mx.dequantize, mode affine) in float32: the
    stored scales and biases taken to float32 (exact), so mlx computes s q + b in fp32."""
    try:
        import mlx.core as mx
    except ImportError:
        raise QahiraFormatError(
            f"{module}: dequantizing with mlx needs the mlx package (on Linux: pip install "
            "'mlx[cpu]')") from None
    import numpy as np

    w = mx.dequantize(tensors.mx(f"{module}.weight"),
                      tensors.mx(f"{module}.scales").astype(mx.float32),
                      tensors.mx(f"{module}.biases").astype(mx.float32),
                      group_size=group, bits=bits, mode="affine")
    return torch.from_numpy(np.array(w.astype(mx.float32)))


def _layer_params(module: str, override, default: dict, tensors: MlxTensors,
                  in_features: int, source: Path) -> tuple[int, int]:
    """(group size, bits) of a quantized module, as mlx-lm's loader takes them: its override
    in the quantization dict, else inferred from the shapes (mlx_lm.utils.infer_quant_config).
    Checked against the stored shapes; QahiraFormatError naming the tensor otherwise."""
    w_dtype, w_shape = tensors.meta[f"{module}.weight"]
    s_dtype, s_shape = tensors.meta[f"{module}.scales"]
    b_meta = tensors.meta.get(f"{module}.biases")
    where = f"module {module!r} in {source}"
    if isinstance(override, dict):
        mode = override.get("mode", "affine")
    else:  # mlx-lm: float scales mean affine; uint8 scales are the mx/nv fp modes
        mode = ("affine" if s_dtype in ("F16", "BF16", "F32")
                else f"{default.get('mode', '(not affine)')} ({s_dtype} scales)")
    if mode != "affine":
        raise QahiraFormatError(
            f"{where}: mlx quantization mode {mode}; only mode 'affine' (w = s q + b) has an "
            "exact qahira form (mxfp4 / mxfp8 / nvfp4 need format v2): not converted")
    if isinstance(override, dict):
        group, bits = override.get("group_size"), override.get("bits")
    else:
        group = in_features // s_shape[-1] if s_shape and s_shape[-1] else 0
        bits = (w_shape[-1] * 32) // in_features if w_shape else 0
    problems = []
    if bits not in MLX_BITS:
        problems.append(f"bits={bits} (expected 1..8)")
    elif w_dtype != "U32" or len(w_shape) != 2 or w_shape[1] * 32 != in_features * bits:
        problems.append(f"{module}.weight is {w_dtype} {w_shape}, expected U32 "
                        f"[out, {in_features * bits // 32}]")
    if not group or in_features % group or s_shape[-1:] != [in_features // group]:
        problems.append(f"{module}.scales is {s_shape} for {in_features} inputs and "
                        f"group_size={group}")
    if s_dtype not in ("F16", "BF16", "F32"):
        problems.append(f"{module}.scales is {s_dtype}, expected a float dtype")
    if b_meta is None or b_meta[1] != s_shape:
        problems.append(f"{module}.biases is {b_meta}, expected the scales' shape {s_shape}")
    if problems:
        raise QahiraFormatError(f"{where}: not a valid mlx affine layer: {'; '.join(problems)}")
    return group, bits


@contextlib.contextmanager
def read_source(src, dtype: torch.dtype, progress: bool = True) -> Iterator[SourceModel]:
    """Read an mlx-lm quantized model folder as a SourceModel (qahira_vllm.convert).

    Refused before any weight is decoded, each with a QahiraFormatError naming the folder,
    tensor or module: a folder without mlx-lm's quantization dict or weights; a model type
    transformers does not know; a tensor transformers' model does not have; a quantized layer
    of a non-affine mode or with shapes that do not match its group size and bits. Refused
    while decoding: a scale not exact in float16 (kept exact only then), a non-finite scale or
    bias. Linear layers mlx left in float stay float with the rest of their vLLM-fused group;
    other quantized tensors (embedding, lm_head) are dequantized by mlx into `dtype`."""
    folder, cfg_path, config = read_config(src, "MLX")
    quant = quantization_dict(config)
    if quant is None:
        raise QahiraFormatError(f"{cfg_path}: no mlx-lm \"quantization\" dict (group_size, "
                                "bits): not an MLX quantized model")
    skel = hf_skeleton(config, cfg_path)
    tensors = MlxTensors(folder)

    # Plan from the headers: refuse what cannot be converted before decoding anything.
    modules = {n[: -len(".scales")] for n in tensors.meta if n.endswith(".scales")}
    check_names(skel, tensors, modules, {"weight": "weight"}, folder, "MLX")
    params = {}
    for module in sorted(modules):
        override = quant.get(module)
        if override is False:
            raise QahiraFormatError(f"{module} in {folder}: {cfg_path.name} marks it not "
                                    "quantized but it has a .scales tensor: inconsistent")
        params[module] = _layer_params(module, override, quant, tensors,
                                       skel.shapes[f"{module}.weight"][-1], folder)
    convert_set, block, notes = plan_layers(skel, {m: p[0] for m, p in params.items()}, "MLX")

    layers: dict[str, ConvertedLayer] = {}
    out_tensors: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for name in tqdm(sorted(tensors.meta), desc="converting", unit="tensor",
                     disable=not progress):
        base, leaf = name.rsplit(".", 1)
        if base in modules:
            if leaf != "weight":
                continue
            group, bits = params[base]
            counts[f"{bits}bit_g{group}"] = counts.get(f"{bits}bit_g{group}", 0) + 1
            if base in convert_set:
                q = unpack(tensors.get(name), bits, skel.shapes[name][-1])
                q, s, o = bias_to_format(q, tensors.get(f"{base}.scales"),
                                         tensors.get(f"{base}.biases"), bits, group, base,
                                         tensors.where[name])
                factor = group // block
                layers[base] = ConvertedLayer(
                    q=q, scales=split_groups(s, factor), offsets=split_groups(o, factor),
                    bits=4 if bits <= 4 else 8,
                    source=f"mlx affine {bits}-bit group {group} {base}",
                    reference=lambda m=base, g=group, b=bits: mlx_dequantize(tensors, m, g, b))
            else:
                out_tensors[name] = mlx_dequantize(tensors, base, group, bits).to(dtype)
        else:
            t = tensors.get(name)
            out_tensors[name] = t.to(dtype) if t.is_floating_point() else t

    yield SourceModel(layers=layers, tensors=out_tensors, config=output_config(skel, dtype),
                      files_dir=folder, block_size=(1, block),
                      modules_not_converted=sorted(skel.targets - convert_set), notes=notes,
                      provenance={"source_types": dict(sorted(counts.items()))})
