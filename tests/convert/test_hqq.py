"""`qahira convert` from HQQ (axis 1): the converted weights equal hqq's own dequantization.

References that are not ours: models quantized and saved by hqq itself (AutoHQQHFModel,
HQQLinear, save_to_safetensors), dequantized by hqq from its in-memory quantized model
(Quantizer.dequantize: in float32 for the bit-exact comparison, and in the model's float16 as
hqq runs it, against the stated bound), hqq's BitPack packers, and worked examples computed by
hand from hqq's packing layout. The stored checkpoint is dequantized with
tiny.dequant_packed_ref (written without qahira_vllm.quant_math).
"""

from __future__ import annotations

import json

import pytest
import torch

from support import tiny
from support.convert_checks import stored_dequant
from support.hqq_files import write_tiny_hqq

from qahira_vllm.convert import convert, detect_format
from qahira_vllm.convert.common import bias_to_format
from qahira_vllm.convert.hqq import unpack
from qahira_vllm.format import QahiraFormatError

LAYERS = [f"model.layers.{b}.{s}" for b in range(2) for s in tiny.LINEAR_SUFFIXES]


# ---- worked examples from hqq's packing layout (no hqq) --------------------------------------

def test_worked_example_4bit_u8_rows_and_float_zero():
    # 4 groups of 8 (a [2, 16] layer, axis 1): packed rows r hold group r in the high nibble
    # and group r + 2 in the low nibble
    q = [[(r * 8 + j) * 3 % 16 for j in range(8)] for r in range(4)]
    packed = torch.tensor([[q[r][j] << 4 | q[r + 2][j] for j in range(8)] for r in range(2)],
                          dtype=torch.uint8)
    assert unpack(packed, "4bit_u8", 4).tolist() == q
    s = torch.tensor([0.25, 0.5, 0.125, 1.5], dtype=torch.float16).reshape(2, 2)
    z = torch.tensor([7.5, 3.25, 8.0, 0.1], dtype=torch.float16).reshape(2, 2)
    w_q = torch.tensor(q, dtype=torch.uint8).reshape(2, 16)  # group g of row o: [o, 8g..8g+7]
    exact = -(s.double() * z.double())
    qq, scales, offsets = bias_to_format(w_q, s, exact, 4, 8, "example", round_offsets=True)
    assert torch.equal(qq, w_q) and torch.equal(scales, s)
    z01 = float(torch.tensor(0.1, dtype=torch.float16))  # 0.0999755859375: fp16's 0.1
    assert offsets.tolist() == [[-1.875, -1.625], [-1.0, -1.5 * z01]]  # -s z, exact in fp32
    w = [[(q[o * 2 + g][j] - z[o, g].item()) * s[o, g].item() for g in range(2) for j in range(8)]
         for o in range(2)]
    ours = tiny.dequant_ref(qq, scales, offsets, (1, 8))
    assert torch.equal(ours.float(), torch.tensor(w, dtype=torch.float64).float())


def test_worked_example_3bit_32_padded_rows():
    q = [[(r + 2 * j) % 8 for j in range(4)] for r in range(3)]  # 3 groups, padded to 10 rows
    packed = torch.tensor([[sum(q[i][j] << (27 - 3 * i) for i in range(3)) for j in range(4)]],
                          dtype=torch.int32)
    assert unpack(packed, "3bit_32", 3).tolist() == q


# ---- hqq's own packers -----------------------------------------------------------------------

@pytest.mark.parametrize("packing,bits", [("8bit_u8", 8), ("4bit_u8", 4), ("3bit_32", 3),
                                          ("2bit_u8", 2), ("1bit_u8", 1)])
def test_unpack_inverts_hqq_bitpack(packing, bits):
    from hqq.core.bitpack import BitPack

    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 1 << bits, (40, 32), generator=g, dtype=torch.uint8)
    packed = getattr(BitPack, f"pack_{packing}")(q if bits != 3 else q.to(torch.int32))
    assert torch.equal(unpack(packed, packing, 40), q)


# ---- tiny models quantized by hqq, against hqq's own dequantization --------------------------

@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """key -> (hqq folder, checkpoint, summary, HQQReference), built on first use."""
    built = {}

    def get(key, **kw):
        if key not in built:
            root = tmp_path_factory.mktemp(f"hqq-{key}")
            src, ref = write_tiny_hqq(root / "hqq", **kw)
            summary = convert(src, root / "ckpt", progress=False, verify=True)
            built[key] = (src, root / "ckpt", summary, ref)
        return built[key]

    return get


@pytest.mark.parametrize("nbits,group", [(4, 64), (8, 32), (3, 128), (2, 64)])
def test_tiny_hqq_converts_bit_exact_to_hqq_fp32(converted, nbits, group):
    src, ckpt, summary, ref = converted(f"{nbits}-{group}", nbits=nbits, group=group)
    qc, layers, sd = stored_dequant(ckpt)
    assert sorted(layers) == sorted(LAYERS)
    for layer in LAYERS:
        assert torch.equal(layers[layer], ref.fp32[f"{layer}.weight"]), layer
        assert bool((sd[f"{layer}.scales"] > 0).all())
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert sd[name].dtype == torch.float32 and torch.equal(sd[name], ref.fp32[name]), name
    assert qc["bits"] == (4 if nbits <= 4 else 8) and qc["block_size"] == [1, group]
    assert qc["source_format"] == "hqq" and qc["offset_dtype"] == "float32"
    assert summary["verify_worst"] == 0.0 and summary["notes"] == []  # -s z exact in fp32
    config = json.loads((ckpt / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "qahira"
    assert (ckpt / "tokenizer.json").read_text() == (src / "tokenizer.json").read_text()


def test_hqq_native_fp16_dequantization_within_stated_bound(converted):
    """hqq runs fl16(fl16(q - z) s): within 2**-10 |s| |q - z| (1 + 2**-8) + 2**-24 of the
    converted (exact, once-rounded fp32) weights, and not equal to them."""
    src, ckpt, summary, ref = converted("4-64", nbits=4, group=64)
    _, layers, _ = stored_dequant(ckpt)
    differs = False
    for layer in LAYERS:
        q, s, z = ref.qz[layer]
        g = q.shape[1] // s.shape[1]
        t = (q - z.repeat_interleave(g, 1)).abs() * s.repeat_interleave(g, 1).abs()
        bound = 2.0 ** -10 * t * (1 + 2.0 ** -8) + 2.0 ** -24
        diff = (layers[layer].double() - ref.native[layer].double()).abs()
        assert bool((diff <= bound).all()), layer
        differs |= bool((diff > 0).any())
    assert differs


def test_bfloat16_compute_dtype_converts_exactly(converted):
    src, ckpt, summary, ref = converted("bf16", compute_dtype=torch.bfloat16)
    assert tiny.load_safetensors_dir(src)["model.layers.0.mlp.up_proj.scale"].dtype == \
        torch.bfloat16
    _, layers, _ = stored_dequant(ckpt)
    assert all(torch.equal(layers[n], ref.fp32[f"{n}.weight"]) for n in LAYERS)
    assert summary["verify_worst"] == 0.0


def test_per_tag_configs_mixed_bits_and_float_member(converted):
    """hqq's per-tag quant_config: down_proj 8-bit groups of 32, the rest 4-bit groups of 64,
    v_proj not quantized: stored at 8 bits, blocks of 32, q/k/v kept float (vLLM's qkv_proj)."""
    four = {"nbits": 4, "group_size": 64, "axis": 1}
    per_tag = {"self_attn.q_proj": four, "self_attn.k_proj": four, "self_attn.v_proj": None,
               "self_attn.o_proj": four, "mlp.gate_proj": four, "mlp.up_proj": four,
               "mlp.down_proj": {"nbits": 8, "group_size": 32, "axis": 1}}
    src, ckpt, summary, ref = converted("mixed", per_tag=per_tag, hf_config=False)
    assert detect_format(src) == "hqq"  # hqq's own output: no quantization_config
    qc, layers, sd = stored_dequant(ckpt)
    kept = sorted(f"model.layers.{b}.self_attn.{p}" for b in range(2)
                  for p in ("k_proj", "q_proj", "v_proj"))
    assert summary["modules_not_converted"] == kept
    assert qc["bits"] == 8 and qc["block_size"] == [1, 32]
    assert sorted(layers) == sorted(set(LAYERS) - set(kept))
    for name, w in layers.items():
        assert torch.equal(w, ref.fp32[f"{name}.weight"]), name
    for name in kept:  # q/k: hqq's dequantization; v: hqq left it float16
        assert torch.equal(sd[f"{name}.weight"], ref.fp32[f"{name}.weight"]), name


# ---- bad inputs: refused by name, nothing written --------------------------------------------

def test_axis_0_refused_by_layer_name(tmp_path):
    src, _ = write_tiny_hqq(tmp_path / "hqq", axis=0)
    with pytest.raises(QahiraFormatError, match=r"module 'model\.layers\.0\.\S+' in .*axis=0.*"
                                                r"only axis=1"):
        convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_float32_scales_refused_by_tensor_name(tmp_path):
    src, _ = write_tiny_hqq(tmp_path / "hqq", compute_dtype=torch.float32)
    with pytest.raises(QahiraFormatError, match=r"tensor 'model\.layers\.0\.\S+\.scales' "
                                                r"\(float32\).*offset -s z, or \|s\| qmax, is a product that rounds"):
        convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_pickled_qmodel_refused(tmp_path):
    src = tmp_path / "pt"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(tiny.build_config().to_dict()))
    torch.save({}, src / "qmodel.pt")
    assert detect_format(src) == "hqq"
    with pytest.raises(QahiraFormatError, match=r"qmodel\.pt: hqq's pickled format.*"
                                                r"save_to_safetensors"):
        convert(src, tmp_path / "out", progress=False)


def test_detect_format_and_cli_verify(converted, tmp_path, capsys):
    from qahira_vllm.cli import main

    src, *_ = converted("4-64", nbits=4, group=64)
    assert detect_format(src) == "hqq"
    assert main(["convert", str(src), str(tmp_path / "out"), "--verify", "--no-progress"]) == 0
    assert "model.layers.1.mlp.down_proj: max |W_qahira - W_source| = 0" in capsys.readouterr().out
