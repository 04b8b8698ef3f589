"""HQQ (hqq's HQQLinear, axis 1) -> qahira: w = (q - z) s with a float zero z.

The layout (hqq.core.quantize.HQQLinear.state_dict with encoded_state_dict, as written by
transformers' save_pretrained of an HQQ model and by hqq's AutoHQQHFModel.save_to_safetensors):
safetensors holding, per quantized linear module P,

    P.W_q          packed q of the [out * in / g, g] group matrix (W.reshape(-1, g) for
                   axis 1), in hqq.core.bitpack's row-chunk layout: "4bit_u8" stores
                   rows [0, n/2) in the high nibbles and [n/2, n) in the low nibbles of
                   uint8 [n/2, g]; "2bit_u8" / "1bit_u8" likewise in 4 / 8 chunks from the
                   top bits; "3bit_32" 10 chunks of 3 bits from bit 27 down of int32 rows
                   (rows padded to a multiple of 10); "8bit_u8" plain uint8 (5, 6, 8 bits)
    P.scale, P.zero  [out * in / g, 1] in the compute dtype (float16 / bfloat16)
    P.nbits, P.group_size, P.axis (int32), P.shape (int64 [out, in]), P.packing,
    P.compute_dtype, P.unpack_view_dtype (uint8 character codes), P.view_as_float,
    P.quant_scale, P.quant_zero, ... (uint8 booleans), optional P.bias

and config.json with transformers' quantization_config {"quant_method": "hqq", ...} (absent
in hqq's own save_to_safetensors output). hqq dequantizes (Quantizer.dequantize) as
((q - z) s).reshape(shape) in its compute dtype.

In the format (W = s' q' + o, s' > 0): s' = s (float16; a bfloat16 s must be exact in
float16, else refused: format v2), q' = q, o = -s z computed exactly in float64 and rounded
once to float32. For float16 / bfloat16 s and z the product has at most 22 significant bits,
so o is exact and s' q' + o is (q - z) s rounded once in fp32, which equals hqq's own
dequantization run in float32 (compute_dtype float32) bit for bit; a float32 z rounds o once
(the worst |o - (-s z)| is reported in the notes). hqq's native float16 dequantization rounds
twice in float16, so it differs from the exact value by at most about 2**-10 |s| |q - z|.
Axis 0 (groups along the output dim) is refused by layer name; so are quantized scales or
zeros (quant_scale / quant_zero) and a group that does not divide the layer's inputs. A
negative s (no hqq quantizer writes one) flips q' = qmax - q as in the MLX reader.
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
from .common import (FolderTensors, bias_offsets, bias_to_format, check_names, hf_skeleton,
                     output_config, plan_layers, read_config, split_groups)

# hqq packing name -> (bits per element, elements per packed unit)
PACKINGS = {"8bit_u8": (8, 1), "4bit_u8": (4, 2), "2bit_u8": (2, 4), "1bit_u8": (1, 8),
            "3bit_32": (3, 10)}
# meta tensors of an HQQLinear state dict (HQQLinear.state_dict_keys() without W_q and bias)
META_KEYS = ("nbits", "group_size", "shape", "scale", "zero", "axis", "packing",
             "unpack_view_dtype", "view_as_float", "quant_scale", "quant_zero", "compute_dtype",
             "offload_meta", "encoded_state_dict", "stores_quant_config", "channel_wise",
             "optimize", "round_zero", "zero_scale")
TORCH_DTYPES = {"torch.float16": torch.float16, "torch.bfloat16": torch.bfloat16,
                "torch.float32": torch.float32, "torch.uint8": torch.uint8,
                "torch.int32": torch.int32}


def is_hqq_folder(path: Path) -> bool:
    """Whether `path` holds an HQQ model: config.json quantization_config quant_method "hqq"
    (what transformers reads), or hqq's own output (a qmodel.pt, or safetensors whose tensor
    names end in ".W_q")."""
    p = Path(path)
    cfg = p / "config.json"
    if cfg.is_file():
        try:
            qc = json.loads(cfg.read_text()).get("quantization_config")
        except (json.JSONDecodeError, UnicodeDecodeError):
            qc = None
        if isinstance(qc, dict) and "quant_method" in qc:
            return qc["quant_method"] == "hqq"
    if (p / "qmodel.pt").is_file():
        return True
    from ..safetensors_io import model_weight_files, read_safetensors_header

    try:  # the first of the files that form the model (safetensors_io's rule)
        header = read_safetensors_header(model_weight_files(p)[0])
    except (OSError, QahiraFormatError):  # none or unreadable: read_source names the file
        return False
    return any(k.endswith(".W_q") for k in header)


def _text(t: torch.Tensor) -> str:
    return "".join(chr(int(c)) for c in t.reshape(-1).tolist())


def unpack(w_q: torch.Tensor, packing: str, rows: int) -> torch.Tensor:
    """hqq's packed W_q (already viewed back from a float view) -> uint8 [rows, g]: row
    chunk i of the packed rows holds elements i*step .. from the top bits down
    (hqq.core.bitpack); "3bit_32" rows are padded to a multiple of 10, cut back to `rows`."""
    bits, k = PACKINGS[packing]
    step = w_q.shape[0]
    wide = w_q.to(torch.int64) & (0xFFFFFFFF if packing == "3bit_32" else 0xFF)
    top = 30 if packing == "3bit_32" else 8
    mask = (1 << bits) - 1
    chunks = [(wide >> (top - bits * (i + 1))) & mask for i in range(k)]
    q = torch.cat(chunks) if k > 1 else wide
    if q.shape[0] < rows:
        raise ValueError(f"packed {packing} W_q has {step} rows, {rows} groups expected")
    return q[:rows].to(torch.uint8)


class _Module:
    """One HQQLinear's decoded state (from the encoded safetensors state dict)."""

    def __init__(self, name: str, tensors: FolderTensors, folder: Path):
        self.name, self.where = name, f"module {name!r} in {folder}"
        meta = {k: tensors.get(f"{name}.{k}") for k in META_KEYS if f"{name}.{k}" in tensors.meta}
        for key in ("nbits", "group_size", "shape", "axis", "packing"):
            if key not in meta:
                raise QahiraFormatError(f"{self.where}: tensor '{name}.{key}' missing: not an "
                                        "hqq HQQLinear state dict")
        if meta["nbits"].is_floating_point():  # 1.58 bits: ternary, its own scheme
            raise QahiraFormatError(f"{self.where}: nbits={meta['nbits'].item():g} (ternary "
                                    "HQQ) has no exact qahira form: not converted")
        self.nbits, self.group = int(meta["nbits"]), int(meta["group_size"])
        self.axis, self.shape = int(meta["axis"]), [int(v) for v in meta["shape"].tolist()]
        self.packing = _text(meta["packing"])
        self.view_dtype = _text(meta["unpack_view_dtype"]) if "unpack_view_dtype" in meta else None
        self.view_as_float = bool(meta.get("view_as_float", torch.tensor(0)))
        self.meta = meta

    def check(self, hf_shape: list[int]) -> None:
        """QahiraFormatError naming the layer unless it has an exact qahira form."""
        out_f, in_f = self.shape
        if self.axis != 1:
            raise QahiraFormatError(
                f"{self.where}: HQQ axis={self.axis} (groups along the output dim); qahira "
                "blocks run along the input dim: only axis=1 HQQ converts (quantize with "
                "axis=1, transformers' HqqConfig default); not converted")
        if any(bool(self.meta.get(k, torch.tensor(0))) for k in ("quant_scale", "quant_zero")):
            raise QahiraFormatError(f"{self.where}: quantized scales/zeros (quant_scale / "
                                    "quant_zero) are not converted")
        problems = []
        if self.shape != hf_shape:
            problems.append(f"shape {self.shape}, transformers' layer is {hf_shape}")
        if self.packing not in PACKINGS or PACKINGS[self.packing][0] < self.nbits:
            problems.append(f"packing {self.packing!r} for nbits={self.nbits}")
        if self.group < 1 or in_f % self.group:
            problems.append(f"group_size={self.group} does not divide in={in_f} (groups "
                            "would span rows)")
        if problems:
            raise QahiraFormatError(f"{self.where}: not convertible: {'; '.join(problems)}")

    def scale_zero(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, z) [out, in/g] in their stored dtype."""
        if "zero_scale" in self.meta:  # offload_meta stacks (zero, scale)
            z, s = self.meta["zero_scale"][0], self.meta["zero_scale"][1]
        else:
            s, z = self.meta["scale"], self.meta["zero"]
        out_f, in_f = self.shape
        return s.reshape(out_f, in_f // self.group), z.reshape(out_f, in_f // self.group)

    def q(self, w_q: torch.Tensor) -> torch.Tensor:
        """uint8 [out, in] of the stored W_q."""
        if self.view_as_float:  # stored viewed as the compute dtype: view it back
            w_q = w_q.view(TORCH_DTYPES.get(self.view_dtype, torch.uint8))
        out_f, in_f = self.shape
        return unpack(w_q, self.packing, out_f * in_f // self.group).reshape(out_f, in_f)


def hqq_dequantize(tensors: FolderTensors, module: str) -> torch.Tensor:
    """hqq's own dequantization of `module` in float32: HQQLinear.load_state_dict of the
    stored (encoded) state dict with compute_dtype float32, then HQQLinear.dequantize."""
    try:
        from hqq.core.quantize import HQQLinear
    except ImportError:
        raise QahiraFormatError(f"{module}: dequantizing with hqq needs the hqq package "
                                "(pip install hqq)") from None
    state = {k[len(module) + 1:]: tensors.get(k) for k in tensors.meta
             if k.startswith(module + ".") and "." not in k[len(module) + 1:]}
    state.pop("bias", None)
    layer = HQQLinear(None, None, compute_dtype=torch.float32, device="cpu", initialize=False)
    layer.load_state_dict(state)
    return layer.dequantize().to(torch.float32)


@contextlib.contextmanager
def read_source(src, dtype: torch.dtype, progress: bool = True) -> Iterator[SourceModel]:
    """Read an HQQ model folder (safetensors) as a SourceModel (qahira_vllm.convert).

    Refused before any weight is decoded, each with a QahiraFormatError naming the folder,
    tensor or layer: hqq's pickled qmodel.pt (save it as safetensors first); a model type
    transformers does not know; a tensor transformers' model does not have; an axis-0,
    ternary or quantized-meta layer, or one whose group does not divide its inputs. Refused
    while decoding: a scale not exact in float16 (the offset would round). Linear layers HQQ left in
    float stay float with the rest of their vLLM-fused group; other HQQ modules are
    dequantized by hqq into `dtype`."""
    folder, cfg_path, config = read_config(src, "HQQ")
    if not list(folder.glob("model*.safetensors")) and (folder / "qmodel.pt").is_file():
        raise QahiraFormatError(
            f"{folder / 'qmodel.pt'}: hqq's pickled format is not read (a pickle can run code); "
            "load it with hqq (AutoHQQHFModel.from_quantized) and save it with "
            "AutoHQQHFModel.save_to_safetensors, then convert that folder")
    skel = hf_skeleton(config, cfg_path)
    tensors = FolderTensors(folder)

    # Plan from the small meta tensors: refuse what cannot be converted before decoding.
    names = {n[: -len(".W_q")] for n in tensors.meta if n.endswith(".W_q")}
    check_names(skel, tensors, names, {"W_q": "weight", "bias": "bias"}, folder, "HQQ")
    modules = {n: _Module(n, tensors, folder) for n in sorted(names)}
    for name, m in modules.items():
        m.check(skel.shapes[f"{name}.weight"])
    convert_set, block, notes = plan_layers(skel, {n: m.group for n, m in modules.items()},
                                            "HQQ")

    layers: dict[str, ConvertedLayer] = {}
    out_tensors: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    worst_rounding = 0.0
    for name in tqdm(sorted(tensors.meta), desc="converting", unit="tensor",
                     disable=not progress):
        base, leaf = name.rsplit(".", 1)
        if base not in modules:
            t = tensors.get(name)
            out_tensors[name] = t.to(dtype) if t.is_floating_point() else t
            continue
        if leaf == "bias":
            out_tensors[name] = tensors.get(name).to(dtype)
        if leaf != "W_q":
            continue
        m = modules[base]
        counts[f"{m.nbits}bit_g{m.group}"] = counts.get(f"{m.nbits}bit_g{m.group}", 0) + 1
        if base not in convert_set:
            out_tensors[f"{base}.weight"] = hqq_dequantize(tensors, base).to(dtype)
            continue
        s, z = m.scale_zero()
        exact = -(s.to(torch.float64) * z.to(torch.float64))  # -s z, exact in float64
        q, scales, offsets = bias_to_format(m.q(tensors.get(name)), s, exact, m.nbits, m.group,
                                            base, tensors.where[name], round_offsets=True)
        rounding = (offsets.to(torch.float64)
                    - bias_offsets(s, exact, m.nbits)).abs().max().item()
        worst_rounding = max(worst_rounding, rounding)
        factor = m.group // block
        layers[base] = ConvertedLayer(
            q=q, scales=split_groups(scales, factor), offsets=split_groups(offsets, factor),
            bits=4 if m.nbits <= 4 else 8, source=f"hqq {m.nbits}-bit group {m.group} {base}",
            reference=lambda b=base: hqq_dequantize(tensors, b))
    if worst_rounding:
        notes.append(f"offsets -s z rounded once to float32: worst |o - (-s z)| = "
                     f"{worst_rounding:.3g} (float32 zeros)")
    yield SourceModel(layers=layers, tensors=out_tensors, config=output_config(skel, dtype),
                      files_dir=folder, block_size=(1, block),
                      modules_not_converted=sorted(skel.targets - convert_set), notes=notes,
                      provenance={"source_types": dict(sorted(counts.items()))})
