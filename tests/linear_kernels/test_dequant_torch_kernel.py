"""qahira_vllm.linear_kernels.dequant_torch: DequantTorchKernel (the general path) against an fp64
reference built from support.tiny's independent dequantization (no vLLM); and the tests' own fp32
reference (linear_reference.linear_ref, on quant_math.dequantize) against the same."""

from __future__ import annotations

import pytest
import torch

from support.linear_reference import layer_and_fp64_weight, linear_ref, run_kernel
from qahira_vllm import linear_kernels as lk


# ---- dequant path (fp32 activations) ---------------------------------------------------------

@pytest.mark.parametrize("bits,block,out_f,in_f", [
    (4, (1, 32), 96, 160), (4, (1, 64), 192, 576), (4, (1, 128), 48, 384), (4, (2, 32), 192, 576),
    (4, (8, 4), 40, 72), (4, (2, 16), 24, 48), (8, (1, 64), 40, 192), (8, (8, 4), 48, 100),
])
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("with_bias", [False, True])
def test_dequant_kernel_fp32(bits, block, out_f, in_f, m, with_bias):
    y, y_ref, _ = run_kernel(lk.DequantTorchKernel, out_f, in_f, bits, block, torch.float32, m,
                       with_bias, seed=m)
    # fp32 GEMM of exactly dequantized weights: relative 1e-5 of max|y| (K <= 576 terms)
    tol = 1e-5 * y_ref.abs().max()
    assert (y - y_ref).abs().max() <= tol


def test_dequant_kernel_bf16_and_3d_input():
    y, y_ref, layer = run_kernel(lk.DequantTorchKernel, 64, 128, 4, (8, 4), torch.bfloat16, 0,
                           True, x_shape=(2, 5))
    # weights rounded to bf16 (2^-9 relative) + bf16 output: 2e-2 of max|y|
    assert (y - y_ref).abs().max() <= 2e-2 * y_ref.abs().max()
    # prepare() keeps qweight packed and leaves no trainable parameters behind
    assert layer.qweight.dtype == torch.int32 and layer.qweight.shape == (64, 16)
    assert list(layer.parameters()) == []


def test_reference_linear_matches_independent_reference():
    layer, w_ref = layer_and_fp64_weight(48, 128, 4, (2, 16), seed=9)
    x = torch.randn(5, 128)
    bias = torch.randn(48)
    y = linear_ref(x, layer.qweight, layer.scales, layer.offsets, 4, (2, 16), bias)
    y_ref = x.double() @ w_ref.t() + bias.double()
    assert (y.double() - y_ref).abs().max() <= 1e-5 * y_ref.abs().max()  # fp32 GEMM
