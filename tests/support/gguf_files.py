"""GGUF test data: tiny Llama GGUF files written with gguf-py's own GGUFWriter and quantizers,
the embedded SmolLM2 Q4_1 file converted once per process, and transformers' own GGUF
dequantization as the reference (a decoder that is not ours)."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 128, 2, 4, 2, 96


def linear_shapes(hidden: int = HIDDEN, inter: int = INTER) -> dict[str, tuple[int, int]]:
    """GGUF linear tensor name in block N -> [out, in]."""
    kv = hidden // HEADS * KV_HEADS
    return {"attn_q": (hidden, hidden), "attn_k": (kv, hidden), "attn_v": (kv, hidden),
            "attn_output": (hidden, hidden), "ffn_gate": (inter, hidden),
            "ffn_up": (inter, hidden), "ffn_down": (hidden, inter)}


def _weights(rng, shape) -> np.ndarray:
    """Random weights with a zero block and a constant block in row 0 (d = 0 for the
    affine types and Q8_0), a block whose largest |w| is positive (negative d in Q4_0 /
    Q5_0) and one whose largest |w| is negative."""
    w = rng.normal(0.0, 0.08, size=shape).astype(np.float32)
    w[0, 0:32] = 0.0
    w[0, 32:64] = 0.37
    w[1, 0:32] = np.abs(w[1, 0:32])
    w[1, 5] = 0.5
    w[2, 0:32] = -np.abs(w[2, 0:32])
    w[2, 7] = -0.5
    return w


def flip_d(raw: np.ndarray, rows: slice, type_name: str = "Q8_0") -> np.ndarray:
    """Negate the fp16 d (the first 2 bytes) of every block of `rows`, nothing else: Q8_0's
    quantizer only writes d > 0, so this makes negative-d blocks of equally valid files."""
    import gguf

    raw = raw.copy()
    n, width = raw.shape
    size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][1]
    blocks = raw.reshape(n, width // size, size)
    d = blocks[rows, :, 0:2].copy().view(np.float16)
    blocks[rows, :, 0:2] = (-d).view(np.uint8)
    return raw


# Where each K-quant super-block keeps its fp16 d (and dmin), in bytes, from llama.cpp's
# block_q2_K ... block_q6_K structs (ggml-common.h), with the typical |d| that gives weights of
# about 0.03 (the other bytes are random: sc / mn / q of all sizes); Q6_K's d lies below
# float16's smallest normal (6.1e-5), so subnormal d are covered too.
K_FP16_FIELDS = {"Q2_K": ((80, 3e-3), (82, 1e-3)), "Q3_K": ((108, 1e-3),),
                 "Q4_K": ((0, 1.2e-4), (2, 1e-4)), "Q5_K": ((0, 6e-5), (2, 1e-4)),
                 "Q6_K": ((208, 3e-5),)}
# types whose d llama.cpp's quantizers write with either sign (signed sub-block scales)
K_SIGNED_D = ("Q3_K", "Q6_K")


def random_k_quant(rng, shape: tuple[int, int], type_name: str) -> np.ndarray:
    """Raw K-quant data uint8 [out, in / 256 * type size] for a weight [out, in]: every byte
    random, then each super-block's d (and dmin) a finite fp16 of the typical size (positive
    where llama.cpp writes d >= 0: Q2_K, Q4_K, Q5_K; either sign for Q3_K / Q6_K; dmin either
    sign). Valid blocks of any content, written by no quantizer of ours."""
    import gguf

    size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][1]
    out, n = shape[0], shape[1] // 256
    raw = rng.integers(0, 256, (out, n, size), dtype=np.uint8)
    for k, (pos, mag) in enumerate(K_FP16_FIELDS[type_name]):
        v = rng.uniform(0.25, 1.75, (out, n)) * mag
        if k == 1 or type_name in K_SIGNED_D:  # dmin, or a signed-scale type's d
            v *= rng.choice([-1.0, 1.0], (out, n))
        raw[..., pos:pos + 2] = v.astype(np.float16)[..., None].view(np.uint8)
    return raw.reshape(out, n * size)


def mixed_overrides(types: dict[str, str], default: str, seed: int = 0, hidden: int = 256,
                    inter: int = 512) -> dict:
    """write_tiny_gguf overrides giving every linear tensor a type: types[full GGUF name],
    else types[tensor kind] (e.g. "attn_v"), else `default`. K-quants: random_k_quant; other
    types: gguf.quants.quantize of random weights (gguf-py's own quantizer)."""
    import gguf

    rng = np.random.default_rng(seed)
    overrides = {}
    for b in range(LAYERS):
        for name, shape in linear_shapes(hidden, inter).items():
            full = f"blk.{b}.{name}.weight"
            tname = types.get(full, types.get(name, default))
            if tname in K_FP16_FIELDS:
                raw = random_k_quant(rng, shape, tname)
            else:
                raw = gguf.quants.quantize(_weights(rng, shape),
                                           gguf.GGMLQuantizationType[tname])
            overrides[full] = (raw, tname)
    return overrides


# {name: (types, default)} for mixed_overrides: like llama.cpp's Q4_K_M (Q6_K attn_v and some
# ffn_down, Q4_K elsewhere) and Q3_K_M, with a Q5_K / Q2_K member and format-1 types mixed in
K_MIXES = {
    "Q4_K_M": ({"attn_v": "Q6_K", "blk.1.ffn_down.weight": "Q6_K", "blk.1.ffn_up.weight": "Q5_K",
                "blk.1.attn_output.weight": "Q8_0"}, "Q4_K"),
    "Q3_K_M": ({"attn_v": "Q5_0", "blk.0.ffn_gate.weight": "Q2_K",
                "blk.1.ffn_down.weight": "Q4_0", "attn_output": "Q4_K"}, "Q3_K"),
}


def write_k_mix_gguf(path: Path, mix: str, seed: int = 4) -> Path:
    """write_tiny_gguf (hidden 256, intermediate 512: whole K-quant super-blocks) with every
    linear tensor typed by K_MIXES[mix]."""
    types, default = K_MIXES[mix]
    return write_tiny_gguf(path, "Q8_0", seed=seed, hidden=256, inter=512,
                           overrides=mixed_overrides(types, default, seed=seed))


def write_tiny_gguf(path: Path, linear_type: str, arch: str = "llama", seed: int = 0,
                    overrides: dict | None = None, hidden: int = HIDDEN,
                    inter: int = INTER) -> Path:
    """A 2-layer Llama GGUF at `path`: every linear layer quantized to `linear_type` with
    gguf.quants.quantize (Q8_0: the second half of each tensor's rows then gets d negated),
    except `overrides` ({GGUF tensor name: (raw data, type name)}); token embedding Q8_0,
    norms F32, an untied output.weight F16. No tokenizer."""
    import gguf

    rng = np.random.default_rng(seed)
    qtype = gguf.GGMLQuantizationType[linear_type]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // HEADS)
    w.add_vocab_size(VOCAB)
    q8 = gguf.GGMLQuantizationType.Q8_0
    w.add_tensor("token_embd.weight", gguf.quants.quantize(_weights(rng, (VOCAB, hidden)), q8),
                 raw_dtype=q8)
    for b in range(LAYERS):
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{b}.{norm}.weight",
                         rng.uniform(0.5, 1.5, hidden).astype(np.float32))
        for name, shape in linear_shapes(hidden, inter).items():
            full = f"blk.{b}.{name}.weight"
            if overrides and full in overrides:
                raw, tname = overrides[full]
                w.add_tensor(full, raw, raw_dtype=gguf.GGMLQuantizationType[tname])
                continue
            raw = gguf.quants.quantize(_weights(rng, shape), qtype)
            if linear_type == "Q8_0":
                raw = flip_d(raw, slice(shape[0] // 2, None))
            w.add_tensor(full, raw, raw_dtype=qtype)
    w.add_tensor("output_norm.weight", rng.uniform(0.5, 1.5, hidden).astype(np.float32))
    w.add_tensor("output.weight", rng.normal(0, 0.08, (VOCAB, hidden)).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@functools.lru_cache(maxsize=1)
def transformers_gguf_tensors(gguf_file: Path) -> dict:
    """{HF name: fp32 tensor}: transformers' own GGUF loading (load_gguf_checkpoint: gguf's
    dequantizer, its name map and Llama's q/k un-permutation). Cached for the last file (the
    SmolLM2 GGUF's takes ~20 s; tests/convert and tests/vllm both compare against it): treat
    the result as read-only."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return load_gguf_checkpoint(str(gguf_file), return_tensors=True,
                                model_to_load=model)["tensors"]


@functools.lru_cache(maxsize=1)
def smollm2_converted() -> tuple[Path, Path]:
    """(the embedded SmolLM2 Q4_1 GGUF, its `qahira convert` output), once per process."""
    from qahira_vllm.convert import convert
    from qahira_vllm.models import fetch_gguf

    src = fetch_gguf("smollm2-135m", verbose=False)
    root = Path(tempfile.mkdtemp(prefix="qahira-gguf-smollm2-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    out = root / "ckpt"
    convert(src, out, progress=False)
    return src, out
