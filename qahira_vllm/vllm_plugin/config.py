"""`qahira` as a vLLM quantization method: config, per-layer method choice, load-time checks."""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from ..format import QUANT_METHOD, QahiraQuantConfig


@register_quantization_config(QUANT_METHOD)
class QahiraConfig(QuantizationConfig):
    """Block-wise INT4/INT8 weights with float offsets per block (docs/FORMAT.md)."""

    def __init__(self, fmt: QahiraQuantConfig):
        super().__init__()
        self.fmt = fmt
        # Layers stored quantized, read from the tensor headers in maybe_update_config: decides
        # whether lm_head (kept in float unless `qahira quantize --lm-head`) is ours.
        self.converted_layers: frozenset[str] = frozenset()

    def __repr__(self) -> str:
        return f"QahiraConfig(bits={self.fmt.bits}, block_size={list(self.fmt.block_size)})"

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

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        # Imported here, not at module level: registration must stay cheap (plugin contract).
        from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
        from vllm.model_executor.layers.quantization.utils.quant_utils import is_layer_skipped
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

        if isinstance(layer, ParallelLMHead) and prefix in self.converted_layers:
            from .linear_method import QahiraLinearMethod

            return QahiraLinearMethod(self.fmt, prefix)  # vocab-parallel rows, like a column
        if not isinstance(layer, LinearBase):
            return None  # embeddings (and lm_head unless converted) stay unquantized
        if self.fmt.modules_not_converted and is_layer_skipped(
                prefix, list(self.fmt.modules_not_converted), self.packed_modules_mapping,
                match_mode="suffix"):
            return UnquantizedLinearMethod()
        from .linear_method import QahiraLinearMethod

        return QahiraLinearMethod(self.fmt, prefix)

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None) -> None:
        # Check every stored tensor's shape and dtype before any request can be served.
        from ..checkpoint import validate_checkpoint

        self.converted_layers = frozenset(validate_checkpoint(model_name, self.fmt))
