"""qahira_kernels' cpu_int4 op (kernels/cpu_intdot.c, ops.cpu_int4, its weight layout
layouts.pack_cpu_int4) and cpu_lib, which builds it, against an fp64 reference.

The kernel quantizes activations to 16 bits per 32 columns, so the reference comparison uses the
kernel's own error bound, computed per output from the data (linear_reference.check_int4).
This machine class (x86-64 with AVX2 and gcc) is what CI runs on, so the kernel must build here:
a test fails, rather than skips, if it does not.

The C source is built twice (AVX2; AVX-512 + VNNI). Tests taking the `variant` fixture
(conftest.py) run once per build, with the build in the test id ([avx2] / [avx512]); a build this CPU cannot run is
reported as skipped with the reason (not coverage: test_avx512_build_compiles_and_links checks
that the AVX-512 object is built and linked on every machine, and the AVX2 build is the same
source).
"""

from __future__ import annotations

import os

import pytest
import torch

from support.linear_reference import int4_layer, check_int4
from qahira_kernels import cpu_lib, ops
from qahira_kernels.layouts import pack_cpu_int4, pack_cpu_int8

def test_library_builds_here():
    assert cpu_lib.load_library() is not None, cpu_lib.library_error()


def test_avx512_build_compiles_and_links():
    """The AVX-512 object is compiled and linked on every machine whose gcc knows the flags
    (CI's included), whether or not this CPU can run it."""
    import subprocess

    lib = cpu_lib.load_library()
    assert cpu_lib.intdot_built_variants() == ("avx2", "avx512"), cpu_lib._avx512_build_error
    nm = subprocess.run(["nm", "-D", "--defined-only", lib._name], capture_output=True,
                        text=True, check=True).stdout
    assert " T qahira_cpu_intdot_avx512" in nm and " T qahira_cpu_intdot_avx2" in nm
    # CPUID answer agrees with the kernel's needs as the OS reports them
    flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    want = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}
    assert ("avx512" in cpu_lib.intdot_variants()) == (want <= set(flags))


def _layer(bits, out_f, in_f, block, seed, offset_dtype=torch.float16,
           scale_dtype=torch.float16):
    """(packed weight, q, scales, offsets, op) of a random INT4/INT8 layer (fp32 scales: full
    fp32 mantissas, as format 2's)."""
    bo, bi = block
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 1 << bits, (out_f, in_f), generator=g, dtype=torch.uint8)
    scales = ((0.15 + 0.1 * torch.rand(out_f // bo, in_f // bi, generator=g))
              / ((1 << bits) - 1)).to(scale_dtype)
    offsets = (-0.1 + 0.02 * torch.randn(out_f // bo, in_f // bi, generator=g)).to(offset_dtype)
    if bits == 4:
        return pack_cpu_int4(q), q, scales, offsets, ops.cpu_int4
    return pack_cpu_int8(q), q, scales, offsets, ops.cpu_int8


# chunk counts K/32 of 1, 3, 8, 9, 13, 27: odd (unpaired last chunk), < 8 (tail only), 8k + r
TAIL_SHAPES = [((1, 32), 24, 32), ((2, 96), 6, 96), ((1, 64), 40, 256), ((1, 32), 16, 288),
               ((1, 32), 9, 416), ((8, 96), 64, 864)]


@pytest.mark.parametrize("bits", [4, 8])
def test_avx2_and_avx512_builds_bit_identical(bits):
    """Exact integer sums and the same fp32 steps in the same order: every output bit agrees,
    for every dtype, M across the row tiles (4 and 8) and chunk tails."""
    runs = cpu_lib.intdot_variants()
    if len(runs) < 2:
        pytest.skip(f"needs both builds; this CPU runs only {runs}")
    for i, (block, out_f, in_f) in enumerate(TAIL_SHAPES):
        for off_dt, s_dt in ((torch.float16, torch.float16), (torch.float32, torch.float16),
                             (torch.float32, torch.float32)):
            w, q, scales, offsets, op = _layer(bits, out_f, in_f, block, i, off_dt, s_dt)
            for m in (1, 5, 8, 13):
                x = torch.randn(m, in_f, generator=torch.Generator().manual_seed(m)) * 2
                for dt in (torch.float32, torch.bfloat16, torch.float16):
                    a, b = (op(x.to(dt), w, scales, offsets, *block, variant=v) for v in runs)
                    assert torch.equal(a, b), (block, in_f, m, dt, off_dt, s_dt)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block,out_f,in_f", TAIL_SHAPES)
def test_op_per_variant_all_chunk_tails(variant, bits, block, out_f, in_f):
    w, q, scales, offsets, op = _layer(bits, out_f, in_f, block, seed=in_f)
    x = torch.randn(11, in_f, generator=torch.Generator().manual_seed(1)) * 3
    y = op(x, w, scales, offsets, *block, variant=variant)
    check_int4(y, x, q, scales, offsets, block)
    yb = op(x.bfloat16(), w, scales, offsets, *block, variant=variant)
    check_int4(yb, x.bfloat16(), q, scales, offsets, block)


# every chunk_scales8 case: blocks of 1, 2, 3, 4 and 8 chunks, with tails
FP32_SCALE_SHAPES = [*TAIL_SHAPES, ((1, 128), 8, 512), ((1, 256), 8, 768)]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block,out_f,in_f", FP32_SCALE_SHAPES)
def test_op_per_variant_fp32_scales(variant, bits, block, out_f, in_f):
    """Format 2's float32 scales, read as stored: within the same bound of the fp64 reference
    on those scales (a kernel that rounded them to fp16 would be off by up to 2^-11 of each
    block's contribution, far beyond the bound at these sizes)."""
    w, q, scales, offsets, op = _layer(bits, out_f, in_f, block, seed=in_f,
                                       scale_dtype=torch.float32)
    assert scales.dtype == torch.float32 and not torch.equal(scales, scales.half().float())
    x = torch.randn(11, in_f, generator=torch.Generator().manual_seed(1)) * 3
    check_int4(op(x, w, scales, offsets, *block, variant=variant), x, q, scales, offsets, block)
    xb = x.bfloat16()
    check_int4(op(xb, w, scales, offsets, *block, variant=variant), xb, q, scales, offsets, block)


def test_isa_switch(monkeypatch):
    """$QAHIRA_CPU_ISA picks a build this CPU runs; anything else is a clear error."""
    monkeypatch.delenv(cpu_lib.ISA_ENV, raising=False)
    assert cpu_lib.intdot_variant() == cpu_lib.intdot_variants()[-1]
    monkeypatch.setenv(cpu_lib.ISA_ENV, "AVX2")
    assert cpu_lib.intdot_variant() == "avx2"
    monkeypatch.setenv(cpu_lib.ISA_ENV, "sse2")
    with pytest.raises(ValueError, match=r"QAHIRA_CPU_ISA='sse2': this machine runs only avx2"):
        cpu_lib.intdot_variant()


def test_pack_cpu_int8_layout():
    """Chunk pairs as [c lo, c+1 lo, c hi, c+1 hi]; an unpaired last chunk unchanged."""
    q = torch.randint(0, 256, (3, 96), generator=torch.Generator().manual_seed(0),
                      dtype=torch.uint8)
    w = pack_cpu_int8(q)
    assert w.shape == (3, 96) and w.dtype == torch.uint8
    order = [*range(0, 16), *range(32, 48), *range(16, 32), *range(48, 64), *range(64, 96)]
    assert torch.equal(w, q[:, order])


@pytest.mark.parametrize("block,out_f,in_f", [
    ((1, 32), 96, 160), ((1, 64), 40, 576), ((8, 96), 64, 96), ((16, 64), 48, 256),
    ((1, 128), 13, 384), ((2, 32), 30, 32), ((1, 256), 24, 512), ((2, 96), 6, 864),
])
@pytest.mark.parametrize("m", [1, 3, 4, 5, 17, 70])
@pytest.mark.parametrize("offset_dtype", [torch.float16, torch.float32])
def test_op_fp32_within_activation_quantization_bound(variant, block, out_f, in_f, m,
                                                      offset_dtype):
    """fp32 in and out: the only error is the documented activation rounding (and fp32 sums)."""
    _, q, scales, offsets = int4_layer(out_f, in_f, block, seed=m, offset_dtype=offset_dtype)
    x = torch.randn(m, in_f, generator=torch.Generator().manual_seed(m)) * 3
    x[0, :7] = 0.0          # a chunk with zeros and one with a single large value
    x[-1, 40 % in_f] = 50.0
    y = ops.cpu_int4(x, pack_cpu_int4(q), scales, offsets, *block, variant=variant)
    assert y.dtype == torch.float32 and y.shape == (m, out_f)
    err = check_int4(y, x, q, scales, offsets, block)
    # and the bound is tight enough to mean something: far below bf16 output rounding
    assert err.max() <= 1e-3 * (x.abs().max() * 0.2 * in_f)


@pytest.mark.parametrize("bits", [4, 8])
def test_each_row_independent_of_batch(variant, bits):
    """A row's output is bit-identical whatever else is in the batch (any M, any position)."""
    block = (1, 64)
    w, _, scales, offsets, op = _layer(bits, 80, 288, block, seed=7)
    x = torch.randn(37, 288, generator=torch.Generator().manual_seed(8)).bfloat16()
    full = op(x, w, scales, offsets, *block, variant=variant)
    for i in (0, 5, 36):
        alone = op(x[i:i + 1], w, scales, offsets, *block, variant=variant)
        assert torch.equal(alone[0], full[i])
    for lo, hi in ((3, 9), (2, 13), (8, 16)):
        part = op(x[lo:hi], w, scales, offsets, *block, variant=variant)
        assert torch.equal(part, full[lo:hi])


def test_pack_cpu_int4_layout():
    q = torch.arange(64, dtype=torch.int32).remainder(16).view(1, 64).repeat(2, 1)
    q[1] = 15 - q[1]
    w = pack_cpu_int4(q)
    assert w.shape == (2, 32) and w.dtype == torch.uint8
    for n in range(2):
        for c in range(2):
            for j in range(16):
                byte = int(w[n, c * 16 + j])
                assert byte & 15 == q[n, c * 32 + j] and byte >> 4 == q[n, c * 32 + 16 + j]


@pytest.mark.parametrize("bits", [4, 8])
def test_multithreaded_equals_single_thread(variant, bits):
    w, _, scales, offsets, op = _layer(bits, 256, 512, (1, 32), seed=11)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(12)).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = op(x, w, scales, offsets, 1, 32, variant=variant)
        torch.set_num_threads(2)
        two = op(x, w, scales, offsets, 1, 32, variant=variant)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """Forget the loaded library so load_library() runs again under the test's environment."""
    monkeypatch.setattr(cpu_lib, "_lib", None)
    monkeypatch.setattr(cpu_lib, "_lib_error", None)
    monkeypatch.setenv("QAHIRA_KERNEL_CACHE", str(tmp_path))


def test_failed_build_is_reported_not_raised(fresh_library, monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "/bin/false")
    assert cpu_lib.load_library() is None
    why = cpu_lib.library_error()
    assert "/bin/false failed" in why and "cpu_intdot.c" in why
    assert list(tmp_path.glob("*")) == []  # no partial file left behind


def test_build_is_cached_and_atomic(fresh_library, tmp_path):
    assert cpu_lib.load_library() is not None
    built = list(tmp_path.glob("*"))
    assert len(built) == 1 and built[0].suffix == ".so"
    mtime = built[0].stat().st_mtime_ns
    cpu_lib._lib, cpu_lib._lib_error = None, None
    assert cpu_lib.load_library() is not None
    assert built[0].stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert os.access(built[0], os.R_OK)


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    """$QAHIRA_KERNEL_CACHE, else $XDG_CACHE_HOME/qahira/kernels (never the model cache)."""
    monkeypatch.setenv("QAHIRA_KERNEL_CACHE", str(tmp_path / "k"))
    assert cpu_lib.cache_dir() == tmp_path / "k"
    monkeypatch.delenv("QAHIRA_KERNEL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("QAHIRA_HOME", str(tmp_path / "models"))
    assert cpu_lib.cache_dir() == tmp_path / "xdg" / "qahira" / "kernels"


@pytest.mark.parametrize("name", ["cpu_int4", "cpu_int8"])
def test_torch_op_runs_the_chosen_build(monkeypatch, name):
    """torch.ops.qahira.<name> (what vLLM's compiled graph calls) runs cpu_lib.intdot_variant()."""
    bits = 4 if name == "cpu_int4" else 8
    w, q, scales, offsets, op = _layer(bits, 32, 320, (1, 64), seed=3)
    x = torch.randn(6, 320, generator=torch.Generator().manual_seed(4)).bfloat16()
    for v in cpu_lib.intdot_variants():
        monkeypatch.setenv(cpu_lib.ISA_ENV, v)
        y = getattr(torch.ops.qahira, name)(x, w, scales, offsets, 1, 64)
        assert torch.equal(y, op(x, w, scales, offsets, 1, 64, variant=v))
        check_int4(y, x, q, scales, offsets, (1, 64))
