"""The `qahira` checkpoint format, format_version 1 and 2: the one place it is defined.

A checkpoint is an ordinary Hugging Face model folder. `config.json["quantization_config"]`:

    {"quant_method": "qahira", "format_version": 1, "bits": 4 | 8,
     "block_size": [bo, bi], "offset_dtype": "float16" | "float32",
     "modules_not_converted": [...], ...provenance...}

Version 2 adds two optional fields (a reader of version 1 refuses them):

    "scale_dtype": "float16" | "float32"     # every layer's `scales` (default float16)
    "layers": {"model.layers.0.mlp.down_proj": {"bits": 8, "block_size": [1, 16]}, ...}

`layers` overrides `bits` and/or `block_size` (nothing else) of the layer with exactly that HF
module name; the top-level `bits` / `block_size` are the defaults for every other layer.
`QahiraQuantConfig.for_layer(name)` is that layer's config: per-layer code takes only that.
The version is derived: `to_dict()` writes 1 (byte-identical to format 1) when scales are
float16 and there are no overrides, else 2.

For every converted linear layer `P` (HF module name, e.g. `model.layers.0.self_attn.q_proj`)
with weight `[out, in]`, the checkpoint holds instead of `P.weight`:

    P.qweight  4-bit: int32 [out, in/8], column 8w+j in bits 4j..4j+3 of word w (low nibble first)
               8-bit: uint8 [out, in]
    P.scales   scale_dtype  [out/bo, in/bi]   (float16 in version 1)
    P.offsets  offset_dtype [out/bo, in/bi]

    W[o, i] = scales[o//bo, i//bi] * q[o, i] + offsets[o//bo, i//bi]      (q unsigned)

computed in fp32 as a product rounded to fp32, then a sum rounded to fp32 (not fused: with
float32 scales the product is not always exact).

Offsets are floats, never integer zero points: that is what makes QA-HiRA merges exact.
See docs/FORMAT.md for the prose version of this contract.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch

QUANT_METHOD = "qahira"
FORMAT_VERSION = 1  # the version written by default (2 only when a v2 field is needed)
READ_VERSIONS = (1, 2)
SUPPORTED_BITS = (4, 8)
OFFSET_DTYPES = {"float16": torch.float16, "float32": torch.float32}
SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
LAYER_OVERRIDE_KEYS = ("bits", "block_size")  # what `layers` may set per layer
V2_FIELDS = ("scale_dtype", "layers")
INT4_PER_WORD = 8  # 4-bit values packed into one int32 word

QWEIGHT, SCALES, OFFSETS = "qweight", "scales", "offsets"
QUANT_TENSOR_SUFFIXES = (QWEIGHT, SCALES, OFFSETS)


class QahiraFormatError(ValueError):
    """A checkpoint, tensor or configuration does not follow the qahira format."""


def _check_bits(bits: Any, field_name: str) -> int:
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise QahiraFormatError(f"{field_name}={bits!r}: expected one of {SUPPORTED_BITS}")
    return bits


def _check_block(block: Any, field_name: str) -> tuple[int, int]:
    bs = tuple(block) if isinstance(block, (list, tuple)) else ()
    if len(bs) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1
                               for b in bs):
        raise QahiraFormatError(f"{field_name}={block!r}: expected [bo, bi], two positive "
                                "integers")
    return bs


class FrozenMap(Mapping):
    """A read-only, hashable, picklable mapping (vLLM pickles and deep-copies its quantization
    config; types.MappingProxyType can do neither)."""

    def __init__(self, items: Mapping | None = None):
        self._d = dict(items or {})

    def __getitem__(self, key):
        return self._d[key]

    def __iter__(self) -> Iterator:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __hash__(self) -> int:
        return hash(tuple(self._d.items()))

    def __repr__(self) -> str:
        return repr(self._d)


def _normalise_layers(layers: Any) -> Mapping[str, Mapping[str, Any]]:
    """`layers` as given -> read-only {module name: read-only {"bits"?, "block_size"?}}."""
    where = "quantization_config.layers"
    if not isinstance(layers, Mapping):
        raise QahiraFormatError(f"{where}={layers!r}: expected an object {{module name: "
                                "{\"bits\": ..., \"block_size\": [bo, bi]}}}")
    out: dict[str, Mapping[str, Any]] = {}
    for name, ov in layers.items():
        if not isinstance(name, str) or not name:
            raise QahiraFormatError(f"{where}: key {name!r}: expected a module name")
        here = f"{where}[{name!r}]"
        if not isinstance(ov, Mapping) or not ov:
            raise QahiraFormatError(f"{here}={ov!r}: expected an object with \"bits\" and/or "
                                    "\"block_size\"")
        unknown = sorted(set(ov) - set(LAYER_OVERRIDE_KEYS))
        if unknown:
            raise QahiraFormatError(f"{here}: unknown field(s) {unknown}: a layer may override "
                                    f"only {list(LAYER_OVERRIDE_KEYS)}")
        norm: dict[str, Any] = {}
        if "bits" in ov:
            norm["bits"] = _check_bits(ov["bits"], f"{here}.bits")
        if "block_size" in ov:
            norm["block_size"] = _check_block(ov["block_size"], f"{here}.block_size")
        out[name] = FrozenMap(norm)
    return FrozenMap(dict(sorted(out.items())))


@dataclass(frozen=True)
class QahiraQuantConfig:
    """The checkpoint's quantization_config (see the module docstring).

    `layers` (read-only {module name: {"bits"?, "block_size"?}}) holds per-layer overrides;
    per-layer code must use `for_layer(name)`, never the top-level bits/block_size directly.
    Raises QahiraFormatError naming the field for any invalid value. Hashable and comparable
    (`extra`, the provenance, takes no part in either).
    """
    bits: int = 4
    block_size: tuple[int, int] = (1, 64)
    offset_dtype: str = "float16"
    modules_not_converted: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # provenance etc.
    scale_dtype: str = "float16"
    layers: Mapping[str, Mapping[str, Any]] = field(default_factory=FrozenMap)

    def __post_init__(self) -> None:
        _check_bits(self.bits, "quantization_config.bits")
        object.__setattr__(self, "block_size",
                           _check_block(self.block_size, "quantization_config.block_size"))
        if self.scale_dtype not in SCALE_DTYPES:
            raise QahiraFormatError(
                f"quantization_config.scale_dtype={self.scale_dtype!r}: expected one of "
                f"{sorted(SCALE_DTYPES)}")
        object.__setattr__(self, "layers", _normalise_layers(self.layers))
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
    def scale_torch_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    @property
    def format_version(self) -> int:
        """1 when the config is expressible in format 1 (float16 scales, no overrides), else 2."""
        return 1 if self.scale_dtype == "float16" and not self.layers else 2

    def for_layer(self, module_name: str) -> "QahiraQuantConfig":
        """The config of layer `module_name` (HF module name, exact match in `layers`): its
        bits and block_size, the same scale/offset dtypes, no `layers`. Per-layer code (shapes,
        checks, kernels, quantization, dequantization) takes this."""
        ov = self.layers.get(module_name, {})
        if not self.layers and not ov:
            return self
        return dataclasses.replace(self, bits=ov.get("bits", self.bits),
                                   block_size=ov.get("block_size", self.block_size),
                                   layers=FrozenMap())

    def block_lcm(self, module_names) -> tuple[int, int]:
        """(bo, bi): the smallest block shape that every named layer's block divides (lcm per
        dim; the model's block_size for none). A QA-HiRA tile holds whole blocks of each of
        those layers exactly when it is a multiple of this."""
        blocks = [self.for_layer(n).block_size for n in module_names] or [self.block_size]
        return math.lcm(*(b[0] for b in blocks)), math.lcm(*(b[1] for b in blocks))

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "quantization_config") -> "QahiraQuantConfig":
        if d.get("quant_method") != QUANT_METHOD:
            raise QahiraFormatError(
                f"{source}: quant_method={d.get('quant_method')!r}, expected {QUANT_METHOD!r}")
        version = d.get("format_version")
        if isinstance(version, bool) or version not in READ_VERSIONS:
            raise QahiraFormatError(
                f"{source}: format_version={version!r}, this build reads "
                f"{' and '.join(map(str, READ_VERSIONS))}")
        for key in ("bits", "block_size"):
            if key not in d:
                raise QahiraFormatError(f"{source}: missing required field {key!r}")
        if version == 1:
            v2 = [k for k in V2_FIELDS if k in d]
            if v2:
                raise QahiraFormatError(
                    f"{source}: field(s) {v2} need format_version 2, but it says 1")
        known = {"quant_method", "format_version", "bits", "block_size", "offset_dtype",
                 "modules_not_converted", *V2_FIELDS}
        try:
            return cls(bits=d["bits"], block_size=d["block_size"],
                       offset_dtype=d.get("offset_dtype", "float16"),
                       modules_not_converted=d.get("modules_not_converted", ()),
                       scale_dtype=d.get("scale_dtype", "float16"),
                       layers=d.get("layers", {}),
                       extra={k: v for k, v in d.items() if k not in known})
        except QahiraFormatError as e:
            if source == "quantization_config":
                raise
            raise QahiraFormatError(f"{source}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """The config.json object: format 1's exact keys when format_version is 1, else 2's."""
        d: dict[str, Any] = {"quant_method": QUANT_METHOD, "format_version": self.format_version,
                             "bits": self.bits, "block_size": list(self.block_size)}
        if self.format_version == 2:
            d["scale_dtype"] = self.scale_dtype
        d["offset_dtype"] = self.offset_dtype
        if self.layers:
            d["layers"] = {name: {k: list(v) if k == "block_size" else v for k, v in ov.items()}
                           for name, ov in self.layers.items()}
        d["modules_not_converted"] = list(self.modules_not_converted)
        return {**d, **self.extra}

    def is_converted(self, module_name: str) -> bool:
        """Whether the linear layer `module_name` is stored quantized."""
        return not any(module_name == m or module_name.startswith(m + ".")
                       or module_name.endswith("." + m) for m in self.modules_not_converted)


def check_divides(layer: str, out_features: int, in_features: int, cfg: QahiraQuantConfig) -> None:
    """Raise a clear error if the block shape (or 4-bit packing) does not tile the layer.

    cfg: the model's config or the layer's (`cfg.for_layer(layer)` is taken either way)."""
    cfg = cfg.for_layer(layer)
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
    """Shape and dtype of each stored tensor of one converted layer.

    cfg: that layer's config (`QahiraQuantConfig.for_layer`); scales are cfg.scale_torch_dtype.
    """
    bo, bi = cfg.block_size
    if cfg.bits == 4:
        qweight = ((out_features, in_features // INT4_PER_WORD), torch.int32)
    else:
        qweight = ((out_features, in_features), torch.uint8)
    blocks = (out_features // bo, in_features // bi)
    return {QWEIGHT: qweight, SCALES: (blocks, cfg.scale_torch_dtype),
            OFFSETS: (blocks, cfg.offset_torch_dtype)}


def layer_dims(layer: str, tensors: Mapping[str, Any], cfg: QahiraQuantConfig) -> tuple[int, int]:
    """(out, in) of a stored layer, read from its qweight (the one tensor that fixes both).

    tensors: suffix -> anything with a `.shape` (a tensor, or a safetensors header entry).
    Raises QahiraFormatError naming the layer when qweight is missing or not 2-D. The inverse
    of `expected_tensors`: 4-bit qweight [out, in/8] -> in = 8 * columns; 8-bit [out, in].
    The bits are the layer's (`cfg.for_layer(layer)`).
    """
    cfg = cfg.for_layer(layer)
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
    """Check one layer's stored tensors against the format; raise naming tensor and expectation.

    cfg: the model's config or the layer's (`cfg.for_layer(layer)` is taken either way)."""
    cfg = cfg.for_layer(layer)
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
