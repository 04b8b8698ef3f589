"""vLLM serves a tiny Llama converted from GPTQ (4-bit, asymmetric, group 32, the older "gptq"
layout whose stored zeros are one less, with planted zero points 0 and 15, a zero and a
negative scale) like transformers running that checkpoint's weights as the GPTQ layout
defines them (tests/support/gptq_files.gptq_spec_dequant), in fp32.

The converted weights are bit-identical to that dequantization (tests/convert/test_gptq.py, with
vLLM's own CPU GPTQ kernel as a second decoder), so in fp32 the greedy tokens must match and the
first-token logprobs agree closely.
"""

from __future__ import annotations

import json

import pytest

from support.convert_checks import assert_served_like
from support.gptq_files import gptq_spec_dequant, reference_model, write_gptq_model

from qahira_vllm.convert import convert

pytestmark = pytest.mark.vllm


def test_vllm_serves_converted_gptq_like_its_dequantization(tmp_path):
    src = write_gptq_model(tmp_path / "src", bits=4, sym=False, fmt="gptq", group_size=32)
    ckpt = tmp_path / "ckpt"
    summary = convert(src, ckpt, progress=False)
    assert summary["notes"]  # the v1 zero-0 convention is exercised
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert qc["bits"] == 4 and qc["block_size"] == [1, 32] and qc["source_format"] == "gptq"
    reference = reference_model(src, lambda t: gptq_spec_dequant(
        t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, "gptq"))
    assert_served_like(ckpt, reference, tmp_path)
