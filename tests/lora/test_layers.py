"""The vLLM LoRA layer classes of qahira_vllm.lora on stand-in base layers (no engine):
tensor-parallel sharding of compact A/B, geometry read from shapes, base-only tokens. Every
test runs twice: on the compiled whole-layer CPU kernel (qahira_kernels.cpu_qbara, which must
build on this machine class) and on the torch segment path that serves when it cannot."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from qahira_vllm.adapter_format import AdapterError
from qahira_vllm.lora.ops import SlotGeometry
from support.qbara_reference import dense_reference

IN = 64


class _Method:
    """Stand-in quant method: y = x W_shard^T (+ bias)."""

    def apply(self, layer, x, bias=None):
        y = x @ layer.w.t()
        return y if bias is None else y + bias


class _Base(nn.Module):
    def __init__(self, w_shard, **attrs):
        super().__init__()
        self.w = w_shard
        self.qweight = w_shard  # vLLM finds the LoRA device from qweight
        self.quant_method = _Method()
        self.prefix = "model.layers.0.test"
        for k, v in attrs.items():
            setattr(self, k, v)


def _Punica(slots):
    """vLLM's CPU punica wrapper mapping token t to slot slots[t] (-1: no adapter), set the way
    vLLM's model runner sets it: LoRA ids (0 = none) through update_metadata."""
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    wrapper = PunicaWrapperCPU(len(slots), len(slots), "cpu")
    ids = tuple(s + 1 for s in slots)  # slot s holds LoRA id s + 1
    wrapper.update_metadata(LoRAMapping(ids, ids, is_prefill=True), [1, 2, 3], 3, 100)
    return wrapper


@pytest.fixture(autouse=True, params=["compiled_kernel", "torch_segments"])
def math_path(request, monkeypatch):
    if request.param == "torch_segments":  # what a machine without the compiled library runs
        monkeypatch.setenv("QAHIRA_DISABLED_KERNELS", "cpu_qbara")
    return request.param


def _create(layer, request_path: str, config=None):
    layer.create_lora_weights(3, config or LORA_CONFIG)
    assert (layer._cpu_kernel is None) == (request_path == "torch_segments")
    return layer


LORA_CONFIG = SimpleNamespace(max_lora_rank=16, lora_dtype=torch.float32,
                              fully_sharded_loras=False)


def _qkv(tp_rank, tp_size, path, heads=4, kv_heads=2, head=8):
    from qahira_vllm.lora.layers import QbaraQKVParallelLinearWithLoRA

    out_q, out_kv = heads * head, kv_heads * head
    w = torch.zeros((out_q + 2 * out_kv) // tp_size, IN)
    base = _Base(w, input_size=IN, output_size=out_q + 2 * out_kv,
                 output_size_per_partition=(out_q + 2 * out_kv) // tp_size,
                 output_sizes=[out_q, out_kv, out_kv], tp_size=tp_size, tp_rank=tp_rank,
                 total_num_heads=heads, total_num_kv_heads=kv_heads, head_size=head,
                 v_head_size=head, num_heads=heads // tp_size,
                 num_kv_heads=max(1, kv_heads // tp_size),
                 num_kv_head_replicas=max(1, tp_size // kv_heads))
    return _create(QbaraQKVParallelLinearWithLoRA(base), path), (out_q, out_kv, out_kv)


def _row(tp_rank, tp_size, path, out=48, config=None):
    from qahira_vllm.lora.layers import QbaraRowParallelLinearWithLoRA

    base = _Base(torch.zeros(out, IN // tp_size), input_size=IN, output_size=out,
                 input_size_per_partition=IN // tp_size, tp_size=tp_size, tp_rank=tp_rank)
    return _create(QbaraRowParallelLinearWithLoRA(base), path, config)


def _pair(g, out, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(g.rank, IN // g.pool, generator=gen),
            torch.randn(out // g.repeat, g.rank, generator=gen))


GEOS = [SlotGeometry(2, 2, 8), SlotGeometry(4, 4, 16), SlotGeometry(1, 1, 4)]
SLOTS = [-1, 0, 0, 1, 2, -1, 1, 2]


@pytest.mark.parametrize("tp_size", [1, 2])
def test_qkv_shards_concatenate_to_the_full_delta(tp_size, math_path):
    x = torch.randn(len(SLOTS), IN)
    per_rank = []
    for tp_rank in range(tp_size):
        layer, sizes = _qkv(tp_rank, tp_size, math_path)
        for slot, g in enumerate(GEOS):
            pairs = [_pair(g, size, 10 * slot + i) for i, size in enumerate(sizes)]
            layer.set_lora(slot, [a for a, _ in pairs], [b for _, b in pairs])
            assert all(layer.geometry[i][slot] == g for i in range(3))
        layer.set_mapping(_Punica(SLOTS))
        per_rank.append(layer.apply(x))
    # Full delta per slice, then each rank's shard of it.
    expected_slices = []
    for i, size in enumerate(sizes):
        a_list = [_pair(g, size, 10 * s + i)[0] for s, g in enumerate(GEOS)]
        b_list = [_pair(g, size, 10 * s + i)[1] for s, g in enumerate(GEOS)]
        expected_slices.append(dense_reference(x, torch.tensor(SLOTS), a_list, b_list, GEOS,
                                               size))
    for tp_rank, y in enumerate(per_rank):
        parts = [e.chunk(tp_size, dim=1)[tp_rank] for e in expected_slices]
        torch.testing.assert_close(y.double(), torch.cat(parts, dim=1), rtol=1e-4, atol=1e-3)
        assert torch.equal(y[torch.tensor(SLOTS) < 0], torch.zeros(2, y.shape[1]))


@pytest.mark.parametrize("tp_size", [1, 2])
def test_row_parallel_partial_deltas_sum_to_the_full_delta(tp_size, math_path):
    x = torch.randn(len(SLOTS), IN)
    total = 0
    for tp_rank in range(tp_size):
        layer = _row(tp_rank, tp_size, math_path)
        for slot, g in enumerate(GEOS):
            layer.set_lora(slot, *_pair(g, 48, slot))
        layer.set_mapping(_Punica(SLOTS))
        total = total + layer.apply(x.chunk(tp_size, dim=1)[tp_rank])
    a_list = [_pair(g, 48, s)[0] for s, g in enumerate(GEOS)]
    b_list = [_pair(g, 48, s)[1] for s, g in enumerate(GEOS)]
    expected = dense_reference(x, torch.tensor(SLOTS), a_list, b_list, GEOS, 48)
    torch.testing.assert_close(total.double(), expected, rtol=1e-4, atol=1e-3)


def test_misaligned_shards_and_bad_shapes_are_adapter_errors(math_path):
    layer, sizes = _qkv(1, 2, math_path)  # k, v: 16 outputs, 8 per rank
    a, b = _pair(SlotGeometry(2, 16, 8), sizes[1], 0)
    with pytest.raises(AdapterError, match="not aligned to repeat=16"):
        layer.slice_geometry(1, a, b)
    row = _row(1, 2, math_path)  # 32 input columns per rank
    a, b = _pair(SlotGeometry(64, 1, 8), 48, 0)
    with pytest.raises(AdapterError, match="not aligned to pool=64"):
        row.slice_geometry(0, a, b)
    with pytest.raises(AdapterError, match="do not tile"):
        row.slice_geometry(0, torch.zeros(8, 7), torch.zeros(48, 8))
    with pytest.raises(AdapterError, match="above --max-lora-rank 16"):
        row.slice_geometry(0, torch.zeros(32, 32), torch.zeros(48, 32))


def test_reset_clears_a_slot(math_path):
    layer = _row(0, 1, math_path)
    layer.set_lora(0, *_pair(GEOS[0], 48, 0))
    layer.reset_lora(0)
    layer.set_mapping(_Punica([0, 0]))
    x = torch.randn(2, IN)
    assert torch.equal(layer.apply(x), x @ layer.base_layer.w.t())


def test_lora_dtype_bf16_holds_the_kernel_copies_in_bf16(math_path):
    """vLLM's lora_dtype bf16 (a bf16 model's default): the compiled kernel holds A and B^T in
    bf16, as stock vLLM holds LoRA weights, so the layer's output is bit for bit the fp32
    config's on the bf16-rounded adapters; the torch segment path keeps fp32 (the unrounded
    adapters' output). Reset clears the bf16 copies too."""
    bf16_config = SimpleNamespace(**{**vars(LORA_CONFIG), "lora_dtype": torch.bfloat16})
    pairs = [_pair(g, 48, s) for s, g in enumerate(GEOS)]
    rounded = [(a.bfloat16().float(), b.bfloat16().float()) for a, b in pairs]
    x = torch.randn(len(SLOTS), IN)

    def run(config, adapters):
        layer = _row(0, 1, math_path, config=config)
        for slot, (a, b) in enumerate(adapters):
            layer.set_lora(slot, a, b)
        layer.set_mapping(_Punica(SLOTS))
        return layer, layer.apply(x)

    layer, y = run(bf16_config, pairs)
    if math_path == "compiled_kernel":
        assert layer._a_kernel[0].dtype == layer._bt_stacked[0].dtype == torch.bfloat16
        assert torch.equal(y, run(LORA_CONFIG, rounded)[1])
        assert not torch.equal(y, run(LORA_CONFIG, pairs)[1])
    else:
        assert torch.equal(y, run(LORA_CONFIG, pairs)[1])
    for slot in range(len(GEOS)):
        layer.reset_lora(slot)
    if math_path == "compiled_kernel":
        assert not layer._a_kernel[0].any() and not layer._bt_stacked[0].any()
    assert torch.equal(layer.apply(x), x @ layer.base_layer.w.t())


# ----------------------------------------------------------------------------- QA-HiRA slots

def _qahira_dense(m: torch.Tensor, pool: int, repeat: int, scaling: float) -> torch.Tensor:
    """dW[o, i] = s * M[o // q, i // p] / p (docs/FORMAT.md section 2), by explicit indexing."""
    out, inp = m.shape[0] * repeat, m.shape[1] * pool
    o = torch.arange(out)[:, None] // repeat
    i = torch.arange(inp)[None, :] // pool
    return scaling * m.double()[o, i] / pool


def _m(out, pool, repeat, seed):
    return torch.randn(out // repeat, IN // pool, generator=torch.Generator().manual_seed(seed))


# slot 0: Q-BaRA; slots 1 and 2: QA-HiRA of two geometries (pool, repeat, scaling)
QAHIRA_GEOS = {1: (4, 2, 2.0), 2: (8, 4, 0.75)}


def _set_mixed_slots(layer, sizes):
    """Slot 0 gets a Q-BaRA, slots 1 and 2 a QA-HiRA each (as vLLM hands them over: lora_a = M,
    lora_b = [scaling]); returns the full dense dW per slot and slice."""
    dense = {}
    pairs = [_pair(GEOS[0], size, i) for i, size in enumerate(sizes)]
    layer.set_lora(0, [a for a, _ in pairs], [b for _, b in pairs])
    dense[0] = [(b.double().repeat_interleave(GEOS[0].repeat, 0)
                 @ a.double().repeat_interleave(GEOS[0].pool, 1) / GEOS[0].pool)
                for a, b in pairs]
    for slot, (pool, repeat, scaling) in QAHIRA_GEOS.items():
        ms = [_m(size, pool, repeat, 10 * slot + i) for i, size in enumerate(sizes)]
        layer.set_lora(slot, ms, [torch.tensor([scaling], dtype=torch.float64)] * len(ms))
        assert all(layer.qahira_slots[i][slot].pool == pool for i in range(len(sizes)))
        assert all(layer.geometry[i][slot] is None for i in range(len(sizes)))
        dense[slot] = [_qahira_dense(m, pool, repeat, scaling) for m in ms]
    return dense


def _expected(x, dense, slice_index):
    y = torch.zeros(x.shape[0], dense[0][slice_index].shape[0], dtype=torch.float64)
    for t, s in enumerate(SLOTS):
        if s >= 0:
            y[t] = x[t].double() @ dense[s][slice_index].t()
    return y


@pytest.mark.parametrize("tp_size", [1, 2])
def test_qahira_slots_next_to_qbara_on_qkv_shards(tp_size, math_path):
    x = torch.randn(len(SLOTS), IN)
    for tp_rank in range(tp_size):
        layer, sizes = _qkv(tp_rank, tp_size, math_path)
        dense = _set_mixed_slots(layer, sizes)
        layer.set_mapping(_Punica(SLOTS))
        y = layer.apply(x)
        parts = [_expected(x, dense, i).chunk(tp_size, dim=1)[tp_rank] for i in range(3)]
        torch.testing.assert_close(y.double(), torch.cat(parts, dim=1), rtol=1e-5, atol=1e-5)
        assert torch.equal(y[torch.tensor(SLOTS) < 0], torch.zeros(2, y.shape[1]))


@pytest.mark.parametrize("tp_size", [1, 2])
def test_qahira_row_parallel_partial_deltas_sum_to_the_full_delta(tp_size, math_path):
    x = torch.randn(len(SLOTS), IN)
    total = 0
    for tp_rank in range(tp_size):
        layer = _row(tp_rank, tp_size, math_path)
        dense = _set_mixed_slots(layer, [48])
        layer.set_mapping(_Punica(SLOTS))
        total = total + layer.apply(x.chunk(tp_size, dim=1)[tp_rank])
    torch.testing.assert_close(total.double(), _expected(x, dense, 0), rtol=1e-5, atol=1e-5)


def test_qahira_misaligned_shards_and_reset(math_path):
    layer, sizes = _qkv(1, 2, math_path)  # k, v: 16 outputs, 8 per rank
    with pytest.raises(AdapterError, match="not aligned to repeat=16"):
        layer.qahira_geometry(1, torch.zeros(1, IN // 4))
    with pytest.raises(AdapterError, match="does not tile"):
        layer.qahira_geometry(0, torch.zeros(5, IN // 4))
    row = _row(1, 2, math_path)  # 32 input columns per rank
    with pytest.raises(AdapterError, match="not aligned to pool=64"):
        row.qahira_geometry(0, torch.zeros(48, 1))
    row.set_lora(0, _m(48, 4, 2, 0), torch.tensor([2.0], dtype=torch.float64))
    row.reset_lora(0)
    row.set_mapping(_Punica([0, 0]))
    x = torch.randn(2, IN // 2)
    assert torch.equal(row.apply(x), x @ row.base_layer.w.t())
