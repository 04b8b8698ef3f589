"""Per-batch token -> slot segments, computed once per batch and shared by every layer.

vLLM's punica wrapper holds the token -> slot map (its public `token_lora_indices`, -1 = no
adapter) and refreshes it in `update_metadata` whenever the batch mapping or the slot layout
changes. We wrap that method on the wrapper instance (not the class) to drop our cached
segments, so the ~200 adapted layers of a forward pass share one sort instead of one each (both
are rows of vllm_plugin/vllm_api.py).
"""

from __future__ import annotations

import torch

from .ops import Segment, segment_by_slot

_ATTR = "_qahira_slot_batch"


class SlotBatch:
    def __init__(self, punica_wrapper):
        self._pw = punica_wrapper
        self._cache: dict = {}

    def invalidate(self) -> None:
        self._cache.clear()

    def slot_idx(self, num_tokens: int) -> torch.Tensor:
        """Slot per token [num_tokens]; tokens beyond the mapping (padding) get -1."""
        key = ("idx", num_tokens)
        if key not in self._cache:
            # indices_len[0] is None until the first mapping: then no token has an adapter.
            known = self._pw.indices_len[0] or 0
            idx = self._pw.token_lora_indices[:min(known, num_tokens)]
            if idx.shape[0] < num_tokens:
                idx = torch.cat([idx, idx.new_full((num_tokens - idx.shape[0],), -1)])
            self._cache[key] = idx
        return self._cache[key]

    def segments(self, num_tokens: int) -> list[Segment]:
        key = ("seg", num_tokens)
        if key not in self._cache:
            self._cache[key] = segment_by_slot(self.slot_idx(num_tokens))
        return self._cache[key]

    def token_slots(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, slots) int64 of the tokens that have an adapter, grouped by slot (for
        qahira_kernels.cpu_qbara)."""
        key = ("tok", num_tokens)
        if key not in self._cache:
            idx = self.slot_idx(num_tokens).to("cpu", torch.int64)
            rows = torch.cat([torch.arange(s.rows.start, s.rows.stop) if s.contiguous else s.rows
                              for s in self.segments(num_tokens)] or [idx.new_zeros(0)])
            self._cache[key] = (rows.contiguous(), idx[rows].contiguous())
        return self._cache[key]

    def gather_cache(self, num_tokens: int) -> dict:
        """Scratch dict for ops.add_qbara_segments' gathered groups, valid for this batch."""
        return self._cache.setdefault(("gather", num_tokens), {})

    def kernel_segments(self, num_tokens: int, num_slots: int):
        """(slot_idx int32, qahira_kernels TokenSegments) for the CUDA kernels (no host sync)."""
        key = ("kseg", num_tokens, num_slots)
        if key not in self._cache:
            from qahira_kernels.qbara import segment_tokens

            idx = self.slot_idx(num_tokens).to(torch.int32)
            self._cache[key] = (idx, segment_tokens(idx, num_slots))
        return self._cache[key]


def slot_batch(punica_wrapper) -> SlotBatch:
    batch = getattr(punica_wrapper, _ATTR, None)
    if batch is None:
        batch = SlotBatch(punica_wrapper)
        original = punica_wrapper.update_metadata

        def update_metadata(*args, **kwargs):
            batch.invalidate()
            return original(*args, **kwargs)

        punica_wrapper.update_metadata = update_metadata
        setattr(punica_wrapper, _ATTR, batch)
    return batch
