"""Tiny random Llama / Qwen2 models for the unit tests, saved as safetensors model folders.

Default dims (hidden 128, intermediate 256, 4 heads, 2 kv heads => head_dim 32, k/v out 64) are
chosen so that blocks 1x32, 1x64, 8x4, 2x16 and 4x8 divide every linear layer
(out in {64, 128, 256}, in in {128, 256}). `NON_DIVIDING` uses intermediate 96, so
`down_proj` ([128, 96]) is not divisible by bi=64 while every other layer is.

Nothing is downloaded: models come from `AutoModelForCausalLM.from_config` with a fixed seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 256
DEFAULT_DIMS = dict(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2)
NON_DIVIDING = dict(hidden=128, intermediate=96, layers=2, heads=4, kv_heads=2)

# Layer names of a 2-layer model, for the tests that enumerate them.
LINEAR_SUFFIXES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def build_config(arch: str = "llama", hidden: int = 128, intermediate: int = 256, layers: int = 2,
                 heads: int = 4, kv_heads: int = 2, tie: bool = False):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, max_position_embeddings=128,
                  tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":  # q/k/v projections carry a bias
        return Qwen2Config(**common)
    raise ValueError(arch)


def make_model_dir(out: Path, arch: str = "llama", seed: int = 0, tie: bool = False,
                   dtype: torch.dtype = torch.float32, **dims) -> Path:
    """Write a random tiny model (config.json, generation_config.json, model.safetensors,
    plus a small extra file `tokenizer_config.json` that the quantizer must copy)."""
    from transformers import AutoModelForCausalLM

    config = build_config(arch, tie=tie, **{**DEFAULT_DIMS, **dims})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger than HF's 0.02 init so layers and blocks have spread
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.08)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:  # norms: not all ones, so "unchanged" is a meaningful check
                p.uniform_(0.5, 1.5)
    model = model.to(dtype)
    out = Path(out)
    model.save_pretrained(out)  # safetensors by default
    (out / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}) + "\n")
    return out


def linear_layer_names(n_layers: int = 2) -> list[str]:
    return [f"model.layers.{i}.{s}" for i in range(n_layers) for s in LINEAR_SUFFIXES]


def load_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


# ---- independent references (written without qahira_vllm.quant_math) -------------------------

def unpack_int4_ref(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [out, in/8] -> int64 [out, in] with plain bit arithmetic on the unsigned word."""
    w = qweight.to(torch.int64) & 0xFFFFFFFF
    cols = [(w >> (4 * j)) & 0xF for j in range(8)]
    return torch.stack(cols, dim=-1).reshape(qweight.shape[0], -1)


def expand_ref(t: torch.Tensor, block_size, shape) -> torch.Tensor:
    """[out/bo, in/bi] -> float64 [out, in]: element [o, i] = t[o // bo, i // bi]."""
    bo, bi = block_size
    ro = (torch.arange(shape[0]) // bo)[:, None]
    ci = (torch.arange(shape[1]) // bi)[None, :]
    return t.double()[ro, ci]


def dequant_ref(q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                block_size) -> torch.Tensor:
    """float64 W[o, i] = scales[o//bo, i//bi] * q[o, i] + offsets[o//bo, i//bi], by indexing."""
    bo, bi = block_size
    out_f, in_f = q.shape
    ro = (torch.arange(out_f) // bo)[:, None]
    ci = (torch.arange(in_f) // bi)[None, :]
    return q.to(torch.float64) * scales.double()[ro, ci] + offsets.double()[ro, ci]


def dequant_packed_ref(qweight, scales, offsets, block_size, bits: int) -> torch.Tensor:
    q = unpack_int4_ref(qweight) if bits == 4 else qweight.to(torch.int64)
    return dequant_ref(q, scales, offsets, block_size)


def blockwise(t: torch.Tensor, block_size) -> torch.Tensor:
    """[out, in] -> [out/bo, in/bi, bo*bi] by explicit index arithmetic (not via reshape)."""
    bo, bi = block_size
    out_f, in_f = t.shape
    res = torch.empty(out_f // bo, in_f // bi, bo * bi, dtype=t.dtype)
    for a in range(bo):
        for b in range(bi):
            res[:, :, a * bi + b] = t[a::bo, b::bi]
    return res


def error_bound(w: torch.Tensor, block_size, bits: int, offset_dtype: str = "float16",
                clip: bool = False) -> torch.Tensor:
    """A priori bound on |dequant(quant(w)) - w| per element, float64 [out, in], from w alone.

    Per block, lo/hi = min/max, exact scale s = (hi - lo)/qmax, s_eff = max(s, 2^-24) (the
    quantizer clamps scales to fp16's smallest subnormal; constant blocks use s' = 1 and err
    = |o' - lo|, covered by the offset term). Stored s' = fp16(s_eff): |s' - s_eff| <= u*s_eff +
    2^-25 with u = 2^-11 (fp16 unit roundoff; 2^-25 = half the subnormal spacing). Stored
    o' = offset_dtype(lo): |o' - lo| <= u_o*|lo| + 2^-25 (u_o = 2^-11 fp16, 2^-24 fp32).
    The grid is o' + k*s', k = 0..qmax. Inside it nearest rounding errs <= s'/2; below it the
    error is <= o' - lo; above it <= hi - (o' + qmax*s') <= |o' - lo| + qmax*|s_eff - s'|. Hence

        |err| <= s'/2 + |o' - lo| + qmax*|s' - s_eff|
              <= s_eff*(1+u)/2 + u_o*max(|lo|,|hi|) + 2^-25 + qmax*(u*s_eff + 2^-25)

    With clip=True (mse_clip: range shrunk about its centre by r >= 0.7) values outside the
    clipped range add at most (1 - 0.7)*(hi - lo)/2 = 0.15*(hi - lo), and the clipped range's
    scale/offset satisfy the same rounding terms (|lo_r| <= max(|lo|, |hi|), s_r <= s).
    Plus 1e-6*(|w| + s_eff) for the quantizer's fp32 arithmetic.
    """
    qmax = (1 << bits) - 1
    u, u_o = 2.0**-11, (2.0**-11 if offset_dtype == "float16" else 2.0**-24)
    blocks = blockwise(w.double(), block_size)
    lo, hi = blocks.amin(-1), blocks.amax(-1)
    s_eff = ((hi - lo) / qmax).clamp(min=2.0**-24)
    per_block = (s_eff * (1 + u) / 2 + u_o * torch.maximum(lo.abs(), hi.abs()) + 2.0**-25
                 + qmax * (u * s_eff + 2.0**-25))
    if clip:
        per_block = per_block + 0.15 * (hi - lo)
    bo, bi = block_size
    ro = (torch.arange(w.shape[0]) // bo)[:, None]
    ci = (torch.arange(w.shape[1]) // bi)[None, :]
    return per_block[ro, ci] + 1e-6 * (w.double().abs() + s_eff[ro, ci])
