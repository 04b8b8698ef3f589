"""vLLM LinearMethod for qahira layers: parameters, sharding checks, kernel dispatch."""

from __future__ import annotations

import dataclasses

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import (LinearMethodBase,
                                               register_weight_loader_v2_supported_method)
from vllm.model_executor.parameter import PackedvLLMParameter

from ..format import INT4_PER_WORD, QahiraFormatError, QahiraQuantConfig
from ..linear_kernels import LinearSpec, choose_kernel

logger = init_logger("vllm.qahira")  # under vLLM's logger so its handlers print it
_announced: set[tuple[str, tuple[str, ...]]] = set()  # (kernel, reasons) already logged


@register_weight_loader_v2_supported_method
class QahiraLinearMethod(LinearMethodBase):

    def __init__(self, fmt: QahiraQuantConfig, prefix: str):
        """fmt: this layer's config (QahiraConfig.layer_fmt: format 2's per-layer bits / block
        already applied); prefix: the vLLM layer name, for errors."""
        self.fmt = fmt.for_layer(prefix)
        self.prefix = prefix

    def _check_partition(self, input_size_per_partition: int, output_partition_sizes: list[int],
                         input_size: int, output_size: int) -> None:
        bo, bi = self.fmt.block_size
        where = f"layer {self.prefix!r} (weight [out={output_size}, in={input_size}])"
        if output_size % bo or input_size % bi:
            raise QahiraFormatError(
                f"{where}: block [{bo}, {bi}] does not divide the layer")
        sharded = input_size_per_partition != input_size or sum(output_partition_sizes) != output_size
        tp_note = " (tensor-parallel shard)" if sharded else ""
        for size in output_partition_sizes:
            if size % bo:
                raise QahiraFormatError(
                    f"{where}: output shard of {size} rows{tp_note} is not a multiple of "
                    f"bo={bo}: a quantization block would straddle a shard boundary; use a "
                    "smaller tensor-parallel size or a block whose bo divides every shard")
        if input_size_per_partition % bi:
            raise QahiraFormatError(
                f"{where}: input shard of {input_size_per_partition} columns{tp_note} is not a "
                f"multiple of bi={bi}: a quantization block would straddle a shard boundary; use "
                "a smaller tensor-parallel size or a block whose bi divides every shard")
        if self.fmt.bits == 4 and input_size_per_partition % INT4_PER_WORD:
            raise QahiraFormatError(
                f"{where}: input shard of {input_size_per_partition} columns{tp_note} is not a "
                f"multiple of {INT4_PER_WORD} (int4 packing)")

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        self._check_partition(input_size_per_partition, output_partition_sizes,
                              input_size, output_size)
        bo, bi = self.fmt.block_size
        out_pp = sum(output_partition_sizes)
        weight_loader = extra_weight_attrs["weight_loader"]
        if self.fmt.bits == 4:
            qweight_data = torch.empty(out_pp, input_size_per_partition // INT4_PER_WORD,
                                       dtype=torch.int32)
            pack = INT4_PER_WORD
        else:
            qweight_data = torch.empty(out_pp, input_size_per_partition, dtype=torch.uint8)
            pack = 1
        qweight = PackedvLLMParameter(data=qweight_data, input_dim=1, output_dim=0,
                                      packed_dim=1, packed_factor=pack,
                                      weight_loader=weight_loader)
        # Block params: output rows are "packed" bo to one, so the fused-layer loaders divide
        # shard offsets by bo, and input columns are already per partition for row parallel.
        blocks = (out_pp // bo, input_size_per_partition // bi)
        scales = PackedvLLMParameter(data=torch.empty(blocks, dtype=self.fmt.scale_torch_dtype),
                                     input_dim=1,
                                     output_dim=0, packed_dim=0, packed_factor=bo,
                                     weight_loader=weight_loader)
        offsets = PackedvLLMParameter(data=torch.empty(blocks, dtype=self.fmt.offset_torch_dtype),
                                      input_dim=1, output_dim=0, packed_dim=0, packed_factor=bo,
                                      weight_loader=weight_loader)
        layer.register_parameter("qweight", qweight)
        layer.register_parameter("scales", scales)
        layer.register_parameter("offsets", offsets)
        layer.qahira_spec = LinearSpec(bits=self.fmt.bits, block_size=self.fmt.block_size,
                                       out_features=out_pp, in_features=input_size_per_partition,
                                       act_dtype=params_dtype, device_type="cpu",
                                       scale_dtype=self.fmt.scale_torch_dtype)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        spec = layer.qahira_spec
        spec = dataclasses.replace(spec, device_type=layer.qweight.device.type)
        kernel_cls, reasons = choose_kernel(spec)
        key = (kernel_cls.name, tuple(reasons))
        if key not in _announced:  # once per distinct choice, not once per layer
            _announced.add(key)
            logger.info("qahira: using kernel %s for %s%s", kernel_cls.name, spec,
                        "".join(f"\n  not {r}" for r in reasons))
        kernel = kernel_cls(spec)
        kernel.prepare(layer)
        layer.qahira_kernel = kernel

    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        return layer.qahira_kernel.apply(layer, x, bias)
