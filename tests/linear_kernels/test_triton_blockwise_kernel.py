"""qahira_vllm.linear_kernels.triton_blockwise: TritonBlockwiseKernel, what can_implement accepts
and rejects, prepare/apply on a layer (run in Triton's interpreter on CPU tensors, see
conftest.py). Its place in the kernel list: test_choose_kernel.py."""

from __future__ import annotations

import pytest
import torch

from support.linear_reference import linear_ref
from qahira_vllm.linear_kernels import LinearSpec
from qahira_vllm.linear_kernels import triton_blockwise as tl_linear
from qahira_vllm.linear_kernels.triton_blockwise import TritonBlockwiseKernel as Kernel
from qahira_vllm.quant_math import pack_qweight


def spec(bits=4, block=(1, 64), out_f=576, in_f=1536, dtype=torch.bfloat16, device="cuda"):
    return LinearSpec(bits=bits, block_size=block, out_features=out_f, in_features=in_f,
                      act_dtype=dtype, device_type=device)


@pytest.mark.parametrize("s", [
    spec(),
    spec(dtype=torch.float16),
    spec(bits=8, block=(8, 4), in_f=192),
    spec(block=(2, 16)), spec(block=(8, 8)), spec(block=(4, 32)), spec(block=(1, 128)),
    spec(block=(3, 24), out_f=576, in_f=192),        # odd bo, bi not a power of two
    spec(bits=8, block=(1, 1), out_f=30, in_f=50),   # 8-bit needs no in % 8
], ids=lambda s: f"{s.bits}b-{s.block_size[0]}x{s.block_size[1]}-{str(s.act_dtype)[6:]}")
def test_can_implement_accepts(s):
    assert Kernel.can_implement(s) == (True, None)


@pytest.mark.parametrize("s,why", [
    (spec(device="cpu"), "CUDA only"),
    (spec(dtype=torch.bfloat16, device="cpu"), "CUDA only"),
    (spec(dtype=torch.float32), "fp16/bf16 only"),
    (spec(bits=3), "4 or 8 only"),
    (spec(block=(5, 64)), "does not tile"),            # 576 % 5
    (spec(block=(1, 100)), "does not tile"),           # 1536 % 100
    (spec(block=(1, 4), in_f=20, out_f=8), "in % 8"),  # 4-bit packing
])
def test_can_implement_rejects(s, why):
    ok, reason = Kernel.can_implement(s)
    assert not ok and why in reason


def test_can_implement_without_triton_or_on_old_gpu(monkeypatch):
    monkeypatch.setattr(tl_linear, "_triton_available", lambda: False)
    assert Kernel.can_implement(spec()) == (False, "triton is not installed")
    monkeypatch.setattr(tl_linear, "_triton_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    ok, reason = Kernel.can_implement(spec(dtype=torch.bfloat16))
    assert not ok and "compute capability" in reason
    assert Kernel.can_implement(spec(dtype=torch.float16)) == (True, None)


def _layer(bits, block, out_f, in_f, offset_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    bo, bi = block
    layer = torch.nn.Module()
    q = torch.randint(0, 2 ** bits, (out_f, in_f), generator=g, dtype=torch.uint8)
    layer.qweight = torch.nn.Parameter(pack_qweight(q, bits), requires_grad=False)
    layer.scales = torch.nn.Parameter(
        (0.004 + 0.02 * torch.rand(out_f // bo, in_f // bi, generator=g)).half(),
        requires_grad=False)
    layer.offsets = torch.nn.Parameter(
        (0.15 * torch.randn(out_f // bo, in_f // bi, generator=g)).to(offset_dtype),
        requires_grad=False)
    return layer


@pytest.mark.parametrize("bits,block,act,offset_dtype", [
    (4, (1, 32), torch.bfloat16, torch.float16),
    (4, (4, 32), torch.float16, torch.float32),
    (8, (8, 4), torch.bfloat16, torch.float32),
])
def test_prepare_and_apply_match_reference(bits, block, act, offset_dtype):
    out_f, in_f = 48, 96
    layer = _layer(bits, block, out_f, in_f, offset_dtype)
    stored = {n: getattr(layer, n).data.clone() for n in ("qweight", "scales", "offsets")}
    kernel = Kernel(spec(bits, block, out_f, in_f, act))
    kernel.prepare(layer)
    assert not hasattr(layer, "scales") and not hasattr(layer, "offsets")
    assert set(dict(layer.named_buffers())) == {"qweight", "scales_t", "offsets_t"}
    assert torch.equal(layer.qweight, stored["qweight"])             # kept as stored
    assert torch.equal(layer.scales_t, stored["scales"].t())         # transposed only
    assert layer.offsets_t.dtype == offset_dtype
    bias = torch.randn(out_f).to(act)
    x = torch.randn(2, 3, in_f).to(act)
    y = kernel.apply(layer, x, bias)
    assert y.shape == (2, 3, out_f) and y.dtype == act
    ref = linear_ref(x, stored["qweight"], stored["scales"], stored["offsets"], bits, block, bias)
    tol = 2e-3 if act == torch.float16 else 2e-2
    assert ((y.float() - ref).abs().max() / ref.abs().max()).item() < tol
    # Activations in another dtype are cast to the layer's and back.
    y32 = kernel.apply(layer, x.float(), bias)
    assert y32.dtype == torch.float32
    assert ((y32 - ref).abs().max() / ref.abs().max()).item() < tol


def test_custom_op_fake_shape_for_torch_compile():
    """torch.compile traces the op through its fake implementation: right shape and dtype."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer = _layer(4, (1, 32), 48, 96, torch.float16)
    kernel = Kernel(spec(4, (1, 32), 48, 96, torch.bfloat16))
    kernel.prepare(layer)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x = mode.from_tensor(torch.randn(5, 7, 96).bfloat16())
        y = torch.ops.qahira.triton_blockwise(x, layer.qweight, layer.scales_t,
                                              layer.offsets_t, None, 4, 1, 32)
    assert y.shape == (5, 7, 48) and y.dtype == torch.bfloat16
