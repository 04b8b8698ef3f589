"""qahira_kernels' cpu_avx2_int4 op (kernels/cpu_avx2_int4.c, ops.cpu_avx2_int4, its weight layout
layouts.pack_cpu_avx2_int4) and cpu_lib, which builds it, against an fp64 reference.

The kernel quantizes activations to 16 bits per 32 columns, so the reference comparison uses the
kernel's own error bound, computed per output from the data (linear_reference.check_avx2_int4).
This machine class (x86-64 with AVX2 and gcc) is what CI runs on, so the kernel must build here:
a test fails, rather than skips, if it does not.
"""

from __future__ import annotations

import os

import pytest
import torch

from linear_reference import avx2_int4_layer, check_avx2_int4
from qahira_kernels import cpu_lib
from qahira_kernels.layouts import pack_cpu_avx2_int4


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
    _, q, scales, offsets = avx2_int4_layer(out_f, in_f, block, seed=m, offset_dtype=offset_dtype)
    x = torch.randn(m, in_f, generator=torch.Generator().manual_seed(m)) * 3
    x[0, :7] = 0.0          # a chunk with zeros and one with a single large value
    x[-1, 40 % in_f] = 50.0
    y = torch.ops.qahira.cpu_avx2_int4(x, pack_cpu_avx2_int4(q), scales, offsets, *block)
    assert y.dtype == torch.float32 and y.shape == (m, out_f)
    err = check_avx2_int4(y, x, q, scales, offsets, block)
    # and the bound is tight enough to mean something: far below bf16 output rounding
    assert err.max() <= 1e-3 * (x.abs().max() * 0.2 * in_f)


def test_each_row_independent_of_batch():
    """A row's output is bit-identical whatever else is in the batch (any M, any position)."""
    block = (1, 64)
    _, q, scales, offsets = avx2_int4_layer(80, 256, block, seed=7)
    w = pack_cpu_avx2_int4(q)
    x = torch.randn(37, 256, generator=torch.Generator().manual_seed(8)).bfloat16()
    full = torch.ops.qahira.cpu_avx2_int4(x, w, scales, offsets, *block)
    for i in (0, 5, 36):
        alone = torch.ops.qahira.cpu_avx2_int4(x[i:i + 1], w, scales, offsets, *block)
        assert torch.equal(alone[0], full[i])
    part = torch.ops.qahira.cpu_avx2_int4(x[3:9], w, scales, offsets, *block)
    assert torch.equal(part, full[3:9])


def test_pack_cpu_avx2_int4_layout():
    q = torch.arange(64, dtype=torch.int32).remainder(16).view(1, 64).repeat(2, 1)
    q[1] = 15 - q[1]
    w = pack_cpu_avx2_int4(q)
    assert w.shape == (2, 32) and w.dtype == torch.uint8
    for n in range(2):
        for c in range(2):
            for j in range(16):
                byte = int(w[n, c * 16 + j])
                assert byte & 15 == q[n, c * 32 + j] and byte >> 4 == q[n, c * 32 + 16 + j]


def test_multithreaded_equals_single_thread():
    _, q, scales, offsets = avx2_int4_layer(256, 512, (1, 32), seed=11)
    w = pack_cpu_avx2_int4(q)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(12)).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.qahira.cpu_avx2_int4(x, w, scales, offsets, 1, 32)
        torch.set_num_threads(2)
        two = torch.ops.qahira.cpu_avx2_int4(x, w, scales, offsets, 1, 32)
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
    assert "/bin/false failed" in why and "cpu_avx2_int4.c" in why
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
