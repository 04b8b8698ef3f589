"""lm-eval's `vllm` backend on a qahira checkpoint (CPU install; see test_vllm_cli.py for the
`vllm` metadata alias it needs), on a small local task written here (no hub access).

Reference: lm-eval's `hf` backend on the float reference model, i.e. the checkpoint's
dequantized weights saved as a plain transformers folder (a reference with no qahira code in
it). Both in fp32. Task: last-token loglikelihood of a continuation after a context
(lambada-style: metrics acc = greedy match, perplexity). Half the rows continue with the float
model's own greedy next token (found with transformers, not lm-eval), so acc is 0.5 by
construction, not 0 on a random model. Tolerance: per-row loglikelihood within LOGLIK_TOL
nats (fp32 vs fp32, different kernels and summation orders) and so perplexity within the same
relative tolerance; greedy flags and acc equal exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from qahira_vllm.server_process import console_script
from support import tiny
from support.engine import CPU_ENGINE, engine_lock, single_process
from support.lm_eval_task import write_task

pytestmark = pytest.mark.vllm

TASK = "qahira_last_word"
LOGLIK_TOL = 1e-4  # measured max 4.3e-6 (Xeon, avx512 + amx)
WORD_ROWS = [("the cat sat on the", "mat"), ("water boils at one hundred", "degrees"),
             ("the capital of France is", "Paris")]
N_GREEDY = 3


def _rows(model, tok) -> list[dict]:
    """N_GREEDY rows whose target is the float model's greedy next token (a non-space
    character that re-tokenizes to that token; the random model often prefers padding ids,
    hence a search over seeded random contexts), then the WORD_ROWS (" " + word targets)."""
    import random

    from support.hf_reference import greedy_reference

    rng = random.Random(0)
    vocab = [c for c, _ in WORD_ROWS for c in c.split()]
    greedy = []
    for _ in range(500):
        ctx = " ".join(rng.choice(vocab) for _ in range(4))
        ids = tok(ctx).input_ids
        t = greedy_reference(model, ids, 1)[0][0]
        s = tok.decode([t])
        if s and not s.isspace() and tok(ctx + s).input_ids == ids + [t]:
            greedy.append({"context": ctx, "target": s})
            if len(greedy) == N_GREEDY:
                return greedy + [{"context": c, "target": " " + w} for c, w in WORD_ROWS]
    raise AssertionError(f"only {len(greedy)} of 500 random contexts have a usable greedy token")


def _lm_eval(model: str, model_args: dict, task_dir: Path, out: Path, env: dict):
    """Run the `lm_eval` command; (aggregated results, {doc_id: (loglikelihood, is_greedy)})."""
    args = ",".join(f"{k}={v}" for k, v in model_args.items())
    cmd = [console_script("lm_eval"), "--model", model, "--model_args", args, "--tasks", TASK,
           "--include_path", str(task_dir), "--output_path", str(out), "--log_samples",
           "--batch_size", "8", "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(out / "datasets"), **env}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"][TASK]
    samples = [json.loads(line) for line in
               next(out.rglob(f"samples_{TASK}_*.jsonl")).read_text().splitlines()]
    per_doc = {s["doc_id"]: (float(s["resps"][0][0][0]), s["resps"][0][0][1] == "True")
               for s in samples}
    return results, per_doc


def test_lm_eval_vllm_backend_equals_hf_backend_on_float_reference(tmp_path):
    from transformers import AutoTokenizer

    from qahira_vllm.checkpoint import load_reference_model

    qckpt = tiny.tiny_qckpt()
    ref, tok = load_reference_model(qckpt), AutoTokenizer.from_pretrained(qckpt)
    float_dir = tmp_path / "float-reference"
    ref.save_pretrained(float_dir)
    tok.save_pretrained(float_dir)
    task_dir = write_task(tmp_path / "task", TASK, _rows(ref, tok))

    hf, hf_docs = _lm_eval("hf", {"pretrained": float_dir, "dtype": "float32"},
                           task_dir, tmp_path / "out-hf", {})
    spec, env = single_process({"llm_kwargs": {"quantization": "qahira", "dtype": "float32",
                                               **CPU_ENGINE}}, None)
    with engine_lock():  # the engine runs inside the lm_eval process
        vl, vl_docs = _lm_eval("vllm", {"pretrained": qckpt, **spec["llm_kwargs"]}, task_dir,
                               tmp_path / "out-vllm", env)

    assert hf["acc,none"] == vl["acc,none"] == 0.5
    assert vl_docs.keys() == hf_docs.keys() and len(hf_docs) == N_GREEDY + len(WORD_ROWS)
    for d, (ll, greedy) in hf_docs.items():
        assert vl_docs[d][1] == greedy, d
        assert abs(vl_docs[d][0] - ll) <= LOGLIK_TOL, (d, vl_docs[d][0], ll)
    assert abs(vl["perplexity,none"] / hf["perplexity,none"] - 1) <= LOGLIK_TOL
