"""Export a Q-BaRA adapter as the mathematically equal standard LoRA (PEFT / stock vLLM).

    A' = repeat_interleave(A, p, dim=1) / p   [R, in]
    B' = repeat_interleave(B, q, dim=0)       [out, R]
    r = R, lora_alpha with lora_alpha / r == scaling exactly (PEFT and vLLM compute
    scaling = lora_alpha / r when use_rslora is false, which is what we write)

The export costs p times the shrink and q times the expand FLOPs and memory of the compact form.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .adapter_format import (LORA_A, LORA_B, AdapterConfig, AdapterError, load_adapter,
                             save_adapter)
from .adapter_math import qbara_to_lora

EXPORT_INFO_NAME = "qahira_export.json"


def export_peft_lora(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike,
                     overwrite: bool = False) -> dict:
    """Write the equivalent plain LoRA of a Q-BaRA (or LoRA) adapter. Returns a summary.

    out_dir gets a plain PEFT adapter_config.json (no qahira section) and
    qahira_export.json (the qahira section: base fingerprint, where it came from)."""
    adapter = load_adapter(adapter_dir)
    c = adapter.config
    if c.adapter_type == "qahira":
        raise AdapterError(
            f"{adapter.path}: a QA-HiRA adapter has no low-rank form (M is a full matrix, rank "
            "up to min(out/qo, in/pi)); merge it into the base instead: qahira merge QCKPT "
            "ADAPTER OUT_DIR")
    if c.has_layer_patterns:
        raise AdapterError(
            f"{adapter.path}: already a plain PEFT LoRA with per-layer rank_pattern / "
            "alpha_pattern: serve or load it as it is (nothing to export)")
    tensors = {}
    for layer, group in adapter.tensors.items():
        a, b = qbara_to_lora(group[LORA_A].float(), group[LORA_B].float(), c.pool, c.repeat)
        tensors[layer] = {LORA_A: a, LORA_B: b}
    lora = AdapterConfig(
        adapter_type="lora", target_modules=c.target_modules, scaling=c.scaling, rank=c.rank,
        exclude_modules=c.exclude_modules, layers_to_transform=c.layers_to_transform,
        layers_pattern=c.layers_pattern,
        base_fingerprint=c.base_fingerprint, base_model_name_or_path=c.base_model_name_or_path,
        provenance={**c.provenance, "exported_from": {"adapter_type": c.adapter_type,
                                                      "pool": c.pool, "repeat": c.repeat,
                                                      "path": str(Path(adapter_dir).resolve())}})
    # A plain PEFT config (PEFT warns about unknown keys); provenance and the base fingerprint
    # go to a side file that PEFT and vLLM ignore.
    sidecar = json.dumps(lora.to_json_dict()["qahira"], indent=2) + "\n"
    out = save_adapter(out_dir, lora, tensors, overwrite=overwrite, include_qahira=False,
                       extra_files={EXPORT_INFO_NAME: sidecar})
    return {"out_dir": str(out), "format": "peft-lora", "r": lora.peft_r,
            "lora_alpha": lora.peft_lora_alpha, "scaling": lora.scaling,
            "layers": len(tensors), "expanded_from": [c.pool, c.repeat]}
