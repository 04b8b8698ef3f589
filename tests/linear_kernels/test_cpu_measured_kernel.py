"""qahira_vllm.linear_kernels.cpu_measured: the kernel per M bucket, measured on this machine.

What is checked: a first layer measures its shape class (every candidate timed at each bucket,
each bucket choosing its fastest), writes the cache, and logs the table; a second one reads the
cache without timing anything; a call with M rows runs exactly the kernel its bucket chose
(bit for bit against that kernel prepared on its own), beyond the last bucket too; the compiled
path is one op; corrupt caches are measured again; what it refuses; the timing's rounds
(interleaved, rotated, a slow candidate timed once) and that the dense buffers the timing
allocated are released. The chosen kernels' numerics are their own tests'."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch

from support.linear_reference import check_traced_as_one_op, layer_and_fp64_weight
from qahira_kernels import cpu_lib, ops
from qahira_vllm import linear_kernels as lk
from qahira_vllm.linear_kernels import cpu_measured as cm

SHAPE = dict(bits=4, block_size=(1, 32), out_features=64, in_features=192,
             act_dtype=torch.bfloat16, device_type="cpu")


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """An empty kernel cache directory (the library, loaded first, stays the built one) and a
    fresh in-process table."""
    assert cpu_lib.load_library() is not None, cpu_lib.library_error()
    monkeypatch.setenv("QAHIRA_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cm, "_tables", {})
    return tmp_path / cm.CACHE_NAME


def _prepared(spec, seed=0):
    layer, _ = layer_and_fp64_weight(spec.out_features, spec.in_features, spec.bits,
                                     spec.block_size, seed=seed)
    kernel = cm.CpuMeasuredKernel(spec)
    kernel.prepare(layer)
    return kernel, layer


def test_bucket_of_m():
    assert [cm.M_BUCKETS[cm.bucket_index(m)] for m in (1, 2, 3, 4, 5, 8, 9, 200, 256)] == \
        [1, 2, 4, 4, 8, 8, 16, 256, 256]
    assert cm.bucket_index(10_000) == len(cm.M_BUCKETS) - 1


def test_measures_once_caches_and_logs(cache, caplog, monkeypatch):
    spec = lk.LinearSpec(**SHAPE)
    assert lk.choose_kernel(spec)[0] is cm.CpuMeasuredKernel
    with caplog.at_level(logging.INFO, logger="vllm.qahira"):
        kernel, layer = _prepared(spec)
    assert "kernel per batch size for int4 1x32 64x192" in caplog.text and "measured in" in caplog.text
    assert caplog.text.count("  M<=") == len(cm.M_BUCKETS)
    data = json.loads(cache.read_text())
    [entries] = data.values()
    [(key, entry)] = entries.items()
    labels = sorted(cm.candidates(spec))
    assert key == cm.shape_key(spec, labels) and "cpu_int4" in labels
    assert set(entry["choice"]) == {str(m) for m in cm.M_BUCKETS}
    for m, row in entry["ms"].items():  # each bucket took its fastest timed candidate
        assert entry["choice"][m] == min(row, key=lambda lb: (row[lb], lb))
    assert set(entry["ms"]["1"]) == set(labels)  # all timed at the first bucket
    assert not hasattr(layer, "qweight")
    winners = sorted(set(entry["choice"].values()))
    assert sorted(n for n, _ in layer.named_children()) == [f"measured_{i}"
                                                            for i in range(len(winners))]

    # A second layer of the class, in a new process's table: read from the file, not timed.
    monkeypatch.setattr(cm, "_tables", {})

    def no_timing(*a):
        raise AssertionError("measured again")

    monkeypatch.setattr(cm, "measure", no_timing)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vllm.qahira"):
        kernel2, _ = _prepared(spec, seed=1)
    assert "(cached," in caplog.text
    assert kernel2.labels == kernel.labels


def _write_entry(cache, spec, choice):
    labels = sorted(cm.candidates(spec))
    entry = {"choice": {str(m): choice(m) for m in cm.M_BUCKETS},
             "ms": {str(m): {lb: 1.0 for lb in labels} for m in cm.M_BUCKETS}}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({cm.machine_key(): {cm.shape_key(spec, labels): entry}}))


def test_each_call_runs_its_buckets_kernel(cache):
    spec = lk.LinearSpec(**SHAPE)
    _write_entry(cache, spec, lambda m: "cpu_int4" if m <= 4 else "cpu_dequant_gemm[avx2]")
    kernel, layer = _prepared(spec)
    assert kernel.labels[:3] == ["cpu_int4"] * 3 and kernel.labels[3:] == \
        ["cpu_dequant_gemm[avx2]"] * (len(cm.M_BUCKETS) - 3)
    # the same layer served by each kernel alone
    int4_layer, _ = layer_and_fp64_weight(64, 192, 4, (1, 32), seed=0)
    int4 = lk.CpuInt4Kernel(spec)
    int4.prepare(int4_layer)
    dq_layer, _ = layer_and_fp64_weight(64, 192, 4, (1, 32), seed=0)
    dq = lk.CpuDequantGemmKernel(spec, "avx2")
    dq.prepare(dq_layer)
    g = torch.Generator().manual_seed(2)
    bias = torch.randn(64, generator=g).bfloat16()
    for m, (ref_kernel, ref_layer) in ((1, (int4, int4_layer)), (3, (int4, int4_layer)),
                                       (5, (dq, dq_layer)), (40, (dq, dq_layer)),
                                       (300, (dq, dq_layer))):
        x = torch.randn(m, 192, generator=g).bfloat16()
        assert torch.equal(kernel.apply(layer, x, bias), ref_kernel.apply(ref_layer, x, bias)), m
    x3 = torch.randn(2, 3, 192, generator=g).bfloat16()  # 6 rows: the dequant bucket
    assert torch.equal(kernel.apply(layer, x3), dq.apply(dq_layer, x3))
    check_traced_as_one_op(kernel, layer, 192)  # 4 rows: cpu_int4, inside one op


def test_corrupt_cache_is_measured_again(cache):
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text("{not json")
    spec = lk.LinearSpec(**{**SHAPE, "bits": 8})
    kernel, _ = _prepared(spec)
    data = json.loads(cache.read_text())
    assert cm.shape_key(spec, sorted(cm.candidates(spec))) in data[cm.machine_key()]
    assert len(kernel.labels) == len(cm.M_BUCKETS)


@pytest.mark.parametrize("change,reason", [
    (dict(act_dtype=torch.float32), "nothing to choose between"),
    (dict(device_type="cuda"), "CPU only"),
])
def test_can_implement_refuses(change, reason):
    ok, why = cm.CpuMeasuredKernel.can_implement(lk.LinearSpec(**{**SHAPE, **change}))
    assert not ok and reason in why


def test_disabled_candidates_are_not_timed(monkeypatch):
    monkeypatch.setenv("QAHIRA_DISABLED_KERNELS", "cpu_dequant_gemm,cpu_dequant_dense")
    assert sorted(cm.candidates(lk.LinearSpec(**SHAPE))) == ["cpu_int4", "cpu_int4pack"]
    monkeypatch.setenv("QAHIRA_DISABLED_KERNELS",
                       "cpu_dequant_gemm,cpu_int4pack,cpu_dequant_dense")
    ok, why = cm.CpuMeasuredKernel.can_implement(lk.LinearSpec(**SHAPE))
    assert not ok and why == "nothing to choose between (cpu_int4)"


def test_vllm_lora_finds_the_device_of_a_measured_layer(cache):
    """vLLM's LoRA wrappers place adapter tensors on the base layer's device, found from its
    tensors; a cpu_measured layer keeps them in child modules, which qahira's patched lookup
    (lora.install) searches. vLLM's own lookup is the fallback for other layers."""
    from types import SimpleNamespace

    from vllm.lora.layers import base_linear
    from qahira_vllm.lora.install import _patch_lora_device

    module = SimpleNamespace(_get_lora_device=base_linear._get_lora_device)
    _patch_lora_device(module)
    spec = lk.LinearSpec(**SHAPE)
    _write_entry(cache, spec, lambda m: "cpu_int4" if m <= 4 else "cpu_dequant_gemm[avx2]")
    kernel, layer = _prepared(spec)
    layer.qahira_kernel = kernel
    assert not list(layer.parameters(recurse=False)) and not list(layer.buffers(recurse=False))
    assert module._get_lora_device(layer) == torch.device("cpu")
    plain = torch.nn.Linear(4, 4)
    assert module._get_lora_device(plain) == plain.weight.device


def test_timed_rounds_interleave_and_keep_each_fastest(monkeypatch):
    """After a warm-up call each, rounds of one call per candidate in a rotated order; each
    candidate's result is its fastest timed call; one whose calls used up TIME_BUDGET_S sits
    out the later rounds. A fake clock that each call advances by its stated duration keeps
    the test independent of the machine's load."""
    monkeypatch.setattr(cm, "TIMED_CALLS", 4)
    monkeypatch.setattr(cm, "TIME_BUDGET_S", 0.05)
    clock = [0.0]
    monkeypatch.setattr(cm, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    order = []
    durations = {"a": iter([0, 0.02, 0.001, 0.02, 0.02]), "b": iter([0] + [0.005] * 4),
                 "slow": iter([0, 0.06])}

    def call(label):
        def run():
            order.append(label)
            clock[0] += next(durations[label])
        return run

    best = cm._timed_rounds({label: call(label) for label in ("a", "b", "slow")})
    warm, timed = order[:3], order[3:]
    assert warm == ["a", "b", "slow"]
    assert timed == ["a", "b", "slow", "b", "a", "a", "b", "a", "b"]  # rotated; slow once
    assert best == pytest.approx({"a": 0.001, "b": 0.005, "slow": 0.06})


def test_measuring_releases_the_buffers_it_allocated(cache):
    """cpu_dequant_dense, timed, allocates a dense buffer for the shape; measure() drops it
    (about 64 MiB for a 1B model's merged gate_up), and a layer whose table chose it allocates
    its own on its first call."""
    spec = lk.LinearSpec(**SHAPE)
    factories = cm.candidates(spec)
    assert "cpu_dequant_dense" in factories
    key = ((spec.out_features, spec.in_features), spec.act_dtype)
    ops.release_reused_buffer(*key)
    before = ops.reused_buffer_keys()
    kept = ops.reused_buffer((7, 3), torch.float32)  # someone else's, allocated before
    cm.measure(spec, factories)
    assert ops.reused_buffer_keys() == before | {((7, 3), torch.float32)}
    assert ops.reused_buffer((7, 3), torch.float32) is kept
    ops.release_reused_buffer((7, 3), torch.float32)
    _write_entry(cache, spec, lambda m: "cpu_dequant_dense")
    kernel, layer = _prepared(spec)
    x = torch.randn(3, spec.in_features).bfloat16()
    kernel.apply(layer, x)
    assert key in ops.reused_buffer_keys()
