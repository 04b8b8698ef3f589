"""qahira_vllm.linear_kernels.cpu_int4: CpuInt4Kernel (what it accepts, prepare/apply on a
layer, under torch.compile), within the kernel's documented error bound of an fp64 reference
(linear_reference.check_int4). The op itself: tests/kernels/test_cpu_intdot.py."""

from __future__ import annotations

import pytest
import torch

from support.linear_reference import check_traced_as_one_op, int4_layer, check_int4
from qahira_kernels import cpu_lib
from qahira_vllm import linear_kernels as lk
from qahira_vllm.linear_kernels.cpu_int4 import CpuInt4Kernel


@pytest.fixture(params=["avx2", "avx512"])
def variant(request, monkeypatch):
    """Each build of the kernel this CPU runs, through the $QAHIRA_CPU_ISA switch (the test id
    names it; a build the CPU lacks is reported as skipped, see tests/kernels/test_cpu_intdot.py
    for the compile-and-link check)."""
    runs = cpu_lib.intdot_variants()
    if request.param not in runs:
        pytest.skip(f"{request.param} build not run: this CPU runs only {runs}")
    monkeypatch.setenv(cpu_lib.ISA_ENV, request.param)
    assert cpu_lib.intdot_variant() == request.param
    return request.param


@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block", [(1, 32), (1, 64), (4, 64)])
def test_kernel_interface_bf16_fp16_bias_3d(variant, act_dtype, block):
    spec = lk.LinearSpec(bits=4, block_size=block, out_features=64, in_features=192,
                         act_dtype=act_dtype, device_type="cpu")
    assert CpuInt4Kernel.can_implement(spec) == (True, None)
    layer, q, scales, offsets = int4_layer(64, 192, block, seed=3)
    kernel = CpuInt4Kernel(spec)
    kernel.prepare(layer)
    assert not hasattr(layer, "qweight") and list(layer.parameters()) == []
    assert layer.gemv_weight.dtype == torch.uint8 and layer.gemv_weight.shape == (64, 96)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 192, generator=g).to(act_dtype)
    bias = (torch.randn(64, generator=g) * 0.5).to(act_dtype)
    y = kernel.apply(layer, x, bias)
    assert y.dtype == act_dtype and y.shape == (2, 5, 64)
    check_int4(y, x, q, scales, offsets, block, bias)


def test_traced_by_torch_compile_as_one_op(variant):
    """vLLM compiles the model: the op must trace with fullgraph (fake impl) and give the same y."""
    spec = lk.LinearSpec(bits=4, block_size=(1, 32), out_features=48, in_features=128,
                         act_dtype=torch.bfloat16, device_type="cpu")
    layer, *_ = int4_layer(48, 128, (1, 32), seed=5)
    kernel = CpuInt4Kernel(spec)
    kernel.prepare(layer)
    check_traced_as_one_op(kernel, layer, 128)


@pytest.mark.parametrize("change,reason", [
    (dict(bits=8), "4-bit"), (dict(block_size=(1, 16)), "multiple of 32"),
    (dict(block_size=(8, 4)), "multiple of 32"), (dict(act_dtype=torch.float32), "fp32"),
    (dict(device_type="cuda"), "CPU"),
])
def test_can_implement_refuses(change, reason):
    spec = lk.LinearSpec(**{**dict(bits=4, block_size=(1, 32), out_features=64, in_features=64,
                                   act_dtype=torch.bfloat16, device_type="cpu"), **change})
    ok, why = CpuInt4Kernel.can_implement(spec)
    assert not ok and reason in why


def test_disabled_by_environment(monkeypatch):
    """In the fixed order (cpu_measured off), QAHIRA_DISABLED_KERNELS=cpu_int4 turns off this
    kernel only: the layer goes to the next one that serves it (cpu_dequant_gemm), and the
    reason says why."""
    spec = lk.LinearSpec(4, (1, 32), 64, 64, torch.bfloat16, "cpu")
    monkeypatch.setenv("QAHIRA_DISABLED_KERNELS", "cpu_measured")
    assert lk.choose_kernel(spec)[0] is CpuInt4Kernel
    monkeypatch.setenv("QAHIRA_DISABLED_KERNELS", "cpu_measured,cpu_int4")
    kernel, reasons = lk.choose_kernel(spec)
    assert kernel is lk.CpuDequantGemmKernel
    assert "cpu_int4: disabled by QAHIRA_DISABLED_KERNELS" in reasons
    # fp32 layers still get the compiled exact kernel (the library is not switched off).
    assert lk.choose_kernel(lk.LinearSpec(4, (1, 32), 64, 64, torch.float32, "cpu"))[0] \
        is lk.CpuBlockwiseKernel


def test_failed_build_is_reported_not_raised(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_lib, "_lib", None)
    monkeypatch.setattr(cpu_lib, "_lib_error", None)
    monkeypatch.setenv("QAHIRA_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")
    spec = lk.LinearSpec(4, (1, 32), 64, 64, torch.bfloat16, "cpu")
    ok, why = CpuInt4Kernel.can_implement(spec)
    assert not ok and "/bin/false failed" in why and "cpu_intdot.c" in why
    assert list(tmp_path.glob("*")) == []  # no partial file left behind
