"""compressed-tensors test data: tiny Llama checkpoints written by compressed-tensors' own
compressor (ModelCompressor, the lifecycle llm-compressor's save follows: apply the
QuantizationConfig, set the qparams, compress_model, save_pretrained, update_config), and
the library's own decoders as references (not ours).

llm-compressor itself does not install beside this venv's pins (every release pins another
compressed-tensors and an older transformers), so the qparams are the library's
calculate_qparams on per-group min / max: what llm-compressor's default MinMax observer
computes for a weight-only scheme (RTN).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from support import tiny

DIMS = dict(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2)


def scheme_args(bits: int = 4, group_size: int | None = 32, symmetric: bool = True,
                strategy: str = "group", actorder: str | None = None, **extra):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy,
                            group_size=group_size if strategy == "group" else None,
                            actorder=actorder, **extra)


def write_ct_checkpoint(out: Path, bits: int = 4, group_size: int | None = 32,
                        symmetric: bool = True, strategy: str = "group",
                        dtype: torch.dtype = torch.bfloat16, fmt: str = "pack-quantized",
                        ignore=("lm_head",), input_activations=None, actorder=None,
                        g_idx_shuffle: bool = False, seed: int = 0, tokenizer: bool = False,
                        tie: bool = False, edit=None, **dims) -> Path:
    """A 2-layer Llama (tiny.build_config + tiny.random_model, then `dtype`) quantized with one
    config group targeting every Linear (`ignore` excepted) and compressed by compressed-tensors
    in format `fmt`. input_activations: QuantizationArgs for an activation-quantized scheme.
    actorder="group" stores weight_g_idx (arange // g, or shuffled with g_idx_shuffle).
    edit(state_dict) may change the compressed tensors before saving. tokenizer=True adds
    tiny.make_tokenizer (vocabulary 320)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationScheme,
                                                 QuantizationStatus, apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams

    out = Path(out)
    config = tiny.build_config("llama", tie=tie, tokenizer=tokenizer, **{**DIMS, **dims})
    model = tiny.random_model(config, seed, randomize_norms=True).to(dtype)
    args = scheme_args(bits, group_size, symmetric, strategy, actorder)
    scheme = QuantizationScheme(targets=["Linear"], weights=args,
                                input_activations=input_activations)
    qcfg = QuantizationConfig(config_groups={"group_0": scheme}, ignore=list(ignore),
                              quantization_status=QuantizationStatus.FROZEN)
    apply_quantization_config(model, qcfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, mod in model.named_modules():
            if getattr(mod, "quantization_scheme", None) is None:
                continue
            w = mod.weight.float()
            out_f, in_f = w.shape
            gs = in_f if strategy == "channel" else group_size
            if actorder == "group":
                idx = torch.arange(in_f) // gs
                if g_idx_shuffle:
                    idx = idx[torch.randperm(in_f, generator=g)]
                mod.weight_g_idx.data.copy_(idx.to(mod.weight_g_idx.dtype))
                # groups hold the columns g_idx names (the library sorts by g_idx)
                w = w[:, torch.argsort(idx, stable=True)]
            grouped = w.reshape(out_f, in_f // gs, gs)
            scale, zp = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
            mod.weight_scale.data.copy_(scale.to(mod.weight_scale.dtype))
            if getattr(mod, "weight_zero_point", None) is not None:
                mod.weight_zero_point.data.copy_(zp.to(mod.weight_zero_point.dtype))
            if input_activations is not None and hasattr(mod, "input_scale"):
                mod.input_scale.data.fill_(0.02)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    if edit is not None:
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        edit(sd)
        from safetensors.torch import save_file

        model.config.save_pretrained(out)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"))
    else:
        model.save_pretrained(out)
    compressor.update_config(out)
    if tokenizer:
        tiny.make_tokenizer().save_pretrained(out)
    return out


def ct_reference(ckpt: Path, fp32_scales: bool = True) -> dict[str, torch.Tensor]:
    """{layer: W}: compressed-tensors' own decompress of every quantized layer of `ckpt` (the
    compressor its scheme's format names, scheme matched by the library's own matcher).
    fp32_scales: the scales widened to float32 first (the library then computes in fp32:
    exact); else in the stored scale dtype, as the library does by default."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    qc = json.loads((Path(ckpt) / "config.json").read_text())["quantization_config"]
    config = QuantizationConfig.model_validate(qc)
    sd = load_file(str(Path(ckpt) / "model.safetensors"))
    (scheme,) = config.config_groups.values()
    fmt = scheme.format or config.format
    compressor = BaseCompressor.get_value_from_registry(fmt)
    out = {}
    for name in sd:
        if not name.endswith(".weight_scale"):
            continue
        layer = name[: -len(".weight_scale")]
        local = {k[len(layer) + 1:]: v for k, v in sd.items() if k.startswith(layer + ".")
                 and k[len(layer) + 1:].startswith("weight")}
        if fp32_scales:
            local["weight_scale"] = local["weight_scale"].float()
        out[layer] = compressor.decompress(local, scheme)["weight"]
    return out
