"""Data-parallel training under torchrun: 2 gloo ranks on the CPU (127.0.0.1, one thread each).

- 2 ranks x batch 2 x accumulation 2 equal one process with batch 4 x accumulation 2 (the same
  global batch of 8 sequences per step) within an fp32 tolerance derived below;
- a 2-rank run stopped at step K and resumed to 2K equals the straight 2K run bit for bit
  (with dropout on, so every rank's RNG state must come back);
- rank 0 alone writes the log; a resume with another rank count is refused.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qahira_vllm.adapter_format import WEIGHTS_NAME
from qahira_vllm.training.trainer import TrainConfig, train

REPO = Path(__file__).resolve().parents[2]
K = 3
LR = 3e-3
# Same settings as CLI flags (torchrun runs) and as TrainConfig fields (in-process runs).
COMMON = dict(method="qbara", max_length=48, eval_fraction=0.15, lr=LR, max_grad_norm=1.0,
              warmup_ratio=0.1, eval_steps=0, grad_accum=2, threads=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(qckpt, data, out, **kw) -> None:
    """`qahira train` under torchrun with 2 CPU ranks (gloo)."""
    flags = []
    for key, value in {**COMMON, **kw}.items():
        flag = "--" + key.replace("_", "-")
        flags += [flag] if value is True else [flag, str(value)]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    # 2 cores: one thread per rank; gloo over loopback.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "qahira_vllm.cli", "train", "--base", str(qckpt), "--data", str(data),
           "--out", str(out), "--no-progress", *flags]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"torchrun failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    # One summary printed per launch (rank 0), not one per rank.
    assert r.stdout.count('"world_size": 2') == 1, r.stdout


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def _losses(run_dir: Path) -> dict[int, float]:
    steps = [r for r in _log(run_dir) if "loss" in r and "event" not in r]
    by_step = {r["step"]: r["loss"] for r in steps}
    assert len(by_step) == len(steps), "a step was logged twice (only rank 0 writes)"
    return by_step


def test_two_ranks_equal_one_process_with_the_same_global_batch(qckpt, pattern_data, tmp_path):
    _torchrun(qckpt, pattern_data, tmp_path / "ddp", batch_size=2, max_steps=K)
    train(TrainConfig(base=str(qckpt), data=str(pattern_data), out=str(tmp_path / "one"),
                      batch_size=4, max_steps=K, progress=False, **COMMON))
    log = _log(tmp_path / "ddp.run")
    assert log[0]["world_size"] == 2 and log[0]["global_batch"] == 8
    assert log[0]["device"] == "cpu" and log[0]["bf16"] is False
    assert all(r["peak_mem_mb"] > 0 for r in log if "loss" in r and "event" not in r)

    # The two runs see the same sequences per step and differ only in fp32 rounding: each rank
    # pads its shard to its own longest sequence and sums its half of the gradient, and gloo
    # adds the two halves (DDP's division by 2 is exact). Relative gradient differences are
    # then a few fp32 ulps times the reduction depth, well under delta = 1e-3. AdamW moves an
    # element by lr * m / (sqrt(v) + eps), whose change under a relative gradient change delta
    # is at most ~lr * delta per step, so after K steps |diff| <= K * lr * delta
    # (= 9e-6 here; measured ~1e-6). Losses agree to well within 1e-5 relative.
    tol = K * LR * 1e-3
    ddp, one = _losses(tmp_path / "ddp.run"), _losses(tmp_path / "one.run")
    assert sorted(ddp) == sorted(one) == list(range(1, K + 1))
    for step in one:
        assert ddp[step] == pytest.approx(one[step], rel=1e-5), step
    ev = [{r["step"]: r["eval_loss"] for r in _log(tmp_path / d) if "eval_loss" in r
           and "event" not in r} for d in ("ddp.run", "one.run")]
    assert ev[0].keys() == {0, K} and ev[0][K] == pytest.approx(ev[1][K], rel=1e-5)
    a = load_file(str(tmp_path / "ddp" / WEIGHTS_NAME))
    b = load_file(str(tmp_path / "one" / WEIGHTS_NAME))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=tol, msg=name)
    # ... while training moved B (zero at init) by far more than the tolerance.
    assert max(b[k].abs().max().item() for k in b if k.endswith("lora_B.weight")) > 100 * tol


def test_two_rank_resume_is_exact(qckpt, pattern_data, tmp_path):
    kw = dict(batch_size=2, max_steps=2 * K, dropout=0.1)  # dropout: per-rank RNG must resume
    _torchrun(qckpt, pattern_data, tmp_path / "full", save_steps=K, **kw)
    # A run directory holding only the step-K checkpoint, as if the run had died there.
    ckpt = Path("checkpoints") / f"step-{K:06d}"
    shutil.copytree(tmp_path / "full.run" / ckpt, tmp_path / "part.run" / ckpt)
    _torchrun(qckpt, pattern_data, tmp_path / "part", resume=True, **kw)
    full, part = _losses(tmp_path / "full.run"), _losses(tmp_path / "part.run")
    assert sorted(part) == list(range(K + 1, 2 * K + 1))
    assert [part[s] for s in part] == [full[s] for s in part]  # exact floats
    a = load_file(str(tmp_path / "full" / WEIGHTS_NAME))
    b = load_file(str(tmp_path / "part" / WEIGHTS_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(tmp_path / "full.run" / ckpt / "training_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])

    # One process cannot continue a 2-rank run: its batches and RNG streams differ.
    with pytest.raises(ValueError, match=r"written by 2 rank\(s\), resumed with 1"):
        train(TrainConfig(base=str(qckpt), data=str(pattern_data), out=str(tmp_path / "one"),
                          run_dir=str(tmp_path / "part.run"), resume=str(tmp_path / "part.run"
                                                                          / ckpt),
                          progress=False, **COMMON, **kw))
