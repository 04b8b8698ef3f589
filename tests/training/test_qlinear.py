"""QuantLinear serves exactly the stored weights and passes gradients to its input only."""

import pytest
import torch

from support import tiny
from qahira_vllm.checkpoint import load_quantized_state
from qahira_vllm.format import QahiraFormatError
from qahira_vllm.training.qlinear import QuantLinear


def _layer(qckpt, name="model.layers.0.mlp.down_proj"):
    cfg, quant, other = load_quantized_state(qckpt)
    t = quant[name]
    out_f = t["qweight"].shape[0]
    in_f = t["qweight"].shape[1] * (8 if cfg.bits == 4 else 1)
    return cfg, t, other.get(f"{name}.bias"), out_f, in_f


@pytest.mark.parametrize("which", ["llama", "qwen"])
def test_weight_is_bit_exact_stored_formula(which, qckpt, qckpt_qwen):
    path = qckpt if which == "llama" else qckpt_qwen
    cfg, t, _, out_f, in_f = _layer(path)
    lin = QuantLinear(t["qweight"], t["scales"], t["offsets"], cfg, in_f, out_f)
    # scale (fp16) * q (4 bits) is exact in fp32 and in fp64; the sum is rounded once, so the
    # fp32 weight must equal the fp64 reference rounded to fp32, bit for bit.
    ref = tiny.dequant_packed_ref(t["qweight"], t["scales"], t["offsets"],
                                         cfg.block_size, cfg.bits).to(torch.float32)
    assert torch.equal(lin.dequantized_weight(), ref)


def test_forward_backward_match_dense(qckpt_qwen):
    cfg, t, bias, out_f, in_f = _layer(qckpt_qwen, "model.layers.1.self_attn.q_proj")
    assert bias is not None
    lin = QuantLinear(t["qweight"], t["scales"], t["offsets"], cfg, in_f, out_f, bias=bias)
    w = tiny.dequant_packed_ref(t["qweight"], t["scales"], t["offsets"], cfg.block_size)
    x = torch.randn(3, 5, in_f, dtype=torch.float64)
    x32 = x.float().requires_grad_(True)
    y = lin(x32)
    y_ref = x @ w.t() + bias.double()
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x32.grad.double(), g.double() @ w, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in lin.parameters())


def test_memory_stays_packed(qckpt):
    cfg, t, _, out_f, in_f = _layer(qckpt)
    lin = QuantLinear(t["qweight"], t["scales"], t["offsets"], cfg, in_f, out_f)
    stored = sum(b.numel() * b.element_size() for b in lin.buffers())
    assert stored < out_f * in_f * 0.75  # ~0.5 byte per weight + block params, not 4 bytes
    x = torch.randn(2, in_f, requires_grad=True)
    y = lin(x)
    # The autograd graph keeps the packed tensors, not a dequantized fp32 weight.
    saved = y.grad_fn.saved_tensors
    assert all(s.dtype != torch.float32 or s.numel() < out_f * in_f for s in saved)


def test_bf16_autocast(qckpt):
    cfg, t, _, out_f, in_f = _layer(qckpt)
    lin = QuantLinear(t["qweight"], t["scales"], t["offsets"], cfg, in_f, out_f)
    x = torch.randn(4, in_f, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), x.detach() @ lin.dequantized_weight().t(), rtol=0.05,
                               atol=0.05)


def test_8bit_layer():
    path = tiny.tiny_qckpt("llama", bits=8, block_size=(2, 16), hidden=64,
                                   intermediate=128, heads=2, kv_heads=1)
    cfg, t, _, out_f, in_f = _layer(path)
    lin = QuantLinear(t["qweight"], t["scales"], t["offsets"], cfg, in_f, out_f)
    ref = tiny.dequant_packed_ref(t["qweight"], t["scales"], t["offsets"], cfg.block_size,
                                         bits=8).float()
    assert torch.equal(lin.dequantized_weight(), ref)


def test_rejects_wrong_tensor_shapes(qckpt):
    cfg, t, _, out_f, in_f = _layer(qckpt)
    with pytest.raises(QahiraFormatError, match="scales"):
        QuantLinear(t["qweight"], t["scales"][:, :-1], t["offsets"], cfg, in_f, out_f, name="x")


@pytest.mark.parametrize("bits, block, odt", [(4, (1, 32), "float16"), (4, (4, 8), "float32"),
                                              (8, (2, 16), "float16"), (4, (8, 4), "float16")])
def test_fast_dequant_is_bit_identical_to_quant_math(bits, block, odt):
    from qahira_vllm.format import QahiraQuantConfig
    from qahira_vllm.quant_math import dequantize, expand_blocks, pack_qweight, quantize
    from qahira_vllm.training.qlinear import _dequantize

    cfg = QahiraQuantConfig(bits=bits, block_size=block, offset_dtype=odt)
    torch.manual_seed(0)
    w = torch.randn(64, 96) * torch.logspace(-3, 1, 96)  # many magnitudes per row
    q, scales, offsets = quantize(w, cfg)
    qweight = pack_qweight(q, bits)
    # the plain fp32 formula on expanded block parameters
    reference = (q.to(torch.float32) * expand_blocks(scales.to(torch.float32), block)
                 + expand_blocks(offsets.to(torch.float32), block))
    assert torch.equal(dequantize(qweight, scales, offsets, cfg), reference)
    # what QuantLinear uses on CPU: the compiled kernel (it builds on this machine class)
    from qahira_kernels import cpu_lib

    assert cpu_lib.load_library() is not None, cpu_lib.library_error()
    assert torch.equal(_dequantize(qweight, scales, offsets, cfg), reference)


@pytest.mark.parametrize("bits, block, odt", [(4, (1, 32), "float16"), (4, (4, 8), "float32"),
                                              (8, (2, 16), "float16"), (4, (8, 4), "float16"),
                                              (4, (1, 24), "float16")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_dequant_triton_is_bit_identical_to_quant_math(bits, block, odt, dtype):
    """QuantLinear's CUDA path (qahira_kernels' Triton dequant kernel), run on CPU tensors in
    Triton's interpreter, as CI checks Triton: bit for bit the stored formula, rounded once."""
    from qahira_kernels import blockwise_gemm
    from qahira_kernels._triton_utils import is_interpreted
    from qahira_vllm.format import QahiraQuantConfig
    from qahira_vllm.quant_math import dequantize, pack_qweight, quantize
    from qahira_vllm.training.qlinear import dequantize_triton

    assert is_interpreted(blockwise_gemm._dequant_kernel), (
        "run with TRITON_INTERPRET=1 in the environment (the project's test command sets it)")
    cfg = QahiraQuantConfig(bits=bits, block_size=block, offset_dtype=odt)
    torch.manual_seed(1)
    w = torch.randn(64, 96) * torch.logspace(-3, 1, 96)  # many magnitudes per row
    q, scales, offsets = quantize(w, cfg)
    qweight = pack_qweight(q, bits)
    got = dequantize_triton(qweight, scales, offsets, cfg, dtype)
    assert got.dtype == dtype and got.shape == (64, 96)
    assert torch.equal(got, dequantize(qweight, scales, offsets, cfg).to(dtype))
    # and the independent unpacking reference (fp64, rounded to fp32 once; see above)
    ref = tiny.dequant_packed_ref(qweight, scales, offsets, block, bits).to(torch.float32)
    assert torch.equal(got, ref.to(dtype))
