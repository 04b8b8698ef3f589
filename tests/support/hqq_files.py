"""HQQ test data: tiny models quantized and saved by hqq itself (AutoHQQHFModel.quantize_model,
HQQLinear, AutoHQQHFModel.save_to_safetensors) from the tiny float models of support.tiny, and
hqq's own dequantization of the in-memory quantized model as the reference (not read back
from the file, so not through the converter's reading)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from support import tiny

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "generation_config.json")


@dataclass
class HQQReference:
    """fp32: {param name: tensor} with each HQQ layer dequantized by hqq in float32
    (Quantizer.dequantize with compute_dtype float32); native: {layer: hqq's dequantization
    in its compute dtype, as hqq runs it}; qz: {layer: (q float64 [out, in], s and z float64
    [out, in/g])} from hqq's own unpacking, for error bounds."""
    fp32: dict
    native: dict
    qz: dict


def write_tiny_hqq(out: Path, nbits: int = 4, group: int = 64, axis: int = 1,
                   compute_dtype: torch.dtype = torch.float16, per_tag: dict | None = None,
                   hf_config: bool = True, seed: int = 0) -> tuple[Path, HQQReference]:
    """Quantize tiny.make_float_model (Llama, hidden 128, intermediate 256) with hqq on the
    CPU and save it with hqq's save_to_safetensors into `out` (plus the tokenizer files).
    per_tag: hqq's per-layer-tag configs ({"self_attn.v_proj": None | dict of
    BaseQuantizeConfig kwargs}; tags left out are not quantized). hf_config: add the
    quantization_config transformers writes for an HQQ model (HqqConfig.to_dict()); hqq's
    own output has none."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear, Quantizer
    from hqq.models.hf.base import AutoHQQHFModel
    from transformers import AutoModelForCausalLM, HqqConfig

    src = tiny.make_float_model(seed=seed)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=compute_dtype)
    if per_tag is None:
        quant_config = BaseQuantizeConfig(nbits=nbits, group_size=group, axis=axis)
    else:
        quant_config = {tag: (None if kw is None else BaseQuantizeConfig(**kw))
                        for tag, kw in per_tag.items()}
    AutoHQQHFModel.quantize_model(model, quant_config=quant_config, compute_dtype=compute_dtype,
                                  device="cpu")
    AutoHQQHFModel.save_to_safetensors(model, str(out), verbose=False)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    if hf_config:
        config = json.loads((out / "config.json").read_text())
        qc = HqqConfig(nbits=nbits, group_size=group, axis=axis).to_dict()
        config["quantization_config"] = json.loads(json.dumps(qc, default=str))
        (out / "config.json").write_text(json.dumps(config, indent=2))

    fp32, native, qz = {}, {}, {}
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, HQQLinear):
                meta = dict(m.meta, compute_dtype=torch.float32)
                fp32[f"{name}.weight"] = Quantizer.dequantize(m.W_q, meta).float()
                native[name] = m.dequantize()
                out_f, in_f = m.meta["shape"]
                rows = out_f * in_f // m.meta["group_size"]
                q = Quantizer.unpack[m.meta["packing"]](m.W_q, dtype=torch.float64)[:rows]
                qz[name] = (q.reshape(out_f, in_f),
                            m.meta["scale"].double().reshape(out_f, -1),
                            m.meta["zero"].double().reshape(out_f, -1))
                if m.bias is not None:
                    fp32[f"{name}.bias"] = m.bias.float()
        for name, p in model.state_dict().items():
            if name.rsplit(".", 1)[0] not in native and p.is_floating_point():
                fp32[name] = p.float()
    return out, HQQReference(fp32=fp32, native=native, qz=qz)
