"""vLLM serves SmolLM2-135M converted from its Q4_1 GGUF (`qahira convert`) like transformers
running the GGUF itself (transformers' own GGUF loading and dequantization), in fp32.

The converted weights are bit-identical to that dequantization (tests/convert/test_gguf.py),
so in fp32 the greedy tokens must match and the first-token logprobs agree closely.
"""

from __future__ import annotations

import json

import pytest
import torch

from support.convert_checks import assert_served_like
from support.gguf_files import smollm2_converted
from support.hf_reference import PROMPTS

pytestmark = pytest.mark.vllm

MAX_TOKENS = 16


def test_vllm_serves_converted_smollm2_like_transformers_gguf(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, ckpt = smollm2_converted()
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert qc["bits"] == 4 and qc["block_size"] == [1, 32] and qc["source_format"] == "gguf"
    reference = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name,
                                                     dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    prompt_ids = [tok(p).input_ids for p in PROMPTS]
    assert_served_like(ckpt, reference, tmp_path, prompt_ids, MAX_TOKENS)
