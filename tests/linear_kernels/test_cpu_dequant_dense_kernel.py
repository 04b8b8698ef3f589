"""qahira_vllm.linear_kernels.cpu_dequant_dense: CpuDequantDenseKernel against torch's own
F.linear on the weight computed independently (support.tiny's fp64 dequantization by index,
rounded to fp32, the format's one rounding of s * q + o, then to the activation dtype): the
kernel runs that same GEMM on the same bits, so the outputs are equal exactly. Also: the
shared buffer of one shape serves two layers, bias and 3-D input, torch.compile, bad stored
tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from support.linear_reference import check_traced_as_one_op, layer_and_fp64_weight
from qahira_vllm import linear_kernels as lk
from qahira_vllm.linear_kernels.cpu_dequant_dense import CpuDequantDenseKernel


def _spec(**kw):
    return lk.LinearSpec(**{**dict(bits=4, block_size=(1, 32), out_features=64, in_features=192,
                                   act_dtype=torch.bfloat16, device_type="cpu"), **kw})


@pytest.mark.parametrize("bits,block,out_f,in_f", [(4, (1, 32), 64, 192), (8, (1, 64), 48, 320),
                                                   (4, (8, 4), 80, 96), (8, (2, 6), 30, 66)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_equals_torch_linear_on_the_independently_dequantized_weight(bits, block, out_f, in_f,
                                                                     dtype):
    spec = _spec(bits=bits, block_size=block, out_features=out_f, in_features=in_f,
                 act_dtype=dtype)
    assert CpuDequantDenseKernel.can_implement(spec) == (True, None)
    layer, w_ref = layer_and_fp64_weight(out_f, in_f, bits, block, seed=bits + in_f)
    kernel = CpuDequantDenseKernel(spec)
    kernel.prepare(layer)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 7, in_f, generator=g).to(dtype)
    bias = (torch.randn(out_f, generator=g) * 0.5).to(dtype)
    w = w_ref.float().to(dtype)
    assert torch.equal(kernel.apply(layer, x), F.linear(x, w))
    y = kernel.apply(layer, x, bias)
    assert y.dtype == dtype and y.shape == (2, 7, out_f)
    assert torch.equal(y, F.linear(x, w) + bias)


def test_layers_of_one_shape_share_the_buffer_and_keep_their_outputs():
    spec = _spec()
    (l1, w1), (l2, w2) = (layer_and_fp64_weight(64, 192, 4, (1, 32), seed=s) for s in (1, 2))
    kernel = CpuDequantDenseKernel(spec)
    kernel.prepare(l1)
    kernel.prepare(l2)
    x = torch.randn(5, 192).bfloat16()
    y1 = kernel.apply(l1, x)
    y2 = kernel.apply(l2, x)
    assert torch.equal(y1, F.linear(x, w1.float().bfloat16()))
    assert torch.equal(y2, F.linear(x, w2.float().bfloat16()))


def test_is_traced_as_one_op():
    spec = _spec()
    layer, _ = layer_and_fp64_weight(64, 192, 4, (1, 32), seed=3)
    kernel = CpuDequantDenseKernel(spec)
    kernel.prepare(layer)
    check_traced_as_one_op(kernel, layer, 192)


def test_refuses_what_it_cannot_serve():
    assert CpuDequantDenseKernel.can_implement(_spec(device_type="cuda")) == (False, "CPU only")
    ok, why = CpuDequantDenseKernel.can_implement(_spec(act_dtype=torch.float64))
    assert not ok and "activations in" in why
    layer, _ = layer_and_fp64_weight(64, 192, 4, (1, 32), seed=3)
    layer.scales.data = layer.scales.data.float().bfloat16()
    with pytest.raises(ValueError, match="scales"):
        CpuDequantDenseKernel(_spec()).prepare(layer)
