"""vLLM serves a tiny model converted from HQQ (`qahira convert`, hqq 4-bit, axis 1, groups of
64, float16 scales and zeros) like transformers running hqq's own float32 dequantization of the
quantized model, in fp32.

The reference weights come from hqq's in-memory quantized model (support.hqq_files), not from
the converter; the converted weights equal them bit for bit (tests/convert/test_hqq.py), so in
fp32 the greedy tokens must match and the first-token logprobs agree closely.
"""

from __future__ import annotations

import json

import pytest
import torch

from support.convert_checks import assert_served_like
from support.hf_reference import PROMPTS
from support.hqq_files import write_tiny_hqq

pytestmark = pytest.mark.vllm

MAX_TOKENS = 16


def test_vllm_serves_converted_hqq_like_hqq_dequantized_reference(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from qahira_vllm.convert import convert

    src, ref = write_tiny_hqq(tmp_path / "hqq", nbits=4, group=64)
    ckpt = tmp_path / "ckpt"
    convert(src, ckpt, progress=False)
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert qc["bits"] == 4 and qc["block_size"] == [1, 64] and qc["source_format"] == "hqq"

    config = json.loads((src / "config.json").read_text())  # the HQQ model's own config
    config.pop("quantization_config")
    reference = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(**config), dtype=torch.float32).eval()
    missing, unexpected = reference.load_state_dict(ref.fp32, strict=False)
    assert not unexpected and not missing
    tok = AutoTokenizer.from_pretrained(src)
    prompt_ids = [tok(p).input_ids for p in PROMPTS]
    assert_served_like(ckpt, reference, tmp_path, prompt_ids, MAX_TOKENS)
