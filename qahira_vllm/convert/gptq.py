"""GPTQ (AutoGPTQ / GPTQModel layout) -> qahira, exactly, for 4- and 8-bit linear layers.

Layout per quantized linear layer `L` (in -> out features, group size g, pf = 32 / bits
values per int32 word, fields filled from the low bits up):

    L.qweight  int32 [in / pf, out]      field j of word [r, o] = q[r pf + j, o]
    L.qzeros   int32 [in / g, out / pf]  field j of word [k, c] = z[k, c pf + j]
    L.scales   fp16  [in / g, out]
    L.g_idx    int32 [in]                group of input i (i // g unless act-order)
    L.bias     float [out]               optional, kept as is

    w[o, i] = scales[g_idx[i], o] * (q[i, o] - z[g_idx[i], o])

Stored zeros: checkpoint_format "gptq" (the older layout, AutoGPTQ's and GPTQModel's
default) stores z - 1 in every field; GPTQModel writes it by subtracting 0x11111111
(4-bit; 0x01010101 8-bit) from the whole int32 word and reads it back by adding the same
constant (utils/model.py, convert_gptq_v{1_to_2,2_to_1}_format_module), so a zero of 0 in
one field borrows from the next field and is recovered exactly. We read it the same way.
AutoGPTQ's older readers add 1 per field instead, which differs only where a field holds
2**bits - 1 (a stored zero of 0): such layers are named in a note. "gptq_v2" stores z as is.

In the format (W = s q' + o, s > 0, block 1 x g along the input dim): s = scale, q' = q,
o = -s z; a negative scale flips q' = qmax - q, o = -|s| (qmax - z); a zero scale gives
s = 1, q' = 0, o = 0. Every product is an fp16 number times an integer below 2**8, exact in
float32, and so is s (q - z): the dequantization equals the source's bit for bit in fp32.
Group size -1 (one group per row) repeats the row's scale and offset over blocks.

Refused by name, before anything is written: bits other than 4 / 8, other checkpoint
formats (marlin, bitblas, ...), GPTQModel `dynamic` per-module overrides, a non-trivial
`g_idx` (act-order, see `check_g_idx`), sym checkpoints whose zeros are not 2**(bits-1)
(vLLM ignores them, GPTQModel reads them), scales not exact in float16.

The math, the scale check and the int32 fields are common.py's (shared by every reader);
`open_source`, `layer_decoders` and `source_model` below are shared with the AWQ reader
(`awq.py`).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from tqdm import tqdm

from ..format import QahiraFormatError
from . import ConvertedLayer, SourceModel
from .common import (WORD_BITS, check_scales, hf_skeleton, output_config, plan_layers,
                     read_config, split_groups, unpack_int32, zero_point_to_format)

SUPPORTED_BITS = (4, 8)
# the source's own quantization config files (not copied to the output)
QUANT_CONFIG_FILES = ("quantize_config.json", "quant_config.json")


# ---- shared with awq.py ----------------------------------------------------------------------

def source_quant_config(folder: Path, config: dict) -> dict:
    """The source's quantization config: config.json's quantization_config, else the first
    of QUANT_CONFIG_FILES (AutoGPTQ's quantize_config.json, AutoAWQ's quant_config.json),
    as vLLM's get_quant_config reads them. {} when none."""
    qc = config.get("quantization_config")
    if isinstance(qc, dict):
        return qc
    for name in QUANT_CONFIG_FILES:
        if (folder / name).is_file():
            return json.loads((folder / name).read_text())
    return {}


def detect_quant_method(folder: Path) -> str | None:
    """"gptq" or "awq" when `folder`'s quantization config says so (quant_method, as
    transformers and vLLM read it; a bare AutoGPTQ quantize_config.json or AutoAWQ
    quant_config.json without it is recognised by its fields), else None."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    qc = source_quant_config(folder, config if isinstance(config, dict) else {})
    method = str(qc.get("quant_method", "")).lower()
    if method in ("gptq", "awq"):
        return method
    if not method and "w_bit" in qc:
        return "awq"
    if not method and "bits" in qc and "desc_act" in qc:
        return "gptq"
    return None


@contextlib.contextmanager
def source_model(folder: Path, config: dict, tensors: dict[str, torch.Tensor],
                 layers: dict[str, tuple[Callable[[], tuple], Callable[[], torch.Tensor], str]],
                 groups: dict[str, int], dtype: torch.dtype, notes: list[str],
                 provenance: dict, progress: bool, fmt: str) -> Iterator[SourceModel]:
    """The SourceModel of an `fmt` ("GPTQ" / "AWQ") folder whose quantized layers are `layers`.

    layers: {HF module name: (decode, reference, source)} where decode() returns (q int
    [out, in], scales float32 [out, in/g], zeros int [out, in/g], bits) and reference() the
    source's dequantization, fp32 [out, in]; groups: {module: g}. tensors: the remaining
    tensors (HF names), converted to `dtype` when floating. Block = 1 x gcd of the groups
    (per-row or larger groups repeat their scale and offset: exact). A vLLM-fused group with
    a float member keeps its quantized members float too (dequantized by `reference`), and
    so does a quantized layer outside the default targets (lm_head)."""
    skel = hf_skeleton(config, folder / "config.json")
    unknown = sorted(set(layers) - set(skel.linear))
    if unknown:
        raise QahiraFormatError(f"{folder}: quantized tensors for {unknown[:4]}, which are not "
                                f"linear layers of {config.get('architectures')}")
    missing = [n for n in sorted(skel.targets - set(layers)) if f"{n}.weight" not in tensors]
    if missing:
        raise QahiraFormatError(f"{folder}: linear layers with neither qweight nor weight: "
                                f"{missing[:5]}")
    convert_set, block, plan_notes = plan_layers(skel, groups, fmt)
    notes.extend(plan_notes)

    out_layers: dict[str, ConvertedLayer] = {}
    out_tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
    for name in tqdm(sorted(layers), desc="converting", unit="layer", disable=not progress):
        decode, reference, source = layers[name]
        if name not in convert_set:
            out_tensors[f"{name}.weight"] = reference().to(dtype)
            continue
        q, scales, zeros, bits = decode()
        qq, s, o = zero_point_to_format(q, scales, zeros, bits, groups[name])
        rep = groups[name] // block
        out_layers[name] = ConvertedLayer(
            q=qq, scales=split_groups(s, rep), offsets=split_groups(o, rep),
            bits=bits, source=source, reference=reference)
    not_converted = sorted(skel.targets - set(out_layers))

    with tempfile.TemporaryDirectory(prefix="qahira-convert-") as files:
        files_dir = Path(files)
        for f in folder.iterdir():  # tokenizer, generation config, chat template, ...
            if f.is_file() and f.name not in QUANT_CONFIG_FILES:
                os.symlink(f.resolve(), files_dir / f.name)
        yield SourceModel(layers=out_layers, tensors=out_tensors,
                          config=output_config(skel, dtype),
                          files_dir=files_dir, block_size=(1, block),
                          modules_not_converted=not_converted, notes=notes,
                          provenance=provenance)


def layer_tensors(tensors: dict[str, torch.Tensor], suffixes: Sequence[str]
                  ) -> dict[str, dict[str, torch.Tensor]]:
    """Pop the quantized layers' tensors out of `tensors`: {module: {suffix: tensor}} for
    every module with a `.qweight`, with whichever of `suffixes` it has."""
    names = [n[: -len(".qweight")] for n in tensors if n.endswith(".qweight")]
    return {m: {s: tensors.pop(f"{m}.{s}") for s in suffixes if f"{m}.{s}" in tensors}
            for m in names}


def expect(t: torch.Tensor | None, name: str, dtype: torch.dtype | tuple, shape: tuple,
           where: str) -> torch.Tensor:
    """`t` when it has `dtype` (or one of them) and `shape`; QahiraFormatError otherwise."""
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if t is None:
        raise QahiraFormatError(f"{where}: tensor {name} is missing")
    if t.dtype not in dtypes or tuple(t.shape) != tuple(shape):
        raise QahiraFormatError(
            f"{where}: {name} is {str(t.dtype).removeprefix('torch.')} {list(t.shape)}, expected "
            f"{'/'.join(str(d).removeprefix('torch.') for d in dtypes)} {list(shape)}")
    return t


def open_source(src, method: str, suffixes: Sequence[str]):
    """(folder, config.json dict, quantization config, {layer: its tensors}, other tensors) of
    a `method` ("gptq" / "awq") folder; QahiraFormatError when its quantization config names
    another method or no tensor ends in .qweight."""
    from ..checkpoint import iter_tensors

    folder, _, config = read_config(src, method.upper())
    tensors = dict(iter_tensors(folder))  # the model's files, headers checked first
    qc = source_quant_config(folder, config)
    found = str(qc.get("quant_method", method)).lower()
    if found != method:
        raise QahiraFormatError(f"{folder} quantization config: quant_method {found!r}, "
                                f"expected {method!r}")
    raw = layer_tensors(tensors, suffixes)
    if not raw:
        raise QahiraFormatError(f"{folder}: no tensor ends in .qweight: not a {method.upper()} "
                                "checkpoint")
    return folder, config, qc, raw, tensors


def layer_decoders(unpack_q: Callable[[], torch.Tensor], scales: torch.Tensor,
                   zeros: torch.Tensor, group: int, bits: int):
    """(decode, reference) of one layer for source_model: unpack_q() gives q int [in, out];
    scales float32 [in/g, out]; zeros int [in/g, out]; w[o, i] = s[i//g, o] (q[i, o] -
    z[i//g, o]) in fp32 (the source math, exact)."""
    def decode():
        return unpack_q().t().contiguous(), scales.t().contiguous(), zeros.t().contiguous(), bits

    def reference():
        q = unpack_q()
        gi = torch.arange(q.shape[0]) // group
        return (scales[gi] * (q - zeros[gi]).to(torch.float32)).t().contiguous()

    return decode, reference


# ---- GPTQ -----------------------------------------------------------------------------------

V1, V2 = "gptq", "gptq_v2"


def gptq_settings(qc: dict, where: str) -> dict:
    """bits, group_size, sym, checkpoint format of a GPTQ quantization config (GPTQModel's
    `format` / `checkpoint_format`, default "gptq"); QahiraFormatError naming `where` for
    what is not converted."""
    bits = qc.get("bits")
    if bits not in SUPPORTED_BITS:
        raise QahiraFormatError(f"{where}: GPTQ bits={bits!r} is not converted (format v1 "
                                "stores 4 or 8 bits; 2- and 3-bit GPTQ are not supported)")
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or V1).lower()
    if qc.get("is_marlin_format") or fmt not in (V1, V2):
        raise QahiraFormatError(
            f"{where}: GPTQ checkpoint format {('marlin' if qc.get('is_marlin_format') else fmt)!r}"
            f" is not converted (only {V1!r} and {V2!r}: qweight packed along the input dim)")
    pack = str(qc.get("pack_dtype", "int32")).removeprefix("torch.")
    if pack != "int32":
        raise QahiraFormatError(f"{where}: GPTQ pack_dtype {pack!r} is not converted (int32 only)")
    dynamic = qc.get("dynamic") or {}
    positive = [k for k in dynamic if not str(k).startswith("-:")]
    if positive:
        raise QahiraFormatError(
            f"{where}: GPTQModel dynamic per-module overrides {positive[:3]} are not converted "
            "(format v1 has one bits value and block size per model)")
    group = qc.get("group_size", -1)
    if not isinstance(group, int) or (group != -1 and group < 1):
        raise QahiraFormatError(f"{where}: GPTQ group_size={group!r}: expected -1 or >= 1")
    return {"bits": bits, "group_size": group, "sym": bool(qc.get("sym", True)),
            "desc_act": bool(qc.get("desc_act", False)), "format": fmt}


def v1_zero_constant(bits: int) -> int:
    """The word GPTQModel adds to every v1 qzeros word: 1 in every field."""
    return sum(1 << (j * bits) for j in range(WORD_BITS // bits))


def gptq_zeros(qzeros: torch.Tensor, bits: int, fmt: str, out: int
               ) -> tuple[torch.Tensor, bool]:
    """(z int64 [in/g, out], whether AutoGPTQ's per-field reading would differ). v1: the
    whole word plus v1_zero_constant, mod 2**32 (GPTQModel); v2: as stored."""
    if fmt == V2:
        return unpack_int32(qzeros, bits, 1, out), False
    words = (qzeros.to(torch.int64) + v1_zero_constant(bits)) & 0xFFFFFFFF
    z = unpack_int32(words, bits, 1, out)
    per_field = unpack_int32(qzeros, bits, 1, out) + 1
    return z, not torch.equal(z, per_field)


def check_g_idx(g_idx: torch.Tensor | None, n_in: int, group: int, where: str) -> None:
    """A g_idx other than i // group (act-order, desc_act) is refused: its groups are not
    contiguous along the input dim, so one group's scale and zero apply to scattered inputs
    and no 1 x g block holds them; making them contiguous would permute the layer's inputs,
    i.e. the previous layer's outputs and the residual stream all layers share, so no exact
    conversion exists in general (vLLM 0.32 also refuses desc_act)."""
    if g_idx is None:
        return
    trivial = torch.arange(n_in, dtype=torch.int64) // group
    if tuple(g_idx.shape) != (n_in,) or not torch.equal(g_idx.to(torch.int64), trivial):
        raise QahiraFormatError(
            f"{where}: g_idx is not i // group_size (act-order / desc_act=true): the groups "
            "are not contiguous along the input dim, so the group scales vary "
            "non-contiguously along it and no 1 x g block layout holds them; a permutation of "
            "the inputs is not exact in general (it would have to permute the residual stream "
            "shared by every layer). Re-quantize with desc_act=false (or GPTQModel's "
            "static_groups=true, which keeps g_idx = i // group_size)")


def gptq_layer(name: str, t: dict[str, torch.Tensor], st: dict, where: str,
               folder: Path | None = None):
    """(decode, reference, group, carried) of one GPTQ layer's tensors (see source_model);
    `folder` names the source in a scale error."""
    bits, pf = st["bits"], WORD_BITS // st["bits"]
    qweight = t.get("qweight")
    if qweight is None or qweight.ndim != 2:
        raise QahiraFormatError(f"{where}: qweight missing or not 2-D")
    n_in, out = qweight.shape[0] * pf, qweight.shape[1]
    group = n_in if st["group_size"] == -1 else st["group_size"]
    if n_in % group:
        raise QahiraFormatError(f"{where}: group_size {group} does not divide the {n_in} "
                                "input features (a partial last group has no 1 x g block)")
    n_groups = n_in // group
    expect(qweight, "qweight", torch.int32, (n_in // pf, out), where)
    scales = expect(t.get("scales"), "scales", (torch.float16, torch.bfloat16, torch.float32),
                    (n_groups, out), where)
    qzeros = expect(t.get("qzeros"), "qzeros", torch.int32, (n_groups, -(-out // pf)), where)
    g_idx = t.get("g_idx")
    check_g_idx(g_idx, n_in, group, where)
    s = check_scales(scales, f"{name}.scales", folder)
    z, carried = gptq_zeros(qzeros, bits, st["format"], out)
    if st["sym"] and not bool((z == 1 << (bits - 1)).all()):
        bad = (z != 1 << (bits - 1)).nonzero()[0].tolist()
        raise QahiraFormatError(
            f"{where}: sym=true but the zero point at [group, out] {bad} is {z[tuple(bad)].item()}"
            f", not {1 << (bits - 1)} (checkpoint format {st['format']!r}): vLLM ignores qzeros "
            "of symmetric GPTQ while GPTQModel reads them, so the file is inconsistent; check "
            "checkpoint_format (gptq stores zero - 1, gptq_v2 the zero)")

    decode, reference = layer_decoders(lambda: unpack_int32(qweight, bits, 0), s, z, group, bits)
    return decode, reference, group, carried


@contextlib.contextmanager
def read_source(src, dtype: torch.dtype, progress: bool = True) -> Iterator[SourceModel]:
    """Read a GPTQ model folder (config.json with quantization_config quant_method "gptq", or
    AutoGPTQ's quantize_config.json) as a SourceModel (qahira_vllm.convert).

    Every layer is checked before anything is decoded; QahiraFormatError names the folder,
    layer or tensor for what cannot be converted exactly (module docstring)."""
    folder, config, qc, raw, tensors = open_source(src, "gptq",
                                                   ("qweight", "qzeros", "scales", "g_idx"))
    st = gptq_settings(qc, f"{folder} quantization config")
    layers, groups, carried = {}, {}, []
    for name, t in raw.items():
        where = f"GPTQ layer {name!r} in {folder}"
        decode, reference, groups[name], c = gptq_layer(name, t, st, where, folder)
        layers[name] = (decode, reference, f"gptq {st['bits']}-bit g{st['group_size']} {name}")
        if c:
            carried.append(name)
    notes = []
    if carried:
        notes.append(
            f"{len(carried)} layer(s) (e.g. {carried[0]}) store a zero point of 0 in the 'gptq' "
            "(v1) layout: read as GPTQModel reads it (whole-word +1 per field); AutoGPTQ's "
            "per-field reading differs there")
    provenance = {"source_bits": st["bits"], "source_group_size": st["group_size"],
                  "source_sym": st["sym"], "source_checkpoint_format": st["format"]}
    with source_model(folder, config, tensors, layers, groups, dtype, notes, provenance,
                      progress, "GPTQ") as source:
        yield source
