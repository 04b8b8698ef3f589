"""transformers support for qahira checkpoints: `quant_method: "qahira"` in `from_pretrained`.

`import qahira_vllm` registers the two classes below with transformers' public registry
(`transformers.quantizers.auto.register_quantization_config` / `register_quantizer`) the
moment transformers' quantizer registry is imported (qahira_vllm/__init__.py: a post-import
hook, so `import qahira_vllm` does not itself import transformers). Then

    AutoModelForCausalLM.from_pretrained(qckpt)

builds the model on the meta device, replaces every linear layer the checkpoint stores
quantized (its `P.qweight` is present) by the trainer's frozen `QuantLinear` with meta buffers
of the stored shapes and dtypes, and lets transformers' own loader fill them: `qweight` keeps
its integer dtype, `scales` / `offsets` the float dtypes they were declared with (fp16, and
fp16 or fp32 per `offset_dtype`), bias and every other tensor the model dtype. The forward is
QuantLinear's: the same kernels as the trainer (the compiled C dequantization on CPU, Triton
on CUDA), fp32 math `W = scales * q + offsets` per block.

Before any tensor is read the checkpoint is checked as every qahira reader checks it
(checkpoint.validate_checkpoint: headers, shapes, dtypes, file set), and each quantized layer
against the model (an nn.Linear of that name, bias present iff stored, not listed in
modules_not_converted, not a tied lm_head); any problem is a QahiraFormatError naming the
file, tensor or layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .format import (FORMAT_VERSION, QUANT_METHOD, QUANT_TENSOR_SUFFIXES, QWEIGHT,
                     QahiraFormatError, QahiraQuantConfig, expected_tensors, layer_dims,
                     validate_layer_tensors)


class QahiraConfig(QuantizationConfigMixin):
    """transformers' view of `config.json["quantization_config"]` for a qahira checkpoint.

    Holds the dict's keys as attributes (so `to_dict()` writes back the same dict, provenance
    included); `qahira_config()` is the validated format object. Raises QahiraFormatError (a
    ValueError) for a config the format refuses (bits, block_size, offset_dtype,
    format_version, quant_method; format 2's scale_dtype and layers, kept as attributes like
    the provenance)."""

    def __init__(self, bits: int = 4, block_size=(1, 64), offset_dtype: str = "float16",
                 modules_not_converted=(), format_version: int = FORMAT_VERSION,
                 quant_method: str = QUANT_METHOD, **provenance: Any):
        self.quant_method = quant_method
        self.format_version = format_version
        self.bits = bits
        self.block_size = list(block_size) if isinstance(block_size, (list, tuple)) else block_size
        self.offset_dtype = offset_dtype
        self.modules_not_converted = list(modules_not_converted or ())
        for key, value in provenance.items():
            setattr(self, key, value)
        self.qahira_config()  # validate now, before any model is built

    def qahira_config(self) -> QahiraQuantConfig:
        return QahiraQuantConfig.from_dict(self.to_dict())


def _output_embedding_name(model: nn.Module) -> str | None:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is None:
        return None
    return next((n for n, m in model.named_modules() if m is out), None)


class QahiraHfQuantizer(HfQuantizer):
    """Loads a pre-quantized qahira checkpoint into QuantLinear layers (no quantization here:
    `qahira quantize` writes checkpoints). Inference, generate(), PEFT adapters on top (base
    frozen: QuantLinear holds buffers only) and save_pretrained (the same tensors back)."""

    requires_calibration = True  # a float model cannot be quantized by from_pretrained

    def __init__(self, quantization_config: QahiraConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.qahira = quantization_config.qahira_config()
        self.model_dir: Path | None = None

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        from .checkpoint import read_headers, validate_checkpoint
        from .safetensors_io import model_weight_files
        from .training.qlinear import QuantLinear

        if not checkpoint_files:
            raise QahiraFormatError("qahira: from_pretrained found no checkpoint files; a "
                                    "qahira model loads from a folder of *.safetensors")
        model_dir = self.model_dir = Path(checkpoint_files[0]).parent
        cfg = self.qahira
        # The format's file set (index else model.safetensors) must be what transformers reads.
        ours = sorted(f.name for f in model_weight_files(model_dir))
        theirs = sorted(Path(f).name for f in checkpoint_files)
        if ours != theirs:
            raise QahiraFormatError(
                f"{model_dir}: transformers would load {theirs} but the checkpoint's weights are "
                f"{ours} (docs/FORMAT.md: the index's files, else model.safetensors); remove the "
                "stray file(s)")
        layers = validate_checkpoint(model_dir, cfg)
        metas = read_headers(model_dir)
        tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
        head = _output_embedding_name(model)
        for layer in layers:
            where = f"{model_dir}: quantized layer {layer!r}"
            try:
                old = model.get_submodule(layer)
            except AttributeError:
                raise QahiraFormatError(f"{where} is not a module of {type(model).__name__}"
                                        ) from None
            if not isinstance(old, nn.Linear):
                raise QahiraFormatError(f"{where} is a {type(old).__name__}, expected nn.Linear")
            if not cfg.is_converted(layer):
                raise QahiraFormatError(f"{where} is listed in modules_not_converted "
                                        f"{list(cfg.modules_not_converted)} but stored quantized")
            if layer == head and tied:
                raise QahiraFormatError(f"{where} is the output embedding but config.json says "
                                        "tie_word_embeddings: true; a converted lm_head is stored "
                                        "untied (set it to false)")
            stored_bias = f"{layer}.bias" in metas
            if stored_bias != (old.bias is not None):
                raise QahiraFormatError(f"{where}: bias {'unexpected' if stored_bias else 'missing'}"
                                        f" (the model's layer has {'no ' if old.bias is None else ''}"
                                        "bias)")
            stored = layer_dims(layer, {QWEIGHT: metas[f"{layer}.{QWEIGHT}"]}, cfg)
            if stored != (old.out_features, old.in_features):
                raise QahiraFormatError(f"{where}: stored [out, in] = {list(stored)}, the "
                                        f"model's layer is [{old.out_features}, {old.in_features}]")
            meta = {s: torch.empty(shape, dtype=dt, device="meta")
                    for s, (shape, dt) in expected_tensors(old.out_features, old.in_features,
                                                           cfg.for_layer(layer)).items()}
            bias = (torch.empty(old.out_features, dtype=old.bias.dtype, device="meta")
                    if old.bias is not None else None)
            model.set_submodule(layer, QuantLinear(
                meta["qweight"], meta["scales"], meta["offsets"], cfg, old.in_features,
                old.out_features, bias, name=layer))
        # transformers skips its size check when a quantizer is active: do it for every tensor.
        expected = model.state_dict()
        for name, m in metas.items():
            ref = expected.get(name)
            if ref is not None and tuple(ref.shape) != tuple(m.shape):
                raise QahiraFormatError(f"tensor {name!r} in {m.file} has shape {list(m.shape)}: "
                                        f"{type(model).__name__} expects {list(ref.shape)}")
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        from .training.qlinear import QuantLinear

        for name, module in model.named_modules():
            if not isinstance(module, QuantLinear):
                continue
            tensors = {s: getattr(module, s) for s in QUANT_TENSOR_SUFFIXES}
            missing = [s for s, t in tensors.items() if t is None or t.is_meta]
            if missing:
                raise QahiraFormatError(f"{self.model_dir}: layer {name!r} got no "
                                        f"{missing} from the checkpoint")
            # the loader must not have cast the stored dtypes
            validate_layer_tensors(name, tensors, module.out_features, module.in_features,
                                   module.cfg, where=str(self.model_dir))
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # adapters (PEFT) train on top; QuantLinear itself has no parameters


def peft_lora_config(lora_config):
    """Let PEFT put LoRA on QuantLinear layers: registers QahiraLoraLinear for QuantLinear
    through PEFT's custom-module API (`LoraConfig._register_custom_module`, PEFT's
    "custom models" guide; PEFT itself dispatches only nn.Linear and its known quantized
    layers). Returns the same LoraConfig. Register again on a config PEFT rebuilt from disk
    (`PeftModel.from_pretrained(model, dir, config=peft_lora_config(LoraConfig.from_pretrained(dir)))`)."""
    from .training.qlinear import QuantLinear

    lora_config._register_custom_module({QuantLinear: _peft_lora_linear()})
    return lora_config


_PEFT_LORA_LINEAR = None


def _peft_lora_linear():
    """The PEFT LoRA layer class for QuantLinear, built on first use (PEFT is optional)."""
    global _PEFT_LORA_LINEAR
    if _PEFT_LORA_LINEAR is not None:
        return _PEFT_LORA_LINEAR
    from peft.tuners.lora.layer import LoraLayer

    class QahiraLoraLinear(nn.Module, LoraLayer):
        """y = QuantLinear(x) + sum over active adapters of s * B A dropout(x) (plain LoRA, as
        PEFT's GPTQ / EETQ layers: the base is never merged or changed)."""

        def __init__(self, base_layer, adapter_name: str, config, r: int = 0,
                     lora_alpha: int = 1, **kwargs):
            for name in ("use_dora", "lora_bias", "velora_config", "use_qalora"):
                if getattr(config, name, None):
                    raise ValueError(f"qahira QuantLinear LoRA: {name} is not supported; "
                                     "use plain LoRA")
            super().__init__()
            LoraLayer.__init__(self, base_layer)
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config,
                              target_name=kwargs.get("target_name", ""))

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            result = self.base_layer(x)
            if self.disable_adapters:
                return result
            for active in self.active_adapters:
                if active not in self.lora_A.keys():
                    continue
                lora_a, lora_b = self.lora_A[active], self.lora_B[active]
                h = self._cast_input_dtype(self.lora_dropout[active](x), lora_a.weight.dtype)
                result = result + (lora_b(lora_a(h)) * self.scaling[active]).to(result.dtype)
            return result

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            raise AttributeError("qahira QuantLinear: LoRA cannot be merged into packed weights "
                                 "(export the adapter and serve it, or `qahira merge` a QA-HiRA)")

        def unmerge(self) -> None:
            raise AttributeError("qahira QuantLinear: nothing is merged")

        def __repr__(self) -> str:
            return "lora." + super().__repr__()

    _PEFT_LORA_LINEAR = QahiraLoraLinear
    return QahiraLoraLinear


def register() -> None:
    """Register QahiraConfig and QahiraHfQuantizer with transformers (idempotent)."""
    from transformers.quantizers import auto

    if QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(QUANT_METHOD)(QahiraConfig)
    if QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantizer(QUANT_METHOD)(QahiraHfQuantizer)


register()
