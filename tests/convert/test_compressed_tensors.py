"""`qahira convert` from compressed-tensors: the converted weights equal the library's own
dequantization.

References that are not ours: checkpoints written by compressed-tensors' own compressor
(ModelCompressor.compress_model, the lifecycle llm-compressor saves with), decoded by its own
compressors' decompress (support.ct_files.ct_reference) and by transformers loading the
checkpoint (its compressed-tensors quantizer), and a worked example packed by hand from the
pack-quantized layout. The stored checkpoint is dequantized with tiny.dequant_packed_ref
(written without qahira_vllm.quant_math) and compared bit for bit in fp32.
"""

from __future__ import annotations

import json

import pytest
import torch

from support import tiny
from support.convert_checks import stored_dequant
from support.ct_files import ct_reference, write_ct_checkpoint

from qahira_vllm.convert import convert, detect_format
from qahira_vllm.convert.common import zero_point_to_format
from qahira_vllm.convert.compressed_tensors import decode_layer, library_dequantize
from qahira_vllm.format import QahiraFormatError

LAYERS = tiny.linear_layer_names(2)

# name -> (write_ct_checkpoint kwargs, expected stored bits, block, offset dtype)
CASES = {
    "w4a16_sym_group": (dict(bits=4), 4, [1, 32], "float16"),
    "w4a16_asym_group": (dict(bits=4, symmetric=False), 4, [1, 32], "float32"),
    "w8a16_sym_group": (dict(bits=8, group_size=64), 8, [1, 64], "float16"),
    "w8a16_asym_group_fp16": (dict(bits=8, symmetric=False, dtype=torch.float16), 8,
                              [1, 32], "float32"),
    "w4a16_sym_channel": (dict(bits=4, strategy="channel"), 4, [1, 128], "float16"),
    "naive_w8_asym": (dict(bits=8, symmetric=False, fmt="naive-quantized"), 8, [1, 32],
                      "float32"),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """case -> (source folder, checkpoint, summary), built on first use."""
    built = {}

    def get(case):
        if case not in built:
            root = tmp_path_factory.mktemp(case)
            src = write_ct_checkpoint(root / "src", **CASES[case][0])
            built[case] = (src, root / "ckpt", convert(src, root / "ckpt", progress=False,
                                                        verify=True))
        return built[case]

    return get


# ---- a worked example from the pack-quantized layout (no compressed-tensors writer) ----------

def _pack4(values: list[int]) -> int:
    """8 unsigned nibbles -> one int32 word, value k in bits 4k..4k+3."""
    word = sum(v << (4 * k) for k, v in enumerate(values))
    return word - (1 << 32) if word >= 1 << 31 else word


@pytest.mark.parametrize("scale", [0.5, -0.25])
def test_worked_example_pack_quantized_asym(scale):
    from compressed_tensors.quantization import QuantizationScheme

    from support.ct_files import scheme_args

    q = [-8, -1, 0, 1, 7, 3, -4, 2]                  # signed 4-bit values, one group of 8
    z = 1                                            # signed zero point
    t = {"weight_packed": torch.tensor([[_pack4([v + 8 for v in q])]], dtype=torch.int32),
         "weight_scale": torch.tensor([[scale]], dtype=torch.bfloat16),
         # zero points are packed along the output dim: row 0 is value 0 of the word
         "weight_zero_point": torch.tensor([[_pack4([z + 8])]], dtype=torch.int32),
         "weight_shape": torch.tensor([1, 8])}
    scheme = QuantizationScheme(targets=["Linear"], weights=scheme_args(4, 8, symmetric=False))
    expected = torch.tensor([[scale * (v - z) for v in q]])          # w = s (q - z)
    q_u, s, z_u, g = decode_layer(t, scheme, "pack-quantized", "example")
    assert q_u.tolist() == [[v + 8 for v in q]] and z_u.tolist() == [[9]] and g == 8
    qq, scales, offsets = zero_point_to_format(q_u, s.float(), z_u, 4, g)
    if scale > 0:   # q' = q + 8, o = -s (z + 8)
        assert qq.tolist() == [[v + 8 for v in q]] and offsets.tolist() == [[-4.5]]
    else:           # q' = 15 - (q + 8), o = -|s| (15 - (z + 8))
        assert qq.tolist() == [[7 - v for v in q]] and offsets.tolist() == [[-1.5]]
    assert scales.tolist() == [[abs(scale)]]
    assert torch.equal(qq.float() * abs(scale) + offsets, expected)
    assert torch.equal(library_dequantize(t, scheme, "pack-quantized"), expected)


# ---- tiny checkpoints written by compressed-tensors, against its own decoder ----------------

@pytest.mark.parametrize("case", list(CASES))
def test_tiny_checkpoint_converts_bit_exact(converted, case):
    src, ckpt, summary = converted(case)
    kwargs, bits, block, offset_dtype = CASES[case]
    qc, layers, sd = stored_dequant(ckpt)
    ref = ct_reference(src)
    assert sorted(layers) == sorted(LAYERS) == sorted(ref)
    for layer in LAYERS:
        assert torch.equal(layers[layer], ref[layer]), layer
        assert bool((sd[f"{layer}.scales"] > 0).all())
    # the library's own output in the stored scale dtype is ours rounded once to that dtype
    native = ct_reference(src, fp32_scales=False)
    scale_dtype = kwargs.get("dtype", torch.bfloat16)
    assert all(torch.equal(layers[n].to(scale_dtype), native[n]) for n in LAYERS)
    assert qc["bits"] == bits and qc["block_size"] == block
    assert qc["offset_dtype"] == offset_dtype and qc["modules_not_converted"] == []
    assert qc["source_format"] == "compressed-tensors"
    assert summary["verify_worst"] == 0.0
    # float tensors: the source's values, widened to fp32 (exact)
    from safetensors.torch import load_file

    raw = load_file(str(src / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert sd[name].dtype == torch.float32 and torch.equal(sd[name], raw[name].float())
    config = json.loads((ckpt / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "qahira"
    # the product's own reader agrees (quant_math.dequantize)
    from qahira_vllm.checkpoint import dequantized_state_dict

    ours = dequantized_state_dict(ckpt)
    assert all(torch.equal(ours[f"{n}.weight"], ref[n]) for n in LAYERS)


def test_transformers_loading_agrees(converted):
    """transformers' compressed-tensors loading (fp32 model, decompressed on first forward)
    gives the same weights as the converted checkpoint."""
    from transformers import AutoModelForCausalLM

    src, ckpt, _ = converted("w4a16_asym_group")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model(torch.tensor([[1, 2, 3]]))  # compressed-tensors decompresses on the first forward
    hf = model.state_dict()
    _, layers, _ = stored_dequant(ckpt)
    assert all(torch.equal(layers[n], hf[f"{n}.weight"]) for n in LAYERS)


def test_negative_and_zero_scales(tmp_path):
    def edit(sd):
        s = sd["model.layers.0.self_attn.q_proj.weight_scale"]
        s[:4] = -s[:4]           # an equally valid file: those rows negated
        s[5, 1] = 0.0            # a group of zeros
        sd["model.layers.1.mlp.down_proj.weight_scale"][2:7] *= -1

    src = write_ct_checkpoint(tmp_path / "src", bits=4, symmetric=False, edit=edit)
    summary = convert(src, tmp_path / "ckpt", progress=False, verify=True)
    assert summary["verify_worst"] == 0.0
    _, layers, sd = stored_dequant(tmp_path / "ckpt")
    ref = ct_reference(src)
    assert all(torch.equal(layers[n], ref[n]) for n in LAYERS)
    q = "model.layers.0.self_attn.q_proj"
    assert bool((ref[q][:4] != 0).any()) and bool((ref[q][5, 32:64] == 0).all())
    assert sd[f"{q}.scales"][5, 1].item() == 1.0 and bool((sd[f"{q}.scales"] > 0).all())


def test_contiguous_g_idx_converts_shuffled_refused(tmp_path):
    src = write_ct_checkpoint(tmp_path / "ok", actorder="group")
    convert(src, tmp_path / "ok-ckpt", progress=False)
    _, layers, _ = stored_dequant(tmp_path / "ok-ckpt")
    ref = ct_reference(src)
    assert all(torch.equal(layers[n], ref[n]) for n in LAYERS)

    bad = write_ct_checkpoint(tmp_path / "bad", actorder="group", g_idx_shuffle=True)
    with pytest.raises(QahiraFormatError, match=r"layer 'model\.layers\.\d\..*weight_g_idx.*"
                                                r"not contiguous"):
        convert(bad, tmp_path / "bad-ckpt", progress=False)
    assert not (tmp_path / "bad-ckpt").exists()


# ---- scales that float16 does not hold: refused by tensor name, nothing rounded -------------

def test_fp32_scales_refused_by_tensor_name(tmp_path):
    src = write_ct_checkpoint(tmp_path / "src", dtype=torch.float32)
    with pytest.raises(QahiraFormatError, match=r"tensor 'model\.layers\.0\.mlp\.down_proj\."
                                                r"weight_scale'.*\(float32\).*not exact in "
                                                r"float16.*offset -s z, or \|s\| qmax, is a product that rounds"):
        convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_bf16_scale_below_float16_precision_refused(tmp_path):
    def edit(sd):  # 2**-30 * 1.5 is a bf16 number; float16's smallest subnormal is 2**-24
        sd["model.layers.1.self_attn.v_proj.weight_scale"][3, 2] = 1.5 * 2.0**-30

    src = write_ct_checkpoint(tmp_path / "src", edit=edit)
    with pytest.raises(QahiraFormatError, match=r"'model\.layers\.1\.self_attn\.v_proj\."
                                                r"weight_scale'.*\(bfloat16\) in .*: 1 of 256 "
                                                r"scales.*\[3, 2\]"):
        convert(src, tmp_path / "out", progress=False)


# ---- schemes and configs that are refused -------------------------------------------------

def test_activation_quantized_scheme_refused_by_layer_name(tmp_path):
    from support.ct_files import scheme_args

    acts = scheme_args(8, None, strategy="token", dynamic=True)
    src = write_ct_checkpoint(tmp_path / "src", bits=8, strategy="channel",
                              input_activations=acts, fmt="int-quantized")
    assert detect_format(src) == "compressed-tensors"
    with pytest.raises(QahiraFormatError, match=r"layer 'model\.layers\.0\.self_attn\.q_proj'"
                                                r".*int-quantized.*quantizes activations"):
        convert(src, tmp_path / "out", progress=False)


@pytest.mark.parametrize("key,value,why", [
    ("transform_config", {"config_groups": {"u": {"type": "hadamard"}}}, "rotated weights"),
    ("kv_cache_scheme", {"num_bits": 8, "type": "float"}, "KV cache"),
    ("quantization_status", "frozen", "not stored compressed")])
def test_whole_model_refusals_name_config(tmp_path, converted, key, value, why):
    import shutil

    src, _, _ = converted("w4a16_sym_group")
    copy = tmp_path / "src"
    shutil.copytree(src, copy)
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"][key] = value
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(QahiraFormatError, match=rf"config\.json quantization_config.*{why}"):
        convert(copy, tmp_path / "out", progress=False)


# ---- layers that stay float ---------------------------------------------------------------

def test_quantized_lm_head_and_float_member_of_fused_group(tmp_path):
    src = write_ct_checkpoint(tmp_path / "src", ignore=["re:.*layers\\.0\\.self_attn\\.k_proj$"])
    summary = convert(src, tmp_path / "ckpt", progress=False, verify=True)
    kept = [f"model.layers.0.self_attn.{p}" for p in ("k_proj", "q_proj", "v_proj")]
    assert summary["modules_not_converted"] == kept  # vLLM serves q/k/v as one layer
    assert any("qkv_proj" in n for n in summary["notes"])
    qc, layers, sd = stored_dequant(tmp_path / "ckpt")
    ref = ct_reference(src)
    from safetensors.torch import load_file

    raw = load_file(str(src / "model.safetensors"))
    assert len(layers) == 11 and all(torch.equal(w, ref[n]) for n, w in layers.items())
    assert "lm_head.weight_packed" in raw                   # the head was quantized ...
    assert torch.equal(sd["lm_head.weight"], ref["lm_head"])  # ... and is stored dequantized
    for name in kept[1:]:
        assert torch.equal(sd[f"{name}.weight"], ref[name])
    assert torch.equal(sd[f"{kept[0]}.weight"], raw[f"{kept[0]}.weight"].float())


def test_cli_detects_and_verifies(converted, tmp_path, capsys):
    from qahira_vllm.cli import main

    src, _, _ = converted("w4a16_sym_group")
    assert detect_format(src) == "compressed-tensors"
    assert main(["convert", str(src), str(tmp_path / "out"), "--verify", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj: max |W_qahira - W_source| = 0" in out
