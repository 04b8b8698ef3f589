"""JSONL training data -> token ids with loss masks, held-out split, packing, batching.

One JSON object per line, one of:
    {"text": "..."}                                  loss on every token
    {"prompt": "...", "response": "..."}             loss on the response (and its EOS) only
    {"messages": [{"role": ..., "content": ...}]}    rendered with the tokenizer's chat
                                                     template; loss on assistant turns only
Blank lines are skipped. Errors name `file:line` and what was expected.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE_INDEX = -100  # label of tokens that carry no loss (torch's cross_entropy default)


class DataError(ValueError):
    """A malformed data file or record."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss

    def __len__(self) -> int:
        return len(self.input_ids)


# ----------------------------------------------------------------------------- encoding

def _with_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def _need_str(record: dict, key: str, where: str) -> str:
    v = record[key]
    if not isinstance(v, str):
        raise DataError(f"{where}: {key!r} is {type(v).__name__}, expected a string")
    return v


def encode_text(text: str, tokenizer) -> Example:
    ids = _with_eos(tokenizer(text)["input_ids"], tokenizer.eos_token_id)
    return Example(ids, list(ids))


def encode_prompt_response(prompt: str, response: str, tokenizer) -> Example:
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = _with_eos(tokenizer(response, add_special_tokens=False)["input_ids"],
                             tokenizer.eos_token_id)
    return Example(prompt_ids + response_ids,
                   [IGNORE_INDEX] * len(prompt_ids) + list(response_ids))


def encode_messages(messages: list[dict], tokenizer, where: str) -> Example:
    """Render with the chat template; label only the tokens inside assistant turns.

    Each assistant turn's character span is found by rendering the conversation up to it (with
    the generation prompt) and through it; the turn's text plus the template's end-of-turn
    markup carry the loss. Needs a template where earlier turns render the same whatever follows.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: 'messages' needs a chat template, and this tokenizer has none "
                        "(use 'text' or 'prompt'/'response' records)")

    def render(msgs, generation_prompt=False) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False,
                                             add_generation_prompt=generation_prompt)

    full = render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start_text = render(messages[:i], generation_prompt=True) if i else ""
        end_text = render(messages[: i + 1])
        if not (full.startswith(start_text) and full.startswith(end_text)):
            raise DataError(f"{where}: the tokenizer's chat template renders earlier turns "
                            "differently depending on later ones; cannot locate assistant turn "
                            f"{i} (use 'prompt'/'response' records instead)")
        spans.append((len(start_text), len(end_text)))
    if not spans:
        raise DataError(f"{where}: 'messages' has no assistant turn: expected at least one "
                        "{\"role\": \"assistant\", ...} message to train on")
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{where}: 'messages' needs a fast tokenizer (character offsets)")
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    labels = [tok if any(a <= start < b for a, b in spans) else IGNORE_INDEX
              for tok, (start, _end) in zip(enc["input_ids"], enc["offset_mapping"])]
    return Example(list(enc["input_ids"]), labels)


def encode_record(record, tokenizer, where: str) -> Example:
    if not isinstance(record, dict):
        raise DataError(f"{where}: got a JSON {type(record).__name__}, expected an object")
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list of "
                            "{\"role\": ..., \"content\": ...} objects")
        for j, m in enumerate(msgs):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)):
                raise DataError(f"{where}: messages[{j}] = {json.dumps(m)[:80]}: expected "
                                "{\"role\": str, \"content\": str}")
        return encode_messages(msgs, tokenizer, where)
    if "prompt" in record or "response" in record:
        missing = [k for k in ("prompt", "response") if k not in record]
        if missing:
            raise DataError(f"{where}: has {'prompt' if missing == ['response'] else 'response'}"
                            f" but no {missing[0]!r}: expected both \"prompt\" and \"response\"")
        return encode_prompt_response(_need_str(record, "prompt", where),
                                      _need_str(record, "response", where), tokenizer)
    if "text" in record:
        return encode_text(_need_str(record, "text", where), tokenizer)
    raise DataError(f"{where}: keys {sorted(record)[:6]}: expected \"text\", \"prompt\" + "
                    "\"response\", or \"messages\"")


def load_jsonl(path: str | os.PathLike, tokenizer) -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    examples = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno}): expected "
                                "one JSON object per line") from None
            examples.append(encode_record(record, tokenizer, where))
    if not examples:
        raise DataError(f"{path}: no records (expected JSON lines)")
    return examples


# ----------------------------------------------------------------------------- shaping

def split_heldout(examples: list[Example], eval_fraction: float,
                  seed: int) -> tuple[list[Example], list[Example]]:
    """Random held-out split by record (at least one record each side when eval_fraction > 0)."""
    if eval_fraction <= 0:
        return list(examples), []
    if not 0 < eval_fraction < 1:
        raise DataError(f"eval_fraction={eval_fraction}: expected a number in [0, 1)")
    if len(examples) < 2:
        raise DataError(f"{len(examples)} record(s): need at least 2 to hold some out "
                        "(pass eval_fraction 0 or a separate eval file)")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(eval_fraction * len(examples))), len(examples) - 1)
    held = set(order[:n_eval])
    return ([e for i, e in enumerate(examples) if i not in held],
            [e for i, e in enumerate(examples) if i in held])


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Concatenate everything and cut into max_length chunks (the last may be shorter)."""
    ids = [t for e in examples for t in e.input_ids]
    labels = [t for e in examples for t in e.labels]
    return [Example(ids[i:i + max_length], labels[i:i + max_length])
            for i in range(0, len(ids), max_length) if len(ids[i:i + max_length]) > 1]


def truncate(examples: list[Example], max_length: int) -> list[Example]:
    return [Example(e.input_ids[:max_length], e.labels[:max_length]) for e in examples]


def shape_examples(examples: list[Example], max_length: int, packing: bool) -> list[Example]:
    """Pack or truncate, then drop sequences without any loss-bearing target token."""
    shaped = pack(examples, max_length) if packing else truncate(examples, max_length)
    # Position 0 is never a target (logits at t predict token t + 1).
    return [e for e in shaped if any(lab != IGNORE_INDEX for lab in e.labels[1:])]


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence; padding has attention 0 and no loss."""
    width = max(len(e) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        ids[row, :len(e)] = torch.tensor(e.input_ids)
        labels[row, :len(e)] = torch.tensor(e.labels)
        mask[row, :len(e)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Number of tokens that carry loss (labels shifted by one)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


class BatchStream:
    """Endless, reproducible batches: a fresh permutation per epoch from (seed, epoch).

    Its whole state is (epoch, position), so a resumed run sees exactly the same batches.
    """

    def __init__(self, examples: list[Example], batch_size: int, seed: int, pad_id: int):
        if not examples:
            raise DataError("no training sequences (after packing/truncation)")
        self.examples, self.batch_size, self.seed, self.pad_id = examples, batch_size, seed, pad_id
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.examples), generator=g).tolist()

    def _next_examples(self) -> list[Example]:
        picked = []
        while len(picked) < self.batch_size:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            picked.append(self.examples[self._order[self.position]])
            self.position += 1
        return picked

    def next_batch(self) -> dict[str, torch.Tensor]:
        return collate(self._next_examples(), self.pad_id)

    def next_shard(self, rank: int, world_size: int) -> dict[str, torch.Tensor]:
        """Rows [rank * b, (rank + 1) * b) of the next batch, b = batch_size / world_size.

        Every rank advances the same stream (same seed, same state), so the shards of one
        global batch are disjoint and together are exactly next_batch()'s examples; each shard
        is padded only to its own longest sequence. Raises ValueError when world_size does not
        divide batch_size.
        """
        if self.batch_size % world_size:
            raise ValueError(f"batch of {self.batch_size} does not split into {world_size} "
                             "equal shards")
        b = self.batch_size // world_size
        return collate(self._next_examples()[rank * b:(rank + 1) * b], self.pad_id)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)


def eval_batches(examples: list[Example], batch_size: int, pad_id: int):
    for i in range(0, len(examples), batch_size):
        yield collate(examples[i:i + batch_size], pad_id)
