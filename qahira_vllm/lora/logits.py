"""vLLM's lm_head LoRA wrapper, minus its per-token vocab-sized gather while no adapter has
lm_head weights.

vLLM's LogitsProcessorWithLoRA runs bgmv shrink + expand over the whole vocabulary for every
token that has an adapter, even when no loaded adapter has lm_head weights (their slots are
zero): on CPU, 32 tokens x 49152 x rank of gathers per step (measured: the bulk of the per-step
cost of the first adapter on SmolLM2). While no slot holds lm_head weights the logits are the
base logits exactly, so this subclass computes only those; otherwise vLLM's own `_get_logits`
runs. The short path re-states vLLM's `_get_logits` without its LoRA term, so it is tied to that
exact source: vllm_plugin/vllm_api.py pins its sha256 (group "lm_head"), and lora/install.py uses
this class only while the installed vLLM matches.
"""

from __future__ import annotations

import torch
from vllm.lora.layers.logits_processor import LogitsProcessorWithLoRA


class QahiraLogitsProcessorWithLoRA(LogitsProcessorWithLoRA):
    """LogitsProcessorWithLoRA that tracks which slots hold lm_head weights (`lm_head_slots`)
    and skips the LoRA gather while none does. Constructor and methods: vLLM's."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lm_head_slots: set[int] = set()

    def set_lora(self, index: int, lora_a, lora_b) -> None:
        super().set_lora(index, lora_a, lora_b)  # calls reset_lora(index) first
        self.lm_head_slots.add(index)

    def reset_lora(self, index: int) -> None:
        super().reset_lora(index)
        self.lm_head_slots.discard(index)

    def _get_logits(self, hidden_states: torch.Tensor, lm_head, embedding_bias=None,
                    skip_gather: bool = False) -> torch.Tensor | None:
        """[tokens, vocab_size] logits (None on non-zero TP ranks when gathered to rank 0)."""
        if self.lm_head_slots or skip_gather:
            return super()._get_logits(hidden_states, lm_head, embedding_bias, skip_gather)
        head = lm_head.base_layer if hasattr(lm_head, "base_layer") else lm_head
        logits = self.base_layer._gather_logits(
            self.base_layer._apply_head(head, hidden_states, embedding_bias))
        if logits is None:
            return None
        if self.sharded_to_full_mapping_gpu is not None:
            logits = logits[:, self.sharded_to_full_mapping_gpu]
        return logits[:, :self.base_layer.vocab_size]
