"""qahira_vllm.linear_kernels: DequantLinearKernel and CpuInt4PackKernel against an fp64
reference built from tiny_models' independent dequantization (no vLLM)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny_models as tm  # noqa: E402
from qahira_vllm import linear_kernels as lk  # noqa: E402
from qahira_vllm.quant_math import pack_qweight  # noqa: E402


def _layer(out_f, in_f, bits, block, seed=0, offset_dtype=torch.float16):
    """A plain nn.Module holding qweight/scales/offsets as frozen Parameters (like vLLM does),
    plus the fp64 dequantized weight computed independently."""
    bo, bi = block
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 1 << bits, (out_f, in_f), generator=g, dtype=torch.uint8)
    qmax = (1 << bits) - 1
    # weights ~ U(-0.1, 0.1)-ish per block: scale ~ 0.2/qmax, offset ~ -0.1
    scales = ((0.15 + 0.1 * torch.rand(out_f // bo, in_f // bi, generator=g)) / qmax).half()
    offsets = (-0.1 + 0.02 * torch.randn(out_f // bo, in_f // bi, generator=g)).to(offset_dtype)
    layer = torch.nn.Module()
    for name, t in (("qweight", pack_qweight(q, bits)), ("scales", scales),
                    ("offsets", offsets)):
        layer.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))
    w_ref = tm.dequant_ref(q, scales, offsets, block)  # float64 [out, in]
    return layer, w_ref


def _run(kernel_cls, out_f, in_f, bits, block, act_dtype, m, with_bias, x_shape=None, seed=0):
    layer, w_ref = _layer(out_f, in_f, bits, block, seed=seed)
    spec = lk.LinearSpec(bits=bits, block_size=block, out_features=out_f, in_features=in_f,
                         act_dtype=act_dtype, device_type="cpu")
    ok, why = kernel_cls.can_implement(spec)
    assert ok, why
    kernel = kernel_cls(spec)
    kernel.prepare(layer)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*(x_shape or (m,)), in_f, generator=g).to(act_dtype)
    bias = (torch.randn(out_f, generator=g) * 0.5).to(act_dtype) if with_bias else None
    y = kernel.apply(layer, x, bias)
    assert y.dtype == act_dtype and y.shape == (*x.shape[:-1], out_f)
    # reference on the exact (already rounded) inputs, in float64
    y_ref = x.double() @ w_ref.t()
    if with_bias:
        y_ref = y_ref + bias.double()
    return y.double(), y_ref, layer


# ---- dequant path (fp32 activations) ---------------------------------------------------------

@pytest.mark.parametrize("bits,block,out_f,in_f", [
    (4, (1, 32), 96, 160), (4, (1, 64), 192, 576), (4, (1, 128), 48, 384), (4, (2, 32), 192, 576),
    (4, (8, 4), 40, 72), (4, (2, 16), 24, 48), (8, (1, 64), 40, 192), (8, (8, 4), 48, 100),
])
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("with_bias", [False, True])
def test_dequant_kernel_fp32(bits, block, out_f, in_f, m, with_bias):
    y, y_ref, _ = _run(lk.DequantLinearKernel, out_f, in_f, bits, block, torch.float32, m,
                       with_bias, seed=m)
    # fp32 GEMM of exactly dequantized weights: relative 1e-5 of max|y| (K <= 576 terms)
    tol = 1e-5 * y_ref.abs().max()
    assert (y - y_ref).abs().max() <= tol


def test_dequant_kernel_bf16_and_3d_input():
    y, y_ref, layer = _run(lk.DequantLinearKernel, 64, 128, 4, (8, 4), torch.bfloat16, 0,
                           True, x_shape=(2, 5))
    # weights rounded to bf16 (2^-9 relative) + bf16 output: 2e-2 of max|y|
    assert (y - y_ref).abs().max() <= 2e-2 * y_ref.abs().max()
    # prepare() keeps qweight packed and leaves no trainable parameters behind
    assert layer.qweight.dtype == torch.int32 and layer.qweight.shape == (64, 16)
    assert list(layer.parameters()) == []


# ---- cpu_int4pack (bf16 / fp16 activations) -------------------------------------------------

@pytest.mark.parametrize("block,out_f,in_f", [
    ((1, 32), 96, 160), ((1, 64), 192, 576), ((1, 128), 48, 384), ((2, 32), 192, 576),
    ((4, 64), 80, 320), ((1, 256), 16, 512),
])
@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_int4pack_kernel(bits, block, out_f, in_f, act_dtype, m, with_bias):
    y, y_ref, layer = _run(lk.CpuInt4PackKernel, out_f, in_f, bits, block, act_dtype, m,
                           with_bias, seed=m + out_f)
    # scale/zero rounded to bf16/fp16 (zero = offset + 8*scale, 2^-9 relative; 8-bit: the
    # high plane's 16*scale times n <= 15 carries the same relative rounding) and bf16/fp16
    # accumulation/output: bound 2e-2 of max|y| (observed ~3e-3)
    assert (y - y_ref).abs().max() <= 2e-2 * y_ref.abs().max()
    assert not hasattr(layer, "qweight")  # repacked in memory
    assert layer.int4_scale_zero_0.shape == (in_f // block[1], out_f, 2)
    assert hasattr(layer, "int4_packed_1") == (bits == 8)  # INT8 = two int4 planes


def test_int4pack_3d_input_and_matches_dequant_path():
    block = (2, 64)
    y, y_ref, _ = _run(lk.CpuInt4PackKernel, 64, 256, 4, block, torch.bfloat16, 0, True,
                       x_shape=(2, 3, 4))
    assert y.shape == (2, 3, 4, 64)
    assert (y - y_ref).abs().max() <= 2e-2 * y_ref.abs().max()


def test_int4pack_blocks_differ_along_output():
    """A 2-D block must be expanded along the output dim: rows 2k and 2k+1 share parameters.
    Swapping in a per-row (1x32) interpretation of the same scales would change the result."""
    layer, w_ref = _layer(32, 64, 4, (2, 32), seed=5)
    spec = lk.LinearSpec(4, (2, 32), 32, 64, torch.bfloat16, "cpu")
    k = lk.CpuInt4PackKernel(spec)
    k.prepare(layer)
    sz = layer.int4_scale_zero_0.float()
    assert torch.equal(sz[:, 0::2], sz[:, 1::2])  # each pair of rows shares (scale, zero)
    x = torch.eye(64, dtype=torch.bfloat16)       # y = W^T: reads back the dequantized weights
    w_back = k.apply(layer, x).double().t()
    # bf16 scale/zero and bf16 output: |dW| <= 2^-8 * (|W| + |zero|) + ..., bound 1e-2 abs
    assert (w_back - w_ref).abs().max() <= 1e-2


# ---- can_implement / select_kernel --------------------------------------------------------------

def _spec(bits=4, block=(1, 64), act=torch.bfloat16, dev="cpu", out_f=128, in_f=256):
    return lk.LinearSpec(bits=bits, block_size=block, out_features=out_f, in_features=in_f,
                         act_dtype=act, device_type=dev)


@pytest.mark.parametrize("spec,reason", [
    (_spec(bits=3), "4-bit or 8-bit"),
    (_spec(block=(1, 16)), "bi must be one of"),
    (_spec(block=(8, 4)), "bi must be one of"),
    (_spec(block=(1, 512)), "bi must be one of"),
    (_spec(act=torch.float32), "bf16/fp16"),
    (_spec(dev="cuda"), "CPU only"),
    (_spec(out_f=40, in_f=64, block=(1, 32)), "16"),   # torch's int4pack needs out % 16 == 0
])
def test_int4pack_refuses(spec, reason):
    ok, why = lk.CpuInt4PackKernel.can_implement(spec)
    assert not ok and reason in why
    assert lk.DequantLinearKernel.can_implement(spec) == (True, None)


@pytest.mark.parametrize("block", [(1, 32), (1, 64), (1, 128), (1, 256), (4, 64)])
@pytest.mark.parametrize("act", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [4, 8])
def test_int4pack_accepts(block, act, bits):
    spec = _spec(block=block, act=act, bits=bits)
    assert lk.CpuInt4PackKernel.can_implement(spec) == (True, None)


@pytest.fixture
def builtin_kernels(monkeypatch):
    """Only this module's kernels, in their built-in order (other test modules may register a
    Triton kernel in front of them)."""
    monkeypatch.setattr(lk, "KERNELS", [k for k in lk.KERNELS
                                        if k in (lk.CpuInt4PackKernel, lk.DequantLinearKernel)])


def test_select_kernel(builtin_kernels):
    assert lk.select_kernel(_spec()) is lk.CpuInt4PackKernel
    assert lk.select_kernel(_spec(act=torch.float16)) is lk.CpuInt4PackKernel
    assert lk.select_kernel(_spec(bits=8)) is lk.CpuInt4PackKernel
    for spec in (_spec(act=torch.float32), _spec(dev="cuda"),
                 _spec(block=(8, 4)), _spec(block=(1, 16)), _spec(out_f=40, in_f=64)):
        assert lk.select_kernel(spec) is lk.DequantLinearKernel


def test_selected_kernel_runs_when_out_not_multiple_of_16(builtin_kernels):
    """out=40 with a 1x32 block is a valid layer; whatever is selected must run it."""
    spec = _spec(out_f=40, in_f=64, block=(1, 32))
    y, y_ref, _ = _run(lk.select_kernel(spec), 40, 64, 4, (1, 32), torch.bfloat16, 3, True)
    assert (y - y_ref).abs().max() <= 2e-2 * y_ref.abs().max()


def test_register_kernel_order(monkeypatch):
    monkeypatch.setattr(lk, "KERNELS", [lk.CpuInt4PackKernel, lk.DequantLinearKernel])

    class Always(lk.DequantLinearKernel):
        name = "always"

    lk.register_kernel(Always)
    lk.register_kernel(Always)  # idempotent
    assert lk.KERNELS == [Always, lk.CpuInt4PackKernel, lk.DequantLinearKernel]
    assert lk.select_kernel(_spec()) is Always


def test_reference_linear_matches_independent_reference():
    layer, w_ref = _layer(48, 128, 4, (2, 16), seed=9)
    x = torch.randn(5, 128)
    bias = torch.randn(48)
    y = lk.reference_linear(x, layer.qweight, layer.scales, layer.offsets, 4, (2, 16), bias)
    y_ref = x.double() @ w_ref.t() + bias.double()
    assert (y.double() - y_ref).abs().max() <= 1e-5 * y_ref.abs().max()  # fp32 GEMM
