"""Offline training of Q-BaRA, QA-HiRA and LoRA adapters on a qahira checkpoint.

qlinear   QuantLinear: the checkpoint's packed weights, dequantized per call (never re-quantized)
adapters  the adapter modules and their delta-weight / LoRA-expansion math (pure torch)
model     build a transformers model from a qahira checkpoint with adapters injected
data      JSONL datasets (text, prompt/response, chat messages) with loss masks
trainer   the training loop (AdamW, schedules, accumulation, checkpoints, exact resume)
"""
