"""`CpuMeasuredKernel` (cpu_measured): on CPUs, the fastest kernel per batch size, as measured
on the machine that serves.

Which CPU kernel is fastest depends on the CPU (AVX2 or AVX-512, VNNI, BF16, AMX, cache and
memory bandwidth) and on M, the rows of the call: the integer-dot kernels (cpu_int4, cpu_int8)
win at decode batch sizes, the dequantize + GEMM kernel (cpu_dequant_gemm) as M grows, the
whole weight dequantized + oneDNN (cpu_dequant_dense) at prefill sizes, and where the crossovers
lie differs several-fold between machines of one kind. So nothing is
hard-coded: for each layer shape class (bits, block, out x in, scale dtype, activation dtype,
threads) every kernel of `MEASURED_KERNELS` that can serve it is timed once at each M bucket in
`M_BUCKETS` (with two or more such kernels; otherwise that one is chosen directly), on
random stored tensors of that shape, and each bucket takes the fastest. A call with M rows
uses the choice of the smallest bucket >= M (the last bucket's beyond it).

The candidates are timed in rounds, one call each per round in a rotated order, and each keeps
its fastest call: a burst of noise on a shared machine then costs one sample of one candidate
instead of all of one candidate's samples (timed back to back, a 2048 x 8192 AMX layer at
M = 128 once measured 17.3 ms against its 7.4 ms, and lost its bucket to a 10.8 ms kernel), and
no candidate runs with a cache the calls before it left warm for it alone. In serving, too, a
layer's weights come back after every other layer has run.

The table is cached per machine (CPU model and flags), torch version, kernel library build and
thread count in `<kernel cache>/kernel_choice.json` (qahira_kernels.cpu_lib.cache_dir(); written
to a temporary file and renamed), so a machine measures each shape class once. The choice is
logged once per shape class, with every candidate's time.

Memory: the layer keeps the repacked weights of each kernel that won a bucket (two layouts
where, e.g., cpu_int4 wins decode and cpu_dequant_gemm the batches: INT4 then costs 1 byte per
weight, still half of bf16). Batch invariance: different buckets may use different kernels, so
a request's output can differ at the rounding level with the batch it ran in (as with oneDNN's
own per-shape algorithms); `QAHIRA_DISABLED_KERNELS=cpu_measured` restores the fixed order of
qahira_vllm.linear_kernels.KERNELS.

Under torch.compile (vLLM's default mode) apply() is one op, `torch.ops.qahira.cpu_measured`,
which picks the kernel at run time from M.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from qahira_kernels import cpu_lib, ops

from .cpu_dequant_gemm import CpuDequantGemmKernel
from .interface import LinearKernel, LinearSpec

logger = logging.getLogger("vllm.qahira")

M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# The fast CPU kernels, for bf16 / fp16 models. cpu_blockwise and dequant_torch, the general
# paths (fp32 models, blocks the fast kernels refuse), are not timed: they stay the fixed
# order's answer where none of these applies.
MEASURED_KERNELS = ("cpu_int4", "cpu_int8", "cpu_dequant_gemm", "cpu_int4pack",
                    "cpu_dequant_dense")
TIMED_CALLS = 5        # rounds per bucket after a warm-up call each (a candidate whose calls
TIME_BUDGET_S = 0.05   # took this long sits out the rest); the fastest counts (noise only
                       # ever adds time)
DROP_FACTOR = 16.0     # a candidate this many times slower than a bucket's best is not timed at
                       # larger buckets (the dequantize + GEMM kernels gain on the others as M
                       # grows, but by less than this over M_BUCKETS' range, as measured)
CACHE_NAME = "kernel_choice.json"
# Part of the cache key: a table measured another way (before rounds were interleaved) is
# measured again rather than trusted.
METHOD = "interleaved-rounds"


def _cpu_identity() -> str:
    """The CPU model name and flags (what decides kernel speed), as /proc/cpuinfo gives them."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            fields.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    return f"{fields.get('model name', platform.processor())}|{fields.get('flags', '')}"


def machine_key() -> str:
    """Hash of what a measurement depends on beyond the layer: CPU model and flags, torch
    version, the compiled kernel library's build (its file name hashes sources and flags),
    torch's thread count and how the timing is done (METHOD)."""
    lib = cpu_lib.load_library()
    parts = (_cpu_identity(), torch.__version__, Path(lib._name).name if lib else "no-library",
             str(torch.get_num_threads()), METHOD)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def shape_key(spec: LinearSpec, labels: list[str]) -> str:
    scale = str(spec.scale_dtype).removeprefix("torch.")
    act = str(spec.act_dtype).removeprefix("torch.")
    return (f"int{spec.bits} {spec.block_size[0]}x{spec.block_size[1]} "
            f"{spec.out_features}x{spec.in_features} scales={scale} act={act} "
            f"[{','.join(labels)}]")


def candidates(spec: LinearSpec) -> dict[str, Callable[[], LinearKernel]]:
    """label -> kernel factory, for every enabled kernel of MEASURED_KERNELS that can serve
    `spec` (cpu_dequant_gemm once per build this CPU runs, "cpu_dequant_gemm[avx512]", unless
    $QAHIRA_CPU_ISA fixes the build)."""
    from . import KERNELS, disabled_kernels

    disabled = disabled_kernels()
    out: dict[str, Callable[[], LinearKernel]] = {}
    for kernel_cls in KERNELS:
        if kernel_cls.name not in MEASURED_KERNELS or kernel_cls.name in disabled:
            continue
        if not kernel_cls.can_implement(spec)[0]:
            continue
        if kernel_cls is CpuDequantGemmKernel and not os.environ.get(cpu_lib.ISA_ENV):
            for v in CpuDequantGemmKernel.variants(spec):
                out[f"{kernel_cls.name}[{v}]"] = (lambda v=v: CpuDequantGemmKernel(spec, v))
        else:
            out[kernel_cls.name] = (lambda k=kernel_cls: k(spec))
    return out


def _random_layer(spec: LinearSpec) -> torch.nn.Module:
    """A layer of random stored tensors of spec's shape (what a kernel's speed depends on)."""
    from ..quant_math import pack_qweight

    n, k = spec.out_features, spec.in_features
    bo, bi = spec.block_size
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 1 << spec.bits, (n, k), generator=g)
    scales = (0.002 + 0.02 * torch.rand(n // bo, k // bi, generator=g)).to(spec.scale_dtype)
    offsets = (-0.1 * torch.rand(n // bo, k // bi, generator=g)).to(spec.scale_dtype)
    return _holder(pack_qweight(q, spec.bits), scales, offsets)


def _holder(qweight, scales, offsets) -> torch.nn.Module:
    layer = torch.nn.Module()
    for name, t in (("qweight", qweight), ("scales", scales), ("offsets", offsets)):
        layer.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))
    return layer


def _timed_rounds(calls: dict[str, Callable[[], object]]) -> dict[str, float]:
    """label -> the fastest of its timed calls, seconds: after one warm-up call each, up to
    TIMED_CALLS rounds of one call per label in a rotated order; a label sits out the rounds
    after its timed calls have taken TIME_BUDGET_S (so a slow candidate is timed once and does
    not cut the fast ones' samples)."""
    labels = list(calls)
    for label in labels:
        calls[label]()
    best = dict.fromkeys(labels, float("inf"))
    spent = dict.fromkeys(labels, 0.0)
    for r in range(TIMED_CALLS):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            if r and spent[label] >= TIME_BUDGET_S:
                continue
            t0 = time.perf_counter()
            calls[label]()
            dt = time.perf_counter() - t0
            best[label] = min(best[label], dt)
            spent[label] += dt
    return best


def measure(spec: LinearSpec, factories: dict[str, Callable[[], LinearKernel]]) -> dict:
    """{"choice": {M: label}, "ms": {M: {label: fastest of its timed calls, ms}}} for each M of
    M_BUCKETS (a label missing from a bucket's "ms" was dropped as too slow), the candidates
    timed in interleaved rounds (module docstring). The buffers of ops.reused_buffer that the
    timing allocated are released after it (a kernel that wins allocates its own again)."""
    buffers_before = ops.reused_buffer_keys()
    try:
        prepared = {}
        for label, make in factories.items():
            kernel, layer = make(), _random_layer(spec)
            kernel.prepare(layer)
            prepared[label] = (kernel, layer)
        g = torch.Generator().manual_seed(1)
        live, choice, ms = list(prepared), {}, {}
        for m in M_BUCKETS:
            x = torch.randn(m, spec.in_features, generator=g).to(spec.act_dtype)
            fastest = _timed_rounds({label: (lambda k=prepared[label][0], lay=prepared[label][1]:
                                             k.apply(lay, x)) for label in live})
            # rounded as cached: the choice is the argmin of what the cache holds
            times = {label: round(t * 1e3, 6) for label, t in fastest.items()}
            best = min(times, key=lambda lb: (times[lb], lb))  # a tie goes to the first name
            choice[m], ms[m] = best, dict(times)
            # A kernel's time never falls as M grows and the best one's at most grows linearly, so
            # one slower than the best by more than the remaining growth cannot win later.
            limit = times[best] * min(DROP_FACTOR, M_BUCKETS[-1] / m)
            live = [lb for lb in live if times[lb] <= limit]
    finally:
        for key in ops.reused_buffer_keys() - buffers_before:
            ops.release_reused_buffer(*key)
    return {"choice": choice, "ms": ms}


def _cache_path() -> Path:
    return cpu_lib.cache_dir() / CACHE_NAME


def _read_cache() -> dict:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(machine: str, key: str, entry: dict) -> None:
    """Add one entry, re-reading the file first (other workers may have added theirs), then
    write a temporary file and rename it over the cache."""
    path = _cache_path()
    data = _read_cache()
    data.setdefault(machine, {})[key] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_tables: dict[tuple[str, str], dict] = {}  # (machine, shape key) -> entry, this process


def choice_table(spec: LinearSpec, factories: dict[str, Callable[[], LinearKernel]]) -> dict:
    """The measured entry for spec's shape class on this machine: from this process, else the
    cache file, else measured now (and cached); logged once per process."""
    machine, key = machine_key(), shape_key(spec, sorted(factories))
    entry = _tables.get((machine, key))
    if entry is not None:
        return entry
    entry = _read_cache().get(machine, {}).get(key)
    how = "cached"
    if entry is None:
        t0 = time.perf_counter()
        entry = measure(spec, factories)
        how = f"measured in {time.perf_counter() - t0:.1f} s"
        _write_cache(machine, key, entry)
    entry = {"choice": {int(m): lb for m, lb in entry["choice"].items()},
             "ms": {int(m): v for m, v in entry["ms"].items()}}
    _tables[(machine, key)] = entry
    logger.info("qahira: kernel per batch size for %s (%s, %d threads):\n%s", key, how,
                torch.get_num_threads(), format_table(entry))
    return entry


def format_table(entry: dict) -> str:
    """The entry as a text table: a row per M bucket ("M<=8": calls of 5 to 8 rows), a column
    per kernel (ms; "-": not timed, dropped as too slow), and the chosen kernel last."""
    labels = sorted({lb for row in entry["ms"].values() for lb in row})
    w = max(map(len, labels)) + 2
    rows = ["  rows      " + "".join(f"{lb:>{w}}" for lb in labels) + "   chosen"]
    for m in sorted(entry["ms"]):
        cells = "".join(f"{entry['ms'][m][lb]:>{w - 3}.3f} ms" if lb in entry["ms"][m]
                        else f"{'-':>{w}}" for lb in labels)
        rows.append(f"  M<={m:<5} {cells}   {entry['choice'][m]}")
    return "\n".join(rows)


def bucket_index(m: int) -> int:
    """Index into M_BUCKETS of the smallest bucket >= m (the last one beyond them)."""
    for i, b in enumerate(M_BUCKETS):
        if m <= b:
            return i
    return len(M_BUCKETS) - 1


# handle -> CpuMeasuredKernel, for the compiled-mode op (a graph holds the int, not the object).
# Handles count layers in the order they are prepared, the same in every run of one model, so a
# graph vLLM cached on disk in an earlier run names the same layers.
_registry: dict[int, "CpuMeasuredKernel"] = {}


class CpuMeasuredKernel(LinearKernel):
    """Dispatches each call to the kernel measured fastest for its M bucket (module docstring).

    prepare() builds, for each kernel that won a bucket, a child module `measured_<i>` holding
    that kernel's repacked tensors, and removes the layer's stored qweight/scales/offsets."""

    name = "cpu_measured"

    @classmethod
    def can_implement(cls, spec: LinearSpec):
        if spec.device_type != "cpu":
            return False, "CPU only"
        found = candidates(spec)
        if len(found) < 2:
            return False, f"nothing to choose between ({', '.join(found) or 'no CPU kernel'})"
        return True, None

    def prepare(self, layer):
        factories = candidates(self.spec)
        self.table = choice_table(self.spec, factories)
        winners = sorted(set(self.table["choice"].values()))
        parts = {}
        for i, label in enumerate(winners):
            holder = _holder(layer.qweight.data, layer.scales.data, layer.offsets.data)
            kernel = factories[label]()
            kernel.prepare(holder)
            layer.add_module(f"measured_{i}", holder)
            parts[label] = (kernel, holder)
        for name in ("qweight", "scales", "offsets"):
            delattr(layer, name)
        self.labels = [self.table["choice"][m] for m in M_BUCKETS]
        self._by_bucket = [parts[lb] for lb in self.labels]
        self.handle = len(_registry)
        _registry[self.handle] = self

    def forward_2d(self, x: torch.Tensor) -> torch.Tensor:
        kernel, holder = self._by_bucket[bucket_index(x.shape[0])]
        return kernel.apply(holder, x)

    def apply(self, layer, x, bias=None):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if torch.compiler.is_compiling():
            y = torch.ops.qahira.cpu_measured(x2, self.handle, self.spec.out_features)
        else:
            y = self.forward_2d(x2)
        if bias is not None:
            y = y + bias
        return y.reshape(*shape[:-1], y.shape[-1])


_lib = torch.library.Library("qahira", "FRAGMENT")
_lib.define("cpu_measured(Tensor x, int handle, int out_features) -> Tensor")
_lib.impl("cpu_measured", lambda x, handle, out_features: _registry[handle].forward_2d(x), "CPU")


@torch.library.register_fake("qahira::cpu_measured")
def _cpu_measured_fake(x, handle, out_features):
    return x.new_empty(x.shape[0], out_features)
