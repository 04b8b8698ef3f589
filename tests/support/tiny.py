"""The tests' one tiny-model factory and the independent references built on it.

Two presets of the same kind of model (random Llama / Qwen2, weights drawn wider than HF's init
so that layers and blocks have spread; nothing downloaded):
- `make_model_dir(out, ...)`: a float model folder at `out` (vocabulary 256, no tokenizer; norms
  drawn away from 1), for quantizer / format / kernel tests;
- `make_float_model(...)` / `tiny_qckpt(...)`: cached per session, with a byte-level tokenizer
  and chat template (vocabulary 320), for trainer, adapter and engine tests.
References here (`unpack_int4_ref`, `dequant_ref`, `dequant_packed_ref`, `error_bound`, ...) are
written without qahira_vllm.quant_math, so tests compare the product against them.
"""


from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

import torch

# Tiny models: one thread is faster than two that spin against other processes on a shared CPU.
torch.set_num_threads(1)

VOCAB = 256        # make_model_dir
VOCAB_SIZE = 320   # make_float_model: make_tokenizer's 256 bytes + 3 specials, padded
DEFAULT_DIMS = dict(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2)
NON_DIVIDING = dict(hidden=128, intermediate=96, layers=2, heads=4, kv_heads=2)

# Layer names of a 2-layer model, for the tests that enumerate them.
LINEAR_SUFFIXES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def build_config(arch: str = "llama", hidden: int = 128, intermediate: int = 256, layers: int = 2,
                 heads: int = 4, kv_heads: int = 2, tie: bool = False, tokenizer: bool = False):
    """transformers config of a tiny model; tokenizer=True: the vocabulary and special token ids
    of make_tokenizer (VOCAB_SIZE, eos = pad = 256, no bos) and 512 positions."""
    from transformers import LlamaConfig, Qwen2Config

    ids = (dict(vocab_size=VOCAB_SIZE, max_position_embeddings=512, bos_token_id=None,
                eos_token_id=256, pad_token_id=256) if tokenizer else
           dict(vocab_size=VOCAB, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                pad_token_id=0))
    common = dict(hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, tie_word_embeddings=tie, **ids)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":  # q/k/v projections carry a bias
        return Qwen2Config(**common)
    raise ValueError(arch)


def random_model(config, seed: int, randomize_norms: bool):
    """The model of `config` with weights ~ N(0, 0.08), biases ~ N(0, 0.1) (larger than HF's
    0.02 init, so layers and blocks have spread and logits clear margins) and, with
    randomize_norms, norms ~ U(0.5, 1.5) (so "unchanged" is a meaningful check); fp32."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.08)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif randomize_norms:
                p.uniform_(0.5, 1.5)
    return model


def make_model_dir(out: Path, arch: str = "llama", seed: int = 0, tie: bool = False,
                   dtype: torch.dtype = torch.float32, **dims) -> Path:
    """Write a random tiny model (config.json, generation_config.json, model.safetensors,
    plus a small extra file `tokenizer_config.json` that the quantizer must copy)."""
    config = build_config(arch, tie=tie, **{**DEFAULT_DIMS, **dims})
    model = random_model(config, seed, randomize_norms=True).to(dtype)
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


def dequant_packed_ref(qweight, scales, offsets, block_size, bits: int = 4) -> torch.Tensor:
    """float64 W of the stored (packed) tensors, by dequant_ref."""
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


# ---- cached tiny models with a tokenizer, adapters, PEFT references ---------------------------

_ROOT = Path(tempfile.mkdtemp(prefix="qahira-tiny-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)
_CACHE: dict[tuple, Path] = {}

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer():
    """Byte-level tokenizer (every byte one token) with a ChatML-like chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for s in SPECIALS:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIALS[1:])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_float_model(arch: str = "llama", hidden: int = 128, layers: int = 2,
                     intermediate: int = 256, heads: int = 2, kv_heads: int = 1,
                     seed: int = 0, tie: bool = False) -> Path:
    """A random HF model folder (fp32 safetensors + tokenizer)."""
    key = ("float", arch, hidden, layers, intermediate, heads, kv_heads, seed, tie)
    if key in _CACHE:
        return _CACHE[key]
    config = build_config(arch, hidden, intermediate, layers, heads, kv_heads, tie,
                          tokenizer=True)
    model = random_model(config, seed, randomize_norms=False)
    out = _ROOT / f"float-{len(_CACHE)}-{arch}"
    model.save_pretrained(out)
    make_tokenizer().save_pretrained(out)
    _CACHE[key] = out
    return out


def tiny_qckpt(arch: str = "llama", block_size=(1, 32), bits: int = 4,
               offset_dtype: str = "float16", lm_head: bool = False, **model_kw) -> Path:
    """A quantized qahira checkpoint of a tiny random model (lm_head=True: head converted)."""
    from qahira_vllm.quantize import quantize_model

    key = ("q", arch, tuple(block_size), bits, offset_dtype, lm_head,
           tuple(sorted(model_kw.items())))
    if key in _CACHE:
        return _CACHE[key]
    src = make_float_model(arch, **model_kw)
    out = _ROOT / f"q-{len(_CACHE)}-{arch}-{bits}b-{block_size[0]}x{block_size[1]}-{offset_dtype}"
    quantize_model(src, out, bits=bits, block_size=tuple(block_size), offset_dtype=offset_dtype,
                   progress=False, lm_head=lm_head)
    _CACHE[key] = out
    return out


# A format-2 checkpoint: defaults 4 bits 1x32, float32 scales; down_proj 8 bits 1x16, v_proj
# 8 bits (so q/k/v, one vLLM layer, all 8 bits), layer 1's up_proj 4 bits 2x64 (with gate_proj).
V2_OVERRIDES = (("mlp.down_proj", 8, (1, 16)), ("self_attn.v_proj", 8, None),
                ("model.layers.1.mlp.up_proj", 4, (2, 64)))


def tiny_qckpt_v2(offset_dtype: str = "float32", quantizer: str = "mse_clip") -> Path:
    """A mixed format-2 checkpoint of make_float_model()'s llama (V2_OVERRIDES, fp32 scales)."""
    from qahira_vllm.quantize import quantize_model

    key = ("q-v2", offset_dtype, quantizer)
    if key in _CACHE:
        return _CACHE[key]
    out = _ROOT / f"q-{len(_CACHE)}-v2-{offset_dtype}-{quantizer}"
    quantize_model(make_float_model(), out, bits=4, block_size=(1, 32), offset_dtype=offset_dtype,
                   clip_search=quantizer == "mse_clip", progress=False, scale_dtype="float32",
                   layer_overrides=V2_OVERRIDES)
    _CACHE[key] = out
    return out


def dequant_v2_ref(qc: dict, layer: str, qweight, scales, offsets) -> torch.Tensor:
    """fp32 W of one stored layer of a format-2 checkpoint, independently: the layer's bits /
    block read from the raw `layers` dict, then s * q rounded to fp32 and + o rounded to fp32
    (two operations, the format's definition; expand_ref for the block expansion)."""
    ov = qc.get("layers", {}).get(layer, {})
    bits, block = ov.get("bits", qc["bits"]), ov.get("block_size", qc["block_size"])
    q = unpack_int4_ref(qweight) if bits == 4 else qweight.to(torch.int64)
    s = expand_ref(scales, block, q.shape).float()   # fp32 values, exactly (via float64)
    o = expand_ref(offsets, block, q.shape).float()
    return q.to(torch.float32) * s + o


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pattern_texts(n: int = 64, seed: int = 0) -> list[str]:
    """Short, strongly patterned sentences: a tiny model's adapter can learn them quickly."""
    import random

    rng = random.Random(seed)
    animals = ["cat", "dog", "fox", "owl", "bee", "elk"]
    places = ["mat", "log", "hill", "barn", "pond"]
    return [f"the {rng.choice(animals)} sat on the {rng.choice(places)}. " * 3 for _ in range(n)]


def random_adapter(qckpt: Path, out_dir: Path, adapter_type: str = "qbara", pool: int = 2,
                   repeat: int = 2, rank: int | None = 4, scaling: float = 2.0,
                   std: float = 0.05, seed: int = 0, targets=("q_proj", "k_proj", "v_proj",
                   "o_proj", "gate_proj", "up_proj", "down_proj")) -> Path:
    """An adapter folder with random (non-zero) tensors for every targeted quantized layer."""
    from qahira_vllm.adapter_format import (AdapterConfig, base_layer_dims,
                                            checkpoint_fingerprint, expected_shapes,
                                            matches_targets, peft_compatible_scaling,
                                            save_adapter)

    if adapter_type == "qahira":
        rank = None
    if adapter_type == "lora":
        pool = repeat = 1
    scaling = peft_compatible_scaling(scaling, rank or 1)
    config = AdapterConfig(adapter_type=adapter_type, target_modules=tuple(targets),
                           scaling=scaling, pool=pool, repeat=repeat, rank=rank,
                           base_fingerprint=checkpoint_fingerprint(qckpt),
                           base_model_name_or_path=str(qckpt))
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer, (out_f, in_f) in base_layer_dims(qckpt).items():
        if matches_targets(layer, targets):
            tensors[layer] = {k: torch.randn(shape, generator=g) * std
                              for k, shape in expected_shapes(config, out_f, in_f).items()}
    return save_adapter(out_dir, config, tensors)


# Token-id prompts for engine tests on the tiny models (no tokenizer needed).
TOKEN_PROMPTS = [[72, 101, 108, 108, 111, 44, 32], [84, 104, 101, 32, 99, 97, 116],
                 [50, 43, 50, 61, 52, 10, 51, 43]]


# PEFT LoRA targeting / per-layer options, one adapter each (tests of PEFT's rules, issue 11.5),
# for the tiny Llama's layers model.layers.{0,1}.{self_attn.{q,k,v,o},mlp.{gate,up,down}}_proj.
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_OPTIONS = {
    "list": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
    "regex": dict(r=8, lora_alpha=16,
                  target_modules=r".*\.layers\.1\.(self_attn\.(k|o)_proj|mlp\.up_proj)"),
    "layers": dict(r=8, lora_alpha=16, target_modules=ALL_LINEAR, layers_to_transform=[0],
                   layers_pattern="layers"),
    "exclude": dict(r=8, lora_alpha=16, target_modules=ALL_LINEAR,
                    exclude_modules=["o_proj", "model.layers.0.mlp.gate_proj"]),
    "rank_pattern": dict(r=8, lora_alpha=16, target_modules=ALL_LINEAR,
                         rank_pattern={"q_proj": 4, "model.layers.1.mlp.down_proj": 2}),
    "alpha_pattern": dict(r=8, lora_alpha=16, target_modules=ALL_LINEAR,
                          alpha_pattern={"v_proj": 48, r"layers\.0\.mlp\.up_proj": 4}),
    "rslora": dict(r=8, lora_alpha=12, target_modules=ALL_LINEAR, use_rslora=True,
                   rank_pattern={"k_proj": 2}),
}


def peft_adapter(qckpt: Path, out_dir: Path, seed: int = 0, std: float = 0.1,
                 **lora_kwargs) -> Path:
    """A real PEFT LoRA (peft.get_peft_model + LoraConfig(**lora_kwargs) on the checkpoint's
    dequantized model, saved by PEFT) with random A and B (PEFT starts B at zero)."""
    from peft import LoraConfig, get_peft_model

    from qahira_vllm.checkpoint import load_reference_model

    model = get_peft_model(load_reference_model(qckpt),
                           LoraConfig(task_type="CAUSAL_LM", **lora_kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    model.save_pretrained(out_dir)
    return Path(out_dir)


def peft_reference(qckpt: Path, adapter_dir: Path):
    """PEFT's own forward: PeftModel.from_pretrained on the dequantized model (fp32, eval)."""
    from peft import PeftModel

    from qahira_vllm.checkpoint import load_reference_model

    return PeftModel.from_pretrained(load_reference_model(qckpt), str(adapter_dir)).eval()
