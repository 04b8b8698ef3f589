"""vLLM serves a tiny Llama converted from compressed-tensors W4A16 (asymmetric, group 32,
bf16 scales, written by compressed-tensors' own compressor) like transformers running the
compressed-tensors checkpoint itself (its compressed-tensors quantizer decompresses the
weights), in fp32.

The converted weights are bit-identical to that decompression
(tests/convert/test_compressed_tensors.py), so in fp32 the greedy tokens must match and the
first-token logprobs agree closely.
"""

from __future__ import annotations

import json

import pytest
import torch

from support.convert_checks import assert_served_like
from support.ct_files import write_ct_checkpoint

from qahira_vllm.convert import convert

pytestmark = pytest.mark.vllm


def test_vllm_serves_converted_w4a16_like_transformers_compressed_tensors(tmp_path):
    from transformers import AutoModelForCausalLM

    src = write_ct_checkpoint(tmp_path / "src", bits=4, symmetric=False, tokenizer=True,
                              heads=2, kv_heads=1)
    ckpt = tmp_path / "ckpt"
    convert(src, ckpt, progress=False)
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert qc["bits"] == 4 and qc["block_size"] == [1, 32]
    assert qc["source_format"] == "compressed-tensors"
    reference = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    assert_served_like(ckpt, reference, tmp_path)
