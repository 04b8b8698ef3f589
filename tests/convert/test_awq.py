"""`qahira convert` from AWQ (AutoAWQ GEMM layout): converted weights equal vLLM's AWQ decoding.

References that are not ours: checkpoints written from AutoAWQ's GEMM pack semantics
(tests/support/gptq_files.py: qweight [in, out/8], nibble order [0, 2, 4, 6, 1, 3, 5, 7]),
vLLM's own AWQ Triton dequantizer (awq_triton.awq_dequantize_triton, run by the Triton
interpreter with fp32 scales: exact), and a worked example computed by hand. AutoAWQ itself is
not used (archived; its kernels package needs CUDA). Tests run with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import json

import pytest
import torch

from support import tiny
from support.gptq_files import AWQ_ORDER, pack_words, vllm_awq_dequantize, write_awq_model

from qahira_vllm.convert import convert, detect_format
from qahira_vllm.convert.awq import awq_layer
from qahira_vllm.convert.common import zero_point_to_format
from qahira_vllm.format import QahiraFormatError

NAMES = tiny.linear_layer_names()


def test_worked_example_interleaved_nibbles():
    # One input row, 8 outputs with q = 0..7 and zero point 8. AutoAWQ puts output ORDER[j]
    # in nibble j, ORDER = [0, 2, 4, 6, 1, 3, 5, 7]: the nibbles read 0, 2, 4, 6, 1, 3, 5, 7
    # from the low end, so the word is 0x75316420; the zeros are 0x88888888.
    q = torch.arange(8)[None]
    qweight, qzeros = pack_words(q, 4, 1, AWQ_ORDER), pack_words(q * 0 + 8, 4, 1, AWQ_ORDER)
    assert qweight.tolist() == [[0x75316420]]
    assert qzeros.tolist() == [[0x88888888 - (1 << 32)]]
    scales = torch.tensor([[0.5, 0.25, 1, 2, 4, 8, 16, -1]], dtype=torch.float16)
    decode, reference, group = awq_layer(
        {"qweight": qweight, "qzeros": qzeros, "scales": scales},
        {"group_size": -1, "version": "gemm"}, "example")
    qq, s, o = zero_point_to_format(*decode()[:3], 4, group)
    # w[o] = s[o] (o - 8): -4, -1.75, -6, -10, -16, -24, -32, 1
    expected = (scales.float() * (torch.arange(8) - 8)).t()
    assert expected[:, 0].tolist() == [-4, -1.75, -6, -10, -16, -24, -32, 1]
    assert torch.equal(qq.float() * s.float() + o, expected) and torch.equal(reference(), expected)
    assert torch.equal(vllm_awq_dequantize(qweight, scales, qzeros), expected)
    # the negative scale flips: q' = 15 - 7 = 8, o = -(15 - 8) = -7 -> w = 1
    assert qq[7, 0].item() == 8 and o[7, 0].item() == -7.0 and s[7, 0].item() == 1.0


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    built = {}

    def get(group):
        if group not in built:
            root = tmp_path_factory.mktemp("awq")
            src = write_awq_model(root / "src", group_size=group)
            summary = convert(src, root / "ckpt", progress=False, verify=True)
            built[group] = (src, root / "ckpt", summary, tiny.load_safetensors_dir(src))
        return built[group]

    return get


@pytest.mark.parametrize("group", [32, 128])
def test_tiny_awq_equals_vllm_awq_dequantizer(converted, group):
    src, ckpt, summary, sd_src = converted(group)
    assert detect_format(src) == "awq"
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    sd = tiny.load_safetensors_dir(ckpt)
    assert qc["bits"] == 4 and qc["block_size"] == [1, group] and qc["source_format"] == "awq"
    assert qc["modules_not_converted"] == [] and summary["verify_worst"] == 0.0
    for layer in NAMES:
        ours = tiny.dequant_packed_ref(sd[f"{layer}.qweight"], sd[f"{layer}.scales"],
                                       sd[f"{layer}.offsets"], qc["block_size"], 4).float()
        ref = vllm_awq_dequantize(sd_src[f"{layer}.qweight"], sd_src[f"{layer}.scales"],
                                  sd_src[f"{layer}.qzeros"])
        assert torch.equal(ours, ref), layer
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(sd[name], sd_src[name].float())


def test_autoawq_quant_config_json(tmp_path):
    src = write_awq_model(tmp_path / "src", config_file="quant_config.json")
    assert detect_format(src) == "awq"
    summary = convert(src, tmp_path / "out", progress=False, verify=True)
    assert summary["verify_worst"] == 0.0 and summary["layers_converted"] == 14
    assert not (tmp_path / "out" / "quant_config.json").exists()


@pytest.mark.parametrize("changes, needle", [
    (dict(version="gemv"), "AWQ version 'gemv' is not converted"),
    (dict(version="gemv_fast"), "'gemv_fast'"),
    (dict(zero_point=False), "zero_point=false"),
    (dict(bits=8), "bits=8"),
])
def test_other_versions_refused_by_name(tmp_path, changes, needle):
    src = write_awq_model(tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QahiraFormatError) as e:
        convert(src, tmp_path / "out", progress=False)
    assert needle in str(e.value) and not (tmp_path / "out").exists()
