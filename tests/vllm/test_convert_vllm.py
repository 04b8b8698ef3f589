"""vLLM serves SmolLM2-135M converted from its Q4_1 GGUF (`qahira convert`), and a tiny
Q4_K_M-like GGUF (format 2: per-layer bits / blocks, float32 scales), like transformers
running the GGUF itself (transformers' own GGUF loading and dequantization), in fp32.

The converted weights are bit-identical to that dequantization (tests/convert/test_gguf.py),
so in fp32 the greedy tokens must match and the first-token logprobs agree closely.
"""

from __future__ import annotations

import json

import pytest
import torch

from support.convert_checks import assert_served_like
from support.gguf_files import (VOCAB, smollm2_converted, transformers_gguf_tensors,
                                write_k_mix_gguf)
from support.hf_reference import PROMPTS

pytestmark = pytest.mark.vllm

MAX_TOKENS = 16


def test_vllm_serves_converted_smollm2_like_transformers_gguf(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src, ckpt = smollm2_converted()
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert qc["bits"] == 4 and qc["block_size"] == [1, 32] and qc["source_format"] == "gguf"
    # transformers' own GGUF loading (the tensors from_pretrained(gguf_file=...) loads, shared
    # with tests/convert/test_gguf.py), in its model built from the GGUF's config
    config = AutoConfig.from_pretrained(src.parent, gguf_file=src.name)
    reference = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = reference.load_state_dict(transformers_gguf_tensors(src), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
    assert reference.lm_head.weight.data_ptr() == reference.model.embed_tokens.weight.data_ptr()
    reference.eval()
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    prompt_ids = [tok(p).input_ids for p in PROMPTS]
    assert_served_like(ckpt, reference, tmp_path, prompt_ids, MAX_TOKENS)


def test_vllm_serves_converted_k_quant_mix_like_transformers_gguf(tmp_path):
    """Q4_K / Q6_K / Q5_K / Q8_0 layers (random valid super-blocks): q/k/v and gate/up each
    widened to one bits / block (vLLM's fused layers), the other layers at their own."""
    from transformers import AutoModelForCausalLM

    from qahira_vllm.convert import convert

    src = write_k_mix_gguf(tmp_path / "k.gguf", "Q4_K_M")
    ckpt = tmp_path / "ckpt"
    convert(src, ckpt, progress=False)
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert qc["format_version"] == 2 and qc["scale_dtype"] == "float32" and qc["layers"]
    reference = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name,
                                                     dtype=torch.float32).eval()
    prompts = [[(7 * i + k) % VOCAB for i in range(6 + k)] for k in range(3)]
    assert_served_like(ckpt, reference, tmp_path, prompts, MAX_TOKENS,
                       llm_kwargs={"skip_tokenizer_init": True, "max_model_len": 128})
