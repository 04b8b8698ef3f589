"""The `qahira` checkpoint format, format_version 1: the one place it is defined.

A checkpoint is an ordinary Hugging Face model folder. `config.json["quantization_config"]`:

    {"quant_method": "qahira", "format_version": 1, "bits": 4 | 8,
     "block_size": [bo, bi], "offset_dtype": "float16" | "float32",
     "modules_not_converted": [...], ...provenance...}

For every converted linear layer `P` (HF module name, e.g. `model.layers.0.self_attn.q_proj`)
with weight `[out, in]`, the checkpoint holds instead of `P.weight`:

    P.qweight  4-bit: int32 [out, in/8], column 8w+j in bits 4j..4j+3 of word w (low nibble first)
               8-bit: uint8 [out, in]
    P.scales   float16      [out/bo, in/bi]
    P.offsets  offset_dtype [out/bo, in/bi]

    W[o, i] = scales[o//bo, i//bi] * q[o, i] + offsets[o//bo, i//bi]      (q unsigned)

Offsets are floats, never integer zero points: that is what makes QA-HiRA merges exact.
See docs/FORMAT.md for the prose version of this contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

QUANT_METHOD = "qahira"
FORMAT_VERSION = 1
SUPPORTED_BITS = (4, 8)
OFFSET_DTYPES = {"float16": torch.float16, "float32": torch.float32}
SCALE_DTYPE = torch.float16
INT4_PER_WORD = 8  # 4-bit values packed into one int32 word

QWEIGHT, SCALES, OFFSETS = "qweight", "scales", "offsets"
QUANT_TENSOR_SUFFIXES = (QWEIGHT, SCALES, OFFSETS)


class QahiraFormatError(ValueError):
    """A checkpoint, tensor or configuration does not follow the qahira format."""


@dataclass(frozen=True)
class QahiraQuantConfig:
    bits: int = 4
    block_size: tuple[int, int] = (1, 64)
    offset_dtype: str = "float16"
    modules_not_converted: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # provenance etc.

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise QahiraFormatError(
                f"quantization_config.bits={self.bits!r}: expected one of {SUPPORTED_BITS}")
        bs = tuple(self.block_size) if isinstance(self.block_size, (list, tuple)) else ()
        if len(bs) != 2 or not all(isinstance(b, int) and b >= 1 for b in bs):
            raise QahiraFormatError(
                f"quantization_config.block_size={self.block_size!r}: expected [bo, bi], "
                "two positive integers")
        object.__setattr__(self, "block_size", bs)
        if self.offset_dtype not in OFFSET_DTYPES:
            raise QahiraFormatError(
                f"quantization_config.offset_dtype={self.offset_dtype!r}: expected one of "
                f"{sorted(OFFSET_DTYPES)}")
        mnc = self.modules_not_converted
        if not isinstance(mnc, (list, tuple)) or not all(isinstance(m, str) for m in mnc):
            raise QahiraFormatError(
                f"quantization_config.modules_not_converted={mnc!r}: expected a list of module "
                "names")
        object.__setattr__(self, "modules_not_converted", tuple(mnc))

    @property
    def bo(self) -> int:
        return self.block_size[0]

    @property
    def bi(self) -> int:
        return self.block_size[1]

    @property
    def offset_torch_dtype(self) -> torch.dtype:
        return OFFSET_DTYPES[self.offset_dtype]

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "quantization_config") -> "QahiraQuantConfig":
        if d.get("quant_method") != QUANT_METHOD:
            raise QahiraFormatError(
                f"{source}: quant_method={d.get('quant_method')!r}, expected {QUANT_METHOD!r}")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise QahiraFormatError(
                f"{source}: format_version={version!r}, this build reads {FORMAT_VERSION}")
        for key in ("bits", "block_size"):
            if key not in d:
                raise QahiraFormatError(f"{source}: missing required field {key!r}")
        known = {"quant_method", "format_version", "bits", "block_size", "offset_dtype",
                 "modules_not_converted"}
        return cls(bits=d["bits"], block_size=d["block_size"],
                   offset_dtype=d.get("offset_dtype", "float16"),
                   modules_not_converted=d.get("modules_not_converted", ()),
                   extra={k: v for k, v in d.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION,
                "bits": self.bits, "block_size": list(self.block_size),
                "offset_dtype": self.offset_dtype,
                "modules_not_converted": list(self.modules_not_converted), **self.extra}

    def is_converted(self, module_name: str) -> bool:
        """Whether the linear layer `module_name` is stored quantized."""
        return not any(module_name == m or module_name.startswith(m + ".")
                       or module_name.endswith("." + m) for m in self.modules_not_converted)


def check_divides(layer: str, out_features: int, in_features: int, cfg: QahiraQuantConfig) -> None:
    """Raise a clear error if the block shape (or 4-bit packing) does not tile the layer."""
    bo, bi = cfg.block_size
    problems = []
    if out_features % bo:
        problems.append(f"out={out_features} is not a multiple of bo={bo}")
    if in_features % bi:
        problems.append(f"in={in_features} is not a multiple of bi={bi}")
    if cfg.bits == 4 and in_features % INT4_PER_WORD:
        problems.append(f"in={in_features} is not a multiple of {INT4_PER_WORD} (int4 packing)")
    if problems:
        raise QahiraFormatError(
            f"layer {layer!r} with weight [out={out_features}, in={in_features}] cannot use "
            f"block [{bo}, {bi}] at {cfg.bits} bits: " + "; ".join(problems))


def expected_tensors(out_features: int, in_features: int,
                     cfg: QahiraQuantConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of each stored tensor of one converted layer."""
    bo, bi = cfg.block_size
    if cfg.bits == 4:
        qweight = ((out_features, in_features // INT4_PER_WORD), torch.int32)
    else:
        qweight = ((out_features, in_features), torch.uint8)
    blocks = (out_features // bo, in_features // bi)
    return {QWEIGHT: qweight, SCALES: (blocks, SCALE_DTYPE),
            OFFSETS: (blocks, cfg.offset_torch_dtype)}


def layer_dims(layer: str, tensors: Mapping[str, Any], cfg: QahiraQuantConfig) -> tuple[int, int]:
    """(out, in) of a stored layer, read from its qweight (the one tensor that fixes both).

    tensors: suffix -> anything with a `.shape` (a tensor, or a safetensors header entry).
    Raises QahiraFormatError naming the layer when qweight is missing or not 2-D. The inverse
    of `expected_tensors`: 4-bit qweight [out, in/8] -> in = 8 * columns; 8-bit [out, in].
    """
    q = tensors.get(QWEIGHT)
    if q is None:
        raise QahiraFormatError(f"missing tensor {layer + '.' + QWEIGHT!r} (layer has "
                                f"{sorted(tensors)} but no qweight)")
    if len(q.shape) != 2:
        raise QahiraFormatError(f"tensor {layer + '.' + QWEIGHT!r} has shape {list(q.shape)}: "
                                "expected 2-D [out, in/8] (4-bit) or [out, in] (8-bit)")
    out_f, cols = q.shape
    return out_f, cols * INT4_PER_WORD if cfg.bits == 4 else cols


def validate_layer_tensors(layer: str, tensors: dict[str, torch.Tensor], out_features: int,
                           in_features: int, cfg: QahiraQuantConfig, where: str = "") -> None:
    """Check one layer's stored tensors against the format; raise naming tensor and expectation."""
    check_divides(layer, out_features, in_features, cfg)
    loc = f" in {where}" if where else ""
    for suffix, (shape, dtype) in expected_tensors(out_features, in_features, cfg).items():
        name = f"{layer}.{suffix}"
        t = tensors.get(suffix)
        if t is None:
            raise QahiraFormatError(f"missing tensor {name!r}{loc}: expected {dtype} {list(shape)}")
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise QahiraFormatError(
                f"tensor {name!r}{loc} is {t.dtype} {list(t.shape)}: expected {dtype} {list(shape)} "
                f"(layer [out={out_features}, in={in_features}], bits={cfg.bits}, "
                f"block={list(cfg.block_size)})")
