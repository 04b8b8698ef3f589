"""qahira_vllm.linear_kernels.cpu_int4pack: CpuInt4PackKernel (torch's CPU int4 GEMM) against an
fp64 reference built from support.tiny's independent dequantization (no vLLM), and what it
accepts."""

from __future__ import annotations

import pytest
import torch

from support.linear_reference import layer_and_fp64_weight, run_kernel
from qahira_vllm import linear_kernels as lk


@pytest.mark.parametrize("block,out_f,in_f", [
    ((1, 32), 96, 160), ((1, 64), 192, 576), ((1, 128), 48, 384), ((2, 32), 192, 576),
    ((4, 64), 80, 320), ((1, 256), 16, 512),
])
@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_int4pack_kernel(bits, block, out_f, in_f, act_dtype, m, with_bias):
    y, y_ref, layer = run_kernel(lk.CpuInt4PackKernel, out_f, in_f, bits, block, act_dtype, m,
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
    y, y_ref, _ = run_kernel(lk.CpuInt4PackKernel, 64, 256, 4, block, torch.bfloat16, 0, True,
                       x_shape=(2, 3, 4))
    assert y.shape == (2, 3, 4, 64)
    assert (y - y_ref).abs().max() <= 2e-2 * y_ref.abs().max()


def test_int4pack_blocks_differ_along_output():
    """A 2-D block must be expanded along the output dim: rows 2k and 2k+1 share parameters.
    Swapping in a per-row (1x32) interpretation of the same scales would change the result."""
    layer, w_ref = layer_and_fp64_weight(32, 64, 4, (2, 32), seed=5)
    spec = lk.LinearSpec(4, (2, 32), 32, 64, torch.bfloat16, "cpu")
    k = lk.CpuInt4PackKernel(spec)
    k.prepare(layer)
    sz = layer.int4_scale_zero_0.float()
    assert torch.equal(sz[:, 0::2], sz[:, 1::2])  # each pair of rows shares (scale, zero)
    x = torch.eye(64, dtype=torch.bfloat16)       # y = W^T: reads back the dequantized weights
    w_back = k.apply(layer, x).double().t()
    # bf16 scale/zero and bf16 output: |dW| <= 2^-8 * (|W| + |zero|) + ..., bound 1e-2 abs
    assert (w_back - w_ref).abs().max() <= 1e-2


# ---- can_implement ------------------------------------------------------------------------------

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
    assert lk.DequantTorchKernel.can_implement(spec) == (True, None)


@pytest.mark.parametrize("block", [(1, 32), (1, 64), (1, 128), (1, 256), (4, 64)])
@pytest.mark.parametrize("act", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [4, 8])
def test_int4pack_accepts(block, act, bits):
    spec = _spec(block=block, act=act, bits=bits)
    assert lk.CpuInt4PackKernel.can_implement(spec) == (True, None)
