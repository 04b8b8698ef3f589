"""`qahira convert` from GPTQ (AutoGPTQ / GPTQModel layout): converted weights equal the source's.

References that are not ours: checkpoints written from GPTQModel's pack semantics
(tests/support/gptq_files.py, including its v1 "zero minus one" word arithmetic), a field-by-
field reading of that layout (gptq_spec_dequant), vLLM's CPU GPTQ kernel (CPUWNA16LinearKernel,
AVX-512 only, stated and checked below), and worked examples computed by hand. GPTQModel itself
does not install beside the pinned torch / transformers (it needs torch >= 2.14.1 and
transformers >= 5.20.2). The stored checkpoint is dequantized with tiny.dequant_packed_ref
(written without qahira_vllm.quant_math) and compared bit for bit in fp32.
"""

from __future__ import annotations

import json

import pytest
import torch

from support import tiny
from support.convert_checks import stored_dequant
from support.gptq_files import (gptq_qzeros, gptq_spec_dequant, has_avx512, pack_words,
                                vllm_cpu_wna16_weight, write_gptq_model)

from qahira_vllm.convert import convert, detect_format
from qahira_vllm.convert.common import zero_point_to_format
from qahira_vllm.convert.gptq import gptq_layer, gptq_zeros
from qahira_vllm.format import QahiraFormatError

SETTINGS = {"v1 4-bit asym g32": dict(bits=4, sym=False, fmt="gptq", group_size=32),
            "v1 4-bit sym g32": dict(bits=4, sym=True, fmt="gptq", group_size=32),
            "v2 4-bit asym g64": dict(bits=4, sym=False, fmt="gptq_v2", group_size=64),
            "v1 8-bit asym g32": dict(bits=8, sym=False, fmt="gptq", group_size=32),
            "v2 8-bit sym per-row": dict(bits=8, sym=True, fmt="gptq_v2", group_size=-1),
            "v2 4-bit sym g32 qwen2 (bias)": dict(bits=4, sym=True, fmt="gptq_v2", group_size=32,
                                                  arch="qwen2")}
NAMES = tiny.linear_layer_names()


# ---- worked examples from the layout (no file, no library) ----------------------------------

def test_worked_example_v1_stored_zero_minus_one_with_borrow():
    # 8 inputs x 8 outputs, 4 bits, one group. Output 0's inputs q = 1..8 fill one qweight word
    # from the low nibble up: 0x87654321. True zeros 0..7 across the outputs pack to 0x76543210;
    # the v1 layout stores the word minus 0x11111111 = 0x654320FF (the zero 0 borrows).
    q = torch.zeros(8, 8, dtype=torch.int64)
    q[:, 0] = torch.arange(1, 9)
    qweight = pack_words(q, 4, 0)
    qzeros = torch.tensor([[0x654320FF]], dtype=torch.int32)
    assert qweight[0, 0].item() == 0x87654321 - (1 << 32)
    assert torch.equal(gptq_qzeros(torch.arange(8)[None], 4, "gptq"), qzeros)
    z, carried = gptq_zeros(qzeros, 4, "gptq", 8)
    assert z.tolist() == [list(range(8))]
    assert carried  # AutoGPTQ's per-field +1 reads 0xF + 1 = 16 and 0x0 + 1 = 1 for outputs 0, 1
    scales = torch.full((1, 8), 0.5, dtype=torch.float16)
    t = {"qweight": qweight, "qzeros": qzeros, "scales": scales,
         "g_idx": torch.zeros(8, dtype=torch.int32)}
    decode, reference, group, _ = gptq_layer("x", t, dict(bits=4, group_size=8, sym=False,
                                                          format="gptq"), "example")
    qq, s, o = zero_point_to_format(*decode()[:3], 4, group)
    # w[0, i] = 0.5 (q - 0) = 0.5 .. 4.0; w[o, i] = 0.5 (0 - o) for the other outputs
    expected = torch.zeros(8, 8)
    expected[0] = 0.5 * torch.arange(1, 9)
    expected[1:] = -0.5 * torch.arange(1, 8)[:, None]
    assert o[:, 0].tolist() == [-0.5 * k for k in range(8)] and s.unique().tolist() == [0.5]
    assert torch.equal(qq.float() * s.float() + o, expected)
    assert torch.equal(reference(), expected)


def test_worked_example_negative_and_zero_scale_8bit():
    # 8-bit: 4 values per word. One group of 4 inputs; outputs 0 and 1 have s = -0.25 and 0.
    q = torch.tensor([[10, 1, 0, 0], [20, 2, 0, 0], [200, 3, 0, 0], [255, 4, 0, 0]])  # [in, out]
    qweight = pack_words(q, 8, 0)
    assert qweight[0].tolist() == [0xFFC8140A - (1 << 32), 0x04030201, 0, 0]
    qzeros = gptq_qzeros(torch.tensor([[128, 7, 0, 255]]), 8, "gptq")
    assert qzeros.tolist() == [[0xFDFF067F - (1 << 32)]]  # 0xFF000780 - 0x01010101, 0 borrows
    t = {"qweight": qweight, "qzeros": qzeros,
         "scales": torch.tensor([[-0.25, 0.0, 1.0, 2.0]], dtype=torch.float16)}
    decode, _, group, _ = gptq_layer("x", t, dict(bits=8, group_size=4, sym=False,
                                                  format="gptq"), "example")
    qq, s, o = zero_point_to_format(*decode()[:3], 8, group)
    # w = -0.25 (q - 128) = 0.25 ((255 - q) - 127): q' = 255 - q, s = 0.25, o = -31.75
    assert qq[0].tolist() == [245, 235, 55, 0] and s[:2].tolist() == [[0.25], [1.0]]
    assert o[:2].tolist() == [[-31.75], [0.0]] and qq[1].tolist() == [0, 0, 0, 0]
    assert torch.equal(qq[0].float() * 0.25 - 31.75, -0.25 * (q[:, 0] - 128).float())


# ---- tiny GPTQ checkpoints --------------------------------------------------------------------

@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    built = {}

    def get(key):
        if key not in built:
            root = tmp_path_factory.mktemp("gptq")
            src = write_gptq_model(root / "src", **SETTINGS[key])
            summary = convert(src, root / "ckpt", progress=False, verify=True)
            built[key] = (src, root / "ckpt", summary, tiny.load_safetensors_dir(src))
        return built[key]

    return get


@pytest.mark.parametrize("key", list(SETTINGS))
def test_tiny_gptq_converts_bit_exact(converted, key):
    st = SETTINGS[key]
    src, ckpt, summary, sd_src = converted(key)
    assert detect_format(src) == "gptq"
    qc, layers, sd = stored_dequant(ckpt)
    assert sorted(layers) == sorted(NAMES)
    for layer in NAMES:
        ref = gptq_spec_dequant(sd_src[f"{layer}.qweight"], sd_src[f"{layer}.qzeros"],
                                sd_src[f"{layer}.scales"], sd_src[f"{layer}.g_idx"],
                                st["bits"], st["fmt"])
        assert torch.equal(layers[layer], ref), layer
        assert bool((sd[f"{layer}.scales"] > 0).all())
    # the planted conventions are there: a zero and a negative scale
    s0 = sd_src["model.layers.0.self_attn.q_proj.scales"]
    assert bool((s0 == 0).any()) and bool((s0 < 0).any())
    floats = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]
    if st.get("arch") == "qwen2":  # biases of converted layers stay beside them, float
        floats += [f"{n}.bias" for n in NAMES if "self_attn" in n and "o_proj" not in n]
    for name in floats:
        assert sd[name].dtype == torch.float32 and torch.equal(sd[name], sd_src[name].float())
    assert qc["bits"] == st["bits"] and qc["source_format"] == "gptq"
    assert qc["block_size"] == [1, 32 if st["group_size"] == 32 else
                                64 if st["group_size"] == 64 else 128]
    assert qc["modules_not_converted"] == [] and qc["offset_dtype"] == "float32"
    assert summary["verify_worst"] == 0.0
    assert any("zero point of 0" in n for n in summary["notes"]) == (  # zero 0 in v1
        st["fmt"] == "gptq" and not st["sym"])
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "qahira"
    assert (ckpt / "tokenizer.json").is_file()
    # the product's own reader agrees
    from qahira_vllm.checkpoint import dequantized_state_dict

    ours = dequantized_state_dict(ckpt)
    assert all(torch.equal(ours[f"{n}.weight"], layers[n]) for n in NAMES)


@pytest.mark.skipif(not has_avx512(), reason="vLLM's CPU int4 kernel (cpu_gemm_wna16) needs "
                    "AVX-512; the worked examples and the spec reading above run everywhere")
@pytest.mark.parametrize("key", ["v1 4-bit asym g32", "v1 4-bit sym g32", "v2 4-bit asym g64"])
def test_4bit_matches_vllm_cpu_gptq_kernel(converted, tmp_path, key):
    """vLLM's CPU GPTQ kernel (machine: Intel Xeon with AVX-512) returns each weight rounded
    once to fp16; so must ours. Symmetric: vLLM ignores qzeros (uint4b8, zero 8). The v1
    asymmetric file goes to vLLM as its v2 twin (the same groups, zeros stored as is), since
    vLLM serves GPTQ zero points only in that form."""
    assert has_avx512()
    st = SETTINGS[key]
    src, ckpt, _, sd_src = converted(key)
    twin = tiny.load_safetensors_dir(write_gptq_model(tmp_path / "v2", **{**st, "fmt": "gptq_v2"}))
    _, layers, _ = stored_dequant(ckpt)
    for layer in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        zeros = None if st["sym"] else twin[f"{layer}.qzeros"]
        assert torch.equal(twin[f"{layer}.qweight"], sd_src[f"{layer}.qweight"])
        w = vllm_cpu_wna16_weight(sd_src[f"{layer}.qweight"], sd_src[f"{layer}.scales"], zeros,
                                  st["group_size"])
        assert torch.equal(w, layers[layer].half().float()), layer


def test_autogptq_quantize_config_json(tmp_path):
    src = write_gptq_model(tmp_path / "src", bits=4, sym=True, fmt="gptq",
                           config_file="quantize_config.json")
    assert "quantization_config" not in json.loads((src / "config.json").read_text())
    assert detect_format(src) == "gptq"
    summary = convert(src, tmp_path / "out", progress=False, verify=True)
    assert summary["verify_worst"] == 0.0 and summary["layers_converted"] == 14
    assert not (tmp_path / "out" / "quantize_config.json").exists()


# ---- refused by name, nothing written ---------------------------------------------------------

def _refused(src, out, *needles):
    with pytest.raises(QahiraFormatError) as e:
        convert(src, out, progress=False)
    assert not out.exists()
    for n in needles:
        assert n in str(e.value), str(e.value)


def test_act_order_g_idx_refused_by_layer(tmp_path):
    src = write_gptq_model(tmp_path / "src", act_order=True)
    _refused(src, tmp_path / "out", "model.layers.0.", "g_idx is not i // group_size",
             "non-contiguously", "desc_act=false")


def _edit_config(src, **changes):
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (src / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, needle", [
    (dict(bits=3), "bits=3"),
    (dict(checkpoint_format="marlin"), "'marlin'"),
    (dict(dynamic={r"+:.*\.1\..*": {"bits": 8}}), "dynamic"),
    (dict(checkpoint_format="gptq_v2", sym=True), "sym=true but the zero point"),
])
def test_unsupported_settings_refused(tmp_path, changes, needle):
    src = write_gptq_model(tmp_path / "src", bits=4, sym=True, fmt="gptq")
    _edit_config(src, **changes)
    _refused(src, tmp_path / "out", needle)


def test_scales_not_exact_in_fp16_refused_by_layer(tmp_path):
    from safetensors.torch import load_file, save_file

    src = write_gptq_model(tmp_path / "src")
    sd = load_file(str(src / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.scales"
    s = sd[name].to(torch.bfloat16)
    s[0, 5] = 1e-6  # a bf16 value below float16's normal range: it would round
    sd[name] = s
    save_file(sd, str(src / "model.safetensors"))
    _refused(src, tmp_path / "out", "model.layers.1.mlp.up_proj", "exact only for float16 scales")
