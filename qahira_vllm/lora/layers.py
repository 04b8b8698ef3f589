"""vLLM LoRA layer classes for qahira-quantized linear layers, holding Q-BaRA adapters compactly.

Each class subclasses vLLM's own LoRA wrapper of the same parallel layer (so forward, gather and
all-reduce stay vLLM's) and replaces the adapter storage and math:

    lora_a_stacked[i]  [slots, R_max, in_local]      slot s, slice i: A[:rank, :in_local/p]
    lora_b_stacked[i]  [slots, out_local_i, R_max]   slot s, slice i: B[:out_local_i/q, :rank]
    geometry[i][s]     SlotGeometry(pool, repeat, rank) or None (slot empty for this slice)

    qahira_slots[i][s] QahiraSlot(M shard, pool, repeat, scaling) or None: a QA-HiRA adapter

Slices: 1 (column / row parallel), 2 (gate_up), 3 (q, k, v). Geometry is read from the compact
tensor shapes at set_lora (p = in / A.cols, q = out / B.rows), so a plain LoRA is p = q = 1 and
vLLM's adapter pipeline carries Q-BaRA tensors unchanged. A QA-HiRA adapter (no rank: one
pooled matrix M [out/q, in/p]) reaches set_lora as lora_a = M and lora_b = a one-element tensor
holding its scaling (lora/loader.py builds that LoRAModel; vLLM folds the scaling into it as it
does into a LoRA's B), and is held apart from the rank-r slots, in its own size. vLLM folds the scaling into B once
(LoRALayerWeights.optimize), per layer as its PEFTHelper resolves it (PEFT's rank_pattern /
alpha_pattern / rsLoRA; loader.check_vllm_scaling checks it equals PEFT's), so the per-slot
scaling is 1 and a slice's rank comes from its own tensors.

Tensor parallel: B rows are sharded like the base's output rows (column parallel), A columns
like its input columns (row parallel), in compact units: a shard boundary must fall on a
multiple of q (outputs) or p (inputs), else `check_geometry` raises AdapterError.

Token -> slot comes from vLLM's punica wrapper (public `token_lora_indices`, -1 = no adapter); the
punica ops themselves are not used, which is what keeps base-only tokens adapter-free on CPU.
"""

from __future__ import annotations

import torch
from vllm.lora.layers import (ColumnParallelLinearWithLoRA, MergedColumnParallelLinearWithLoRA,
                              MergedQKVParallelLinearWithLoRA, RowParallelLinearWithLoRA)
from vllm.model_executor.custom_op import maybe_get_oot_by_class
from vllm.model_executor.layers.linear import (ColumnParallelLinear,
                                               MergedColumnParallelLinear, QKVParallelLinear,
                                               RowParallelLinear)

from qahira_kernels import cpu_lib
from qahira_kernels.layouts import pack_qahira_slots
from qahira_kernels.cpu_qbara import MAX_RANK as CPU_KERNEL_MAX_RANK
from qahira_kernels.cpu_qbara import CpuQbaraLayer

from ..adapter_format import AdapterError
from ..linear_kernels import disabled_kernels
from .batch import slot_batch
from .ops import QahiraSlot, SlotGeometry, add_qahira_segments, add_qbara_segments

CPU_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Set by install.py; False keeps vLLM's stock LoRA classes (e.g. to compare against them).
ENABLED = True


def _is_qahira_layer(layer) -> bool:
    from ..vllm_plugin.linear_method import QahiraLinearMethod

    return isinstance(getattr(layer, "quant_method", None), QahiraLinearMethod)


def _ours(source_layer, lora_config, base_cls) -> bool:
    return (ENABLED and not lora_config.fully_sharded_loras
            and type(source_layer) is maybe_get_oot_by_class(base_cls)
            and _is_qahira_layer(source_layer))


class QbaraSlotsMixin:
    """Compact per-slot adapter storage and the segment math; mixed into vLLM's wrappers.

    Subclasses set in __init__: slice_full (full out per slice), slice_shard (start, size) of
    this rank's rows per slice, in_full, in_shard (start, size) of this rank's input columns.
    """

    slice_full: tuple[int, ...]
    slice_shard: tuple[tuple[int, int], ...]
    in_full: int
    in_shard: tuple[int, int]

    # ------------------------------------------------------------------ storage

    def create_lora_weights(self, max_loras, lora_config, model_config=None) -> None:
        self.lora_config = lora_config
        r_max, dtype = lora_config.max_lora_rank, lora_config.lora_dtype
        if torch.device(self.device).type == "cpu":
            # The compact buffers are small, and on CPUs without bf16 units fp32 GEMMs of these
            # shapes are ~14x faster than bf16 ones (measured, [32 x 288] @ [288 x 16]: 7 us vs
            # 98 us); fp32 also keeps A, B and the rank-r intermediate unrounded.
            dtype = torch.float32
        in_local = self.in_shard[1]
        # Width `in_local` (not in/p) so that plain LoRAs (p = 1) fit in the same slots; a
        # Q-BaRA slot fills only its [:rank, :in/p] corner and the math reads only that.
        self.lora_a_stacked = tuple(
            torch.zeros(max_loras, r_max, in_local, dtype=dtype, device=self.device)
            for _ in self.slice_full)
        self.lora_b_stacked = tuple(
            torch.zeros(max_loras, size, r_max, dtype=dtype, device=self.device)
            for _, size in self.slice_shard)
        self.geometry: list[list[SlotGeometry | None]] = [
            [None] * max_loras for _ in self.slice_full]
        self._device_geometry = None  # int32/fp32 per-slot tensors for the CUDA kernels
        self._packed = [{} for _ in self.slice_full]  # ops.pack_slots cache, per slice
        self.qahira_slots: list[list[QahiraSlot | None]] = [
            [None] * max_loras for _ in self.slice_full]
        self._qahira_tables = None  # the kernels' view of qahira_slots, rebuilt after changes
        self._cpu_kernel = None
        if (torch.device(self.device).type == "cpu" and r_max <= CPU_KERNEL_MAX_RANK
                and "cpu_qbara" not in disabled_kernels()
                and cpu_lib.load_library() is not None):
            # The compiled CPU kernel's own copies: B transposed (the expand step streams rows of
            # it) and the per-slot geometry as arrays; kept current in set_lora / reset_lora.
            # With vLLM's lora_dtype bf16 (the model's dtype unless --lora-dtype says otherwise)
            # A and B^T are held in bf16, as stock vLLM holds LoRA weights: each token reads its
            # own slot's, so with many distinct adapters in a batch these reads are the layer's
            # cost (32 Q-BaRA adapters on SmolLM2: 313 MB per decode step in fp32).
            kernel_dtype = (torch.bfloat16 if lora_config.lora_dtype == torch.bfloat16
                            else torch.float32)
            self._a_kernel = self.lora_a_stacked if kernel_dtype == torch.float32 else tuple(
                torch.zeros(a.shape, dtype=kernel_dtype) for a in self.lora_a_stacked)
            self._bt_stacked = tuple(torch.zeros(max_loras, r_max, size, dtype=kernel_dtype)
                                     for _, size in self.slice_shard)
            self._geo = tuple(torch.zeros(max_loras, 3, dtype=torch.int32)
                              for _ in self.slice_full)
            self._coef = tuple(torch.zeros(max_loras, dtype=torch.float32)
                               for _ in self.slice_full)
            self._cpu_kernel = CpuQbaraLayer.create(self._a_kernel, self._bt_stacked,
                                                    self._geo, self._coef)

    def reset_lora(self, index: int) -> None:
        for i in range(len(self.slice_full)):
            self.lora_a_stacked[i][index] = 0
            self.lora_b_stacked[i][index] = 0
            self.geometry[i][index] = None
            self.qahira_slots[i][index] = None
            self._packed[i].clear()
            if self._cpu_kernel is not None:
                self._a_kernel[i][index] = 0
                self._bt_stacked[i][index] = 0
                self._geo[i][index] = 0
                self._coef[i][index] = 0
        self._device_geometry = None
        self._qahira_tables = None

    def check_geometry(self, i: int, pool: int, repeat: int, rank: int,
                       where: str = "") -> None:
        """Raise AdapterError unless (pool, repeat, rank) fits slice i and this rank's shard."""
        where = where or f"layer {self.base_layer.prefix!r}"
        out_full = self.slice_full[i]
        r_max = self.lora_config.max_lora_rank
        if rank > r_max:
            raise AdapterError(f"{where}: rank {rank} is above --max-lora-rank {r_max}")
        if pool < 1 or self.in_full % pool:
            raise AdapterError(f"{where}: pool={pool} does not divide in={self.in_full}")
        if repeat < 1 or out_full % repeat:
            raise AdapterError(f"{where}: repeat={repeat} does not divide out={out_full}")
        start, size = self.slice_shard[i]
        if start % repeat or size % repeat:
            raise AdapterError(
                f"{where}: tensor-parallel shard of output rows [{start}, {start + size}) of "
                f"{out_full} (tp_size={self.tp_size}) is not aligned to repeat={repeat}: a "
                "repeated output group would straddle two ranks; use a smaller "
                "tensor-parallel size or an adapter whose repeat divides every shard")
        in_start, in_size = self.in_shard
        if in_start % pool or in_size % pool:
            raise AdapterError(
                f"{where}: tensor-parallel shard of input columns [{in_start}, "
                f"{in_start + in_size}) of {self.in_full} (tp_size={self.tp_size}) is not "
                f"aligned to pool={pool}: a pooled input group would straddle two ranks; use "
                "a smaller tensor-parallel size or an adapter whose pool divides every shard")

    def slice_geometry(self, i: int, lora_a: torch.Tensor, lora_b: torch.Tensor,
                       where: str = "") -> SlotGeometry:
        """(pool, repeat, rank) of a compact (full, unsharded) A/B pair for slice i."""
        where = where or f"layer {self.base_layer.prefix!r} slice {i}"
        rank, in_pooled = lora_a.shape
        out_rep, rank_b = lora_b.shape
        if rank_b != rank or in_pooled == 0 or out_rep == 0:
            raise AdapterError(f"{where}: lora_A {list(lora_a.shape)} and lora_B "
                               f"{list(lora_b.shape)} do not form a rank-r pair")
        if self.in_full % in_pooled or self.slice_full[i] % out_rep:
            raise AdapterError(
                f"{where}: lora_A {list(lora_a.shape)} / lora_B {list(lora_b.shape)} do not "
                f"tile the layer [out={self.slice_full[i]}, in={self.in_full}]")
        g = SlotGeometry(self.in_full // in_pooled, self.slice_full[i] // out_rep, rank)
        self.check_geometry(i, g.pool, g.repeat, g.rank, where)
        return g

    def qahira_geometry(self, i: int, m: torch.Tensor, where: str = "") -> tuple[int, int]:
        """(pool, repeat) of a QA-HiRA M [out_i/q, in/p] (full, unsharded) for slice i; raises
        AdapterError unless it tiles the layer and this rank's shard."""
        where = where or f"layer {self.base_layer.prefix!r} slice {i}"
        if m.dim() != 2 or 0 in m.shape or self.slice_full[i] % m.shape[0] \
                or self.in_full % m.shape[1]:
            raise AdapterError(f"{where}: qahira_M {list(m.shape)} does not tile the layer "
                               f"[out={self.slice_full[i]}, in={self.in_full}]")
        pool, repeat = self.in_full // m.shape[1], self.slice_full[i] // m.shape[0]
        self.check_geometry(i, pool, repeat, 0, where)
        return pool, repeat

    def _set_qahira(self, i: int, index: int, m: torch.Tensor, scale: torch.Tensor) -> None:
        pool, repeat = self.qahira_geometry(i, m)
        (start, size), (in_start, in_size) = self.slice_shard[i], self.in_shard
        shard = m[start // repeat:(start + size) // repeat,
                  in_start // pool:(in_start + in_size) // pool]
        dtype = self.lora_a_stacked[i].dtype
        self.qahira_slots[i][index] = QahiraSlot(
            shard.to(device=self.device, dtype=dtype).contiguous(), pool, repeat,
            float(scale.reshape(()).item()))
        self._qahira_tables = None

    def set_lora(self, index: int, lora_a, lora_b) -> None:
        self.reset_lora(index)
        if isinstance(lora_a, torch.Tensor):
            lora_a, lora_b = [lora_a], [lora_b]
        if len(lora_a) != len(self.slice_full):
            raise AdapterError(f"layer {self.base_layer.prefix!r}: adapter has "
                               f"{len(lora_a)} packed parts, the layer {len(self.slice_full)}")
        in_start, in_size = self.in_shard
        for i, (a, b) in enumerate(zip(lora_a, lora_b)):
            if a is None or b is None:
                continue
            if b.dim() == 1:  # QA-HiRA: a is M, b its scaling (see the module docstring)
                self._set_qahira(i, index, a, b)
                continue
            g = self.slice_geometry(i, a, b)
            start, size = self.slice_shard[i]
            a = a[:, in_start // g.pool:(in_start + in_size) // g.pool]
            b = b[start // g.repeat:(start + size) // g.repeat]
            self.lora_a_stacked[i][index, :g.rank, :a.shape[1]].copy_(a, non_blocking=True)
            self.lora_b_stacked[i][index, :b.shape[0], :g.rank].copy_(b, non_blocking=True)
            self.geometry[i][index] = g
            if self._cpu_kernel is not None:
                if self._a_kernel is not self.lora_a_stacked:
                    self._a_kernel[i][index, :g.rank, :a.shape[1]].copy_(a)
                self._bt_stacked[i][index, :g.rank, :b.shape[0]].copy_(b.t())
                self._geo[i][index] = torch.tensor([g.pool, g.repeat, g.rank], dtype=torch.int32)
                self._coef[i][index] = g.scaling / g.pool

    def set_mapping(self, punica_wrapper) -> None:
        super().set_mapping(punica_wrapper)
        slot_batch(punica_wrapper)  # start caching segments before the first batch

    # vLLM's set_lora paths call these for TP; ours shards inside set_lora in compact units.
    def slice_lora_a(self, lora_a):
        return lora_a

    def slice_lora_b(self, lora_b):
        return lora_b

    # ------------------------------------------------------------------ math

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out = self._get_quant_method().apply(self.base_layer, x, bias)
        x2 = x.reshape(-1, x.shape[-1])
        out2 = out.view(-1, out.shape[-1])
        batch = slot_batch(self.punica_wrapper)
        if out2.is_cuda and x2.dtype in (torch.float16, torch.bfloat16):
            self._apply_cuda(out2, x2, batch)  # the Triton kernels take fp16/bf16 only
        elif self._cpu_kernel is not None and out2.dtype in CPU_KERNEL_DTYPES \
                and x2.dtype in CPU_KERNEL_DTYPES and out2.stride(-1) == 1:
            rows, slots = batch.token_slots(x2.shape[0])
            if rows.numel():
                self._sync_cpu_kernel_qahira()
                self._cpu_kernel.apply(out2, x2, rows, slots)
        else:
            segments = batch.segments(x2.shape[0])
            if segments:
                cache, pooled = batch.gather_cache(x2.shape[0]), {}  # pooled x: per input
                offset = 0
                for i, (_, size) in enumerate(self.slice_shard):
                    add_qbara_segments(out2[:, offset:offset + size], x2, segments,
                                       self.lora_a_stacked[i], self.lora_b_stacked[i],
                                       self.geometry[i], cache, pooled, self._packed[i])
                    offset += size
                self._add_qahira(out2, x2, batch, pooled)
        return out

    def _qahira_kernel_tables(self):
        """Per slice, the QA-HiRA slots as the kernels read them (qahira_kernels.layouts.
        pack_qahira_slots): (m_flat fp32, m_offset int64 [slots], pool, repeat, on int32
        [slots], scaling fp32 [slots]) on the layer's device, or None for a slice without any;
        cached until a slot changes."""
        if self._qahira_tables is None:
            tables = []
            for row in self.qahira_slots:
                if not any(row):
                    tables.append(None)
                    continue
                m_flat, m_offset = pack_qahira_slots([a.m if a else None for a in row])
                geo = torch.tensor([(a.pool, a.repeat, 1) if a else (1, 1, 0) for a in row],
                                   dtype=torch.int32)
                scaling = torch.tensor([a.scaling if a else 0.0 for a in row],
                                       dtype=torch.float32)
                tables.append((m_flat, m_offset, *(t.to(m_flat.device) for t in (
                    geo[:, 0].contiguous(), geo[:, 1].contiguous(), geo[:, 2].contiguous(),
                    scaling))))
            self._qahira_tables = tables
        return self._qahira_tables

    def _sync_cpu_kernel_qahira(self) -> None:
        """Point the compiled CPU kernel at the current QA-HiRA tables (after any change)."""
        if self._qahira_tables is not None:
            return
        for c, table in enumerate(self._qahira_kernel_tables()):
            if table is None:
                self._cpu_kernel.set_qahira(c, None)
                continue
            m_flat, m_offset, pool, repeat, on, scaling = table
            self._cpu_kernel.set_qahira(c, m_flat, m_offset,
                                        torch.stack([pool, repeat, on], 1).contiguous(),
                                        scaling / pool.to(torch.float32))

    def _add_qahira(self, out2: torch.Tensor, x2: torch.Tensor, batch,
                    pooled: dict | None = None) -> None:
        """The QA-HiRA slots' deltas on the torch path (the rank-r paths leave those slots
        alone)."""
        if not any(any(row) for row in self.qahira_slots):
            return
        segments, pooled = batch.segments(x2.shape[0]), {} if pooled is None else pooled
        offset = 0
        for i, (_, size) in enumerate(self.slice_shard):
            add_qahira_segments(out2[:, offset:offset + size], x2, segments,
                                self.qahira_slots[i], pooled)
            offset += size

    def _apply_cuda(self, out2: torch.Tensor, x2: torch.Tensor, batch) -> None:
        from qahira_kernels.qbara import qahira_apply, qbara_apply  # Triton: CUDA only

        slot_idx, segments = batch.kernel_segments(x2.shape[0], self.lora_a_stacked[0].shape[0])
        if self._device_geometry is None:
            self._device_geometry = self._geometry_tensors(out2.device)
        offset = 0
        for i, (_, size) in enumerate(self.slice_shard):
            pool, repeat, rank, scaling = self._device_geometry[i]
            qbara_apply(out2[:, offset:offset + size], x2, self.lora_a_stacked[i],
                        self.lora_b_stacked[i], pool, repeat, rank, scaling, slot_idx,
                        segments=segments)
            table = self._qahira_kernel_tables()[i]
            if table is not None:
                qahira_apply(out2[:, offset:offset + size], x2, *table, slot_idx,
                             segments=segments)
            offset += size

    def _geometry_tensors(self, device):
        """Per slice: pool, repeat, rank (int32) and scaling (fp32) per slot; empty slot =
        rank 0 (the kernels then add nothing)."""
        result = []
        for geo in self.geometry:
            rows = [(g.pool, g.repeat, g.rank) if g else (1, 1, 0) for g in geo]
            t = torch.tensor(rows, dtype=torch.int32).t().contiguous().to(device)
            scaling = torch.tensor([g.scaling if g else 0.0 for g in geo],
                                   dtype=torch.float32, device=device)
            result.append((t[0], t[1], t[2], scaling))
        return result


class QbaraColumnParallelLinearWithLoRA(QbaraSlotsMixin, ColumnParallelLinearWithLoRA):
    def __init__(self, base_layer) -> None:
        super().__init__(base_layer)
        size = self.base_layer.output_size_per_partition
        self.slice_full = (self.base_layer.output_size,)
        self.slice_shard = ((self.tp_rank * size, size),)
        self.in_full, self.in_shard = self.input_size, (0, self.input_size)
        self.output_slices = (size,)

    @classmethod
    def can_replace_layer(cls, source_layer, lora_config, packed_modules_list,
                          model_config=None, **_) -> bool:
        return _ours(source_layer, lora_config, ColumnParallelLinear)


class QbaraMergedColumnParallelLinearWithLoRA(QbaraSlotsMixin,
                                              MergedColumnParallelLinearWithLoRA):
    def __init__(self, base_layer) -> None:
        super().__init__(base_layer)
        self.slice_full = tuple(self.base_layer.output_sizes)
        self.slice_shard = tuple((self.tp_rank * (s // self.tp_size), s // self.tp_size)
                                 for s in self.slice_full)
        self.in_full, self.in_shard = self.input_size, (0, self.input_size)

    @classmethod
    def can_replace_layer(cls, source_layer, lora_config, packed_modules_list,
                          model_config=None, **_) -> bool:
        return (_ours(source_layer, lora_config, MergedColumnParallelLinear)
                and len(packed_modules_list) == len(source_layer.output_sizes))


class QbaraQKVParallelLinearWithLoRA(QbaraSlotsMixin, MergedQKVParallelLinearWithLoRA):
    def __init__(self, base_layer) -> None:
        super().__init__(base_layer)
        bl = self.base_layer
        q_total = bl.total_num_heads * bl.head_size
        k_total = bl.total_num_kv_heads * bl.head_size
        v_total = bl.total_num_kv_heads * bl.v_head_size
        q_size, k_size = bl.num_heads * bl.head_size, bl.num_kv_heads * bl.head_size
        v_size = bl.num_kv_heads * bl.v_head_size
        kv_id = self.tp_rank // bl.num_kv_head_replicas
        self.slice_full = (q_total, k_total, v_total)
        self.slice_shard = ((self.tp_rank * q_size, q_size), (kv_id * k_size, k_size),
                            (kv_id * v_size, v_size))
        self.in_full, self.in_shard = self.input_size, (0, self.input_size)
        self.output_slices = (q_size, k_size, v_size)

    @classmethod
    def can_replace_layer(cls, source_layer, lora_config, packed_modules_list,
                          model_config=None, **_) -> bool:
        return (_ours(source_layer, lora_config, QKVParallelLinear)
                and len(packed_modules_list) == 3)


class QbaraRowParallelLinearWithLoRA(QbaraSlotsMixin, RowParallelLinearWithLoRA):
    def __init__(self, base_layer) -> None:
        super().__init__(base_layer)
        size = self.base_layer.input_size_per_partition
        self.slice_full = (self.base_layer.output_size,)
        self.slice_shard = ((0, self.base_layer.output_size),)
        self.in_full, self.in_shard = self.base_layer.input_size, (self.tp_rank * size, size)
        self.output_slices = (self.base_layer.output_size,)

    @classmethod
    def can_replace_layer(cls, source_layer, lora_config, packed_modules_list,
                          model_config=None, **_) -> bool:
        return _ours(source_layer, lora_config, RowParallelLinear)


QBARA_LORA_CLASSES = (QbaraColumnParallelLinearWithLoRA, QbaraMergedColumnParallelLinearWithLoRA,
                      QbaraQKVParallelLinearWithLoRA, QbaraRowParallelLinearWithLoRA)
