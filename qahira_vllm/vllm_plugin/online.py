"""Online quantization: `--quantization qahira` on a float model quantizes its weights at load.

vLLM builds the method's config with no arguments when the model's config.json has no
`quantization_config` (vllm/model_executor/model_loader/weight_utils.py get_quant_config): that
is online mode, with the defaults of `qahira quantize` (4 bits, block 1x64, float16 offsets,
mse_clip). Other settings come through vLLM's own hook for this, `hf_overrides`:

    LLM(float_dir, quantization="qahira",
        hf_overrides={"quantization_config_dict_json": '{"bits": 8, "block_size": [1, 32]}'})
    qahira serve float_dir --quantization qahira \\
        --hf-overrides '{"quantization_config_file": "qahira_online.json"}'

Each linear layer is created with a float `weight` on the meta device and vLLM's layer-wise
loader (reload/layerwise.py, the same machinery as vLLM's online FP8) materializes it once all
its shards have arrived, then calls process_weights_after_loading: the weight is quantized with
quant_math.quantize (the offline quantizer), stored as qweight/scales/offsets exactly as a
checkpoint would hold them, the float weight is dropped, and the same kernel prepare step as for
a loaded checkpoint runs. At most one layer's float weight is alive at a time.

Equality with `qahira quantize`: quantize() works block by block (min-max and the mse_clip
search alike), so quantizing a tensor-parallel shard, or a fused qkv / gate_up matrix, gives the
same tensors as quantizing each full checkpoint tensor, as long as no block straddles a shard or
fused sub-matrix boundary; QahiraLinearMethod._check_partition refuses the layer otherwise. The
float weight is held in float32 whatever the serving dtype, so a bf16/fp16/fp32 checkpoint is
quantized from exactly its stored values, as `qahira quantize` does.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from vllm.model_executor.layers.linear import register_weight_loader_v2_supported_method

from ..format import QUANT_METHOD, QahiraFormatError, QahiraQuantConfig
from .linear_method import QahiraLinearMethod, logger

# The keys a user may set, with `qahira quantize`'s defaults (its --bits, --block,
# --offset-dtype, --quantizer and --skip).
ONLINE_DEFAULTS: dict[str, Any] = {"bits": 4, "block_size": [1, 64], "offset_dtype": "float16",
                                   "quantizer": "mse_clip", "modules_not_converted": []}
QUANTIZERS = ("mse_clip", "minmax")

_HOW_TO_SET = ("hf_overrides={\"quantization_config_dict_json\": '<json>'} or "
               "{\"quantization_config_file\": \"<path>\"}; CLI --hf-overrides")


class OnlineSettings:
    """Parsed online-quantization settings: `fmt` (QahiraQuantConfig: bits, block_size,
    offset_dtype, modules_not_converted) and `clip_search` (True for mse_clip)."""

    def __init__(self, fmt: QahiraQuantConfig, clip_search: bool):
        self.fmt = fmt
        self.clip_search = clip_search
        self.announced = False  # settings logged once, at the first layer

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, source: str) -> "OnlineSettings":
        """Settings from a dict with any of ONLINE_DEFAULTS' keys (`quant_method`, if present,
        must be "qahira"; `block_size` may also be written "BOxBI").

        Raises QahiraFormatError naming `source` for an unknown key or a bad value."""
        if not isinstance(d, (dict, type(None))):
            raise QahiraFormatError(f"{source}: expected a JSON object, got {type(d).__name__}")
        d = dict(d or {})
        method = d.pop("quant_method", QUANT_METHOD)
        if method != QUANT_METHOD:
            raise QahiraFormatError(f"{source}: quant_method={method!r}, expected {QUANT_METHOD!r}")
        if d.pop("lm_head", False):
            raise QahiraFormatError(
                f"{source}: lm_head cannot be quantized online (it stays in float, as with "
                "`qahira quantize`): run `qahira quantize MODEL OUT --lm-head` and serve OUT")
        v2 = sorted({"scale_dtype", "layers"} & set(d))
        if v2:
            raise QahiraFormatError(
                f"{source}: {v2} (format 2: per-layer bits / block, float32 scales) cannot be "
                "used online, which quantizes every layer alike with float16 scales: write a "
                "checkpoint with `qahira quantize MODEL OUT --layer SUFFIX=BITS[:BOxBI] "
                "--scale-dtype float32` and serve OUT")
        unknown = sorted(set(d) - set(ONLINE_DEFAULTS))
        if unknown:
            raise QahiraFormatError(
                f"{source}: unknown online quantization setting(s) {unknown}; expected some of "
                f"{sorted(ONLINE_DEFAULTS)} (a qahira checkpoint's own quantization_config "
                "belongs in its config.json, not here)")
        s = {**ONLINE_DEFAULTS, **d}
        block = s["block_size"]
        if isinstance(block, str):
            try:
                block = [int(b) for b in block.lower().split("x")]
            except ValueError:
                raise QahiraFormatError(
                    f"{source}: block_size={block!r}: expected [bo, bi] or \"BOxBI\"") from None
        if s["quantizer"] not in QUANTIZERS:
            raise QahiraFormatError(
                f"{source}: quantizer={s['quantizer']!r}: expected one of {QUANTIZERS}")
        try:  # QahiraQuantConfig checks bits, block_size, offset_dtype, modules_not_converted
            fmt = QahiraQuantConfig(bits=s["bits"], block_size=block,
                                    offset_dtype=s["offset_dtype"],
                                    modules_not_converted=s["modules_not_converted"],
                                    extra={"quantizer": s["quantizer"], "online": True})
        except QahiraFormatError as e:
            raise QahiraFormatError(f"{source}: {e}") from None
        return cls(fmt, s["quantizer"] == "mse_clip")

    @classmethod
    def from_json(cls, text: str, source: str) -> "OnlineSettings":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise QahiraFormatError(
                f"{source}: not valid JSON ({e}); settings: {_HOW_TO_SET}") from None
        if not isinstance(d, dict):
            raise QahiraFormatError(f"{source}: expected a JSON object, got {type(d).__name__}")
        return cls.from_dict(d, source)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "OnlineSettings":
        try:
            text = open(path).read()
        except OSError as e:
            raise QahiraFormatError(
                f"online quantization settings file {str(path)!r}: {e.strerror}") from None
        return cls.from_json(text, f"online quantization settings file {str(path)!r}")


def is_skipped(prefix: str, skip: tuple[str, ...],
               packed_modules_mapping: dict[str, list[str]]) -> bool:
    """Whether layer `prefix` stays in float: it, or any checkpoint module fused into it, is
    named in `skip` (whole name or dotted suffix). A fused layer (qkv_proj) has one method,
    so naming one member keeps the whole group in float, as `qahira quantize --skip` does."""
    parent, _, leaf = prefix.rpartition(".")
    names = [prefix] + [f"{parent}.{m}" if parent else m
                        for m in packed_modules_mapping.get(leaf, ())]
    return any(n == s or n.endswith("." + s) for n in names for s in skip)


@register_weight_loader_v2_supported_method
class QahiraOnlineLinearMethod(QahiraLinearMethod):
    """A float linear layer quantized to the qahira format while vLLM loads it.

    create_weights: `weight` float32 [out_per_partition, in_per_partition] on the meta device
    (vLLM's normal weight loaders, tensor-parallel narrowing and qkv/gate_up stacking apply).
    process_weights_after_loading: replaces it by `qweight` (int32 [out, in/8] at 4 bits, uint8
    [out, in] at 8), `scales` float16 [out/bo, in/bi] and `offsets` (offset dtype, same shape),
    then prepares the kernel as for a checkpoint. Raises QahiraFormatError (layer named, with
    what to do) when the block does not tile the layer or its shards, or the weight is not
    storable (non-finite values, out-of-range blocks: quant_math.check_quantizable).
    """

    # vLLM: allocate the weight on meta, materialize and process it layer by layer.
    uses_meta_device = True

    def __init__(self, fmt: QahiraQuantConfig, prefix: str, clip_search: bool = True):
        super().__init__(fmt, prefix)
        self.clip_search = clip_search

    def _online_hint(self) -> str:
        leaf = self.prefix.rsplit(".", 1)[-1]
        return (f" [online quantization: choose another block_size (via {_HOW_TO_SET}), "
                f"keep the layer in float with \"modules_not_converted\": [\"{leaf}\"], "
                "or run `qahira quantize` (--keep-unconvertible keeps untileable layers in float) "
                "and serve its output]")

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        from vllm.model_executor.model_loader.reload.layerwise import (
            initialize_online_processing)
        from vllm.model_executor.parameter import ModelWeightParameter

        from ..linear_kernels import LinearSpec

        try:
            self._check_partition(input_size_per_partition, output_partition_sizes,
                                  input_size, output_size)
        except QahiraFormatError as e:
            raise QahiraFormatError(f"{e}{self._online_hint()}") from None
        out_pp = sum(output_partition_sizes)
        # float32 holds bf16/fp16/fp32 checkpoint values exactly (see the module docstring).
        weight = ModelWeightParameter(
            data=torch.empty(out_pp, input_size_per_partition, dtype=torch.float32,
                             device="meta"),
            input_dim=1, output_dim=0, weight_loader=extra_weight_attrs["weight_loader"])
        layer.register_parameter("weight", weight)
        layer.qahira_spec = LinearSpec(bits=self.fmt.bits, block_size=self.fmt.block_size,
                                       out_features=out_pp, in_features=input_size_per_partition,
                                       act_dtype=params_dtype, device_type="cpu")
        initialize_online_processing(layer)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        # vLLM calls this twice: from the layer-wise loader, then for every module at the end.
        if getattr(layer, "_already_called_process_weights_after_loading", False):
            return
        from ..quant_math import check_quantizable, pack_qweight, quantize

        w = layer.weight.data
        if w.is_meta:
            raise QahiraFormatError(
                f"layer {self.prefix!r}: no weight was loaded for it from the checkpoint, so "
                "there is nothing to quantize online")
        check_quantizable(w, self.fmt, f"{self.prefix}.weight (online quantization)")
        q, scales, offsets = quantize(w, self.fmt, clip_search=self.clip_search)
        qweight = pack_qweight(q, self.fmt.bits)
        del q
        delattr(layer, "weight")  # the float copy is no longer needed (memory)
        for name, t in (("qweight", qweight), ("scales", scales), ("offsets", offsets)):
            layer.register_parameter(name, torch.nn.Parameter(t.contiguous(),
                                                              requires_grad=False))
        super().process_weights_after_loading(layer)
        layer._already_called_process_weights_after_loading = True


def online_quant_method(settings: OnlineSettings, layer: torch.nn.Module, prefix: str,
                        packed_modules_mapping: dict[str, list[str]]):
    """The method for `layer` in online mode: linear layers are quantized unless skipped;
    lm_head and embeddings (not LinearBase) stay float, as with `qahira quantize`."""
    from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod

    if not isinstance(layer, LinearBase):
        return None
    if not settings.announced:
        settings.announced = True
        fmt = settings.fmt
        logger.info("qahira: online quantization of the float weights at load: %d bits, block "
                    "%s, %s offsets, %s, modules_not_converted=%s", fmt.bits,
                    list(fmt.block_size), fmt.offset_dtype,
                    "mse_clip" if settings.clip_search else "minmax",
                    list(fmt.modules_not_converted))
    if is_skipped(prefix, settings.fmt.modules_not_converted, packed_modules_mapping):
        logger.info("qahira online: %s kept in float (modules_not_converted)", prefix)
        return UnquantizedLinearMethod()
    return QahiraOnlineLinearMethod(settings.fmt, prefix, settings.clip_search)
