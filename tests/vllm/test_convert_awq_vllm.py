"""vLLM serves a tiny Llama converted from AWQ (AutoAWQ GEMM layout, group 32) like transformers
running the weights vLLM's own AWQ Triton dequantizer decodes from that checkpoint (run by the
Triton interpreter), in fp32.

The converted weights are bit-identical to that dequantization (tests/convert/test_awq.py), so
in fp32 the greedy tokens must match and the first-token logprobs agree closely. Run with
TRITON_INTERPRET=1 (as the suite is).
"""

from __future__ import annotations

import json

import pytest

from support.convert_checks import assert_served_like
from support.gptq_files import reference_model, vllm_awq_dequantize, write_awq_model

from qahira_vllm.convert import convert

pytestmark = pytest.mark.vllm


def test_vllm_serves_converted_awq_like_vllm_awq_dequantizer(tmp_path):
    src = write_awq_model(tmp_path / "src", group_size=32)
    ckpt = tmp_path / "ckpt"
    convert(src, ckpt, progress=False)
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert qc["bits"] == 4 and qc["block_size"] == [1, 32] and qc["source_format"] == "awq"
    reference = reference_model(src, lambda t: vllm_awq_dequantize(
        t["qweight"], t["scales"], t["qzeros"]))
    assert_served_like(ckpt, reference, tmp_path)
