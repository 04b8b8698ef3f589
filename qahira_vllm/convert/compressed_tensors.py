"""compressed-tensors (what llm-compressor writes) -> qahira, exactly, for weight-only INT
schemes: `pack-quantized` (W4A16 / W8A16 presets), `naive-quantized` and weight-only
`int-quantized`; strategies `group` and `channel`; symmetric or with zero points.

Source layout (compressed-tensors 0.17, compressors/pack_quantized): per quantized linear
layer P, with b = num_bits, pf = 32 // b values per int32 word, B = 2**(b-1):

    P.weight_packed      int32 [out, ceil(in / pf)]   column j in word j // pf, bits
                                                       (j % pf) b .. +b-1; value q + B (unsigned)
    P.weight             int8  [out, in]               (naive- / int-quantized) signed q
    P.weight_scale       model dtype [out, in / g]     (channel: [out, 1])
    P.weight_zero_point  int32 [ceil(out / pf), in/g]  asymmetric only, packed along the OUTPUT
                                                       dim (naive: int8 [out, in/g]); z + B
    P.weight_shape       int64 [2]                      [out, in]
    P.weight_g_idx       int32 [in]                     actorder "group" only

    w = s (q - z)    q, z signed in [-B, B - 1]; symmetric: z = 0

In the format (W = s q' + o, s > 0), with q_u = q + B and Z = z + B (both 0..2**b - 1):
s > 0: q' = q_u, o = -s Z; s < 0: q' = qmax - q_u, o = -|s| (qmax - Z) (the same values);
s = 0 (all zeros): s = 1, q' = 0, o = 0. The scale is the file's value, so it must be exact
in float16 (format v1): bf16 scales inside float16's range are, fp32 scales rarely; a tensor
with any inexact scale is refused by name (a float32 scale would make the offset -s z
round), never rounded.
Every offset is an fp16 number times an integer below 2**8, exact in float32, and so is
every product s q', so the dequantization equals the library's (run in float32) bit for bit.
Groups become blocks [1, g]; one block shape per checkpoint (format v1), so layers with
different group sizes (and channel layers, g = in) use the greatest common divisor, the
scale and offset repeated (exact).

Refused by layer name, each with why: activation- or output-quantized schemes (W8A8, W4A8:
qahira is weight-only, serving them unquantized would change the model's math), float
types (FP8, NVFP4, MXFP4), dynamic weight scales, strategies other than group / channel,
actorder "group" with a g_idx that is not the contiguous arange(in) // g (groups would not
be blocks), other formats (marlin-24, sparse, ...). Refused for the whole model: a
sparsity_config, a transform_config (rotated weights need online transforms), a
kv_cache_scheme, and quantization_status other than "compressed".

Which scheme a layer has comes from compressed-tensors' own matcher (match_named_modules /
match_targets, as apply_quantization_config does) on the model built on the meta device,
and its format from the scheme's `format`, else the config's (as vLLM reads them).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from ..format import QahiraFormatError
from . import ConvertedLayer, SourceModel
from .common import (FolderTensors, check_scales, hf_skeleton, output_config, plan_layers,
                     split_groups, unpack_int32, zero_point_to_format)

QUANT_METHOD = "compressed-tensors"
PACKED = "pack-quantized"
UNPACKED = ("naive-quantized", "int-quantized")  # int8 `weight` tensors
FORMATS = (PACKED, *UNPACKED)
STRATEGIES = ("group", "channel")
PARAMS = ("weight_packed", "weight", "weight_scale", "weight_zero_point", "weight_shape",
          "weight_g_idx")


def _quant_config(config: dict) -> dict:
    """The quantization config vLLM reads (get_quant_config): quantization_config, else the
    older compressed-tensors key compression_config."""
    qc = config.get("quantization_config") or config.get("compression_config") or {}
    return qc if isinstance(qc, dict) else {}


def is_compressed_tensors(folder: Path) -> bool:
    """True when `folder`'s config.json says quant_method "compressed-tensors"."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and _quant_config(config).get("quant_method") == QUANT_METHOD


def read_ct_config(src: Path) -> dict:
    """config.json of `src` with its compressed-tensors quantization_config checked for what
    concerns the whole model. QahiraFormatError naming config.json otherwise."""
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: pass a model folder")
    config = json.loads(cfg_path.read_text())
    qc = _quant_config(config)
    where = f"{cfg_path} quantization_config"
    if qc.get("quant_method") != QUANT_METHOD:
        raise QahiraFormatError(f"{where}: quant_method {qc.get('quant_method')!r}, expected "
                                f"{QUANT_METHOD!r}")
    if qc.get("quantization_status", "compressed") != "compressed":
        raise QahiraFormatError(
            f"{where}: quantization_status {qc['quantization_status']!r}: the weights are not "
            "stored compressed (save the model with llm-compressor's compressed save)")
    for key, why in (("sparsity_config", "sparse weights need their own kernels"),
                     ("transform_config", "rotated weights need the online transforms vLLM "
                      "applies at run time; qahira has none"),
                     ("kv_cache_scheme", "a quantized KV cache is not part of the qahira "
                      "format; serving without it would change the model's math")):
        if qc.get(key):
            raise QahiraFormatError(f"{where} has a {key}: not converted ({why})")
    return config


def layer_schemes(model, qconfig) -> dict[str, object]:
    """{module name: QuantizationScheme}: compressed-tensors' own matching, as its
    apply_quantization_config assigns schemes (first matching target wins, ignore honoured)."""
    from compressed_tensors.utils.match import match_named_modules, match_targets

    target_to_scheme = {}
    for scheme in qconfig.config_groups.values():
        for target in scheme.targets:
            target_to_scheme[target] = scheme
    out = {}
    for name, module in match_named_modules(model, list(target_to_scheme), qconfig.ignore):
        matched = match_targets(name, module, list(target_to_scheme))
        out[name] = target_to_scheme[matched[0]]
    return out


def scheme_problem(scheme, fmt: str | None) -> str | None:
    """Why a layer with this scheme and format cannot be converted exactly, or None."""
    w = scheme.weights
    if scheme.input_activations is not None or scheme.output_activations is not None:
        return ("its scheme quantizes activations (input_activations / output_activations, "
                "e.g. W8A8 / W4A8); qahira serves weight-only schemes (W4A16 / W8A16), and "
                "serving it with float activations would change the model's math")
    if w is None:
        return "its scheme has no weight quantization"
    if fmt not in FORMATS:
        return f"format {fmt!r} is not converted (converted: {', '.join(FORMATS)})"
    if str(w.type) != "int":
        return f"weights of type {w.type!r} (only int weights have an exact qahira form)"
    if w.dynamic:
        return "dynamic weight quantization stores no scales"
    if str(w.strategy) not in STRATEGIES:
        return (f"weight strategy {w.strategy!r}: converted are {', '.join(STRATEGIES)} (one "
                "scale per row or per group of columns)")
    if not 2 <= w.num_bits <= 8:
        return f"{w.num_bits}-bit weights (converted: 2 to 8 bits)"
    return None


def decode_layer(t: dict[str, torch.Tensor], scheme, fmt: str, where: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """One layer's stored tensors (local names: weight_packed / weight, weight_scale, ...) ->
    (q_u int64 [out, in] in 0..2**b - 1, scales [out, in/g] as stored, Z int64 [out, in/g]
    (zero point + 2**(b-1)), g). QahiraFormatError naming `where` for a missing tensor, a
    shape that disagrees with the scheme, or a g_idx that is not contiguous groups."""
    w = scheme.weights
    bits, half = w.num_bits, 1 << (w.num_bits - 1)
    scale = t.get("weight_scale")
    if scale is None:
        raise QahiraFormatError(f"{where}: no weight_scale tensor")
    if fmt == PACKED:
        if "weight_packed" not in t or "weight_shape" not in t:
            raise QahiraFormatError(f"{where}: {fmt} needs weight_packed and weight_shape")
        out_f, in_f = (int(x) for x in t["weight_shape"].tolist())
        packed = t["weight_packed"]
        if packed.dtype != torch.int32 or tuple(packed.shape) != (
                out_f, math.ceil(in_f / (32 // bits))):
            raise QahiraFormatError(f"{where}: weight_packed is {packed.dtype} "
                                    f"{list(packed.shape)}, expected int32 [{out_f}, "
                                    f"{math.ceil(in_f / (32 // bits))}] for {bits}-bit")
        q_u = unpack_int32(packed, bits, 1, in_f)
    else:
        q = t.get("weight")
        if q is None or q.dtype != torch.int8 or q.ndim != 2:
            raise QahiraFormatError(f"{where}: {fmt} needs an int8 weight [out, in]")
        if int(q.min()) < -half or int(q.max()) > half - 1:
            raise QahiraFormatError(f"{where}: weight values {int(q.min())}..{int(q.max())} "
                                    f"outside the {bits}-bit range {-half}..{half - 1}")
        out_f, in_f = q.shape
        q_u = q.to(torch.int64) + half
    g = in_f if str(w.strategy) == "channel" else int(w.group_size)
    if in_f % g:
        raise QahiraFormatError(f"{where}: in = {in_f} is not a multiple of the group size {g}")
    groups = in_f // g
    if tuple(scale.shape) != (out_f, groups):
        raise QahiraFormatError(f"{where}: weight_scale {list(scale.shape)}, expected "
                                f"[{out_f}, {groups}] ({w.strategy}, in = {in_f}, g = {g})")
    if w.symmetric:
        z_u = torch.full((out_f, groups), half, dtype=torch.int64)
    else:
        zp = t.get("weight_zero_point")
        if zp is None:
            raise QahiraFormatError(f"{where}: asymmetric scheme without weight_zero_point")
        if fmt == PACKED:
            z_u = unpack_int32(zp, bits, 0, out_f)
        else:
            z_u = zp.to(torch.int64) + half
        if tuple(z_u.shape) != (out_f, groups) or int(z_u.min()) < 0 or \
                int(z_u.max()) > 2 * half - 1:
            raise QahiraFormatError(f"{where}: weight_zero_point does not hold [{out_f}, "
                                    f"{groups}] {bits}-bit values")
    g_idx = t.get("weight_g_idx")
    if g_idx is not None and not torch.equal(g_idx.to(torch.int64),
                                             torch.arange(in_f) // g):
        raise QahiraFormatError(
            f"{where}: act-order weight_g_idx puts columns in groups that are not contiguous "
            "runs of the input dim; qahira blocks are contiguous, so this layer has no exact "
            "form (re-quantize with actorder 'weight' or none)")
    return q_u, scale, z_u, g


def library_dequantize(t: dict[str, torch.Tensor], scheme, fmt: str) -> torch.Tensor:
    """compressed-tensors' own decompress of one layer (the compressor registered for `fmt`),
    with the scales widened to float32 first so the library computes in float32 (exact: a
    scale times an integer below 2**9); float32 [out, in]."""
    from compressed_tensors.compressors import BaseCompressor

    local = {k: v for k, v in t.items() if k in PARAMS}
    local["weight_scale"] = local["weight_scale"].float()
    compressor = BaseCompressor.get_value_from_registry(fmt)
    return compressor.decompress(local, scheme)["weight"].float()


@contextlib.contextmanager
def read_source(src, dtype: torch.dtype, progress: bool = True) -> Iterator[SourceModel]:
    """Read a compressed-tensors model folder as a SourceModel (qahira_vllm.convert).

    Everything refusable is refused before any tensor data is read, except the checks that
    need the values (scales exact in float16, zero points and int8 weights in range, g_idx
    contiguous), which run before anything is written; each a QahiraFormatError naming the
    config.json, layer or tensor (module docstring lists them)."""
    from compressed_tensors.quantization import QuantizationConfig

    src = Path(src)
    config = read_ct_config(src)
    qc = _quant_config(config)
    try:
        qconfig = QuantizationConfig.model_validate(qc)
    except Exception as e:  # pydantic's message names the bad field
        raise QahiraFormatError(f"{src / 'config.json'} quantization_config is not a valid "
                                f"compressed-tensors config: {e}") from None
    skel = hf_skeleton(config, src / "config.json")
    model = skel.model
    schemes = layer_schemes(model, qconfig)
    tensors = FolderTensors(src)
    entries = tensors.entries

    # Plan from the config and the headers: refuse before reading any tensor data.
    formats, plan, notes = {}, {}, []
    for name, scheme in schemes.items():
        fmt = scheme.format or qconfig.format
        fmt = str(getattr(fmt, "value", fmt))
        if fmt == "dense":
            continue  # matched but stored float
        where = f"layer {name!r} ({fmt}) in {src}"
        problem = scheme_problem(scheme, fmt)
        if problem:
            raise QahiraFormatError(f"{where}: not converted: {problem}")
        local = {p: entries[f"{name}.{p}"] for p in PARAMS if f"{name}.{p}" in entries}
        if "weight_scale" not in local:
            raise QahiraFormatError(f"{where}: its scheme is quantized ({fmt}) but the files "
                                    f"hold no {name}.weight_scale")
        formats[name] = fmt
        plan[name] = (scheme, local)
    quant_suffixes = tuple(f".{p}" for p in PARAMS if p != "weight")
    orphans = sorted(n for n in entries if n.endswith(quant_suffixes)
                     and n.rsplit(".", 1)[0] not in plan)
    if orphans:
        raise QahiraFormatError(
            f"{src}: tensor {orphans[0]!r} is quantized but no config group of "
            "quantization_config matches its layer: config.json and the weights disagree")
    # One block shape per checkpoint: the gcd of the group sizes (channel: g = in), known
    # from the schemes and the model's shapes before any data is read.
    groups = {n: (model.get_submodule(n).in_features
                  if str(plan[n][0].weights.strategy) == "channel"
                  else int(plan[n][0].weights.group_size)) for n in plan if n in skel.targets}
    convert_set, bi, plan_notes = plan_layers(skel, groups, "compressed-tensors")
    notes.extend(plan_notes)

    def read(entry) -> torch.Tensor:
        return tensors.get(entry.name)

    layers: dict[str, ConvertedLayer] = {}
    out_tensors: dict[str, torch.Tensor] = {}
    scale_dtypes: set[str] = set()
    for name, (scheme, local) in tqdm(sorted(plan.items()), desc="converting", unit="layer",
                                      disable=not progress):
        t = {p: read(e) for p, e in local.items()}
        fmt = formats[name]
        where = f"layer {name!r} ({fmt}, file {local['weight_scale'].file.name})"
        if name not in convert_set:  # a quantized lm_head, or a member of a float fused group
            out_tensors[f"{name}.weight"] = library_dequantize(t, scheme, fmt).to(dtype)
            continue
        q_u, scale, z_u, g = decode_layer(t, scheme, fmt, where)
        s = check_scales(scale, f"{name}.weight_scale", local["weight_scale"].file)
        bits = scheme.weights.num_bits
        if bits <= 4 and q_u.shape[1] % 8:
            raise QahiraFormatError(f"{where}: in = {q_u.shape[1]} is not a multiple of 8, "
                                    "which qahira's 4-bit packing needs")
        q, scales, offsets = zero_point_to_format(q_u, s, z_u, bits, g)
        scale_dtypes.add(str(scale.dtype).removeprefix("torch."))
        layers[name] = ConvertedLayer(
            q=q, scales=split_groups(scales, g // bi), offsets=split_groups(offsets, g // bi),
            bits=4 if bits <= 4 else 8,
            source=f"compressed-tensors {fmt} {bits}-bit {scheme.weights.strategy} {name}",
            # read again when verify asks: holding every layer's source tensors costs memory
            reference=lambda local=local, scheme=scheme, fmt=fmt: library_dequantize(
                {p: read(e) for p, e in local.items()}, scheme, fmt))
    layer_tensor_names = {e.name for _, local in plan.values() for e in local.values()}
    for ename, entry in entries.items():
        if ename not in layer_tensor_names:
            x = read(entry)
            out_tensors[ename] = x.to(dtype) if x.is_floating_point() else x

    yield SourceModel(layers=layers, tensors=out_tensors, config=output_config(skel, dtype),
                      files_dir=src, block_size=(1, bi),
                      modules_not_converted=sorted(skel.targets - convert_set),
                      notes=notes,
                      provenance={"source_formats": sorted(set(formats.values())),
                                  "source_scale_dtypes": sorted(scale_dtypes)})
