"""`qahira convert` from MLX (mlx-lm affine): the converted weights equal mlx's dequantization.

References that are not ours: models written by mlx-lm itself (mlx_lm.convert), read back by
mlx-lm's loader and dequantized by mx.dequantize with the scales and biases in float32 (so mlx
computes s q + b in fp32), mx.quantize's packing, and worked examples computed by hand from
mlx's documented layout. The stored checkpoint is dequantized with tiny.dequant_packed_ref
(written without qahira_vllm.quant_math) and compared bit for bit in fp32.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from support import tiny
from support.convert_checks import stored_dequant
from support.mlx_files import mlx_layer_params, mlx_reference, write_tiny_mlx

from qahira_vllm.convert import convert, detect_format
from qahira_vllm.convert.common import bias_to_format
from qahira_vllm.convert.mlx import unpack
from qahira_vllm.format import QahiraFormatError

LAYERS = [f"model.layers.{b}.{s}" for b in range(2) for s in tiny.LINEAR_SUFFIXES]


def _words(values: list[int], bits: int) -> torch.Tensor:
    """One row packed as mlx documents it: element j at bits j*bits.. of a little-endian
    stream of uint32 words (built with Python integers, not with the code under test)."""
    stream = sum(v << (bits * j) for j, v in enumerate(values))
    raw = stream.to_bytes(len(values) * bits // 8, "little")
    return torch.from_numpy(np.frombuffer(raw, dtype="<u4").copy())[None, :]


# ---- worked examples from mlx's documented layout (no mlx) -----------------------------------

def test_worked_example_4_bit_positive_negative_and_zero_scale():
    q = [(j * 5) % 16 for j in range(24)]  # three groups of 8
    packed = _words(q + [0] * 8, 4)[:, :3]  # 24 elements = 3 words
    assert packed.tolist()[0][0] == sum(q[j] << (4 * j) for j in range(8))
    scales = torch.tensor([[0.5, -0.25, 0.0]], dtype=torch.float16)
    biases = torch.tensor([[-1.0, 2.0, 0.75]], dtype=torch.float16)
    expected = [0.5 * v - 1.0 for v in q[:8]] + [-0.25 * v + 2.0 for v in q[8:16]] + [0.75] * 8
    qq, s, o = bias_to_format(unpack(packed, 4, 24), scales, biases, 4, 8, "example")
    assert unpack(packed, 4, 24)[0].tolist() == q
    assert s.tolist() == [[0.5, 0.25, 1.0]] and s.dtype == torch.float16
    assert o.tolist() == [[-1.0, 2.0 - 15 * 0.25, 0.75]]            # b, b - 15|s|, b
    assert qq[0].tolist() == q[:8] + [15 - v for v in q[8:16]] + [0] * 8
    w = qq[0].float() * s.float().repeat_interleave(8, 1)[0] + o.repeat_interleave(8, 1)[0]
    assert w.tolist() == expected


def test_worked_example_3_bit_elements_cross_word_boundaries():
    q = [(j * 3 + 1) % 8 for j in range(32)]  # 96 bits: element 10 spans words 0 and 1
    packed = _words(q, 3)
    assert packed.shape == (1, 3)
    assert unpack(packed, 3, 32)[0].tolist() == q
    qq, s, o = bias_to_format(unpack(packed, 3, 32),
                              torch.tensor([[-0.125]], dtype=torch.bfloat16),
                              torch.tensor([[0.5]], dtype=torch.bfloat16), 3, 32, "example")
    assert qq[0].tolist() == [7 - v for v in q] and s.tolist() == [[0.125]]
    assert o.tolist() == [[0.5 - 7 * 0.125]]


# ---- mx.quantize's own packing and mx.dequantize ---------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_matches_mx_dequantize_bit_exact(bits, group):
    import mlx.core as mx

    rng = np.random.default_rng(bits * 1000 + group)
    w = rng.normal(0, 0.08, (24, 256)).astype(np.float16)
    w[0, :group] = 0.37          # constant group: mlx writes s = -tiny, q = 0
    w[1, :group] = np.abs(w[1, :group])
    w[2, :group] = -np.abs(w[2, :group])
    qm, sm, bm = mx.quantize(mx.array(w), group_size=group, bits=bits)
    ref = np.array(mx.dequantize(qm, sm.astype(mx.float32), bm.astype(mx.float32),
                                 group_size=group, bits=bits))
    s_t = torch.from_numpy(np.array(sm))
    q, s, o = bias_to_format(unpack(torch.from_numpy(np.array(qm)), bits, 256), s_t,
                             torch.from_numpy(np.array(bm)), bits, group, "layer")
    assert bool((s_t < 0).any()) and bool((s > 0).all())  # mlx's negative scales were flipped
    assert int(q.max()) <= (1 << bits) - 1
    ours = tiny.dequant_ref(q, s, o, (1, group)).float()
    assert torch.equal(ours, torch.from_numpy(ref))


# ---- tiny models written by mlx-lm, against mlx-lm's loader + mx.dequantize ------------------

@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """key -> (mlx folder, checkpoint, summary, mlx reference), built on first use."""
    built = {}

    def get(key, **kw):
        if key not in built:
            root = tmp_path_factory.mktemp(f"mlx-{key}")
            src = write_tiny_mlx(root / "mlx", **kw)
            summary = convert(src, root / "ckpt", progress=False, verify=True)
            built[key] = (src, root / "ckpt", summary, mlx_reference(src))
        return built[key]

    return get


@pytest.mark.parametrize("bits,group", [(4, 64), (8, 32), (4, 128)])
def test_tiny_mlx_converts_bit_exact(converted, bits, group):
    src, ckpt, summary, ref = converted(f"{bits}-{group}", bits=bits, group=group)
    qc, layers, sd = stored_dequant(ckpt)
    assert sorted(layers) == sorted(LAYERS)
    assert set(mlx_layer_params(src).values()) == {(group, bits)}
    for layer in LAYERS:
        assert torch.equal(layers[layer], ref[f"{layer}.weight"]), layer
        assert bool((sd[f"{layer}.scales"] > 0).all())
    # mlx wrote negative scales (flipped here) in every layer
    src_sd = tiny.load_safetensors_dir(src)
    assert all(bool((src_sd[f"{n}.scales"] < 0).any()) for n in LAYERS)
    # the quantized embedding and head: mlx's dequantization, fp32; norms: fp16 -> fp32
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.1.post_attention_layernorm.weight"):
        assert sd[name].dtype == torch.float32 and torch.equal(sd[name], ref[name]), name
    assert qc["bits"] == bits and qc["block_size"] == [1, group]
    assert qc["source_format"] == "mlx" and qc["modules_not_converted"] == []
    assert qc["offset_dtype"] == "float32"  # b - qmax |s| needs more than fp16's 11 bits
    assert summary["verify_worst"] == 0.0
    config = json.loads((ckpt / "config.json").read_text())
    assert "quantization" not in config
    assert config["quantization_config"]["quant_method"] == "qahira"
    assert (ckpt / "tokenizer.json").read_text() == (src / "tokenizer.json").read_text()
    from qahira_vllm.checkpoint import dequantized_state_dict

    ours = dequantized_state_dict(ckpt)  # the product's own reader agrees
    assert all(torch.equal(ours[f"{n}.weight"], ref[f"{n}.weight"]) for n in LAYERS)


def test_bfloat16_scales_in_float16_range_convert_exactly(converted):
    src, ckpt, summary, ref = converted("bf16-tied", dtype="bfloat16", tie=True)
    assert tiny.load_safetensors_dir(src)["model.layers.0.mlp.up_proj.scales"].dtype == \
        torch.bfloat16
    qc, layers, sd = stored_dequant(ckpt)
    assert all(torch.equal(layers[n], ref[f"{n}.weight"]) for n in LAYERS)
    assert "lm_head.weight" not in sd and summary["verify_worst"] == 0.0  # tied, as in mlx


def test_per_layer_overrides_mixed_bits_groups_and_float_member(converted):
    """mlx-lm's per-layer quantization (config.json "quantization"[path]): down_proj 8-bit
    groups of 32, the rest 4-bit groups of 64, layer 1's v_proj left float. Stored at 8 bits
    with blocks of 32; q/k/v of layer 1 stay float (vLLM fuses them into qkv_proj)."""
    def predicate(path, module):
        if path == "model.layers.1.self_attn.v_proj":
            return False
        if path.endswith("down_proj"):
            return {"group_size": 32, "bits": 8, "mode": "affine"}
        return True

    src, ckpt, summary, ref = converted("mixed", predicate=predicate)
    params = mlx_layer_params(src)
    assert params["model.layers.0.mlp.down_proj"] == (32, 8)
    assert params["model.layers.0.mlp.up_proj"] == (64, 4)
    assert "model.layers.1.self_attn.v_proj" not in params
    qc, layers, sd = stored_dequant(ckpt)
    kept = [f"model.layers.1.self_attn.{p}" for p in ("k_proj", "q_proj", "v_proj")]
    assert summary["modules_not_converted"] == kept
    assert qc["bits"] == 8 and qc["block_size"] == [1, 32]
    assert sorted(layers) == sorted(set(LAYERS) - set(kept))
    for name, w in layers.items():
        assert torch.equal(w, ref[f"{name}.weight"]), name
    for name in kept:
        assert torch.equal(sd[f"{name}.weight"], ref[f"{name}.weight"]), name
    assert any("group sizes" in n for n in summary["notes"])
    assert any("4-bit and 8-bit" in n for n in summary["notes"])


# ---- bad inputs: refused by name, nothing written --------------------------------------------

def test_float32_scales_refused_by_tensor_name(tmp_path):
    src = write_tiny_mlx(tmp_path / "mlx", dtype="float32")
    with pytest.raises(QahiraFormatError,
                       match=r"tensor 'model\.layers\.0\.\S+\.scales' \(float32\) in .*"
                             r"model\.safetensors: .*not exact in "
                             r"float16.*offset -s z, or \|s\| qmax, is a product that rounds"):
        convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_non_affine_mode_refused(tmp_path):
    src = write_tiny_mlx(tmp_path / "mlx", bits=4, group=32, mode="mxfp4")
    with pytest.raises(QahiraFormatError,
                       match=r"module '\S+' in .*mode mxfp4.*only mode 'affine'"):
        convert(src, tmp_path / "out", progress=False)


def test_damaged_and_foreign_files_refused(tmp_path):
    src = write_tiny_mlx(tmp_path / "mlx")
    weights = src / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:100])
    with pytest.raises(QahiraFormatError, match=r"model\.safetensors: header length .* "
                                                r"exceeds the file size"):
        convert(src, tmp_path / "out", from_format="mlx", progress=False)
    # a tensor transformers' Llama does not have (another naming scheme): refused by name
    from safetensors.torch import save_file

    weights.write_bytes(good)
    sd = tiny.load_safetensors_dir(src)
    sd["model.layers.0.attention.wq.weight"] = sd.pop("model.layers.0.self_attn.q_proj.weight")
    save_file(sd, str(weights), metadata={"format": "mlx"})
    with pytest.raises(QahiraFormatError, match=r"'model\.layers\.0\.attention\.wq\.weight' "
                                                r"in .*not a parameter of transformers' Llama"):
        convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_detect_format_and_cli_verify(tmp_path, capsys):
    from qahira_vllm.cli import main

    src = write_tiny_mlx(tmp_path / "mlx", bits=8, group=128)
    assert detect_format(src) == "mlx"
    assert main(["convert", str(src), str(tmp_path / "out"), "--verify", "--no-progress"]) == 0
    assert "model.layers.1.mlp.down_proj: max |W_qahira - W_source| = 0" in capsys.readouterr().out
