"""Shared fixtures for the trainer tests (tiny random models from tests/support/tiny.py)."""

import pytest

from support import tiny


@pytest.fixture(scope="session")
def qckpt():
    """Tiny Llama, INT4, block [1, 32], fp16 offsets."""
    return tiny.tiny_qckpt("llama", hidden=64, intermediate=128, heads=2, kv_heads=1)


@pytest.fixture(scope="session")
def qckpt_qwen():
    """Tiny Qwen2 (q/k/v bias, tied embeddings), INT4, block [4, 8], fp32 offsets."""
    return tiny.tiny_qckpt("qwen2", block_size=(4, 8), offset_dtype="float32",
                                   hidden=64, intermediate=128, heads=2, kv_heads=1, tie=True)


@pytest.fixture(scope="session")
def tokenizer(qckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qckpt)


@pytest.fixture(scope="session")
def pattern_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    return tiny.write_jsonl(path, [{"text": t} for t in tiny.pattern_texts(48)])
