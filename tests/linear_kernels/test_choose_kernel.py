"""qahira_vllm.linear_kernels: the one ordered list KERNELS, choose_kernel (first enabled kernel
that can implement the layer, with every earlier kernel's reason) and QAHIRA_DISABLED_KERNELS."""

from __future__ import annotations

import pytest
import torch

from support.linear_reference import run_kernel
from qahira_kernels import cpu_lib
from qahira_vllm import linear_kernels as lk
from qahira_vllm.linear_kernels.cpu_measured import candidates

ENV = "QAHIRA_DISABLED_KERNELS"


def _spec(bits=4, block=(1, 64), act=torch.bfloat16, dev="cpu", out_f=128, in_f=256):
    return lk.LinearSpec(bits=bits, block_size=block, out_features=out_f, in_features=in_f,
                         act_dtype=act, device_type=dev)


def _choose(spec):
    return lk.choose_kernel(spec)[0]


def test_one_fixed_list_one_name_per_kernel():
    assert isinstance(lk.KERNELS, tuple)  # no run-time registration
    assert not hasattr(lk, "register_kernel") and not hasattr(lk, "select_kernel")
    assert [k.name for k in lk.KERNELS] == ["triton_blockwise", "cpu_measured", "cpu_int4",
                                            "cpu_int8", "cpu_dequant_gemm", "cpu_int4pack",
                                            "cpu_blockwise", "cpu_dequant_dense",
                                            "dequant_torch"]
    for k in lk.KERNELS:  # the name is the module's
        assert k.__module__ == f"qahira_vllm.linear_kernels.{k.name}"
    assert lk.KERNELS[0] is lk.TritonBlockwiseKernel and lk.KERNELS[-1] is lk.DequantTorchKernel


@pytest.fixture
def torch_kernels_only(monkeypatch):
    """Only the torch kernels (cpu_int4pack, dequant_torch), through the disable switch."""
    monkeypatch.setenv(ENV, "triton_blockwise, cpu_measured, cpu_int4,cpu_int8,cpu_dequant_gemm,"
                       "cpu_blockwise,cpu_dequant_dense")


def test_choose_among_torch_kernels(torch_kernels_only):
    assert _choose(_spec()) is lk.CpuInt4PackKernel
    assert _choose(_spec(act=torch.float16)) is lk.CpuInt4PackKernel
    assert _choose(_spec(bits=8)) is lk.CpuInt4PackKernel
    for spec in (_spec(act=torch.float32), _spec(dev="cuda"),
                 _spec(block=(8, 4)), _spec(block=(1, 16)), _spec(out_f=40, in_f=64)):
        assert _choose(spec) is lk.DequantTorchKernel


def test_chosen_kernel_runs_when_out_not_multiple_of_16(torch_kernels_only):
    """out=40 with a 1x32 block is a valid layer; whatever is chosen must run it."""
    spec = _spec(out_f=40, in_f=64, block=(1, 32))
    y, y_ref, _ = run_kernel(_choose(spec), 40, 64, 4, (1, 32), torch.bfloat16, 3, True)
    assert (y - y_ref).abs().max() <= 2e-2 * y_ref.abs().max()


def test_reasons_of_every_earlier_kernel(monkeypatch):
    monkeypatch.setenv(ENV, "cpu_int4pack")
    kernel, reasons = lk.choose_kernel(_spec(block=(8, 4), act=torch.float32))
    assert kernel is lk.CpuBlockwiseKernel
    assert reasons == ["triton_blockwise: CUDA only (layer is on cpu)",
                       "cpu_measured: nothing to choose between (cpu_dequant_dense)",
                       "cpu_int4: bi must be a multiple of 32",
                       "cpu_int8: 8-bit only",
                       "cpu_dequant_gemm: bf16 activations only",
                       f"cpu_int4pack: disabled by {ENV}"]
    monkeypatch.setenv(ENV, "cpu_measured")
    assert lk.choose_kernel(_spec()) == (lk.CpuInt4Kernel,
                                         ["triton_blockwise: CUDA only (layer is on cpu)",
                                          f"cpu_measured: disabled by {ENV}"])


def test_triton_first_for_cuda_only():
    """triton_blockwise can_implement answers without a GPU (it imports no Triton)."""
    spec = lambda **kw: _spec(**{"block": (1, 64), "out_f": 576, "in_f": 1536, "dev": "cuda",
                                 **kw})
    assert _choose(spec()) is lk.TritonBlockwiseKernel
    assert _choose(spec(dev="cpu")) is not lk.TritonBlockwiseKernel
    assert _choose(spec(act=torch.float32)) is lk.DequantTorchKernel


def test_cpu_blockwise_for_fp32_and_for_shapes_the_fast_kernels_refuse(monkeypatch):
    """fp32 layers and fp16 odd blocks get cpu_blockwise; bf16 2-D blocks the integer-dot
    kernels refuse get cpu_measured, choosing between cpu_dequant_dense and each
    cpu_dequant_gemm build this CPU runs (cpu_dequant_gemm in the fixed order); INT4 bf16 gets
    cpu_measured (cpu_int4 in the fixed order); CUDA and no library fall through."""

    def spec(bits=4, block=(1, 32), act=torch.float32, dev="cpu"):
        return lk.LinearSpec(bits, block, 64, 128, act, dev)

    for s in (spec(), spec(bits=8), spec(bits=8, block=(1, 16), act=torch.float16)):
        assert _choose(s) is lk.CpuBlockwiseKernel, s
    monkeypatch.delenv(cpu_lib.ISA_ENV, raising=False)  # one candidate per build this CPU runs
    odd_bf16 = spec(block=(8, 4), act=torch.bfloat16)
    assert _choose(odd_bf16) is lk.CpuMeasuredKernel
    assert sorted(candidates(odd_bf16)) == sorted(
        ["cpu_dequant_dense"] + [f"cpu_dequant_gemm[{v}]" for v in cpu_lib.dequant_gemm_variants()])
    assert _choose(spec(act=torch.bfloat16)) is lk.CpuMeasuredKernel
    monkeypatch.setenv(ENV, "cpu_measured")
    assert _choose(odd_bf16) is lk.CpuDequantGemmKernel
    assert _choose(spec(act=torch.bfloat16)) is lk.CpuInt4Kernel
    monkeypatch.delenv(ENV)
    assert _choose(spec(dev="cuda")) is lk.DequantTorchKernel
    assert lk.CpuBlockwiseKernel.can_implement(spec(bits=3))[0] is False
    monkeypatch.setattr(cpu_lib, "_lib", None)
    monkeypatch.setattr(cpu_lib, "_lib_error", "no C compiler (gcc/cc) to build qahira's CPU "
                        "kernels")
    ok, why = lk.CpuBlockwiseKernel.can_implement(spec())
    assert not ok and "no C compiler" in why
    kernel, reasons = lk.choose_kernel(spec())
    assert kernel is lk.DequantTorchKernel
    assert "cpu_blockwise: no C compiler" in reasons[-2]
    assert "cpu_dequant_dense: no C compiler" in reasons[-1]


def test_unknown_name_in_switch_is_an_error(monkeypatch):
    monkeypatch.setenv(ENV, "cpu_gemv")
    with pytest.raises(ValueError, match=r"QAHIRA_DISABLED_KERNELS=.*cpu_gemv.*valid names: "
                                         r"triton_blockwise, cpu_measured, cpu_int4"):
        lk.choose_kernel(_spec())


def test_everything_disabled_lists_every_reason(monkeypatch):
    monkeypatch.setenv(ENV, "cpu_int4pack,dequant_torch")
    with pytest.raises(ValueError, match="no qahira kernel implements") as e:
        lk.choose_kernel(_spec(act=torch.float32, block=(1, 16), bits=8, dev="cuda"))
    for name in ("triton_blockwise:", "cpu_int4:", "cpu_int4pack: disabled",
                 "cpu_blockwise: CPU only", "dequant_torch: disabled"):
        assert name in str(e.value)


@pytest.mark.parametrize("bits,block,act,chosen", [
    (4, (1, 32), torch.bfloat16, "cpu_int4"), (8, (1, 64), torch.float16, "cpu_int8"),
    (4, (2, 16), torch.float32, "cpu_blockwise")])
def test_fp32_scales_go_to_the_kernels_that_read_them(bits, block, act, chosen, monkeypatch):
    """Format 2's float32 scales: cpu_int4pack and triton_blockwise (fp16 scale tables) refuse
    with a reason; cpu_int4 / cpu_int8 / cpu_blockwise read them as stored and are chosen as
    for fp16 scales. Outputs against x @ W^T for the fp32 W = s * q + o (two fp32 operations,
    computed here by index): dequant_torch bit for bit (as F.linear on W in the activation
    dtype), cpu_blockwise within fp32 summation order (1e-6 of sum |x W|) plus one rounding of
    the output dtype, the integer-dot kernels within their documented activation-rounding bound
    (linear_reference.check_int4). The fixed order (cpu_measured off): cpu_measured's choices
    are these kernels and cpu_dequant_gemm (tests/kernels/test_cpu_dequant_gemm.py)."""
    from support import tiny as tm
    from support.linear_reference import check_int4
    from qahira_vllm.quant_math import pack_qweight

    spec = lk.LinearSpec(bits=bits, block_size=block, out_features=64, in_features=128,
                         act_dtype=act, device_type="cpu", scale_dtype=torch.float32)
    monkeypatch.setenv(ENV, "cpu_measured")
    kernel_cls, _ = lk.choose_kernel(spec)
    assert kernel_cls.name == chosen
    assert lk.CpuInt4PackKernel.can_implement(spec) == (False, "float16 scales only (float32 "
                                                                "scales)")
    assert not lk.TritonBlockwiseKernel.can_implement(spec)[0]
    g = torch.Generator().manual_seed(3)
    bo, bi = block
    q = torch.randint(0, 1 << bits, (64, 128), generator=g, dtype=torch.uint8)
    scales = torch.rand(64 // bo, 128 // bi, generator=g) * 0.02 + 1e-3  # full fp32 mantissas
    offsets = torch.randn(64 // bo, 128 // bi, generator=g) * 0.1
    x = torch.randn(3, 128, generator=g).to(act)
    w = (q.float() * tm.expand_ref(scales, block, q.shape).float()
         + tm.expand_ref(offsets, block, q.shape).float())
    y_ref = x.double() @ w.double().t()
    slack = 1e-6 * (x.double().abs() @ w.double().abs().t()) + \
        {torch.float32: 0.0, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[act] * y_ref.abs()
    for cls in {kernel_cls, lk.CpuBlockwiseKernel, lk.DequantTorchKernel}:
        layer = torch.nn.Module()
        for n, t in (("qweight", pack_qweight(q, bits)), ("scales", scales),
                     ("offsets", offsets)):
            layer.register_parameter(n, torch.nn.Parameter(t, requires_grad=False))
        kernel = cls(spec)
        kernel.prepare(layer)
        y = kernel.apply(layer, x)
        if cls is lk.DequantTorchKernel:  # W rounded to the activation dtype, then the GEMM
            assert torch.equal(y, torch.nn.functional.linear(x, w.to(act)))
        elif cls is lk.CpuBlockwiseKernel:  # W kept in fp32, the output rounded once
            assert ((y.double() - y_ref).abs() <= slack).all()
        else:
            check_int4(y, x, q, scales, offsets, block)
