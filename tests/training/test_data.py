"""JSONL records -> tokens and loss masks; malformed lines name file:line."""

import json

import pytest

from qahira_vllm.training.data import (IGNORE_INDEX, BatchStream, DataError, Example, load_jsonl,
                                       pack, shape_examples, split_heldout)


def _write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return p


def _decode_labels(tokenizer, ex):
    return tokenizer.decode([t for t in ex.labels if t != IGNORE_INDEX])


def test_text_prompt_response_and_messages(tmp_path, tokenizer):
    path = _write(tmp_path, [
        {"text": "hello world"},
        "",
        {"prompt": "Q: 2+2?", "response": " A: 4"},
        {"messages": [{"role": "system", "content": "be brief"},
                      {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"},
                      {"role": "user", "content": "bye"},
                      {"role": "assistant", "content": "ciao"}]},
    ])
    text, pr, chat = load_jsonl(path, tokenizer)
    eos = tokenizer.eos_token
    assert tokenizer.decode(text.input_ids) == "hello world" + eos
    assert text.labels == text.input_ids
    assert tokenizer.decode(pr.input_ids) == "Q: 2+2? A: 4" + eos
    assert _decode_labels(tokenizer, pr) == " A: 4" + eos          # response (+ EOS) only
    # Assistant turns and their end-of-turn markup; nothing from system/user turns.
    assert _decode_labels(tokenizer, chat) == "hello<|im_end|>\nciao<|im_end|>\n"
    assert tokenizer.decode(chat.input_ids).startswith("<|im_start|>system\nbe brief")


@pytest.mark.parametrize("line, expected", [
    ("{not json", "d.jsonl:2: invalid JSON"),
    ("[1, 2]", "d.jsonl:2: got a JSON list, expected an object"),
    ({"txt": "x"}, "d.jsonl:2: keys ['txt']: expected \"text\""),
    ({"text": 3}, "d.jsonl:2: 'text' is int, expected a string"),
    ({"prompt": "x"}, "d.jsonl:2: has prompt but no 'response'"),
    ({"messages": []}, "d.jsonl:2: 'messages' must be a non-empty list"),
    ({"messages": [{"role": "user"}]}, "d.jsonl:2: messages[0]"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "d.jsonl:2: 'messages' has no assistant"),
])
def test_malformed_lines(tmp_path, tokenizer, line, expected):
    path = _write(tmp_path, [{"text": "fine"}, line])
    with pytest.raises(DataError) as e:
        load_jsonl(path, tokenizer)
    assert expected in str(e.value)


def test_missing_and_empty_file(tmp_path, tokenizer):
    with pytest.raises(DataError, match="not found"):
        load_jsonl(tmp_path / "nope.jsonl", tokenizer)
    with pytest.raises(DataError, match="no records"):
        load_jsonl(_write(tmp_path, [""]), tokenizer)


def test_messages_need_chat_template(tmp_path, tokenizer):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = None
    path = _write(tmp_path, [{"messages": [{"role": "assistant", "content": "x"}]}])
    with pytest.raises(DataError, match="d.jsonl:1: 'messages' needs a chat template"):
        load_jsonl(path, tok)


def test_split_pack_truncate():
    exs = [Example(list(range(i, i + 10)), list(range(i, i + 10))) for i in range(20)]
    train, held = split_heldout(exs, 0.1, seed=0)
    assert len(train) == 18 and len(held) == 2
    assert split_heldout(exs, 0.1, seed=0)[1] == held           # seeded
    packed = pack(exs, 64)
    assert [len(e) for e in packed] == [64, 64, 64, 8]
    assert [t for e in packed for t in e.input_ids] == [t for e in exs for t in e.input_ids]
    assert all(len(e) == 4 for e in shape_examples(exs, 4, packing=False))
    masked = [Example([1, 2, 3], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX])]
    assert shape_examples(masked, 8, packing=False) == []       # nothing to learn: dropped
    with pytest.raises(DataError, match="at least 2"):
        split_heldout(exs[:1], 0.5, seed=0)


def test_batch_stream_is_reproducible_and_resumable():
    exs = [Example([i, i + 1], [i, i + 1]) for i in range(7)]
    a = BatchStream(exs, 3, seed=1, pad_id=0)
    first = [a.next_batch()["input_ids"][:, 0].tolist() for _ in range(4)]
    assert sorted(sum(first[:2], []) + first[2][:1]) == list(range(7))  # one epoch covers all
    b = BatchStream(exs, 3, seed=1, pad_id=0)
    b.next_batch()
    c = BatchStream(exs, 3, seed=1, pad_id=0)
    c.load_state_dict(b.state_dict())
    assert [c.next_batch()["input_ids"][:, 0].tolist() for _ in range(3)] == first[1:]


def test_padding_has_no_loss():
    from qahira_vllm.training.data import collate, target_tokens

    batch = collate([Example([1, 2, 3], [1, 2, 3]), Example([4], [4])], pad_id=0)
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"][1].tolist() == [4, IGNORE_INDEX, IGNORE_INDEX]
    assert target_tokens(batch) == 2


def test_rank_shards_partition_each_global_batch():
    # sequences of different lengths, each with its id as content
    exs = [Example([i] * (1 + i % 5), [i] * (1 + i % 5)) for i in range(11)]
    whole = BatchStream(exs, 6, seed=3, pad_id=-1)
    ranks = [BatchStream(exs, 6, seed=3, pad_id=-1) for _ in range(3)]
    for _ in range(4):  # crosses an epoch boundary (11 sequences, 6 per batch)
        full = whole.next_batch()
        shards = [s.next_shard(r, 3) for r, s in enumerate(ranks)]
        assert [row[0].item() for sh in shards for row in sh["input_ids"]] == \
            full["input_ids"][:, 0].tolist()
        for sh in shards:  # each shard padded only to its own longest sequence
            assert sh["input_ids"].shape[0] == 2
            assert sh["input_ids"].shape[1] == int(sh["attention_mask"].sum(1).max())
    assert all(s.state_dict() == whole.state_dict() for s in ranks)
    with pytest.raises(ValueError, match="does not split into 4 equal shards"):
        whole.next_shard(0, 4)
