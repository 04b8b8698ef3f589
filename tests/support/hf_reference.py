"""Float reference for engine tests: transformers running a checkpoint's dequantized weights."""

from __future__ import annotations

import torch


@torch.no_grad()
def greedy_reference(model, prompt_ids: list[int], max_tokens: int):
    """(generated token ids, log-softmax of the first generated position) in fp32."""
    ids = torch.tensor([prompt_ids])
    first_logprobs = None
    out = []
    for _ in range(max_tokens):
        logits = model(ids).logits[0, -1].float()
        if first_logprobs is None:
            first_logprobs = torch.log_softmax(logits, dim=-1)
        nxt = int(logits.argmax())
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out, first_logprobs


PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
]
