"""qahira_kernels.cpu_blockwise: the exact every-case CPU kernel (cpu_blockwise.c).

The dequantized weight must equal torch's reference dequantization bit for bit (fp32 s * q,
rounded, then + o, rounded). Outputs are compared against an fp64 GEMM on that weight within
fp32 summation slack, 1e-6 * sum_k |x_k W_nk| (measured ~1e-7), plus one rounding of the
output dtype for bf16/fp16. This machine class (x86-64 with AVX2 and gcc) is what CI runs on,
so the kernel must build here.
"""

from __future__ import annotations

import pytest
import torch

from qahira_kernels import cpu_blockwise as cb
from qahira_kernels import cpu_lib
from qahira_vllm import linear_kernels as lk
from qahira_vllm.quant_math import expand_blocks, pack_qweight, unpack_qweight

ROUNDING = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
FP32_SLACK = 1e-6


def _stored(out_f, in_f, bits, block, offset_dtype=torch.float16, seed=0):
    bo, bi = block
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2 ** bits, (out_f, in_f), generator=g)
    scales = (0.002 + 0.02 * torch.rand(out_f // bo, in_f // bi, generator=g)).half()
    offsets = (0.1 * torch.randn(out_f // bo, in_f // bi, generator=g)).to(offset_dtype)
    return pack_qweight(q, bits), scales, offsets


def _reference_weight(qweight, scales, offsets, bits, block):
    """torch's reference dequantization (qahira_vllm.linear_kernels.reference_linear's)."""
    return (unpack_qweight(qweight, bits).to(torch.float32) * expand_blocks(scales.float(), block)
            + expand_blocks(offsets.float(), block))


def _assert_close(y, x, w):
    y_ref = x.double() @ w.double().t()
    slack = FP32_SLACK * (x.double().abs() @ w.double().abs().t())
    tol = slack + ROUNDING[y.dtype] * y_ref.abs()
    err = (y.double() - y_ref).abs()
    assert (err <= tol).all(), f"max excess {(err - tol).max().item():.3g}"


# Every shape family: bi a multiple of 8 (vector path) or not (per-column params, scalar tail),
# 2-D blocks (the paper's 8x4 tile), odd widths for 8-bit, fp16 and fp32 offsets.
CASES = [
    (4, (1, 32), 48, 256), (4, (1, 64), 40, 576), (4, (8, 4), 64, 96), (4, (2, 8), 6, 40),
    (4, (1, 8), 16, 8), (8, (1, 64), 24, 320), (8, (2, 3), 8, 27), (8, (1, 1), 4, 5),
    (8, (4, 12), 12, 36), (4, (3, 24), 9, 72),
]


@pytest.mark.parametrize("bits,block,out_f,in_f", CASES)
@pytest.mark.parametrize("offset_dtype", [torch.float16, torch.float32])
def test_dequant_is_bit_identical_to_reference(bits, block, out_f, in_f, offset_dtype):
    qw, s, o = _stored(out_f, in_f, bits, block, offset_dtype)
    w = cb.blockwise_dequant(qw, s, o, bits, block, in_f)
    assert w.dtype == torch.float32 and w.shape == (out_f, in_f)
    assert torch.equal(w, _reference_weight(qw, s, o, bits, block))


@pytest.mark.parametrize("bits,block,out_f,in_f", CASES)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_matches_fp64_on_the_reference_weight(bits, block, out_f, in_f, m, dtype):
    qw, s, o = _stored(out_f, in_f, bits, block, seed=m)
    x = (torch.randn(m, in_f, generator=torch.Generator().manual_seed(m)) * 2).to(dtype)
    y = cb.blockwise_linear(x, qw, s, o, bits, block)
    assert y.dtype == dtype and y.shape == (m, out_f)
    _assert_close(y, x, _reference_weight(qw, s, o, bits, block))


def test_no_rows_and_refused_dtypes():
    qw, s, o = _stored(16, 64, 4, (1, 32))
    assert cb.blockwise_linear(torch.empty(0, 64), qw, s, o, 4, (1, 32)).shape == (0, 16)
    # A model.to(dtype) casts float buffers; the C code would misread them, so they are refused.
    for bad, phrase in (((qw, s.float(), o), "scales are torch.float32"),
                        ((qw, s, o.bfloat16()), "offsets are torch.bfloat16"),
                        ((qw.to(torch.uint8), s, o), "expected torch.int32 for 4-bit")):
        with pytest.raises(ValueError, match=phrase):
            cb.blockwise_dequant(*bad, 4, (1, 32), 64)
        with pytest.raises(ValueError, match=phrase):
            cb.blockwise_linear(torch.randn(1, 64), *bad, 4, (1, 32))
        assert not cb.stored_layout_ok(*bad, 4)
    assert cb.stored_layout_ok(qw, s, o, 4)


def test_trainer_dequant_after_model_to_dtype_is_still_right():
    """QuantLinear after `.to(torch.float32)` (buffers cast): the torch path, same weight."""
    from qahira_vllm.format import QahiraQuantConfig
    from qahira_vllm.training.qlinear import QuantLinear

    cfg = QahiraQuantConfig(bits=4, block_size=(8, 4))
    qw, s, o = _stored(32, 64, 4, (8, 4))
    layer = QuantLinear(qw, s, o, cfg, 64, 32)
    x = torch.randn(3, 64)
    before = layer(x)
    assert torch.equal(before, x @ _reference_weight(qw, s, o, 4, (8, 4)).t())
    layer.to(torch.float32)
    assert layer.scales.dtype == torch.float32
    assert torch.equal(layer(x), before)


def test_traced_by_torch_compile_as_one_op():
    """vLLM compiles the model on CPU unless eager: the op must trace with fullgraph (fake impl)
    and serve any M (dynamic shapes)."""
    spec = lk.LinearSpec(bits=8, block_size=(2, 4), out_features=16, in_features=64,
                         act_dtype=torch.float32, device_type="cpu")
    qw, s, o = _stored(16, 64, 8, (2, 4))
    layer = torch.nn.Module()
    for name, t in (("qweight", qw), ("scales", s), ("offsets", o)):
        layer.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))
    kernel = cb.CpuBlockwiseKernel(spec)
    kernel.prepare(layer)
    compiled = torch.compile(lambda t: kernel.apply(layer, t) * 2, backend="aot_eager",
                             fullgraph=True, dynamic=True)
    for m in (3, 37):
        x = torch.randn(m, 64)
        assert torch.equal(compiled(x), kernel.apply(layer, x) * 2)


def test_each_row_independent_of_batch_and_threads():
    """A row's output is bit-identical whatever else is in the batch and with 1 or 2 threads."""
    qw, s, o = _stored(80, 192, 4, (8, 4), seed=7)
    x = torch.randn(32, 192, generator=torch.Generator().manual_seed(8))
    full = cb.blockwise_linear(x, qw, s, o, 4, (8, 4))
    for i in (0, 5, 31):
        assert torch.equal(cb.blockwise_linear(x[i:i + 1], qw, s, o, 4, (8, 4))[0], full[i])
    assert torch.equal(cb.blockwise_linear(x[3:10], qw, s, o, 4, (8, 4)), full[3:10])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cb.blockwise_linear(x, qw, s, o, 4, (8, 4))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, full)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rows_independent_of_m_and_neighbours(dtype):
    """What the plugin calls (apply, eager and as the compiled op), at M from decode to prefill
    sizes: row i is bit-identical to the same row computed alone or in any other batch. (An
    engine prefilling 47 tokens of 8 prompts vs one 4-token prompt: a switch to dequantize +
    GEMM above 32 rows once made its logprobs differ by 2e-4.)"""
    in_f, out_f = 576, 96  # SmolLM2's hidden size: 36 chunks of 16, no scalar tail
    spec = lk.LinearSpec(bits=4, block_size=(1, 32), out_features=out_f, in_features=in_f,
                         act_dtype=dtype, device_type="cpu")
    qw, s, o = _stored(out_f, in_f, 4, (1, 32), seed=11)
    layer = torch.nn.Module()
    for name, t in (("qweight", qw), ("scales", s), ("offsets", o)):
        layer.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))
    kernel = cb.CpuBlockwiseKernel(spec)
    kernel.prepare(layer)
    x = torch.randn(130, in_f, generator=torch.Generator().manual_seed(12)).to(dtype)
    alone = torch.cat([kernel.apply(layer, x[i:i + 1]) for i in range(len(x))])
    # The dense reference is not the check here (test_linear_matches_fp64... is): a sanity bound.
    assert torch.allclose(alone.double(), x.double() @ _reference_weight(qw, s, o, 4, (1, 32))
                          .double().t(), rtol=2e-2, atol=2e-2)
    compiled = torch.compile(lambda t: kernel.apply(layer, t), backend="aot_eager",
                             fullgraph=True, dynamic=True)
    for lo, hi in ((0, 4), (0, 32), (0, 33), (3, 50), (0, 130), (97, 130)):
        assert torch.equal(kernel.apply(layer, x[lo:hi]), alone[lo:hi]), (lo, hi)
        assert torch.equal(compiled(x[lo:hi]), alone[lo:hi]), (lo, hi)
    # Other neighbours: the same rows placed after 40 different ones.
    mixed = torch.cat([torch.randn(40, in_f).to(dtype), x[:10]])
    assert torch.equal(kernel.apply(layer, mixed)[40:], alone[:10])


@pytest.mark.parametrize("m", [1, 32, 33, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_interface_bias_3d(m, dtype):
    """apply() at small and prefill-sized M; bias; 3-D x."""
    bits, block, out_f, in_f = 8, (8, 4), 32, 64
    spec = lk.LinearSpec(bits=bits, block_size=block, out_features=out_f, in_features=in_f,
                         act_dtype=dtype, device_type="cpu")
    assert cb.CpuBlockwiseKernel.can_implement(spec) == (True, None)
    qw, s, o = _stored(out_f, in_f, bits, block, offset_dtype=torch.float32, seed=m)
    layer = torch.nn.Module()
    for name, t in (("qweight", qw), ("scales", s), ("offsets", o)):
        layer.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))
    kernel = cb.CpuBlockwiseKernel(spec)
    kernel.prepare(layer)
    assert list(layer.parameters()) == [] and torch.equal(layer.qweight, qw)  # kept as stored
    g = torch.Generator().manual_seed(m + 1)
    x = torch.randn(1, m, in_f, generator=g).to(dtype)
    bias = torch.randn(out_f, generator=g).to(dtype)
    y = kernel.apply(layer, x, bias)
    assert y.dtype == dtype and y.shape == (1, m, out_f)
    w = _reference_weight(qw, s, o, bits, block)
    y_ref = x[0].double() @ w.double().t() + bias.double()
    tol = (FP32_SLACK * (x[0].double().abs() @ w.double().abs().t())
           + 2 * ROUNDING[dtype] * y_ref.abs() + ROUNDING[dtype] * bias.double().abs())
    assert ((y[0].double() - y_ref).abs() <= tol).all()


def test_selected_for_fp32_and_for_shapes_the_fast_kernels_refuse(monkeypatch):
    """After the plugin's registration: fp32 layers and bf16 2-D/odd blocks get cpu_blockwise;
    the INT4 bf16 default stays on cpu_avx2_int4; CUDA and no library fall through."""
    from qahira_kernels import cpu_gemv

    monkeypatch.setattr(lk, "KERNELS", [lk.CpuInt4PackKernel, lk.DequantLinearKernel])
    cpu_gemv.register()
    cb.register()
    cb.register()  # idempotent
    assert lk.KERNELS == [cpu_gemv.CpuAvx2Int4Kernel, lk.CpuInt4PackKernel,
                          cb.CpuBlockwiseKernel, lk.DequantLinearKernel]

    def spec(bits=4, block=(1, 32), act=torch.float32, dev="cpu"):
        return lk.LinearSpec(bits, block, 64, 128, act, dev)

    for s in (spec(), spec(bits=8), spec(block=(8, 4), act=torch.bfloat16),
              spec(bits=8, block=(1, 16), act=torch.float16)):
        assert lk.select_kernel(s) is cb.CpuBlockwiseKernel, s
    assert lk.select_kernel(spec(act=torch.bfloat16)) is cpu_gemv.CpuAvx2Int4Kernel
    assert lk.select_kernel(spec(dev="cuda")) is lk.DequantLinearKernel
    assert cb.CpuBlockwiseKernel.can_implement(spec(bits=3))[0] is False
    monkeypatch.setattr(cpu_lib, "_lib", None)
    monkeypatch.setattr(cpu_lib, "_lib_error", "disabled by QAHIRA_CPU_GEMV=0")
    ok, why = cb.CpuBlockwiseKernel.can_implement(spec())
    assert not ok and "QAHIRA_CPU_GEMV=0" in why
    assert lk.select_kernel(spec()) is lk.DequantLinearKernel
