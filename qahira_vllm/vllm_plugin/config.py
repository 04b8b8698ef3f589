"""`qahira` as a vLLM quantization method: config, per-layer method choice, load-time checks."""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from ..format import QUANT_METHOD, QahiraFormatError, QahiraQuantConfig


@register_quantization_config(QUANT_METHOD)
class QahiraConfig(QuantizationConfig):
    """Block-wise INT4/INT8 weights with float offsets per block (docs/FORMAT.md)."""

    def __init__(self, fmt: QahiraQuantConfig | None = None, online=None):
        """fmt: the checkpoint's format. Without it (vLLM's call for `--quantization qahira`
        when config.json has no quantization_config): online quantization of a float model
        with `online` settings (vllm_plugin.online.OnlineSettings; default: the defaults of
        `qahira quantize`)."""
        super().__init__()
        if fmt is None:
            from .online import OnlineSettings  # not at import: registration stays cheap

            online = online or OnlineSettings.from_dict(None, "online quantization defaults")
            fmt = online.fmt
        self.fmt = fmt
        self.online = online
        # Layers stored quantized, read from the tensor headers in maybe_update_config: decides
        # whether lm_head (kept in float unless `qahira quantize --lm-head`) is ours.
        self.converted_layers: frozenset[str] = frozenset()

    def __repr__(self) -> str:
        mode = ", online" if self.online else ""
        v2 = (f", scale_dtype={self.fmt.scale_dtype}, {len(self.fmt.layers)} layer override(s)"
              if self.fmt.format_version == 2 else "")
        return (f"QahiraConfig(bits={self.fmt.bits}, block_size={list(self.fmt.block_size)}"
                f"{v2}{mode})")

    def layer_fmt(self, prefix: str) -> QahiraQuantConfig:
        """The format of vLLM layer `prefix` (`fmt.for_layer`). A layer vLLM fuses from several
        HF modules (packed_modules_mapping: qkv_proj <- q/k/v_proj, gate_up_proj <-
        gate/up_proj) holds one bits / block for all of them: QahiraFormatError naming the
        members when format 2's `layers` gives them different ones."""
        parent, _, leaf = prefix.rpartition(".")
        members = self.packed_modules_mapping.get(leaf)
        if not self.fmt.layers or not members:
            return self.fmt.for_layer(prefix)
        names = [f"{parent}.{m}" if parent else m for m in members]
        cfgs = [self.fmt.for_layer(n) for n in names]
        if len({(c.bits, c.block_size) for c in cfgs}) > 1:
            got = ", ".join(f"{n}: {c.bits} bits, block {list(c.block_size)}"
                            for n, c in zip(names, cfgs))
            raise QahiraFormatError(
                f"quantization_config.layers: vLLM fuses {names} into one layer {prefix!r}, "
                f"which needs one bits / block_size for all of them, but they have {got}; "
                "give them the same override (qahira quantize --layer applies one to the "
                "whole group)")
        return cfgs[0]

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70  # Triton's floor; the torch paths need nothing special

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # read from config.json["quantization_config"]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "QahiraConfig":
        return cls(QahiraQuantConfig.from_dict(config, source="config.json quantization_config"))

    # vLLM reads these for a model without quantization_config, from
    # hf_overrides["quantization_config_file" | "quantization_config_dict_json"]: online settings.
    @classmethod
    def from_config_file(cls, config_file: str) -> "QahiraConfig":
        from .online import OnlineSettings

        return cls(online=OnlineSettings.from_file(config_file))

    @classmethod
    def from_config_dict_json(cls, config_dict_json: str) -> "QahiraConfig":
        from .online import OnlineSettings

        return cls(online=OnlineSettings.from_json(
            config_dict_json, "hf_overrides quantization_config_dict_json"))

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        # Imported here, not at module level: registration must stay cheap (plugin contract).
        from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
        from vllm.model_executor.layers.quantization.utils.quant_utils import is_layer_skipped
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

        from .vllm_api import QUANT, require

        require(QUANT)  # every vLLM symbol the method uses, once per process, before any layer
        if self.online:
            from .online import online_quant_method

            return online_quant_method(self.online, layer, prefix, self.packed_modules_mapping)
        if isinstance(layer, ParallelLMHead) and prefix in self.converted_layers:
            from .linear_method import QahiraLinearMethod

            return QahiraLinearMethod(self.layer_fmt(prefix), prefix)  # vocab-parallel rows
        if not isinstance(layer, LinearBase):
            return None  # embeddings (and lm_head unless converted) stay unquantized
        if self.fmt.modules_not_converted and is_layer_skipped(
                prefix, list(self.fmt.modules_not_converted), self.packed_modules_mapping,
                match_mode="suffix"):
            return UnquantizedLinearMethod()
        from .linear_method import QahiraLinearMethod

        return QahiraLinearMethod(self.layer_fmt(prefix), prefix)

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None) -> None:
        if self.online:
            return  # a float model: each layer is checked as it is created and quantized
        # Check every stored tensor's shape and dtype before any request can be served.
        from ..checkpoint import check_block_params_finite, validate_checkpoint

        self.converted_layers = frozenset(validate_checkpoint(model_name, self.fmt))
        check_block_params_finite(model_name)
