"""Merge an adapter into a qahira checkpoint.

QA-HiRA (exact): when every quantization block lies inside one qo x pi tile, the adapter's
dW is constant on each block, so only offsets change:

    offsets'[b] = round_to_offset_dtype( float32(offsets[b]) + scaling * M[tile(b)] / pi )

qweight and scales are written byte-identical; the one rounding is that of offset_dtype.

Q-BaRA / LoRA cannot be merged exactly into a block-quantized base (dW is not constant on blocks,
so the integers would have to change): refused unless requantize=True, which dequantizes, adds
dW and re-quantizes every adapted layer with qahira_vllm.quant_math.quantize ("merge, then
quantize"), reporting the measured error.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from . import __version__
from .adapter_format import (LORA_A, LORA_B, QAHIRA_M, AdapterError, check_qahira_geometry,
                             checkpoint_fingerprint, load_adapter, validate_adapter)
from .adapter_math import qahira_delta_blocks, qahira_delta_weight, qbara_delta_weight
from .checkpoint import load_quantized_state, resolve_model_dir, write_checkpoint
from .format import layer_dims
from .quant_math import dequantize, pack_qweight, quantize

DEFAULT_VERIFY_TEXT = ("The quick brown fox jumps over the lazy dog. To be, or not to be, that "
                       "is the question.")


def _delta_weight(adapter, layer: str) -> torch.Tensor:
    """fp32 dense dW [out, in] of one layer (for the re-quantizing path)."""
    c, t = adapter.config, adapter.tensors[layer]
    if c.adapter_type == "qahira":
        return qahira_delta_weight(t[QAHIRA_M].float(), c.pool, c.repeat, c.scaling)
    return qbara_delta_weight(t[LORA_A].float(), t[LORA_B].float(), c.pool, c.repeat,
                              c.layer_scaling(layer))  # PEFT's per-layer alpha_pattern/rank


def merge_qahira(qckpt: str | os.PathLike, adapter_dir: str | os.PathLike,
                 out_dir: str | os.PathLike, requantize: bool = False, verify: bool = False,
                 verify_text: str | None = None, overwrite: bool = False) -> dict:
    """Write base + adapter as a new qahira checkpoint in out_dir. Returns a summary.

    QA-HiRA adapters merge exactly (offsets only). Q-BaRA / LoRA adapters, and QA-HiRA adapters
    whose tiles do not contain the base's blocks, need requantize=True.
    """
    t0 = time.time()
    qckpt = resolve_model_dir(qckpt)
    adapter = load_adapter(adapter_dir)
    cfg, quant, other = load_quantized_state(qckpt)
    dims = {layer: layer_dims(layer, t, cfg) for layer, t in quant.items()}
    fingerprint = checkpoint_fingerprint(qckpt)
    validate_adapter(adapter, dims, fingerprint)
    ac = adapter.config
    adapted = sorted(adapter.tensors)
    exact = ac.adapter_type == "qahira"
    if exact:
        try:  # format 2 may give layers their own blocks: the tile must hold each's
            check_qahira_geometry(ac.pool, ac.repeat, cfg.block_lcm(adapted),
                                  {n: dims[n] for n in adapted}, source=str(adapter.path))
        except AdapterError as e:
            if not requantize:
                raise AdapterError(f"{e}. This adapter cannot merge exactly into this base; "
                                   "pass --requantize to merge and re-quantize (lossy)") from None
            exact = False
    elif not requantize:
        raise AdapterError(
            f"{adapter.path}: a {ac.adapter_type!r} adapter cannot be merged exactly into a "
            f"block-quantized base: its dW = s * B A varies inside each quantization block "
            f"{list(cfg.block_size)}, so the stored integers would have to change. Serve it "
            "as an adapter (qbara) / export it (qahira export --format peft-lora), train "
            "QA-HiRA for an exact merge, or pass --requantize to dequantize, add and "
            "re-quantize (lossy: the usual merge-then-quantize practice)")

    new_tensors = dict(other)
    report: dict = {"layers": len(adapted)}
    if exact:
        max_round = 0.0
        for layer, t in quant.items():
            new_tensors[f"{layer}.qweight"] = t["qweight"]
            new_tensors[f"{layer}.scales"] = t["scales"]
            offsets = t["offsets"]
            if layer in adapter.tensors:
                delta = qahira_delta_blocks(adapter.tensors[layer][QAHIRA_M], ac.scaling,
                                            ac.pool, ac.repeat, cfg.for_layer(layer).block_size)
                exact_sum = offsets.to(torch.float32) + delta
                offsets = exact_sum.to(cfg.offset_torch_dtype)
                max_round = max(max_round, float((offsets.float() - exact_sum).abs().max()))
            new_tensors[f"{layer}.offsets"] = offsets
        report.update(method="exact_offsets", max_offset_rounding=max_round)
    else:
        clip_search = cfg.extra.get("quantizer") != "minmax"  # as the base was quantized
        sq_err = sq_delta = 0.0
        max_err = 0.0
        for layer, t in quant.items():
            if layer not in adapter.tensors:
                for suffix in ("qweight", "scales", "offsets"):
                    new_tensors[f"{layer}.{suffix}"] = t[suffix]
                continue
            lcfg = cfg.for_layer(layer)  # format 2: this layer's bits / block
            target = (dequantize(t["qweight"], t["scales"], t["offsets"], lcfg)
                      + _delta_weight(adapter, layer))
            q, scales, offsets = quantize(target, lcfg, clip_search=clip_search)
            new_tensors[f"{layer}.qweight"] = pack_qweight(q, lcfg.bits)
            new_tensors[f"{layer}.scales"] = scales
            new_tensors[f"{layer}.offsets"] = offsets
            err = dequantize(new_tensors[f"{layer}.qweight"], scales, offsets, lcfg) - target
            sq_err += float(err.square().sum())
            sq_delta += float(_delta_weight(adapter, layer).square().sum())
            max_err = max(max_err, float(err.abs().max()))
        report.update(method="requantized", max_abs_weight_error=max_err,
                      rms_weight_error_over_rms_delta=(sq_err / max(sq_delta, 1e-30)) ** 0.5)

    config = json.loads((qckpt / "config.json").read_text())
    qc = config["quantization_config"]
    qc["merged_adapters"] = list(qc.get("merged_adapters", [])) + [{
        "adapter_type": ac.adapter_type, "adapter": str(Path(adapter_dir).resolve()),
        "base_fingerprint": fingerprint, "scaling": ac.scaling, "pool": ac.pool,
        "repeat": ac.repeat, "rank": ac.rank, "layers": len(adapted),
        "method": report["method"], "merged_by": f"qahira-vllm {__version__}"}]
    write_checkpoint(qckpt, out_dir, config, new_tensors, overwrite=overwrite)
    summary = {"out_dir": str(Path(out_dir).resolve()), "adapter_type": ac.adapter_type,
               **report, "seconds": round(time.time() - t0, 2)}
    if verify:
        summary.update(verify_merge(qckpt, adapter_dir, out_dir, verify_text))
    return summary


@torch.no_grad()
def verify_merge(qckpt, adapter_dir, merged_dir, text: str | None = None) -> dict:
    """Max |logit difference| between base + adapter (the trainer's forward) and the merged
    checkpoint's fp32 reference forward, on sample text."""
    from transformers import AutoTokenizer

    from .checkpoint import load_reference_model
    from .training.model import load_model_with_adapter

    tokenizer = AutoTokenizer.from_pretrained(qckpt)
    ids = tokenizer(text or DEFAULT_VERIFY_TEXT, return_tensors="pt")["input_ids"]
    with_adapter = load_model_with_adapter(qckpt, adapter_dir)(input_ids=ids).logits
    merged = load_reference_model(merged_dir)(input_ids=ids).logits
    return {"verify_tokens": int(ids.shape[1]),
            "max_abs_logit_diff": float((with_adapter - merged).abs().max()),
            "max_abs_logit": float(with_adapter.abs().max()),
            "same_argmax_fraction": float((with_adapter.argmax(-1) == merged.argmax(-1))
                                          .float().mean())}
