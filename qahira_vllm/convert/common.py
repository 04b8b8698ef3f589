"""What the `qahira convert` readers share: the quantization math into the format, the scale
check, int32 bit fields, the model folder's tensors, and the transformers model they are
checked and planned against. Readers import from here, never from each other.

The math (docs/FORMAT.md, "From other formats"): a source group stores either w = s (q - z)
(GPTQ, AWQ, compressed-tensors, GGUF's Q4_0 / Q5_0 / Q8_0) or w = s q + b (MLX, HQQ with
b = -s z, GGUF's Q4_1 / Q5_1); the format stores W = s' q' + o with s' > 0 in float16.
s > 0: s' = s, q' = q; s < 0: s' = |s|, q' = qmax - q (the same weights, the offset
absorbing s qmax); s = 0 (the group is its offset alone): s' = 1, q' = 0.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ..format import QahiraFormatError

WORD_BITS = 32


# ---- the math ---------------------------------------------------------------------------------

def check_scales(scales: torch.Tensor, tensor: str, file: str | Path | None = None
                 ) -> torch.Tensor:
    """float32 copy of `scales` (any float dtype) when every value is finite and exact in
    float16 (format v1 stores float16 scales). QahiraFormatError naming `tensor` (and `file`),
    its dtype and the first bad position otherwise; nothing is ever rounded."""
    s = scales.to(torch.float32)
    dtype = str(scales.dtype).removeprefix("torch.")
    where = f"tensor {tensor!r} ({dtype})" + (f" in {file}" if file else "")
    if not bool(torch.isfinite(s).all()):
        idx = (~torch.isfinite(s)).nonzero()[0].tolist()
        raise QahiraFormatError(f"{where}: scale {s[tuple(idx)].item()} at {idx}: the file is "
                                "damaged")
    if scales.dtype == torch.float16:
        return s
    back = s.to(torch.float16).to(torch.float32)
    bad = back != s
    if bool(bad.any()):
        idx = bad.nonzero()[0].tolist()
        raise QahiraFormatError(
            f"{where}: {int(bad.sum())} of {s.numel()} scales are not exact in float16 (e.g. "
            f"{s[tuple(idx)].item()!r} at {idx} would become {back[tuple(idx)].item()!r}); "
            "this format's conversion is exact only for float16 scales (with a float32 scale "
            "the offset -s z, or |s| qmax, is a product that rounds). Not converted (nothing "
            "is rounded)")
    return s


def to_format(q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, bits: int,
              group: int, scale_dtype: torch.dtype = torch.float16
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sign and zero conventions: (q' uint8 [out, in], s' scale_dtype [out, in/g] > 0,
    offsets float32 [out, in/g]). q' = qmax - q where s < 0, 0 where s = 0, else q; s' = |s|,
    1 where s = 0. q: integer [out, in] in 0..2**bits - 1; scales: float [out, in/g], checked
    (check_scales; float32 ones exact in float32 for scale_dtype float32, format v2); offsets:
    the format's offsets already (zero_point_offsets / bias_offsets), taken to float32."""
    qmax = (1 << bits) - 1
    neg, zero = scales < 0, scales == 0
    q16 = q.to(torch.int16)
    q_out = torch.where(neg.repeat_interleave(group, dim=1), qmax - q16, q16)
    q_out = torch.where(zero.repeat_interleave(group, dim=1), torch.zeros_like(q_out), q_out)
    s_out = torch.where(zero, torch.ones_like(scales), scales.abs()).to(scale_dtype)
    return q_out.to(torch.uint8), s_out, offsets.to(torch.float32)


def zero_point_offsets(scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """float32 [out, in/g]: o with s' q' + o == s (q - z) (to_format's s', q'): -s z where
    s > 0, -|s| (qmax - z) where s < 0, 0 where s = 0. Exact for float16-exact s and integer
    z below 2**9 (a float16 number times such an integer fits float32)."""
    qmax = (1 << bits) - 1
    s = scales.to(torch.float32)
    z = zeros.to(torch.float32)
    offsets = torch.where(s < 0, -s.abs() * (qmax - z), -s * z)
    return torch.where(s == 0, torch.zeros_like(offsets), offsets)


def bias_offsets(scales: torch.Tensor, biases: torch.Tensor, bits: int) -> torch.Tensor:
    """float64 [out, in/g]: o with s' q' + o == s q + b (to_format's s', q'): b where s >= 0,
    b + s qmax where s < 0. Exact for float16 / bfloat16 / float32 inputs of like magnitude
    (float64 holds their sum); whether float32 holds it is the caller's check."""
    s, b = scales.to(torch.float64), biases.to(torch.float64)
    return torch.where(s < 0, b + s * ((1 << bits) - 1), b)


def zero_point_to_format(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                         group: int, scale_dtype: torch.dtype = torch.float16
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w[o, i] = s[o, i // group] (q[o, i] - z[o, i // group]) in the format: (q' uint8
    [out, in], s' scale_dtype [out, in/g] > 0, offsets float32 [out, in/g]), s' q' + o == w
    exactly in float32. scales: checked (check_scales), or for scale_dtype float32 any
    float32 s with s z exact in float32 (GGUF K-quants: 18-bit s, z <= 63); q, zeros:
    integers 0..2**bits - 1."""
    return to_format(q, scales, zero_point_offsets(scales, zeros, bits), bits, group,
                     scale_dtype)


def bias_to_format(q: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int,
                   group: int, module: str, file: str | Path | None = None,
                   round_offsets: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w = s q + b per group of `group` inputs in the format: (q' uint8 [out, in], s' float16
    [out, in/g] > 0, offsets float32 [out, in/g]) with s' q' + o == s q + b.

    q: integer [out, in] (0..2**bits - 1); scales, biases: [out, in/g], any float dtype
    (float64 biases are taken as exact). round_offsets: round the offsets to float32 once
    instead of refusing one that float32 cannot hold (the caller states the rounding).
    Raises QahiraFormatError naming '{module}.scales' / '{module}.biases' (in `file`) and the
    group for a non-finite scale or bias, a scale not exact in float16 (check_scales), or
    (unless round_offsets) an offset not exact in float32."""
    within = f" in {file}" if file else ""
    s = check_scales(scales, f"{module}.scales", file)
    if not bool(torch.isfinite(biases).all()):
        grp = (~torch.isfinite(biases)).nonzero()[0].tolist()
        raise QahiraFormatError(f"tensor '{module}.biases'{within}: group {grp} is "
                                f"{biases[tuple(grp)].item()}: the file is damaged")
    offsets = bias_offsets(s, biases, bits)
    rounded = offsets.to(torch.float32).to(torch.float64)
    if not round_offsets and bool((rounded != offsets).any()):
        grp = (rounded != offsets).nonzero()[0].tolist()
        raise QahiraFormatError(
            f"tensor '{module}.biases'{within}: group {grp} has offset "
            f"{offsets[tuple(grp)].item():.17g} (scale {s[tuple(grp)].item():g}), not exact "
            "in float32; not converted")
    return to_format(q, s, offsets, bits, group)


def unpack_int32(packed: torch.Tensor, bits: int, dim: int, n: int | None = None,
                 order: Sequence[int] | None = None) -> torch.Tensor:
    """int32 words -> int64 values, unpacked along `dim` (0 or 1): field j (bits j*bits and
    up, of the word read as unsigned) of word k is element k * pf + order[j] (order None:
    j), pf = 32 // bits. Shape: `packed` with `dim` multiplied by pf, then cut to `n` along
    `dim` when given (a partly filled last word)."""
    pf = WORD_BITS // bits
    w = packed.to(torch.int64) & 0xFFFFFFFF
    fields = torch.stack([(w >> (j * bits)) & ((1 << bits) - 1) for j in range(pf)], dim=-1)
    if order is not None:  # element order[j] sits in field j
        fields = fields[..., torch.argsort(torch.tensor(order))]
    if dim == 0:
        out = fields.permute(0, 2, 1).reshape(packed.shape[0] * pf, packed.shape[1])
        return out if n is None else out[:n]
    out = fields.reshape(packed.shape[0], packed.shape[1] * pf)
    return out if n is None else out[:, :n]


def gcd_block(groups: Iterable[int]) -> int:
    """The block width every group splits into: the gcd of the group sizes (1 when none).
    Format v1 has one block shape per model; a group of g = k * block repeats its scale and
    offset k times (split_groups), which is exact."""
    return math.gcd(*groups) or 1


def split_groups(t: torch.Tensor, factor: int) -> torch.Tensor:
    """[out, in/g] -> [out, in/(g/factor)]: each group's value repeated over its sub-groups."""
    return t if factor == 1 else t.repeat_interleave(factor, dim=1)


# ---- the model folder -------------------------------------------------------------------------

def read_config(src, fmt: str) -> tuple[Path, Path, dict]:
    """(folder, its config.json path, the config dict) of a model folder `src` holding an
    `fmt` model. QahiraFormatError naming the path when it is not a folder with a config.json."""
    folder = Path(src)
    if not folder.is_dir():
        raise QahiraFormatError(f"{folder}: a {fmt} model is a folder (config.json and "
                                "*.safetensors), not a file")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise QahiraFormatError(f"{folder}: no config.json, not a Hugging Face model folder")
    return folder, cfg_path, json.loads(cfg_path.read_text())


class FolderTensors:
    """A model folder's tensors by name, read lazily: the files that form the model and their
    checked headers come from qahira_vllm.safetensors_io.model_tensors (the index's shards,
    else model.safetensors; QahiraFormatError naming a damaged file or a duplicate name).

    meta: {name: (safetensors dtype code, shape list)}; where: {name: its file}."""

    def __init__(self, folder: Path):
        from ..safetensors_io import model_tensors

        self.entries = model_tensors(folder)
        self.meta = {k: (e.dtype, list(e.shape)) for k, e in self.entries.items()}
        self.where = {k: e.file for k, e in self.entries.items()}

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.where[name]), "pt") as h:
            return h.get_tensor(name)


# ---- the transformers model a source is checked and planned against ---------------------------

@dataclass
class HFSkeleton:
    """transformers' model for a source config.json, on the meta device: what names and
    shapes the converted checkpoint must have."""
    arch: str                       # transformers class name, e.g. "LlamaForCausalLM"
    config: dict                    # config.json without the source quantization fields
    shapes: dict[str, list[int]]    # state-dict name -> shape
    linear: list[str]               # every nn.Linear module name
    targets: set[str]               # the linear layers qahira converts (all but lm_head)
    optional: set[str]              # names a source may leave out (a tied lm_head)
    model: torch.nn.Module          # the model itself, on the meta device


def hf_skeleton(config: dict, cfg_path: Path) -> HFSkeleton:
    """Build transformers' model of `config` (a config.json dict) on the meta device.
    QahiraFormatError naming cfg_path when transformers cannot build it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_dict = {k: v for k, v in config.items()
               if k not in ("quantization", "quantization_config", "compression_config",
                            "_name_or_path")}
    model_type = hf_dict.get("model_type")
    try:
        hf_config = AutoConfig.for_model(**hf_dict)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
    except (ValueError, KeyError, TypeError) as e:
        raise QahiraFormatError(f"{cfg_path}: model_type {model_type!r} cannot be built by "
                                f"transformers ({e}); not converted") from None
    return skeleton_of(model, hf_dict)


def skeleton_of(model: torch.nn.Module, config: dict) -> HFSkeleton:
    """The HFSkeleton of a transformers model already built (on the meta device) from
    `config` (its config dict, without the source quantization fields)."""
    from ..quantize import default_targets

    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    tied = getattr(model.config, "tie_word_embeddings", False)
    return HFSkeleton(arch=type(model).__name__, config=config,
                      shapes={k: list(v.shape) for k, v in model.state_dict().items()},
                      linear=linear, targets=set(default_targets(linear)),
                      optional={"lm_head.weight"} if tied else set(), model=model)


def check_names(skel: HFSkeleton, tensors: FolderTensors, modules: set[str],
                leaves: dict[str, str], folder: Path, fmt: str) -> None:
    """Every tensor of the source is a parameter of transformers' model, and every parameter
    is provided. A tensor of a quantized module (`modules`) stands for the HF parameter that
    `leaves` ({source leaf: HF leaf}, e.g. {"W_q": "weight"}) names, or for none (scales,
    zeros); any other tensor stands for itself. QahiraFormatError naming the tensor and file
    for a name transformers' model does not have, or the folder for a parameter no tensor
    provides."""
    provided = {}
    for name in tensors.meta:
        base, _, leaf = name.rpartition(".")
        if base not in modules:
            provided[name] = f"tensor {name!r} in {tensors.where[name]}"
        elif leaf in leaves:
            provided[f"{base}.{leaves[leaf]}"] = f"tensor {name!r} in {tensors.where[name]}"
    for name, where in sorted(provided.items()):
        if name not in skel.shapes:
            raise QahiraFormatError(
                f"{where} is not a parameter of transformers' {skel.arch} ({name!r}; {fmt} "
                "models are converted when their names are transformers' own): not converted")
    missing = sorted(set(skel.shapes) - skel.optional - set(provided))
    if missing:
        raise QahiraFormatError(f"{folder}: transformers' {skel.arch} parameters without a "
                                f"tensor: {missing[:5]}")


def plan_layers(skel: HFSkeleton, groups: dict[str, int], fmt: str
                ) -> tuple[set[str], int, list[str]]:
    """groups: {quantized module: its group size along the input dim}. Returns (the target
    layers to convert, the block width every converted group splits into, notes). Target
    layers stored in float stay float, with every other member of their vLLM-fused layer;
    a quantized layer outside the targets (lm_head) is dequantized by the caller."""
    from ..fused_layers import packed_modules_mapping, widen_to_fused_groups

    quantized = skel.targets & set(groups)
    # vLLM's fused groups matter only when some target stays float (importing vLLM's model
    # class takes seconds)
    fused_map = packed_modules_mapping([skel.arch]) if quantized != skel.targets else None
    convert_set, widened = widen_to_fused_groups(quantized, skel.linear, fused_map)
    notes = [f"kept {', '.join(m)} in float too: vLLM serves them as one layer ({fused}) "
             f"with a member stored in float in the {fmt} model"
             for fused, m in sorted(widened.items())]
    sizes = {groups[m] for m in convert_set}
    block = gcd_block(sizes)
    if len(sizes) > 1:
        notes.append(f"mixed group sizes: each group is split into groups of {block} (exact: "
                     "the same scale and offset repeated)")
    return convert_set, block, notes


def output_config(skel: HFSkeleton, dtype: torch.dtype) -> dict:
    """config.json of the converted model: the source's, without its quantization fields,
    with transformers' architecture name and `dtype` (the dtype of the float tensors)."""
    out = dict(skel.config)
    out["architectures"] = skel.config.get("architectures") or [skel.arch]
    out["dtype"] = str(dtype).removeprefix("torch.")
    out.pop("torch_dtype", None)
    return out
