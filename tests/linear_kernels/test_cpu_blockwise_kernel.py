"""qahira_vllm.linear_kernels.cpu_blockwise: CpuBlockwiseKernel (prepare/apply on a layer, under
torch.compile, row independence at every M). The op itself: tests/kernels/test_cpu_blockwise.py.

Outputs are compared against an fp64 GEMM on the format's dequantized weight within fp32
summation slack, 1e-6 * sum_k |x_k W_nk|, plus the output dtype's rounding for bf16/fp16.
"""

from __future__ import annotations

import pytest
import torch

from support.linear_reference import ROUNDING, layer_of
from support.linear_reference import dequantize_ref as _reference_weight
from support.linear_reference import stored_tensors as _stored
from qahira_vllm import linear_kernels as lk
from qahira_vllm.linear_kernels.cpu_blockwise import CpuBlockwiseKernel

FP32_SLACK = 1e-6


def test_traced_by_torch_compile_as_one_op():
    """vLLM compiles the model on CPU unless eager: the op must trace with fullgraph (fake impl)
    and serve any M (dynamic shapes)."""
    spec = lk.LinearSpec(bits=8, block_size=(2, 4), out_features=16, in_features=64,
                         act_dtype=torch.float32, device_type="cpu")
    qw, s, o = _stored(16, 64, 8, (2, 4))
    layer = layer_of(qw, s, o)
    kernel = CpuBlockwiseKernel(spec)
    kernel.prepare(layer)
    compiled = torch.compile(lambda t: kernel.apply(layer, t) * 2, backend="aot_eager",
                             fullgraph=True, dynamic=True)
    for m in (3, 37):
        x = torch.randn(m, 64)
        assert torch.equal(compiled(x), kernel.apply(layer, x) * 2)


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
    layer = layer_of(qw, s, o)
    kernel = CpuBlockwiseKernel(spec)
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
    assert CpuBlockwiseKernel.can_implement(spec) == (True, None)
    qw, s, o = _stored(out_f, in_f, bits, block, offset_dtype=torch.float32, seed=m)
    layer = layer_of(qw, s, o)
    kernel = CpuBlockwiseKernel(spec)
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
