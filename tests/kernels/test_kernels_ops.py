"""qahira_kernels.ops declares every raw op, and qahira_kernels is a leaf library."""

from __future__ import annotations

import subprocess
import sys

import torch

from qahira_kernels import cpu_lib, ops

TORCH_OPS = ("triton_blockwise", "cpu_int4", "cpu_int8", "cpu_blockwise")


def test_every_c_entry_point_is_declared_and_exported():
    lib = cpu_lib.load_library()
    assert lib is not None, cpu_lib.library_error()
    # the AVX-512 build's entry points are absent only if gcc lacks the flags
    # (test_cpu_int4.test_avx512_build_compiles_and_links requires them here)
    declared = {name: argtypes for name, argtypes in ops.C_FUNCTIONS.items()
                if name not in cpu_lib.AVX512_FUNCTIONS
                or "avx512" in cpu_lib.intdot_built_variants()}
    for name, argtypes in declared.items():
        fn = getattr(lib, name)  # AttributeError if the library lacks it
        assert fn.argtypes == argtypes and fn.restype is not None
    # ... and nothing the library exports is left undeclared.
    nm = subprocess.run(["nm", "-D", "--defined-only", lib._name], capture_output=True,
                        text=True, check=True).stdout
    exported = {line.split()[-1] for line in nm.splitlines() if " T qahira_" in line}
    assert exported == set(declared)


def test_torch_ops_registered_with_fake_impls():
    from torch._subclasses.fake_tensor import FakeTensorMode

    for name in TORCH_OPS:
        assert hasattr(torch.ops.qahira, name), name
    with FakeTensorMode():
        x = torch.empty(5, 64)
        assert torch.ops.qahira.cpu_blockwise(x, torch.empty(16, 8, dtype=torch.int32),
                                              torch.empty(16, 2, dtype=torch.float16),
                                              torch.empty(16, 2, dtype=torch.float16),
                                              4, 1, 32).shape == (5, 16)
        assert torch.ops.qahira.cpu_int4(x, torch.empty(16, 32, dtype=torch.uint8),
                                              torch.empty(16, 2, dtype=torch.float16),
                                              torch.empty(16, 2, dtype=torch.float16),
                                              1, 32).shape == (5, 16)
        assert torch.ops.qahira.cpu_int8(x, torch.empty(16, 64, dtype=torch.uint8),
                                         torch.empty(16, 2, dtype=torch.float16),
                                         torch.empty(16, 2, dtype=torch.float16),
                                         1, 32).shape == (5, 16)


def test_imports_nothing_of_qahira_vllm():
    """Every module of the library imports with qahira_vllm unimportable, and without Triton
    for everything but the Triton kernels."""
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('qahira_vllm', 'triton'):
            raise ImportError('blocked ' + name)
sys.meta_path.insert(0, Block())
import qahira_kernels
from qahira_kernels import ops, cpu_lib, cpu_qbara, layouts, reference
assert cpu_lib.load_library() is not None, cpu_lib.library_error()
print('ok')
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
