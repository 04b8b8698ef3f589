"""MLX test data: tiny models written by mlx-lm itself (mlx_lm.convert: its quantize_model,
save_model and save_config) from the tiny float models of support.tiny, and mlx-lm's own
loading plus mlx's own dequantization as the reference (decoders that are not ours)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from support import tiny


def write_tiny_mlx(out: Path, bits: int = 4, group: int = 64, dtype: str = "float16",
                   mode: str = "affine", predicate=None, tie: bool = False, seed: int = 0) -> Path:
    """`mlx_lm.convert(..., quantize=True)` of tiny.make_float_model (Llama, hidden 128,
    intermediate 256, byte tokenizer) into `out`: every linear layer and the embedding
    quantized (mlx-lm's defaults), weights cast to `dtype` first (so the scales and biases
    are `dtype`). predicate: mlx-lm's quant_predicate(path, module) -> bool | dict (per-layer
    overrides, written into config.json's "quantization")."""
    from mlx_lm.convert import convert

    src = tiny.make_float_model(tie=tie, seed=seed)
    convert(str(src), str(out), quantize=True, q_group_size=group, q_bits=bits, q_mode=mode,
            dtype=dtype, quant_predicate=predicate)
    return out


def mlx_reference(folder: Path) -> dict[str, torch.Tensor]:
    """{parameter name: float32 tensor} of the model as mlx-lm loads `folder`
    (mlx_lm.utils.load_model: its reading of the per-layer group sizes and bits): each
    quantized module's weight by mx.dequantize with its scales and biases taken to float32
    (so mlx computes s q + b in float32), every other parameter cast to float32."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(folder))
    out, quantized = {}, set()
    for name, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            w = mx.dequantize(m.weight, m.scales.astype(mx.float32), m.biases.astype(mx.float32),
                              group_size=m.group_size, bits=m.bits, mode=m.mode)
            out[f"{name}.weight"] = torch.from_numpy(np.array(w))
            quantized.add(name)
    for name, p in tree_flatten(model.parameters()):
        if name.rsplit(".", 1)[0] not in quantized:
            out[name] = torch.from_numpy(np.array(p.astype(mx.float32)))
    return out


def mlx_layer_params(folder: Path) -> dict[str, tuple[int, int]]:
    """{module: (group_size, bits)} of every quantized module as mlx-lm loads `folder`."""
    import mlx.nn as nn
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(folder))
    return {n: (m.group_size, m.bits) for n, m in model.named_modules()
            if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}
