"""qahira_vllm.linear_kernels.cpu_int8: CpuInt8Kernel (what it accepts, the choice for INT8
bf16/fp16 layers, prepare/apply on a layer, under torch.compile), per build of the kernel (AVX2,
AVX-512; the test id names it), within the kernel's documented error bound of support.tiny's fp64
reference (linear_reference.check_int4: the bound holds for any integer weights). The op:
tests/kernels/test_cpu_int4.py."""

from __future__ import annotations

import pytest
import torch

from support.linear_reference import check_traced_as_one_op, check_int4, layer_of
from qahira_kernels import cpu_lib
from qahira_vllm import linear_kernels as lk
from qahira_vllm.linear_kernels.cpu_int8 import CpuInt8Kernel
from qahira_vllm.quant_math import pack_qweight


@pytest.fixture(params=["avx2", "avx512"])
def variant(request, monkeypatch):
    runs = cpu_lib.intdot_variants()
    if request.param not in runs:
        pytest.skip(f"{request.param} build not run: this CPU runs only {runs}")
    monkeypatch.setenv(cpu_lib.ISA_ENV, request.param)
    return request.param


def _int8_layer(out_f, in_f, block, seed):
    bo, bi = block
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 256, (out_f, in_f), generator=g, dtype=torch.uint8)
    scales = ((0.15 + 0.1 * torch.rand(out_f // bo, in_f // bi, generator=g)) / 255).half()
    offsets = (-0.1 + 0.02 * torch.randn(out_f // bo, in_f // bi, generator=g)).half()
    return layer_of(pack_qweight(q, 8), scales, offsets), q, scales, offsets


def _spec(**kw):
    return lk.LinearSpec(**{**dict(bits=8, block_size=(1, 32), out_features=64, in_features=192,
                                   act_dtype=torch.bfloat16, device_type="cpu"), **kw})


@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block,in_f", [((1, 32), 192), ((1, 64), 320), ((4, 96), 288)])
def test_kernel_interface_bf16_fp16_bias_3d(variant, act_dtype, block, in_f):
    spec = _spec(block_size=block, in_features=in_f, act_dtype=act_dtype)
    assert CpuInt8Kernel.can_implement(spec) == (True, None)
    layer, q, scales, offsets = _int8_layer(64, in_f, block, seed=3)
    kernel = CpuInt8Kernel(spec)
    kernel.prepare(layer)
    assert not hasattr(layer, "qweight") and list(layer.parameters()) == []
    assert layer.gemv_weight.dtype == torch.uint8 and layer.gemv_weight.shape == (64, in_f)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, in_f, generator=g).to(act_dtype)
    bias = (torch.randn(64, generator=g) * 0.5).to(act_dtype)
    y = kernel.apply(layer, x, bias)
    assert y.dtype == act_dtype and y.shape == (2, 5, 64)
    check_int4(y, x, q, scales, offsets, block, bias)


def test_traced_by_torch_compile_as_one_op(variant):
    layer, *_ = _int8_layer(48, 128, (1, 32), seed=5)
    kernel = CpuInt8Kernel(_spec(out_features=48, in_features=128))
    kernel.prepare(layer)
    check_traced_as_one_op(kernel, layer, 128)


@pytest.mark.parametrize("change,reason", [
    (dict(bits=4), "8-bit"), (dict(block_size=(1, 16)), "multiple of 32"),
    (dict(block_size=(8, 4)), "multiple of 32"), (dict(act_dtype=torch.float32), "fp32"),
    (dict(device_type="cuda"), "CPU"),
])
def test_can_implement_refuses(change, reason):
    ok, why = CpuInt8Kernel.can_implement(_spec(**change))
    assert not ok and reason in why


def test_chosen_for_int8_and_disabled_by_environment(monkeypatch):
    """In the fixed order (cpu_measured off), INT8 bf16/fp16 layers get cpu_int8 (before
    cpu_int4pack's two int4 planes); QAHIRA_DISABLED_KERNELS=cpu_int8 sends fp16 ones to
    cpu_int4pack (cpu_dequant_gemm reads bf16 only) with the reason; fp32 stays on the exact
    cpu_blockwise."""
    monkeypatch.setenv("QAHIRA_DISABLED_KERNELS", "cpu_measured")
    for act in (torch.bfloat16, torch.float16):
        assert lk.choose_kernel(_spec(act_dtype=act))[0] is CpuInt8Kernel
    assert lk.choose_kernel(_spec(act_dtype=torch.float32))[0] is lk.CpuBlockwiseKernel
    monkeypatch.setenv("QAHIRA_DISABLED_KERNELS", "cpu_measured,cpu_int8")
    kernel, reasons = lk.choose_kernel(_spec(act_dtype=torch.float16))
    assert kernel is lk.CpuInt4PackKernel
    assert "cpu_int8: disabled by QAHIRA_DISABLED_KERNELS" in reasons


def test_agrees_with_cpu_int4pack_path(variant):
    """Against the kernel it replaces (torch's int4pack, two planes): same layer, same x, both
    within bf16 rounding of each other."""
    layer, q, scales, offsets = _int8_layer(64, 256, (1, 64), seed=9)
    layer2 = layer_of(layer.qweight.data.clone(), scales.clone(), offsets.clone())
    spec = _spec(block_size=(1, 64), in_features=256)
    a, b = CpuInt8Kernel(spec), lk.CpuInt4PackKernel(spec)
    a.prepare(layer)
    b.prepare(layer2)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(1)).bfloat16()
    ya, yb = a.apply(layer, x).float(), b.apply(layer2, x).float()
    assert (ya - yb).abs().max() <= 2 ** -7 * yb.abs().max()


def test_failed_build_is_reported_not_raised(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_lib, "_lib", None)
    monkeypatch.setattr(cpu_lib, "_lib_error", None)
    monkeypatch.setenv("QAHIRA_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")
    ok, why = CpuInt8Kernel.can_implement(_spec())
    assert not ok and "/bin/false failed" in why and "cpu_intdot.c" in why
    assert list(tmp_path.glob("*")) == []
