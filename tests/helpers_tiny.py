"""Tiny random models for tests: built locally, saved as safetensors, quantized with the project's
quantizer. Cached per test session (one temp folder, removed at exit)."""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

import torch

# Tiny models: one thread is faster than two that spin against other processes on a shared CPU.
torch.set_num_threads(1)

_ROOT = Path(tempfile.mkdtemp(prefix="qahira-tiny-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)
_CACHE: dict[tuple, Path] = {}

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 320  # 256 bytes + 3 specials, padded


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
    from transformers import (AutoModelForCausalLM, LlamaConfig, Qwen2Config)

    common = dict(vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, max_position_embeddings=512,
                  tie_word_embeddings=tie, bos_token_id=None, eos_token_id=256, pad_token_id=256)
    config = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger than HF's 0.02 init so layers matter and logits are spread
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.08)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
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


def unpack_int4_reference(qweight: torch.Tensor) -> torch.Tensor:
    """Independent unpacking (python bit arithmetic on int64) for exactness tests."""
    w = qweight.to(torch.int64) & 0xFFFFFFFF
    cols = [(w >> (4 * j)) & 0xF for j in range(8)]
    return torch.stack(cols, dim=-1).reshape(qweight.shape[0], -1)


def dequant_reference(qweight, scales, offsets, block_size, bits=4) -> torch.Tensor:
    """float64 W = scale * q + offset per block, written independently of quant_math."""
    q = unpack_int4_reference(qweight) if bits == 4 else qweight.to(torch.int64)
    bo, bi = block_size
    s = scales.double().repeat_interleave(bo, 0).repeat_interleave(bi, 1)
    o = offsets.double().repeat_interleave(bo, 0).repeat_interleave(bi, 1)
    return q.double() * s + o


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
