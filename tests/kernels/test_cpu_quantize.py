"""qahira_kernels' cpu_quantize: the compiled clip search (kernels/cpu_quantize.c) must give the
bits of the format's one definition, qahira_vllm.quant_math.quantize (itself checked against a
scalar numpy float32 reference in tests/test_quant_math.py): the same qweight, scales, offsets
and per-block squared errors, for every block shape, INT4 and INT8, fp16 and fp32 offsets,
fp32 / bf16 / fp16 input, normal and heavy-tailed weights, any thread count.
This machine class (x86-64 with AVX2 and gcc) is what CI runs on, so the kernel must build here.
"""

from __future__ import annotations

import pytest
import torch

from qahira_kernels import cpu_lib, ops
from qahira_vllm import quant_math as qm
from qahira_vllm.format import QahiraQuantConfig

RATIOS = qm.fp32_ratios(qm.DEFAULT_CLIP_RATIOS)

# (shape, block): 1xN rows, square and tall blocks, and blocks of 18 / 5 values (not a
# multiple of the 16 error lanes; odd bi puts two blocks in one INT4 byte)
CASES = [((64, 256), (1, 32)), ((64, 512), (1, 64)), ((32, 512), (1, 128)),
         ((64, 128), (8, 4)), ((64, 128), (32, 32)), ((48, 96), (3, 6)), ((16, 40), (1, 5))]


def _weights(shape, kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    if kind == "heavy":  # normal / uniform: rare values 10-20x the typical one
        w = w / torch.rand(shape, generator=g).clamp_min(0.05)
    if kind == "special":  # a constant block, an all-zero one, a tiny range, an fp16-tie range
        w[0] = 0.37
        w[1] = 0.0
        w[2] = 1.0 + torch.arange(shape[1]) * 2.0 ** -20
        w[3] = torch.arange(shape[1]) % 16 * 0.5
    return w


def test_kernel_builds_here():
    assert cpu_lib.load_library() is not None, cpu_lib.library_error()


@pytest.mark.parametrize("shape,block", CASES)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("offset_dtype", ["float16", "float32"])
def test_equals_the_definition_bit_for_bit(shape, block, bits, offset_dtype):
    cfg = QahiraQuantConfig(bits=bits, block_size=block, offset_dtype=offset_dtype)
    for seed, kind in enumerate(("normal", "heavy", "special")):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            w = _weights(shape, kind, seed).to(dtype)
            q, s, o, e = qm.quantize_with_error(w, cfg)
            qw, s2, o2, e2, ref = ops.cpu_quantize(w, bits, *block, RATIOS,
                                                   offset_dtype == "float32")
            case = (kind, dtype)
            assert torch.equal(qw, qm.pack_qweight(q, bits)), case
            assert s2.dtype == torch.float16 and torch.equal(s2, s), case
            assert o2.dtype == cfg.offset_torch_dtype and torch.equal(o2, o), case
            assert torch.equal(e2, e), case
            # sum(w^2) per block, any order: fp32 slack
            blocks = qm._to_blocks(w.double(), block)
            assert torch.allclose(ref.double(), blocks.square().sum(-1), rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize("bits,block", [(4, (1, 64)), (8, (8, 4))])
def test_minmax_only_and_thread_counts_agree(bits, block):
    w = _weights((96, 256), "heavy", 7)
    cfg = QahiraQuantConfig(bits=bits, block_size=block)
    q, s, o, e = qm.quantize_with_error(w, cfg, clip_search=False)
    for threads in (1, 2, 5):  # more threads than blocks rows per thread: same bits
        got = ops.cpu_quantize(w, bits, *block, (1.0,), False, n_threads=threads)
        assert torch.equal(got[0], qm.pack_qweight(q, bits)) and torch.equal(got[1], s)
        assert torch.equal(got[2], o) and torch.equal(got[3], e)
    full = ops.cpu_quantize(w, bits, *block, RATIOS, False, n_threads=1)
    assert (full[3] <= e).all()  # 1.0 is a candidate: never worse than min-max
    assert bits == 8 or (full[3] < e).any()  # and at 4 bits clipping wins somewhere


@pytest.mark.parametrize("value,offset_dtype", [(float("nan"), "float32"),
                                                (float("inf"), "float16"),
                                                (-1e6, "float16"),  # scale > 65504 (4 bits)
                                                (-7e4, "float16")])  # offset -> fp16 -inf
def test_unstorable_weights_are_reported(value, offset_dtype):
    w = _weights((16, 64), "normal", 3)
    w[5, 7] = value
    with pytest.raises(ops.NotStorableError, match="not storable"):
        ops.cpu_quantize(w, 4, 1, 32, RATIOS, offset_dtype == "float32")
    if value == -7e4:  # the same weight is storable with fp32 offsets (range 7e4 / 15 < 65504)
        ops.cpu_quantize(w, 4, 1, 32, RATIOS, True)


def test_bad_arguments_are_refused():
    w = torch.randn(16, 64)
    with pytest.raises(ValueError, match="block must divide"):
        ops.cpu_quantize(w, 4, 3, 32, RATIOS, False)
    with pytest.raises(ValueError, match="block must divide"):
        ops.cpu_quantize(torch.randn(16, 60), 4, 1, 5, RATIOS, False)  # 4 bits: in % 8
    with pytest.raises(ValueError, match="fp32/bf16/fp16 CPU tensor"):
        ops.cpu_quantize(w.double(), 4, 1, 32, RATIOS, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_finite_matches_torch(dtype):
    x = (torch.randn(1000, 37) * 100).to(dtype)
    x[3, 4] = torch.finfo(dtype).max  # the largest finite value is finite
    assert ops.cpu_all_finite(x) and bool(torch.isfinite(x).all())
    for value in (float("nan"), float("inf"), float("-inf")):
        for index in ((0, 0), (999, 36), (500, 11)):
            y = x.clone()
            y[index] = value
            assert not ops.cpu_all_finite(y) and not ops.cpu_all_finite(y, n_threads=1)
    assert ops.cpu_all_finite(x[:, ::2])  # non-contiguous: checked on a contiguous copy
    with pytest.raises(ValueError, match="fp32/bf16/fp16 CPU tensor"):
        ops.cpu_all_finite(x.double())
