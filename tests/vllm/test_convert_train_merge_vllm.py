"""End to end, one test per source family: a quantized checkpoint of another tool -> `qahira
convert` -> `qahira train --method qahira` (a few steps) -> `qahira merge` -> vLLM serves the
merged checkpoint like the source's own dequantization plus the adapter's dense delta, in fp32.

The reference is computed without qahira_vllm code: the source library's (or the published
layout's) dequantization in a transformers fp32 model, plus the adapter's delta written here
from the saved adapter tensors with the paper's formula (docs/FORMAT.md section 2):
dW[o, i] = s * M[o // qo, i // pi] / pi. Served greedy tokens must equal the reference's and
first-token logprobs agree within LOGPROB_TOL. The reference's tokens must also differ from the
unadapted source's, so the test fails if training, merge or serving drop the adapter.

The GPTQ test is also the engine test of `qahira convert` from GPTQ (the older "gptq" layout,
4-bit asymmetric, group 32, planted zero points 0 and 15, a zero and a negative scale): the
merged checkpoint keeps the converted qweight and scales, and its weights are the converted
ones plus the delta. Sources are converted with `--offset-dtype float32`: merge rounds the shifted offsets to the
stored offset dtype, and float32 keeps the merged weights within one fp32 rounding of the
reference (float16 offsets would move them by up to 2^-11 of an offset).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from support import tiny
from support.engine import CPU_ENGINE, run_engine
from support.gguf_files import write_tiny_gguf
from support.gptq_files import gptq_spec_dequant, reference_model, write_gptq_model
from support.hf_reference import greedy_reference

from qahira_vllm.cli import main as cli_main

pytestmark = pytest.mark.vllm

MAX_TOKENS = 12
# Served vs reference first-token logprobs. Both run fp32 on weights that differ by one fp32
# rounding (merged offsets) and in summation order; measured here (2-core Intel Xeon, AVX-512)
# at most 1.4e-6 over both tests.
LOGPROB_TOL = 1e-4
PROMPTS = ["the cat sat on", "the owl sat on the hill. the", "a dog"]
# Few steps, large lr: M starts at zero and each Adam step moves it by ~lr, so 4 steps of 0.1
# give a delta of ~2 * 0.4 / pi per block, enough to change the greedy tokens of these models.
TRAIN_ARGS = ["--method", "qahira", "--max-steps", "4", "--lr", "0.1", "--batch-size", "4",
              "--max-length", "64", "--eval-steps", "0", "--threads", "1", "--device", "cpu",
              "--seed", "0", "--no-progress"]


def _char_tokenizer():
    """A fast tokenizer for the tiny GGUF's 96-token vocabulary (it holds no tokenizer): id 0 is
    the end-of-text token, ids 1..95 the printable ASCII characters (space..'~'), one per char."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"</s>": 0, **{chr(c): c - 31 for c in range(32, 127)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="</s>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="</s>")


def _convert_train_merge(src: Path, root: Path, add_tokenizer=None) -> tuple[Path, Path, Path]:
    """Run the CLI verbs; return (converted checkpoint, adapter, merged checkpoint)."""
    ckpt, adapter, merged = root / "ckpt", root / "adapter", root / "merged"
    assert cli_main(["convert", str(src), str(ckpt), "--offset-dtype", "float32",
                     "--no-progress"]) == 0
    if add_tokenizer is not None:
        add_tokenizer().save_pretrained(ckpt)
    data = tiny.write_jsonl(root / "train.jsonl", [{"text": t} for t in tiny.pattern_texts(16)])
    assert cli_main(["train", "--base", str(ckpt), "--data", str(data), "--out", str(adapter),
                     *TRAIN_ARGS]) == 0
    assert cli_main(["merge", str(ckpt), str(adapter), str(merged)]) == 0
    # An exact QA-HiRA merge changes the offsets only.
    before, after = tiny.load_safetensors_dir(ckpt), tiny.load_safetensors_dir(merged)
    assert before.keys() == after.keys()
    for name, t in before.items():
        if not name.endswith(".offsets"):
            assert torch.equal(t, after[name]), name
    return ckpt, adapter, merged


def _add_adapter_delta(model, adapter: Path) -> int:
    """Add every saved QA-HiRA layer's dense delta to `model`'s fp32 weights, in place:
    W[o, i] += s * M[o // qo, i // pi] / pi. Returns the number of adapted layers; asserts each
    M is non-zero (the few training steps moved it)."""
    from safetensors.torch import load_file

    qc = json.loads((adapter / "adapter_config.json").read_text())["qahira"]
    assert qc["adapter_type"] == "qahira"
    s, pi, qo = qc["scaling"], qc["pool"], qc["repeat"]
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    prefix, suffix = "base_model.model.", ".qahira_M.weight"
    with torch.no_grad():
        for name, m in tensors.items():
            assert name.startswith(prefix) and name.endswith(suffix), name
            assert m.abs().max() > 0, f"{name} is all zero after training"
            weight = model.get_submodule(name[len(prefix): -len(suffix)]).weight
            rows = (torch.arange(weight.shape[0]) // qo)[:, None]
            cols = (torch.arange(weight.shape[1]) // pi)[None, :]
            weight += s * m.float()[rows, cols] / pi
    return len(tensors)


def _assert_served_like_reference(merged: Path, base_ref, tuned_ref, prompts, root: Path,
                                  max_model_len: int) -> None:
    """vLLM (qahira plugin, fp32) serving `merged` gives tuned_ref's greedy tokens and
    first-token logprobs; tuned_ref's tokens differ from base_ref's on some prompt."""
    expected = [greedy_reference(tuned_ref, ids, MAX_TOKENS) for ids in prompts]
    unadapted = [greedy_reference(base_ref, ids, MAX_TOKENS)[0] for ids in prompts]
    assert [e[0] for e in expected] != unadapted, "the adapter does not change the tokens"
    (root / "run").mkdir()
    result = run_engine({"model": str(merged), "prompts": prompts, "max_tokens": MAX_TOKENS,
                         "logprobs": 5,
                         "llm_kwargs": {**CPU_ENGINE, "dtype": "float32",
                                        "max_model_len": max_model_len}}, root / "run")
    assert "qahira: using kernel" in result["log"]  # served by the plugin, not dequantized
    for (tokens, first_lp), served in zip(expected, result["outputs"]):
        assert served["token_ids"] == tokens
        for tok_id, lp in served["first_logprobs"].items():
            assert abs(lp - first_lp[int(tok_id)].item()) < LOGPROB_TOL


def test_gguf_convert_train_merge_serves_like_gguf_plus_delta(tmp_path):
    """Tiny Llama GGUF Q4_0 (gguf-py's quantizer; negative-d blocks) -> ... -> vLLM; reference:
    transformers' GGUF loading (gguf.quants.dequantize) + the adapter delta."""
    from transformers import AutoModelForCausalLM

    # hidden 128: head_dim 32 (vLLM's CPU attention has no head_dim 16, the default's)
    src = write_tiny_gguf(tmp_path / "tiny.gguf", "Q4_0", hidden=128, inter=256)
    _, adapter, merged = _convert_train_merge(src, tmp_path, add_tokenizer=_char_tokenizer)

    def gguf_model():
        return AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name,
                                                    dtype=torch.float32).eval()

    base_ref, tuned_ref = gguf_model(), gguf_model()
    assert _add_adapter_delta(tuned_ref, adapter) == 14  # 7 projections x 2 layers
    tok = _char_tokenizer()
    prompts = [tok(p).input_ids for p in PROMPTS]
    _assert_served_like_reference(merged, base_ref, tuned_ref, prompts, tmp_path,
                                  max_model_len=128)  # the GGUF's context length


def test_gptq_convert_train_merge_serves_like_gptq_plus_delta(tmp_path):
    """Tiny Llama GPTQ (4-bit asymmetric, group 32, "gptq" v1 zeros) -> ... -> vLLM; reference:
    the GPTQModel layout decoded field by field (gptq_spec_dequant) + the adapter delta."""
    from transformers import AutoTokenizer

    src = write_gptq_model(tmp_path / "src", bits=4, sym=False, fmt="gptq", group_size=32)
    _, adapter, merged = _convert_train_merge(src, tmp_path)

    def gptq_model():
        return reference_model(src, lambda t: gptq_spec_dequant(
            t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, "gptq"))

    base_ref, tuned_ref = gptq_model(), gptq_model()
    assert _add_adapter_delta(tuned_ref, adapter) == 14
    tok = AutoTokenizer.from_pretrained(src)
    prompts = [tok(p).input_ids for p in PROMPTS]
    _assert_served_like_reference(merged, base_ref, tuned_ref, prompts, tmp_path,
                                  max_model_len=CPU_ENGINE["max_model_len"])
