"""qahira_kernels' cpu_dequant_gemm op (kernels/cpu_dequant_gemm.c, ops.cpu_dequant_gemm, its
layout layouts.pack_cpu_dequant_gemm) against an fp64 reference built here by index.

The op computes x W^T with W the layer's dense bf16 weight (the format's rule: s * q rounded to
fp32, plus o rounded to fp32, then bf16 to nearest even) and fp32 accumulation of exact products.
Reference: the same W computed here in torch from the unpacked integers (fp32 product, fp32 add,
.to(bfloat16)), then x W^T in fp64. Tolerance: fp32 summation of K exact products,
|y - ref| <= K * 2^-24 * sum_k |x_k W_k| (the standard bound for recursive summation), checked on
the fp32 output; the bf16 output must be that fp32 output rounded to nearest even.

The source is built four times (AVX2; AVX-512; AVX512-BF16 with vdpbf16ps; AMX tiles). Tests taking
`dq_variant` run once per build, the build in the test id; a build this CPU cannot run is
reported as skipped with the reason (test_every_build_compiles_and_links checks that all four
are compiled and linked on every machine).
"""

from __future__ import annotations

import subprocess

import pytest
import torch

from qahira_kernels import cpu_lib, ops
from qahira_kernels.layouts import (CPU_DEQUANT_GEMM_AMX_CHUNK, DEQUANT_GEMM_ROW_LAYOUT,
                                    pack_cpu_dequant_gemm, pack_cpu_dequant_gemm_rows)

VARIANTS = ("avx2", "avx512", "avx512_bf16", "amx")


@pytest.fixture(params=VARIANTS)
def dq_variant(request):
    runs = cpu_lib.dequant_gemm_variants()
    if request.param not in runs:
        pytest.skip(f"{request.param} build not run: this CPU runs only {runs} "
                    f"(built: {cpu_lib.dequant_gemm_built_variants()})")
    return request.param


def test_every_build_compiles_and_links():
    lib = cpu_lib.load_library()
    assert lib is not None, cpu_lib.library_error()
    assert cpu_lib.dequant_gemm_built_variants() == VARIANTS, cpu_lib._bf16dot_build_error
    nm = subprocess.run(["nm", "-D", "--defined-only", lib._name], capture_output=True,
                        text=True, check=True).stdout
    for v in VARIANTS:
        assert f" T qahira_cpu_dequant_gemm_{v}\n" in nm
    flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split())
    runs = cpu_lib.dequant_gemm_variants()
    assert ("avx512_bf16" in runs) == ({"avx512f", "avx512bw", "avx512vl", "avx512dq",
                                         "avx512_vnni", "avx512_bf16"} <= flags)
    # AMX also needs the OS to grant the tile state (Linux >= 5.16 does on AMX CPUs)
    assert ("amx" in runs) == ("avx512_bf16" in runs and {"amx_tile", "amx_bf16"} <= flags)


def _layer(bits, n, k, block, seed, s_dtype=torch.float16, o_dtype=torch.float16):
    bo, bi = block
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
    scales = ((0.15 + 0.1 * torch.rand(n // bo, k // bi, generator=g))
              / ((1 << bits) - 1)).to(s_dtype)
    offsets = (-0.1 + 0.02 * torch.randn(n // bo, k // bi, generator=g)).to(o_dtype)
    return q, scales, offsets


def _packed(q, scales, offsets, bits, block, variant):
    """(w, scales, offsets) in `variant`'s layout."""
    if variant in DEQUANT_GEMM_ROW_LAYOUT:
        return pack_cpu_dequant_gemm_rows(q, bits), scales.float(), offsets.float()
    return pack_cpu_dequant_gemm(q, scales, offsets, bits, block[0])


def _amx_serves(bits, k, block):
    return k % (64 if bits == 4 else 32) == 0 and block[1] % (32 if bits == 4 else 16) == 0


def _dense_bf16(q, scales, offsets, block):
    """W bf16 [N, K]: fp32 product, fp32 sum, bf16 rounding (the format's rule), by index."""
    bo, bi = block
    rows = torch.arange(q.shape[0]) // bo
    cols = torch.arange(q.shape[1]) // bi
    s = scales.float()[rows][:, cols]
    o = offsets.float()[rows][:, cols]
    return (q.float() * s + o).to(torch.bfloat16)


# N: one partial panel (16, 48), several panels with a partial last (80, 144); K: below, at and
# above the vector builds' 128-column chunks and AMX's 1024 (1088, 1056: a short last chunk),
# not a multiple of AMX's 32 (36, 260), odd pair counts per block (bi = 6); M across the
# register tiles (5 or 6 rows; AMX 32) and their remainders.
CASES = [(4, 16, 64, (1, 32)), (4, 80, 320, (1, 64)), (4, 48, 384, (2, 128)),
         (8, 144, 96, (1, 32)), (8, 64, 192, (4, 16)), (4, 32, 36, (1, 6)),
         (8, 16, 260, (16, 130)), (4, 80, 1088, (1, 64)), (8, 48, 1056, (2, 32))]


@pytest.mark.parametrize("bits,n,k,block", CASES)
@pytest.mark.parametrize("s_dtype,o_dtype", [(torch.float16, torch.float16),
                                             (torch.float16, torch.float32),
                                             (torch.float32, torch.float32)])
def test_matches_dense_bf16_weight_within_fp32_summation(dq_variant, bits, n, k, block, s_dtype,
                                                         o_dtype):
    if dq_variant in DEQUANT_GEMM_ROW_LAYOUT and not _amx_serves(bits, k, block):
        pytest.skip(f"{dq_variant} build does not serve in={k}, block {block} (refused: "
                    "test_bad_input_is_refused_with_what_was_expected)")
    q, scales, offsets = _layer(bits, n, k, block, seed=n + k, s_dtype=s_dtype, o_dtype=o_dtype)
    w_ref = _dense_bf16(q, scales, offsets, block).double()
    packed = _packed(q, scales, offsets, bits, block, dq_variant)
    for m in (1, 5, 6, 7, 13, 31, 33, 70):
        x = (torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 2).bfloat16()
        ref = x.double() @ w_ref.t()
        bound = k * 2.0 ** -24 * (x.double().abs() @ w_ref.abs().t())
        y32 = ops.cpu_dequant_gemm(x, *packed, bits, block[1], block[0], variant=dq_variant,
                                   out_dtype=torch.float32)
        assert y32.dtype == torch.float32 and y32.shape == (m, n)
        err = (y32.double() - ref).abs()
        assert (err <= bound).all(), (m, (err / bound).max().item())
        y = ops.cpu_dequant_gemm(x, *packed, bits, block[1], block[0], variant=dq_variant)
        assert y.dtype == torch.bfloat16 and torch.equal(y, y32.to(torch.bfloat16))


@pytest.mark.parametrize("bits,block", [(4, (1, 64)), (8, (2, 32))])
def test_rows_beyond_one_pass_are_split_into_blocks_with_the_same_bits(dq_variant, bits, block):
    """The vector builds take at most block_rows() rows per pass over the weight (a chunk's
    activations and accumulators in half of L2) and split larger calls into equal blocks: the
    result is each row's lone result bit for bit (rows computed alone, in calls of 1 and 7 rows)
    and within the fp32 summation bound of the reference, in fp32 and bf16 outputs."""
    if dq_variant in DEQUANT_GEMM_ROW_LAYOUT:
        pytest.skip(f"{dq_variant} build passes over all rows once (its loop orders: "
                    "test_amx_chunk_first_loop_order_within_fp32_summation)")
    rows = ops.cpu_dequant_gemm_block_rows(dq_variant)
    n, k = 32, 256
    assert 5 <= rows <= (64 << 20) // (k * 2)  # one register tile .. 64 MiB of L2
    m = 2 * rows + 3                            # three blocks, the last one row short
    q, scales, offsets = _layer(bits, n, k, block, seed=5)
    w_ref = _dense_bf16(q, scales, offsets, block).double()
    packed = _packed(q, scales, offsets, bits, block, dq_variant)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(4)) * 2).bfloat16()
    y32 = ops.cpu_dequant_gemm(x, *packed, bits, block[1], block[0], variant=dq_variant,
                               out_dtype=torch.float32)
    ref = x.double() @ w_ref.t()
    bound = k * 2.0 ** -24 * (x.double().abs() @ w_ref.abs().t())
    assert ((y32.double() - ref).abs() <= bound).all()
    picks = [0, rows - 1, rows, rows + 1, 2 * rows - 1, 2 * rows, m - 1]
    for i in picks:
        alone = ops.cpu_dequant_gemm(x[i:i + 1], *packed, bits, block[1], block[0],
                                     variant=dq_variant, out_dtype=torch.float32)
        assert torch.equal(alone[0], y32[i]), i
    sevens = torch.cat([ops.cpu_dequant_gemm(x[i:i + 7], *packed, bits, block[1], block[0],
                                             variant=dq_variant, out_dtype=torch.float32)
                        for i in range(0, m, 7)])
    assert torch.equal(sevens, y32)
    y = ops.cpu_dequant_gemm(x, *packed, bits, block[1], block[0], variant=dq_variant)
    assert torch.equal(y, y32.to(torch.bfloat16))


@pytest.mark.parametrize("bits,block", [(4, (1, 64)), (8, (2, 32))])
def test_amx_chunk_first_loop_order_within_fp32_summation(bits, block):
    """The AMX build's other loop order (chunks outside, panels inside: taken when the
    activations exceed half of L2), on a shape that takes it on any CPU (k / 2 x m words of
    4 bytes = 8 MiB), several chunks with a short last one, a partial last panel."""
    if "amx" not in cpu_lib.dequant_gemm_variants():
        pytest.skip(f"amx build not run: this CPU runs only {cpu_lib.dequant_gemm_variants()}")
    n, k, m = 80, 8256, 512
    assert ops.cpu_dequant_gemm_amx_chunks_outside(k, m)
    assert not ops.cpu_dequant_gemm_amx_chunks_outside(k, 16)  # 264 KiB: panels outside
    q, scales, offsets = _layer(bits, n, k, block, seed=11)
    w_ref = _dense_bf16(q, scales, offsets, block).double()
    packed = _packed(q, scales, offsets, bits, block, "amx")
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(3)) * 2).bfloat16()
    ref = x.double() @ w_ref.t()
    bound = k * 2.0 ** -24 * (x.double().abs() @ w_ref.abs().t())
    y32 = ops.cpu_dequant_gemm(x, *packed, bits, block[1], block[0], variant="amx",
                               out_dtype=torch.float32)
    err = (y32.double() - ref).abs()
    assert (err <= bound).all(), (err / bound).max().item()


@pytest.mark.parametrize("bits,block", [(4, (1, 64)), (4, (2, 32)), (8, (1, 16)), (8, (4, 32))])
@pytest.mark.parametrize("s_dtype", [torch.float16, torch.float32])
def test_amx_reproduces_every_weight_bit_for_bit(bits, block, s_dtype):
    """x = one-hot rows: y[m, n] = W[n, m], one exact product, so every dequantized weight is
    checked against the format's rule bit for bit. A bf16 weight that is denormal counts as
    zero: tdpbf16ps reads denormal inputs as zero (fp32 scales near 3e-39 put some here). An fp32
    value just below 2^-126 (bits 0x007FC000: a whole block with scale 0 and that offset) rounds
    to the normal bf16 2^-126 and must stay: AVX512-BF16's conversion would read it as zero."""
    if "amx" not in cpu_lib.dequant_gemm_variants():
        pytest.skip(f"amx build not run: this CPU runs only {cpu_lib.dequant_gemm_variants()}")
    n, k = 48, 1088  # a partial last panel; a short last chunk
    q, scales, offsets = _layer(bits, n, k, block, seed=5, s_dtype=s_dtype,
                                o_dtype=torch.float32)
    offsets[0, :4] = 0.0
    scales[0, :4] = 3e-39 if s_dtype == torch.float32 else scales[0, :4]  # denormal products
    scales[1, 1] = 0.0
    offsets[1, 1] = torch.tensor(0x007FC000, dtype=torch.int32).view(torch.float32)
    w_ref = _dense_bf16(q, scales, offsets, block).float()
    bo, bi = block
    assert (w_ref[bo:2 * bo, bi:2 * bi] == 2.0 ** -126).all()
    normal = (w_ref == 0) | (w_ref.abs() >= torch.finfo(torch.float32).tiny)
    if s_dtype == torch.float32:
        assert not normal.all()  # the case is exercised
    packed = _packed(q, scales, offsets, bits, block, "amx")
    x = torch.eye(k).bfloat16()
    y = ops.cpu_dequant_gemm(x, *packed, bits, block[1], block[0], variant="amx",
                             out_dtype=torch.float32)
    assert torch.equal(y.t(), torch.where(normal, w_ref, 0.0))


@pytest.mark.parametrize("bits", [4, 8])
def test_builds_agree_bit_for_bit(bits):
    """Every product exact and the same fp32 adds in the same order (odd column, then even,
    per pair): the vector builds agree on data without subnormals (AMX sums in its own order:
    held to the bound above)."""
    runs = tuple(v for v in cpu_lib.dequant_gemm_variants() if v != "amx")
    if len(runs) < 2:
        pytest.skip(f"needs two builds; this CPU runs only {runs}")
    for bits_, n, k, block in CASES:
        if bits_ != bits:
            continue
        q, scales, offsets = _layer(bits, n, k, block, seed=k)
        packed = pack_cpu_dequant_gemm(q, scales, offsets, bits, block[0])
        x = torch.randn(9, k, generator=torch.Generator().manual_seed(1)).bfloat16()
        ys = [ops.cpu_dequant_gemm(x, *packed, bits, block[1], block[0], variant=v,
                                   out_dtype=torch.float32) for v in runs]
        for v, y in zip(runs[1:], ys[1:]):
            assert torch.equal(y, ys[0]), (v, runs[0], (n, k, block))


def test_layout_holds_the_values_by_index():
    """pack_cpu_dequant_gemm against its docstring, element by element."""
    q, scales, offsets = _layer(4, 32, 8, (2, 4), seed=0)
    w, s, o = pack_cpu_dequant_gemm(q, scales, offsets, 4, 2)
    assert w.shape == (2, 4, 16) and s.shape == (2, 2, 16) and s.dtype == scales.dtype
    for n in range(32):
        for k in range(0, 8, 2):
            assert w[n // 16, k // 2, n % 16] == q[n, k] | (q[n, k + 1] << 4)
        for b in range(2):
            assert s[n // 16, b, n % 16] == scales[n // 2, b]
            assert o[n // 16, b, n % 16] == offsets[n // 2, b]
    q8, s8, o8 = _layer(8, 16, 4, (1, 2), seed=1)
    w8, _, _ = pack_cpu_dequant_gemm(q8, s8, o8, 8, 1)
    assert w8.shape == (1, 2, 16, 2)
    assert torch.equal(w8[0, 1, 5], q8[5, 2:4])
    # the AMX build's rows: per 64 columns, column i in the low nibble of byte i and column
    # 32 + i in its high nibble; each panel of 64 rows chunk after chunk of 1024 columns
    assert CPU_DEQUANT_GEMM_AMX_CHUNK == 1024
    q4, _, _ = _layer(4, 80, 1280, (1, 64), seed=2)
    flat = pack_cpu_dequant_gemm_rows(q4, 4).reshape(-1)
    assert flat.numel() == 80 * 640

    def at(n, k):  # byte holding column k (k % 64 < 32) of row n
        p0, r = n // 64 * 64, n % 64
        rows = min(64, 80 - p0)
        c0 = k // 1024 * 1024
        width = (min(c0 + 1024, 1280) - c0) // 2
        return flat[p0 * 640 + c0 // 2 * rows + r * width + (k - c0) // 64 * 32 + k % 32]

    for n in (0, 7, 63, 64, 79):
        for k in (0, 5, 64 + 31, 1024, 1216 + 7):
            assert at(n, k) == q4[n, k] | (q4[n, k + 32] << 4), (n, k)
    q8b, _, _ = _layer(8, 16, 1536, (1, 16), seed=3)
    flat8 = pack_cpu_dequant_gemm_rows(q8b, 8).reshape(-1)
    assert flat8[1024 * 16 + 3 * 512 + 10] == q8b[3, 1024 + 10]  # second chunk, row 3


def test_bad_input_is_refused_with_what_was_expected():
    q, scales, offsets = _layer(4, 16, 64, (1, 32), seed=0)
    packed = pack_cpu_dequant_gemm(q, scales, offsets, 4, 1)
    with pytest.raises(ValueError, match="x is torch.float16, expected torch.bfloat16"):
        ops.cpu_dequant_gemm(torch.zeros(1, 64, dtype=torch.float16), *packed, 4, 32,
                             variant="avx2")
    with pytest.raises(ValueError, match=r"cpu_dequant_gemm\[avx2\].*block 1x24: a shape"):
        ops.cpu_dequant_gemm(torch.zeros(1, 64, dtype=torch.bfloat16), *packed, 4, 24,
                             variant="avx2")
    y = ops.cpu_dequant_gemm(torch.zeros(0, 64, dtype=torch.bfloat16), *packed, 4, 32,
                             variant="avx2")
    assert y.shape == (0, 16)
    with pytest.raises(ValueError, match=r"variant 'avx10': this CPU runs only \("):
        ops.cpu_dequant_gemm(torch.zeros(1, 64, dtype=torch.bfloat16), *packed, 4, 32,
                             variant="avx10")
    if "amx" in cpu_lib.dequant_gemm_variants():  # in % 64 for INT4
        q, scales, offsets = _layer(4, 16, 96, (1, 32), seed=0)
        with pytest.raises(ValueError, match=r"cpu_dequant_gemm\[amx\]"):
            ops.cpu_dequant_gemm(torch.zeros(1, 96, dtype=torch.bfloat16),
                                 torch.zeros(16, 48, dtype=torch.uint8), scales.float(),
                                 offsets.float(), 4, 32, variant="amx")


def test_is_a_torch_op_traced_by_compile():
    q, scales, offsets = _layer(8, 32, 64, (1, 32), seed=2)
    packed = pack_cpu_dequant_gemm(q, scales, offsets, 8, 1)
    x = torch.randn(3, 64).bfloat16()
    f = torch.compile(lambda t: torch.ops.qahira.cpu_dequant_gemm(t, *packed, 8, 32, 1, "avx2")
                      + 1, backend="aot_eager", fullgraph=True)
    assert torch.equal(f(x), ops.cpu_dequant_gemm(x, *packed, 8, 32, 1, "avx2") + 1)


def test_amx_build_leaves_other_libraries_tiles_configured():
    """The AMX tile configuration is per-thread state that oneDNN (vLLM's bf16 layers) also
    uses: after our AMX call, vLLM's oneDNN bf16 GEMM still gives its earlier result."""
    if "amx" not in cpu_lib.dequant_gemm_variants():
        pytest.skip(f"amx build not run: this CPU runs only {cpu_lib.dequant_gemm_variants()}")
    from vllm import _custom_ops as vllm_ops

    if not getattr(vllm_ops, "_supports_onednn", False):
        pytest.skip("this vLLM build has no oneDNN GEMM")
    g = torch.Generator().manual_seed(5)
    w = torch.randn(576, 576, generator=g).bfloat16()
    handle = vllm_ops.create_onednn_mm(w.t(), 32)
    x = torch.randn(40, 576, generator=g).bfloat16()
    before = vllm_ops.onednn_mm(handle, x, None)
    q, scales, offsets = _layer(4, 960, 576, (1, 32), seed=6)
    ops.cpu_dequant_gemm(x, pack_cpu_dequant_gemm_rows(q, 4), scales.float(), offsets.float(),
                         4, 32, variant="amx")
    assert torch.equal(vllm_ops.onednn_mm(handle, x, None), before)


def test_isa_switch_caps_every_kernel_family(monkeypatch):
    """QAHIRA_CPU_ISA names the widest build to use: each family takes its widest build not
    beyond it (the integer-dot kernels have no BF16 / AMX builds)."""
    runs = cpu_lib.dequant_gemm_variants()
    monkeypatch.setenv(cpu_lib.ISA_ENV, "avx2")
    assert cpu_lib.dequant_gemm_variant() == "avx2" and cpu_lib.intdot_variant() == "avx2"
    monkeypatch.setenv(cpu_lib.ISA_ENV, runs[-1])
    assert cpu_lib.dequant_gemm_variant() == runs[-1]
    assert cpu_lib.intdot_variant() == cpu_lib.intdot_variants()[-1]
    monkeypatch.setenv(cpu_lib.ISA_ENV, "avx10")
    with pytest.raises(ValueError, match=r"QAHIRA_CPU_ISA='avx10': this machine runs only avx2"):
        cpu_lib.dequant_gemm_variant()
