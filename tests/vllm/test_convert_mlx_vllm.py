"""vLLM serves a tiny model converted from MLX (`qahira convert`, mlx-lm 4-bit affine, groups of
64, fp16 scales) like transformers running mlx's own dequantization of the MLX weights, in fp32.

The reference weights come from mlx-lm's loader and mx.dequantize (support.mlx_files), not from
the converter; the converted weights equal them bit for bit (tests/convert/test_mlx.py), so in
fp32 the greedy tokens must match and the first-token logprobs agree closely.
"""

from __future__ import annotations

import json

import pytest
import torch

from support.convert_checks import assert_served_like
from support.hf_reference import PROMPTS
from support.mlx_files import mlx_reference, write_tiny_mlx

pytestmark = pytest.mark.vllm

MAX_TOKENS = 16


def test_vllm_serves_converted_mlx_like_mlx_dequantized_reference(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from qahira_vllm.convert import convert

    src = write_tiny_mlx(tmp_path / "mlx", bits=4, group=64, dtype="float16")
    ckpt = tmp_path / "ckpt"
    convert(src, ckpt, progress=False)
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert qc["bits"] == 4 and qc["block_size"] == [1, 64] and qc["source_format"] == "mlx"

    config = json.loads((src / "config.json").read_text())  # the MLX model's own config
    for key in ("quantization", "quantization_config"):
        config.pop(key)
    reference = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(**config), dtype=torch.float32).eval()
    missing, unexpected = reference.load_state_dict(mlx_reference(src), strict=False)
    assert not unexpected and not missing
    tok = AutoTokenizer.from_pretrained(src)
    prompt_ids = [tok(p).input_ids for p in PROMPTS]
    assert_served_like(ckpt, reference, tmp_path, prompt_ids, MAX_TOKENS)
