"""qahira_vllm.linear_kernels.cpu_dequant_gemm: CpuDequantGemmKernel (what it accepts,
prepare/apply on a layer with bias and 3-D input, under torch.compile), per build of the
kernel (the test id names it), against support.tiny's independent fp64 dequantization: the
kernel multiplies by W rounded to bf16, so the tolerance is W's bf16 rounding (2^-9 relative per
weight) plus fp32 summation, plus the output's bf16 rounding. The op itself, bit-level:
tests/kernels/test_cpu_dequant_gemm.py."""

from __future__ import annotations

import pytest
import torch

from support.linear_reference import check_traced_as_one_op, layer_and_fp64_weight
from qahira_kernels import cpu_lib
from qahira_vllm import linear_kernels as lk
from qahira_vllm.linear_kernels.cpu_dequant_gemm import CpuDequantGemmKernel


@pytest.fixture(params=["avx2", "avx512", "avx512_bf16", "amx"])
def dq_variant(request):
    runs = cpu_lib.dequant_gemm_variants()
    if request.param not in runs:
        pytest.skip(f"{request.param} build not run: this CPU runs only {runs}")
    return request.param


def _spec(**kw):
    return lk.LinearSpec(**{**dict(bits=4, block_size=(1, 32), out_features=64, in_features=192,
                                   act_dtype=torch.bfloat16, device_type="cpu"), **kw})


@pytest.mark.parametrize("bits,block,out_f,in_f", [(4, (1, 32), 64, 192), (8, (1, 64), 48, 320),
                                                   (4, (8, 4), 80, 96), (8, (2, 16), 32, 64),
                                                   (4, (2, 64), 80, 320)])
def test_prepare_apply_with_bias_and_3d_input(dq_variant, bits, block, out_f, in_f):
    spec = _spec(bits=bits, block_size=block, out_features=out_f, in_features=in_f)
    assert CpuDequantGemmKernel.can_implement(spec) == (True, None)
    if why := CpuDequantGemmKernel.variant_refuses(spec, dq_variant):
        assert dq_variant not in CpuDequantGemmKernel.variants(spec)
        pytest.skip(f"{dq_variant} build refuses this shape: {why}")
    layer, w_ref = layer_and_fp64_weight(out_f, in_f, bits, block, seed=bits + in_f)
    kernel = CpuDequantGemmKernel(spec, dq_variant)
    kernel.prepare(layer)
    assert not hasattr(layer, "qweight") and list(layer.parameters()) == []
    assert layer.dq_weight.dtype == torch.uint8 and layer.dq_weight.numel() == out_f * in_f * bits // 8
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 7, in_f, generator=g).bfloat16()
    bias = (torch.randn(out_f, generator=g) * 0.5).bfloat16()
    y = kernel.apply(layer, x, bias)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 7, out_f)
    ref = x.double() @ w_ref.t() + bias.double()
    absxw = x.double().abs() @ w_ref.abs().t()
    tol = 2 ** -9 * absxw + in_f * 2 ** -24 * absxw + 2 ** -8 * ref.abs() + 2 ** -8 * bias.double().abs()
    assert ((y.double() - ref).abs() <= tol).all()


def test_other_activation_dtypes_are_read_as_bf16():
    """The interface's contract, y in x's dtype: fp32 x is rounded to bf16 and gets the fp32
    accumulator back; the result equals the bf16 call's (fp32 output) exactly."""
    layer, _ = layer_and_fp64_weight(32, 64, 4, (1, 32), seed=6)
    kernel = CpuDequantGemmKernel(_spec(out_features=32, in_features=64))
    kernel.prepare(layer)
    x = torch.randn(3, 64)
    y = kernel.apply(layer, x)
    assert y.dtype == torch.float32
    from qahira_kernels import ops

    assert torch.equal(y, ops.cpu_dequant_gemm(x.bfloat16(), layer.dq_weight, layer.dq_scales,
                                               layer.dq_offsets, 4, 32, 1, kernel.variant,
                                               torch.float32))


def test_traced_by_torch_compile_as_one_op():
    layer, _ = layer_and_fp64_weight(48, 128, 4, (1, 32), seed=5)
    kernel = CpuDequantGemmKernel(_spec(out_features=48, in_features=128))
    kernel.prepare(layer)
    check_traced_as_one_op(kernel, layer, 128)


@pytest.mark.parametrize("change,reason", [
    (dict(bits=3), "4- or 8-bit"), (dict(block_size=(1, 5), in_features=195), "bi must be even"),
    (dict(act_dtype=torch.float16), "bf16"), (dict(act_dtype=torch.float32), "bf16"),
    (dict(out_features=40), "multiple of 16"), (dict(device_type="cuda"), "CPU"),
])
def test_can_implement_refuses(change, reason):
    ok, why = CpuDequantGemmKernel.can_implement(_spec(**change))
    assert not ok and reason in why
