"""qahira_kernels.cpu_gemv (and cpu_lib, which builds it): the compiled AVX2 INT4 kernel against an fp64 reference.

The kernel quantizes activations to 16 bits per 32 columns, so the reference comparison uses the
kernel's own error bound, computed per output from the data (see cpu_int4_gemv.c):
    |y - y_ref| <= sum_c s_c * sum_{k in c} q_k * max|x_c| / 65534   (+ fp32 accumulation slack)
plus the output dtype's rounding for bf16/fp16 outputs.
This machine class (x86-64 with AVX2 and gcc) is what CI runs on, so the kernel must build here:
a test fails, rather than skips, if it does not.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tiny_models as tm  # noqa: E402
from qahira_kernels import cpu_gemv as cg  # noqa: E402
from qahira_kernels import cpu_lib  # noqa: E402
from qahira_vllm import linear_kernels as lk  # noqa: E402
from qahira_vllm.quant_math import pack_qweight  # noqa: E402

ROUNDING = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def _layer(out_f, in_f, block, seed=0, offset_dtype=torch.float16):
    bo, bi = block
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.uint8)
    scales = ((0.15 + 0.1 * torch.rand(out_f // bo, in_f // bi, generator=g)) / 15).half()
    offsets = (-0.1 + 0.02 * torch.randn(out_f // bo, in_f // bi, generator=g)).to(offset_dtype)
    layer = torch.nn.Module()
    for name, t in (("qweight", pack_qweight(q, 4)), ("scales", scales), ("offsets", offsets)):
        layer.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))
    return layer, q, scales, offsets


def _bound(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, block) -> torch.Tensor:
    """Per-output bound [M, N] of the activation-quantization error, plus fp32 slack."""
    bo, bi = block
    x2 = x.reshape(-1, x.shape[-1]).double()
    m, k = x2.shape
    amax = x2.abs().view(m, k // 32, 32).amax(-1)                                  # [M, K/32]
    s = scales.double().repeat_interleave(bo, 0).repeat_interleave(bi // 32, 1)    # [N, K/32]
    qsum = q.double().view(q.shape[0], k // 32, 32).sum(-1)                        # [N, K/32]
    w_abs = tm.dequant_ref(q, scales, torch.zeros_like(scales), block).abs() + 0.2
    return amax / 65534 @ (s * qsum).t() + 1e-6 * (x2.abs() @ w_abs.t())


def _check(y, x, q, scales, offsets, block, bias=None):
    w_ref = tm.dequant_ref(q, scales, offsets, block)
    y_ref = x.double() @ w_ref.t()
    if bias is not None:
        y_ref = y_ref + bias.double()
    err = (y.double() - y_ref).reshape(-1, y.shape[-1]).abs()
    tol = _bound(x, q, scales, block) + ROUNDING[y.dtype] * y_ref.reshape(-1, y.shape[-1]).abs()
    if bias is not None:  # bias added to the rounded GEMM output, then rounded again
        tol = tol + ROUNDING[y.dtype] * (y_ref - bias.double()).reshape(-1, y.shape[-1]).abs()
    assert (err <= tol).all(), f"max excess {(err - tol).max().item():.3g}"
    return err


def test_library_builds_here():
    assert cpu_lib.load_library() is not None, cpu_lib.library_error()


@pytest.mark.parametrize("block,out_f,in_f", [
    ((1, 32), 96, 160), ((1, 64), 40, 576), ((8, 96), 64, 96), ((16, 64), 48, 256),
    ((1, 128), 13, 384), ((2, 32), 30, 32), ((1, 256), 24, 512), ((2, 96), 6, 864),
])
@pytest.mark.parametrize("m", [1, 3, 4, 5, 17, 70])
@pytest.mark.parametrize("offset_dtype", [torch.float16, torch.float32])
def test_op_fp32_within_activation_quantization_bound(block, out_f, in_f, m, offset_dtype):
    """fp32 in and out: the only error is the documented activation rounding (and fp32 sums)."""
    _, q, scales, offsets = _layer(out_f, in_f, block, seed=m, offset_dtype=offset_dtype)
    x = torch.randn(m, in_f, generator=torch.Generator().manual_seed(m)) * 3
    x[0, :7] = 0.0          # a chunk with zeros and one with a single large value
    x[-1, 40 % in_f] = 50.0
    y = torch.ops.qahira.cpu_int4_linear(x, cg.prepare_weight(q), scales, offsets, *block)
    assert y.dtype == torch.float32 and y.shape == (m, out_f)
    err = _check(y, x, q, scales, offsets, block)
    # and the bound is tight enough to mean something: far below bf16 output rounding
    assert err.max() <= 1e-3 * (x.abs().max() * 0.2 * in_f)


@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block", [(1, 32), (1, 64), (4, 64)])
def test_kernel_interface_bf16_fp16_bias_3d(act_dtype, block):
    spec = lk.LinearSpec(bits=4, block_size=block, out_features=64, in_features=192,
                         act_dtype=act_dtype, device_type="cpu")
    assert cg.CpuAvx2Int4Kernel.can_implement(spec) == (True, None)
    layer, q, scales, offsets = _layer(64, 192, block, seed=3)
    kernel = cg.CpuAvx2Int4Kernel(spec)
    kernel.prepare(layer)
    assert not hasattr(layer, "qweight") and list(layer.parameters()) == []
    assert layer.gemv_weight.dtype == torch.uint8 and layer.gemv_weight.shape == (64, 96)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 192, generator=g).to(act_dtype)
    bias = (torch.randn(64, generator=g) * 0.5).to(act_dtype)
    y = kernel.apply(layer, x, bias)
    assert y.dtype == act_dtype and y.shape == (2, 5, 64)
    _check(y, x, q, scales, offsets, block, bias)


def test_each_row_independent_of_batch():
    """A row's output is bit-identical whatever else is in the batch (any M, any position)."""
    block = (1, 64)
    _, q, scales, offsets = _layer(80, 256, block, seed=7)
    w = cg.prepare_weight(q)
    x = torch.randn(37, 256, generator=torch.Generator().manual_seed(8)).bfloat16()
    full = torch.ops.qahira.cpu_int4_linear(x, w, scales, offsets, *block)
    for i in (0, 5, 36):
        alone = torch.ops.qahira.cpu_int4_linear(x[i:i + 1], w, scales, offsets, *block)
        assert torch.equal(alone[0], full[i])
    part = torch.ops.qahira.cpu_int4_linear(x[3:9], w, scales, offsets, *block)
    assert torch.equal(part, full[3:9])


def test_prepare_weight_layout():
    q = torch.arange(64, dtype=torch.int32).remainder(16).view(1, 64).repeat(2, 1)
    q[1] = 15 - q[1]
    w = cg.prepare_weight(q)
    assert w.shape == (2, 32) and w.dtype == torch.uint8
    for n in range(2):
        for c in range(2):
            for j in range(16):
                byte = int(w[n, c * 16 + j])
                assert byte & 15 == q[n, c * 32 + j] and byte >> 4 == q[n, c * 32 + 16 + j]


def test_multithreaded_equals_single_thread():
    _, q, scales, offsets = _layer(256, 512, (1, 32), seed=11)
    w = cg.prepare_weight(q)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(12)).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.qahira.cpu_int4_linear(x, w, scales, offsets, 1, 32)
        torch.set_num_threads(2)
        two = torch.ops.qahira.cpu_int4_linear(x, w, scales, offsets, 1, 32)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_traced_by_torch_compile_as_one_op():
    """vLLM compiles the model: the op must trace with fullgraph (fake impl) and give the same y."""
    spec = lk.LinearSpec(bits=4, block_size=(1, 32), out_features=48, in_features=128,
                         act_dtype=torch.bfloat16, device_type="cpu")
    layer, *_ = _layer(48, 128, (1, 32), seed=5)
    kernel = cg.CpuAvx2Int4Kernel(spec)
    kernel.prepare(layer)
    x = torch.randn(4, 128).bfloat16()
    compiled = torch.compile(lambda t: kernel.apply(layer, t) * 2, backend="aot_eager",
                             fullgraph=True)
    assert torch.equal(compiled(x), kernel.apply(layer, x) * 2)


@pytest.mark.parametrize("change,reason", [
    (dict(bits=8), "4-bit"), (dict(block_size=(1, 16)), "multiple of 32"),
    (dict(block_size=(8, 4)), "multiple of 32"), (dict(act_dtype=torch.float32), "fp32"),
    (dict(device_type="cuda"), "CPU"),
])
def test_can_implement_refuses(change, reason):
    spec = lk.LinearSpec(**{**dict(bits=4, block_size=(1, 32), out_features=64, in_features=64,
                                   act_dtype=torch.bfloat16, device_type="cpu"), **change})
    ok, why = cg.CpuAvx2Int4Kernel.can_implement(spec)
    assert not ok and reason in why


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """Forget the loaded library so load_library() runs again under the test's environment."""
    monkeypatch.setattr(cpu_lib, "_lib", None)
    monkeypatch.setattr(cpu_lib, "_lib_error", None)
    monkeypatch.setenv("QAHIRA_HOME", str(tmp_path))


def test_disabled_by_environment(fresh_library, monkeypatch):
    monkeypatch.setenv("QAHIRA_CPU_GEMV", "0")
    spec = lk.LinearSpec(4, (1, 32), 64, 64, torch.bfloat16, "cpu")
    ok, why = cg.CpuAvx2Int4Kernel.can_implement(spec)
    assert not ok and "QAHIRA_CPU_GEMV=0" in why


def test_failed_build_is_reported_not_raised(fresh_library, monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "/bin/false")
    spec = lk.LinearSpec(4, (1, 32), 64, 64, torch.bfloat16, "cpu")
    ok, why = cg.CpuAvx2Int4Kernel.can_implement(spec)
    assert not ok and "/bin/false failed" in why and "cpu_int4_gemv.c" in why
    assert list((tmp_path / "cpu_kernels").glob("*")) == []  # no partial file left behind


def test_build_is_cached_and_atomic(fresh_library, tmp_path):
    assert cpu_lib.load_library() is not None
    built = list((tmp_path / "cpu_kernels").glob("*"))
    assert len(built) == 1 and built[0].suffix == ".so"
    mtime = built[0].stat().st_mtime_ns
    cpu_lib._lib, cpu_lib._lib_error = None, None
    assert cpu_lib.load_library() is not None
    assert built[0].stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert os.access(built[0], os.R_OK)
