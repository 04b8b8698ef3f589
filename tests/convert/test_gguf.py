"""`qahira convert` from GGUF: the converted weights equal the source's own dequantization.

References that are not ours: gguf-py's dequantizer as transformers' GGUF loader applies it
(load_gguf_checkpoint: names, Llama's q/k un-permutation), the blocks written by gguf-py's
quantizers (GGUFWriter), and worked examples computed by hand from the llama.cpp block layouts.
The stored checkpoint is dequantized with tiny.dequant_packed_ref (written without
qahira_vllm.quant_math) and compared bit for bit in fp32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from support import tiny
from support.convert_checks import stored_dequant
from support.gguf_files import (K_MIXES, flip_d, linear_shapes, random_k_quant,
                                smollm2_converted, transformers_gguf_tensors, write_k_mix_gguf,
                                write_tiny_gguf)

from qahira_vllm.convert import convert, detect_format
from qahira_vllm.convert.gguf import decode_blocks, to_format
from qahira_vllm.format import QahiraFormatError

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def gguf_d(path, name, type_name) -> np.ndarray:
    """The fp16 d of every block of one tensor, read from the raw bytes."""
    import gguf

    (t,) = [t for t in gguf.GGUFReader(str(path)).tensors if t.name == name]
    size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][1]
    raw = np.asarray(t.data)
    return raw.reshape(raw.shape[0], -1, size)[..., 0:2].copy().view(np.float16)[..., 0]


# ---- worked examples from the block layouts (no gguf-py, no transformers) -------------------

def _block(d: float, payload: list[int], m: float | None = None) -> np.ndarray:
    head = np.array([d], dtype=np.float16).view(np.uint8)
    if m is not None:
        head = np.concatenate([head, np.array([m], dtype=np.float16).view(np.uint8)])
    return np.concatenate([head, np.array(payload, dtype=np.uint8)])[None, :]


def test_worked_example_q4_0_negative_d():
    q = [(j * 5) % 16 for j in range(32)]           # 4-bit values, element j
    payload = [q[j] | (q[j + 16] << 4) for j in range(16)]  # low nibble j, high nibble j + 16
    raw = _block(-0.5, payload)
    expected = torch.tensor([-0.5 * (v - 8) for v in q])  # w = d (q - 8)
    qq, scales, offsets = to_format(*decode_blocks(raw, "Q4_0"), "Q4_0", "example")
    assert scales.tolist() == [[0.5]] and offsets.tolist() == [[-3.5]]   # |d|, -7|d|
    assert qq[0].tolist() == [15 - v for v in q]
    assert torch.equal(qq[0].float() * 0.5 - 3.5, expected)


def test_worked_example_q8_0_negative_d_full_int8_range():
    x = [-128, 127, 0, -1, 1] + list(range(-60, 60, 4))[:27]
    raw = _block(-0.25, [v & 0xFF for v in x])
    qq, scales, offsets = to_format(*decode_blocks(raw, "Q8_0"), "Q8_0", "example")
    # w = d x with d < 0: w = |d| (-x) = |d| ((127 - x) - 127), so q' = 127 - x (0..255 for
    # every int8 x, -128 included) and offset -127 |d|.
    assert scales.tolist() == [[0.25]] and offsets.tolist() == [[-31.75]]
    assert qq[0].tolist() == [127 - v for v in x]
    assert torch.equal(qq[0].float() * 0.25 - 31.75, torch.tensor([-0.25 * v for v in x]))


def test_worked_example_q5_1_and_zero_d():
    q = [(j * 7) % 32 for j in range(32)]
    qh = sum(((v >> 4) & 1) << j for j, v in enumerate(q))   # bit j = bit 4 of element j
    payload = list(np.array([qh], dtype="<u4").view(np.uint8)) + [
        (q[j] & 15) | ((q[j + 16] & 15) << 4) for j in range(16)]
    raw = np.concatenate([_block(0.125, payload, m=-1.5), _block(0.0, payload, m=2.25)], axis=1)
    qq, scales, offsets = to_format(*decode_blocks(raw, "Q5_1"), "Q5_1", "example")
    assert qq[0, :32].tolist() == q and qq[0, 32:].tolist() == [0] * 32
    assert scales.tolist() == [[0.125, 1.0]] and offsets.tolist() == [[-1.5, 2.25]]


# ---- tiny GGUF files written by gguf-py, one per type, against transformers ------------------

@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """type -> (gguf file, checkpoint, summary, transformers' tensors), built on first use."""
    built = {}

    def get(type_name):
        if type_name not in built:
            root = tmp_path_factory.mktemp(f"gguf-{type_name}")
            src = write_tiny_gguf(root / "tiny.gguf", type_name)
            summary = convert(src, root / "ckpt", progress=False, verify=True)
            built[type_name] = (src, root / "ckpt", summary, transformers_gguf_tensors(src))
        return built[type_name]

    return get


@pytest.mark.parametrize("type_name", TYPES)
def test_tiny_gguf_converts_bit_exact(converted, type_name):
    src, ckpt, summary, ref = converted(type_name)
    qc, layers, sd = stored_dequant(ckpt)
    names = [f"model.layers.{b}.{s}" for b in range(2) for s in tiny.LINEAR_SUFFIXES]
    assert sorted(layers) == sorted(names)
    for layer in names:
        assert torch.equal(layers[layer], ref[f"{layer}.weight"]), layer
        assert bool((sd[f"{layer}.scales"] > 0).all())
    # the blocks that need the conventions are there: d = 0, and d < 0 for the signed types
    d = gguf_d(src, "blk.0.attn_q.weight", type_name)
    assert (d == 0).any()
    assert bool((d < 0).any()) == (type_name in ("Q4_0", "Q5_0", "Q8_0"))
    # float tensors: transformers' values, fp32 (exact), untied head included
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.1.post_attention_layernorm.weight"):
        assert sd[name].dtype == torch.float32 and torch.equal(sd[name], ref[name]), name
    assert qc["bits"] == (4 if type_name.startswith("Q4") else 8)
    assert qc["block_size"] == [1, 32] and qc["modules_not_converted"] == []
    # only format-1 types: format 1, with exactly format 1's keys (as before format 2 existed)
    assert qc["format_version"] == 1 and summary["format_version"] == 1
    assert sorted(qc) == sorted(["quant_method", "format_version", "bits", "block_size",
                                 "offset_dtype", "modules_not_converted", "source_format",
                                 "source_model", "source_types", "created_by"])
    assert sd["model.layers.0.self_attn.q_proj.scales"].dtype == torch.float16
    # offsets: affine types copy m (fp16); signed types with d < 0 need -7|d| etc. (fp32)
    assert qc["offset_dtype"] == ("float16" if type_name in ("Q4_1", "Q5_1") else "float32")
    assert summary["verify_worst"] == 0.0
    # the product's own reader agrees (quant_math.dequantize)
    from qahira_vllm.checkpoint import dequantized_state_dict

    ours = dequantized_state_dict(ckpt)
    assert all(torch.equal(ours[f"{n}.weight"], ref[f"{n}.weight"]) for n in names)


def test_q4_0_positive_d_offsets_exact_in_fp16(tmp_path):
    """-8d is exact in float16, so a Q4_0 file whose d are all positive keeps fp16 offsets;
    forcing float16 on a file with negative d reports the rounding of -7|d|."""
    import gguf

    rng = np.random.default_rng(3)
    overrides = {}
    for b in range(2):
        for name, shape in linear_shapes().items():
            w = np.abs(rng.normal(0, 0.08, shape)).astype(np.float32) * -1  # max |w| < 0: d > 0
            overrides[f"blk.{b}.{name}.weight"] = (
                gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_0), "Q4_0")
    src = write_tiny_gguf(tmp_path / "pos.gguf", "Q4_0", overrides=overrides)
    summary = convert(src, tmp_path / "pos", progress=False)
    assert summary["offset_dtype"] == "float16" and summary["offset_rounding_max"] == 0.0
    _, layers, _ = stored_dequant(tmp_path / "pos")
    ref = transformers_gguf_tensors(src)
    assert all(torch.equal(w, ref[f"{n}.weight"]) for n, w in layers.items())

    neg = write_tiny_gguf(tmp_path / "neg.gguf", "Q4_0")
    forced = convert(neg, tmp_path / "neg16", progress=False, offset_dtype="float16")
    assert forced["offset_dtype"] == "float16" and forced["offset_rounding_max"] > 0
    qc, _, sd = stored_dequant(tmp_path / "neg16")
    assert sd["model.layers.0.self_attn.q_proj.offsets"].dtype == torch.float16


def test_mixed_4_and_8_bit_types_store_8_bit(tmp_path):
    import gguf

    rng = np.random.default_rng(5)
    w = rng.normal(0, 0.08, linear_shapes()["ffn_down"]).astype(np.float32)
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    src = write_tiny_gguf(tmp_path / "mix.gguf", "Q4_1",
                          overrides={"blk.1.ffn_down.weight": (raw, "Q8_0")})
    summary = convert(src, tmp_path / "mix", progress=False)
    assert summary["bits"] == 8 and any("8 bits" in n for n in summary["notes"])
    qc, layers, _ = stored_dequant(tmp_path / "mix")
    ref = transformers_gguf_tensors(src)
    assert len(layers) == 14
    assert all(torch.equal(w, ref[f"{n}.weight"]) for n, w in layers.items())


def test_float_linear_layer_keeps_its_fused_group_float(tmp_path):
    rng = np.random.default_rng(6)
    w = rng.normal(0, 0.08, linear_shapes()["attn_k"]).astype(np.float32)
    src = write_tiny_gguf(tmp_path / "f.gguf", "Q4_1",
                          overrides={"blk.0.attn_k.weight": (w, "F32")})
    summary = convert(src, tmp_path / "f", progress=False)
    kept = [f"model.layers.0.self_attn.{p}" for p in ("k_proj", "q_proj", "v_proj")]
    assert summary["modules_not_converted"] == kept  # vLLM serves q/k/v as one layer
    qc, layers, sd = stored_dequant(tmp_path / "f")
    ref = transformers_gguf_tensors(src)
    assert len(layers) == 11
    for name in kept:
        assert torch.equal(sd[f"{name}.weight"], ref[f"{name}.weight"])


# ---- K-quants (format 2): decoders against gguf-py and hand-built super-blocks --------------

def _kq(raw: np.ndarray, type_name: str):
    """(q', s, o) of raw K-quant rows through the reader's decode and conventions, and
    gguf-py's own dequantization of the same bytes (fp32)."""
    import gguf

    ref = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name]))
    return (*to_format(*decode_blocks(raw, type_name), type_name, "example"), ref)


def _w(q, s, o) -> torch.Tensor:
    """s q' + o per element in fp32 (product, then sum)."""
    bi = q.shape[1] // s.shape[1]
    return q.float() * s.repeat_interleave(bi, 1) + o.repeat_interleave(bi, 1)


@pytest.mark.parametrize("type_name", K_TYPES)
def test_k_quant_random_blocks_equal_gguf_dequantize(type_name):
    rng = np.random.default_rng(11)
    raw = random_k_quant(rng, (16, 768), type_name)
    q, s, o, ref = _kq(raw, type_name)
    sub = 32 if type_name in ("Q4_K", "Q5_K") else 16
    assert q.shape == (16, 768) and s.shape == o.shape == (16, 768 // sub)
    assert s.dtype == torch.float32 and bool((s > 0).all())
    assert int(q.max()) <= {"Q2_K": 3, "Q3_K": 7, "Q4_K": 15, "Q5_K": 31, "Q6_K": 63}[type_name]
    assert torch.equal(_w(q, s, o), ref)  # as values: gguf's -0.0 may come out +0.0


def _pack_q4_k_scales(sc: list[int], mn: list[int]) -> list[int]:
    """llama.cpp's 12-byte 6-bit packing of 8 scales and 8 mins (get_scale_min_k4 inverted)."""
    b = [0] * 12
    for j in range(4):
        b[j] = sc[j] | (sc[j + 4] >> 4) << 6
        b[j + 4] = mn[j] | (mn[j + 4] >> 4) << 6
        b[j + 8] = (sc[j + 4] & 15) | (mn[j + 4] & 15) << 4
    return b


def _pack_nibbles_q4_k(q: list[int]) -> list[int]:
    """dequantize_row_q4_K's order: byte 32 c + l holds element 64 c + l (low nibble) and
    64 c + 32 + l (high nibble)."""
    out = [0] * 128
    for e, v in enumerate(q):
        c, r = divmod(e, 64)
        out[32 * c + r % 32] |= v << (4 * (r // 32))
    return out


def _fp16_bytes(*values: float) -> list[int]:
    return list(np.array(values, dtype=np.float16).view(np.uint8))


def test_worked_example_q4_k_zero_and_max_scales():
    sc, mn = [63, 0, 1, 32, 48, 0, 17, 63], [0, 63, 5, 40, 33, 63, 2, 16]
    q = [(e * 3) % 16 for e in range(256)]
    d, dmin = 0.25, -0.125
    raw = np.array(_fp16_bytes(d, dmin) + _pack_q4_k_scales(sc, mn) + _pack_nibbles_q4_k(q),
                   dtype=np.uint8)[None]
    qq, s, o, ref = _kq(raw, "Q4_K")
    # w = d sc q - dmin mn per sub-block of 32 (float64 holds it exactly; one fp32 rounding)
    exact = torch.tensor([d * sc[e // 32] * q[e] - dmin * mn[e // 32] for e in range(256)],
                         dtype=torch.float64)[None]
    assert torch.equal(ref, exact.float()) and torch.equal(_w(qq, s, o), ref)
    assert s[0].tolist() == [15.75, 1.0, 0.25, 8.0, 12.0, 1.0, 4.25, 15.75]  # sc 0 -> 1
    assert o[0].tolist() == [0.125 * m for m in mn]
    assert qq[0, 32:64].tolist() == [0] * 32 and qq[0, :32].tolist() == q[:32]
    # a negative d (no llama.cpp quantizer writes one) is refused, naming the sub-block
    neg = raw.copy()
    neg[0, 0:2] = np.array([-0.25], dtype=np.float16).view(np.uint8)
    with pytest.raises(QahiraFormatError, match=r"example \(Q4_K\): sub-block \[0, 0\]"):
        to_format(*decode_blocks(neg, "Q4_K"), "Q4_K", "example")


def test_worked_example_q5_k_all_ones_is_q_31():
    raw = np.full((1, 176), 0xFF, dtype=np.uint8)
    raw[0, 0:4] = _fp16_bytes(0.5, 2.0)
    qq, s, o, ref = _kq(raw, "Q5_K")
    assert qq.tolist() == [[31] * 256] and s.tolist() == [[31.5] * 8]   # sc = mn = 63
    assert o.tolist() == [[-126.0] * 8] and torch.equal(_w(qq, s, o), ref)
    assert ref.unique().tolist() == [0.5 * 63 * 31 - 2.0 * 63]
    raw[0, 2:4] = np.array([np.inf], dtype=np.float16).view(np.uint8)  # dmin = inf: damaged
    with pytest.raises(QahiraFormatError, match=r"\(Q5_K\): sub-block \[0, 0\] has m = -inf"):
        to_format(*decode_blocks(raw, "Q5_K"), "Q5_K", "example")


def test_worked_example_q6_k_negative_d_zero_and_extreme_scales():
    q = [(7 * e) % 64 for e in range(256)]             # every value 0..63
    ql, qh = [0] * 128, [0] * 64
    for e, v in enumerate(q):                          # dequantize_row_q6_K's order
        h, r = divmod(e, 128)
        ql[64 * h + r % 64] |= (v & 15) << (4 * (r // 64))
        qh[32 * h + r % 32] |= (v >> 4) << (2 * (r // 32))
    sc = [0, -128, 127, 1, -1, 5, -7, 100, -100, 3, 2, -2, 64, -64, 9, -9]
    d = -0.5
    raw = np.array(ql + qh + list(np.array(sc, dtype=np.int8).view(np.uint8)) + _fp16_bytes(d),
                   dtype=np.uint8)[None]
    qq, s, o, ref = _kq(raw, "Q6_K")
    exact = torch.tensor([[d * sc[e // 16] * (q[e] - 32) for e in range(256)]])  # exact, fp32
    assert torch.equal(ref, exact) and torch.equal(_w(qq, s, o), exact)
    # sc = 0: s = 1, q' = 0, o = 0; d sc = 64 > 0: q' = q, o = -32 * 64;
    # d sc = -63.5 < 0: s = 63.5, q' = 63 - q, o = -31 * 63.5
    assert s[0, :3].tolist() == [1.0, 64.0, 63.5] and o[0, :3].tolist() == [0.0, -2048.0,
                                                                               -1968.5]
    assert qq[0, :16].tolist() == [0] * 16 and qq[0, 16:32].tolist() == q[16:32]
    assert qq[0, 32:48].tolist() == [63 - v for v in q[32:48]]


def _expected_shapes(types: dict[str, str], default: str) -> dict[str, tuple[int, list[int]]]:
    """{HF layer: (bits, block)} the format must give each layer of a mixed file, written out
    from the brief's rule: each type's own (4-bit: Q2_K, Q3_K, Q4_0, Q4_1, Q4_K; blocks of 16:
    Q2_K, Q3_K, Q6_K), and one (largest bits, finest block) per vLLM-fused group."""
    own_bits = lambda t: 4 if t in ("Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K") else 8  # noqa: E731
    own_block = lambda t: 16 if t in ("Q2_K", "Q3_K", "Q6_K") else 32  # noqa: E731
    hf = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    groups = [("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up"), ("attn_output",),
              ("ffn_down",)]
    out = {}
    for b in range(2):
        for group in groups:
            ts = [types.get(f"blk.{b}.{g}.weight", types.get(g, default)) for g in group]
            shape = (max(map(own_bits, ts)), [1, min(map(own_block, ts))])
            out.update({f"model.layers.{b}.{hf[g]}": shape for g in group})
    return out


@pytest.mark.parametrize("mix", sorted(K_MIXES))
def test_k_quant_mixed_file_converts_bit_exact(tmp_path, mix):
    types, default = K_MIXES[mix]
    src = write_k_mix_gguf(tmp_path / "k.gguf", mix)
    summary = convert(src, tmp_path / "ckpt", progress=False, verify=True)
    assert summary["verify_worst"] == 0.0
    qc, layers, sd = stored_dequant(tmp_path / "ckpt")
    ref = transformers_gguf_tensors(src)
    assert len(layers) == 14
    for name, w in layers.items():
        assert torch.equal(w, ref[f"{name}.weight"]), name
        scales = sd[f"{name}.scales"]
        assert scales.dtype == torch.float32 and bool((scales > 0).all())
    assert qc["format_version"] == 2 and qc["scale_dtype"] == "float32"
    assert qc["offset_dtype"] == "float32" and qc["modules_not_converted"] == []
    for name, (bits, block) in _expected_shapes(types, default).items():
        own = {**qc, **qc.get("layers", {}).get(name, {})}
        assert (own["bits"], own["block_size"]) == (bits, block), name
    assert any("qkv_proj" in n and "block [1, 16]" in n for n in summary["notes"])
    # the product's own reader agrees (quant_math.dequantize, per-layer config)
    from qahira_vllm.checkpoint import dequantized_state_dict

    ours = dequantized_state_dict(tmp_path / "ckpt")
    assert all(torch.equal(ours[f"{n}.weight"], ref[f"{n}.weight"]) for n in layers)


# ---- bad inputs: refused by name, nothing written -------------------------------------------

def test_q8_k_layer_refused_by_tensor_name(tmp_path):
    shape = linear_shapes(256, 256)["ffn_up"]
    raw = np.zeros((shape[0], shape[1] // 256 * 292), dtype=np.uint8)  # Q8_K: 292 B per 256
    src = write_tiny_gguf(tmp_path / "k.gguf", "Q4_1", hidden=256, inter=256,
                          overrides={"blk.1.ffn_up.weight": (raw, "Q8_K")})
    with pytest.raises(QahiraFormatError, match=r"blk\.1\.ffn_up\.weight.*Q8_K.*activations"):
        convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_unknown_architecture_refused(tmp_path):
    src = write_tiny_gguf(tmp_path / "q.gguf", "Q4_1", arch="qwen2")
    with pytest.raises(QahiraFormatError, match=r"q\.gguf.*architecture 'qwen2'"):
        convert(src, tmp_path / "out", progress=False)


def test_damaged_files_refused_naming_the_file(tmp_path):
    good = write_tiny_gguf(tmp_path / "good.gguf", "Q4_1").read_bytes()
    (tmp_path / "trunc.gguf").write_bytes(good[: len(good) // 2])
    with pytest.raises(QahiraFormatError, match=r"trunc\.gguf: not a readable GGUF"):
        convert(tmp_path / "trunc.gguf", tmp_path / "out", progress=False)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(QahiraFormatError, match=r"junk\.gguf: not a readable GGUF"):
        convert(tmp_path / "junk.gguf", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_negative_d_in_affine_type_refused(tmp_path):
    import gguf

    w = np.random.default_rng(7).normal(0, 0.08, linear_shapes()["attn_v"]).astype(np.float32)
    raw = flip_d(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_1), slice(3, 4), "Q4_1")
    src = write_tiny_gguf(tmp_path / "n.gguf", "Q4_1",
                          overrides={"blk.0.attn_v.weight": (raw, "Q4_1")})
    with pytest.raises(QahiraFormatError, match=r"blk\.0\.attn_v\.weight.*Q4_1.*block \[3, 0\]"):
        convert(src, tmp_path / "out", progress=False)


def test_detect_format(tmp_path):
    src = write_tiny_gguf(tmp_path / "a.gguf", "Q4_1")
    assert detect_format(src) == "gguf" and detect_format(tmp_path) == "gguf"
    (tmp_path / "empty").mkdir()
    with pytest.raises(QahiraFormatError, match="no supported source format"):
        detect_format(tmp_path / "empty")


def test_cli_convert_verify_prints_per_layer(tmp_path, capsys):
    from qahira_vllm.cli import main

    src = write_tiny_gguf(tmp_path / "c.gguf", "Q5_0")
    assert main(["convert", str(src), str(tmp_path / "out"), "--verify", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj: max |W_qahira - W_source| = 0" in out
    assert main(["convert", str(src), str(tmp_path / "out"), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err


# ---- the real SmolLM2-135M-Instruct Q4_1 file ------------------------------------------------

def test_smollm2_q4_1_bit_identical_to_transformers_gguf():
    from transformers import AutoTokenizer

    src, ckpt = smollm2_converted()
    qc, layers, sd = stored_dequant(ckpt)
    ref = transformers_gguf_tensors(src)
    assert len(layers) == 30 * 7 and qc["bits"] == 4 and qc["offset_dtype"] == "float16"
    for layer, w in layers.items():
        assert torch.equal(w, ref[f"{layer}.weight"]), layer
    assert torch.equal(sd["model.embed_tokens.weight"], ref["model.embed_tokens.weight"])
    text = "Paris is the capital of France."
    assert (AutoTokenizer.from_pretrained(ckpt)(text).input_ids
            == AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)(text).input_ids)
