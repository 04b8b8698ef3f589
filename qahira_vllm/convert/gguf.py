"""GGUF (llama.cpp) -> qahira, exactly, for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K linear layers (K-quants: gguf_kquants, format v2).

Block layouts (gguf-py's gguf/quants.py, llama.cpp's ggml-common.h); 32 weights per block
along the input dim, little endian; element j < 16 is the low nibble of byte j, element
j + 16 its high nibble:

    Q4_0  d fp16, 16 B nibbles            w = d (q - 8)     q 0..15
    Q4_1  d fp16, m fp16, 16 B nibbles    w = d q + m       q 0..15
    Q5_0  d fp16, qh u32, 16 B nibbles    w = d (q - 16)    q 0..31, bit j of qh = bit 4 of q_j
    Q5_1  d fp16, m fp16, qh u32, 16 B    w = d q + m       q 0..31
    Q8_0  d fp16, 32 x int8               w = d x           x -128..127 (q = x + 128)

In the format (W = s q' + o, s > 0): "signed" types, w = d (q - z), become s = d, q' = q,
o = -z d when d > 0, and s = |d|, q' = qmax - q, o = -(qmax - z) |d| when d < 0 (llama.cpp's
Q4_0 / Q5_0 quantizers write d = max / -8, / -16, so negative d is common): the same value.
"Affine" types copy d, q, m (a negative d there is refused: no llama.cpp quantizer writes
one, and the flipped offset m - qmax |d| would round). A block with d = 0 holds only zeros
(or m): s = 1, q' = 0. Every product above is exact in float32 (fp16 d times an integer
below 2**8), so the dequantization equals gguf's bit for bit in fp32.

K-quants (gguf_kquants) have the same two forms per sub-block of 16 or 32 weights, with
d = d_super * sc and m = -dmin * mn computed in float32 exactly as gguf does (exact products).
Their scales are stored in float32 (format v2 scale_dtype float32: d_super * sc has up to 18
significant bits), blocks [1, 16] (Q2_K, Q3_K, Q6_K) or [1, 32] (Q4_K, Q5_K), per layer
(format v2 `layers`, chosen by convert()). Products s q' stay exact (18 + 6 bits at most), so
the sum is rounded once, as gguf's d q - dmin mn is, or not at all (signed types): bit for bit.

Names, config and tokenizer come from transformers' GGUF loader (get_gguf_hf_weights_map,
AutoConfig / AutoTokenizer with gguf_file=); Llama's q/k rows are un-permuted with
transformers' own LlamaTensorProcessor, applied to q, scales and offsets alike (a row
permutation, exact since blocks run along the input dim).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from ..format import QahiraFormatError
from . import ConvertedLayer, SourceModel
from . import common
from .gguf_kquants import K_LAYOUTS, decode_k_blocks

BLOCK = 32
# GGUF general.architecture values converted (those transformers' loader un-permutes as
# Llama's; Mistral GGUF files also say "llama").
ARCHITECTURES = ("llama",)
# type name -> (kind, bits needed in qahira, zero point z of "signed" types, qmax, weights per
# block along the input dim); the K-quants' from gguf_kquants.K_LAYOUTS
EXACT_TYPES = {"Q4_0": ("signed", 4, 8, 15, BLOCK), "Q4_1": ("affine", 4, None, 15, BLOCK),
               "Q5_0": ("signed", 8, 16, 31, BLOCK), "Q5_1": ("affine", 8, None, 31, BLOCK),
               "Q8_0": ("signed", 8, 128, 255, BLOCK),
               **{k: (kind, 4 if qmax < 16 else 8, z, qmax, sub)
                  for k, (_, kind, sub, qmax, z) in K_LAYOUTS.items()}}
FLOAT_TYPES = ("F32", "F16", "BF16")
# types refused with a specific reason (others: "no exact form")
REFUSED_WHY = {"Q8_K": "llama.cpp uses Q8_K only for activations, and its float32 d times "
                       "int8 is rounded in gguf's dequantization, so it has no exact form"}


def open_reader(path: Path):
    """gguf.GGUFReader on `path`; QahiraFormatError naming the file if it cannot be parsed."""
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as e:  # bad magic, truncated header or data, ...: the file is the problem
        raise QahiraFormatError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); "
                                "download it again") from None


def _field_str(reader, key: str) -> str | None:
    f = reader.fields.get(key)
    return None if f is None else bytes(f.parts[f.data[0]]).decode()


def resolve_gguf(src) -> Path:
    p = Path(src)
    if p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) != 1:
            raise QahiraFormatError(f"{p}: expected exactly one .gguf file, found {len(ggufs)}")
        p = ggufs[0]
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist")
    return p


def decode_blocks(data: np.ndarray, type_name: str
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Raw GGUF rows, uint8 [rows, n_blocks * type_size], of an EXACT_TYPES type ->
    (q uint8 [rows, in] unsigned 0..qmax, d float32 [rows, in / block], m float32
    [rows, in / block] for affine types else None); block: EXACT_TYPES' last field (the
    K-quants' sub-blocks, decoded by gguf_kquants.decode_k_blocks)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if type_name in K_LAYOUTS:
        return decode_k_blocks(data, type_name)
    rows = data.shape[0]
    has_m = type_name in ("Q4_1", "Q5_1")
    b = data.reshape(rows, -1, GGML_QUANT_SIZES[GGMLQuantizationType[type_name]][1])
    d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    pos = 2
    m = None
    if has_m:
        m = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        pos = 4
    if type_name == "Q8_0":
        q = (b[..., pos:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return q.reshape(rows, -1), d, m
    qh = None
    if type_name in ("Q5_0", "Q5_1"):
        qh = b[..., pos:pos + 4].copy().view(np.uint32)  # [rows, nb, 1], little endian
        pos += 4
    qs = b[..., pos:pos + BLOCK // 2]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # element j, then j + 16
    if qh is not None:
        bit = (qh >> np.arange(BLOCK, dtype=np.uint32)) & 1
        q = q | (bit.astype(np.uint8) << 4)
    return q.reshape(rows, -1).astype(np.uint8), d, m


def to_format(q: np.ndarray, d: np.ndarray, m: np.ndarray | None, type_name: str, where: str
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decoded blocks -> (q' uint8 [out, in], scales [out, in/block] > 0, offsets float32
    [out, in/block]) with s q' + o == the GGUF value of every weight (module docstring);
    scales float16 (exact: the fp16 d), float32 for the K-quants (d_super * sc).
    QahiraFormatError naming `where` and the block (for K-quants the sub-block) for a
    non-finite d / m, or a negative d of an affine type."""
    kind, _, zero, qmax, block = EXACT_TYPES[type_name]
    k_quant = type_name in K_LAYOUTS
    scale_dtype = torch.float32 if k_quant else torch.float16
    unit = "sub-block" if k_quant else "block"  # [row, index along the input dim]
    q_t, d_t = torch.from_numpy(q), torch.from_numpy(d)
    m_t = None if m is None else torch.from_numpy(m)
    for label, t in (("d", d_t), ("m", m_t)):
        if t is not None and not bool(torch.isfinite(t).all()):
            blk = (~torch.isfinite(t)).nonzero()[0].tolist()
            raise QahiraFormatError(f"{where} ({type_name}): {unit} {blk} has {label} = "
                                    f"{t[tuple(blk)].item()}: the file is damaged")
    neg = d_t < 0
    if kind == "affine" and bool(neg.any()):
        blk = neg.nonzero()[0].tolist()
        raise QahiraFormatError(
            f"{where} ({type_name}): {unit} {blk} has d = {d_t[tuple(blk)].item()} < 0, which "
            "llama.cpp never writes; the format needs scale > 0 and the flipped offset "
            f"m - {qmax}|d| can round: not converted")
    bits = qmax.bit_length()  # the source's bits (Q5: 5), not the stored 8
    if kind == "signed":
        return common.zero_point_to_format(q_t, d_t, torch.full_like(d_t, zero), bits, block,
                                           scale_dtype)
    # d >= 0 here: the offset is m
    return common.to_format(q_t, d_t, m_t.clone(), bits, block, scale_dtype)


def gguf_to_hf_names(model, gguf_arch: str) -> dict[str, str]:
    """{GGUF tensor name: HF state-dict name} for `model` (any device, meta is fine): the
    top level of transformers' get_gguf_hf_weights_map (gguf-py's TensorNameMap applied to
    each parameter's module name, ".weight" / ".bias" kept), which for these architectures
    maps every tensor; that function also recurses into every submodule, rebuilding the
    name table each time (minutes on a shared CPU), for layouts like Bloom's."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch = next(k for k, v in MODEL_ARCH_NAMES.items() if v == gguf_arch)
    name_map = get_tensor_name_map(arch, model.config.num_hidden_layers)
    out = {}
    for hf_name in model.state_dict():
        name, suffix = hf_name, ""
        if hf_name.endswith((".weight", ".bias")):
            name, suffix = hf_name.rsplit(".", 1)
            suffix = "." + suffix
        gguf_name = name_map.get_name(name)
        if gguf_name is not None:
            out[gguf_name + suffix] = hf_name
    return out


def _row_permutation(processor, gguf_name: str, rows: int) -> torch.Tensor | None:
    """The row order transformers' tensor processor gives this tensor (Llama's q/k
    un-permutation), as an index; None when it keeps the order."""
    idx = np.arange(rows, dtype=np.int64)[:, None]
    perm = np.ascontiguousarray(processor.process(weights=idx, name=gguf_name).weights[:, 0])
    return None if np.array_equal(perm, idx[:, 0]) else torch.from_numpy(perm)


def _dequantize(t) -> torch.Tensor:
    """gguf's own dequantization of one tensor, float32 in its logical shape."""
    from gguf.quants import dequantize

    return torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))


def _permute(x: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    return x if perm is None else x[perm]


@contextlib.contextmanager
def read_source(src, dtype: torch.dtype, progress: bool = True) -> Iterator[SourceModel]:
    """Read a GGUF file (or a folder holding one) as a SourceModel (qahira_vllm.convert).

    Refused before any tensor is decoded, each with a QahiraFormatError naming the file or
    tensor: an unreadable file; an architecture other than ARCHITECTURES; a linear layer of a
    type with no exact form (not in EXACT_TYPES or FLOAT_TYPES). Linear layers stored in float
    (F32/F16/BF16) stay float, with the rest of their vLLM-fused group. K-quant layers come
    with their own block_size ([1, 16] or [1, 32]); convert() writes format v2 for them."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS

    path = resolve_gguf(src)
    reader = open_reader(path)
    arch = _field_str(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise QahiraFormatError(
            f"{path}: GGUF architecture {arch!r} is not converted yet; supported: "
            f"{', '.join(ARCHITECTURES)} (the Llama family, which includes Mistral files)")
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    cfg_dict = config.to_dict()
    processor = TENSOR_PROCESSORS[arch](config=cfg_dict)
    name_map = gguf_to_hf_names(model, arch)
    skel = common.skeleton_of(model, cfg_dict)
    targets = skel.targets

    # Plan from the tensor headers: refuse what cannot be converted before decoding anything.
    plan, notes, kept_float = {}, [], set()
    for t in reader.tensors:
        hf = name_map.get(t.name)
        if hf is None:
            notes.append(f"GGUF tensor {t.name!r} has no transformers counterpart: skipped "
                         "(as transformers' GGUF loader does)")
            continue
        layer = hf[: -len(".weight")] if hf.endswith(".weight") else None
        type_name = t.tensor_type.name
        if layer in targets:
            where = f"tensor {t.name!r} ({layer}) in {path}"
            if type_name in FLOAT_TYPES:
                kept_float.add(layer)
            elif type_name not in EXACT_TYPES:
                why = REFUSED_WHY.get(type_name, "which has no exact form in the qahira format")
                raise QahiraFormatError(
                    f"{where} is {type_name}, {why} (converted exactly: "
                    f"{', '.join(EXACT_TYPES)} and float types); not converted")
        plan[t.name] = (hf, layer, type_name)
    missing = sorted(targets - {p[1] for p in plan.values()})
    if missing:
        raise QahiraFormatError(f"{path}: linear layers without a tensor: {missing[:5]}")
    convert_set, _, plan_notes = common.plan_layers(
        skel, {n: BLOCK for n in targets - kept_float}, "GGUF")
    notes.extend(plan_notes)
    not_converted = sorted(targets - convert_set)

    layers: dict[str, ConvertedLayer] = {}
    tensors: dict[str, torch.Tensor] = {}
    types: dict[str, int] = {}
    for t in tqdm(reader.tensors, desc="converting", unit="tensor", disable=not progress):
        if t.name not in plan:
            continue
        hf, layer, type_name = plan[t.name]
        types[type_name] = types.get(type_name, 0) + 1
        rows = int(t.data.shape[0]) if t.data.ndim == 2 else 0
        perm = _row_permutation(processor, t.name, rows) if rows else None
        if layer in convert_set:
            q, d, m = decode_blocks(np.asarray(t.data), type_name)
            q, scales, offsets = to_format(q, d, m, type_name, f"tensor {t.name!r} in {path}")
            layers[layer] = ConvertedLayer(
                q=_permute(q, perm), scales=_permute(scales, perm),
                offsets=_permute(offsets, perm), bits=EXACT_TYPES[type_name][1],
                source=f"gguf {type_name} {t.name}",
                reference=lambda t=t, perm=perm: _permute(_dequantize(t), perm),
                block_size=(1, EXACT_TYPES[type_name][4]))
        else:
            w = _dequantize(t)
            if perm is not None:
                w = w[perm]
            tensors[hf] = w.to(dtype)

    with tempfile.TemporaryDirectory(prefix="qahira-convert-") as files:
        files_dir = Path(files)
        if "tokenizer.ggml.model" in reader.fields:
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            tok.save_pretrained(files_dir)
        else:
            notes.append(f"{path} holds no tokenizer: none written (add tokenizer files to "
                         "the output folder before serving)")
        out_config = json.loads(config.to_json_string())  # what save_pretrained writes
        for key in ("quantization_config", "_name_or_path"):
            out_config.pop(key, None)
        out_config["architectures"] = [skel.arch]
        out_config["dtype"] = str(dtype).removeprefix("torch.")
        yield SourceModel(layers=layers, tensors=tensors, config=out_config,
                          files_dir=files_dir, block_size=(1, BLOCK),
                          modules_not_converted=not_converted, notes=notes,
                          provenance={"source_types": dict(sorted(types.items()))})
