"""The trainer learns, accumulates correctly, and resumes bit for bit."""

import json

import pytest
import torch
from safetensors.torch import load_file

from qahira_vllm.adapter_format import WEIGHTS_NAME, load_adapter
from qahira_vllm.cli import main as cli_main
from qahira_vllm.training.trainer import TrainConfig, train


def _records(run_dir, key):
    lines = [json.loads(l) for l in (run_dir / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in lines if key in r and "event" not in r}


def _cfg(qckpt, data, out, **kw):
    base = dict(base=str(qckpt), data=str(data), out=str(out), max_length=48, batch_size=4,
                eval_fraction=0.15, lr=3e-3, max_grad_norm=1.0, warmup_ratio=0.1,
                progress=False, eval_steps=0)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("method, lr", [("qbara", 3e-3), ("qahira", 3e-2), ("lora", 3e-3)])
def test_training_reduces_heldout_loss(method, lr, qckpt, pattern_data, tmp_path):
    out = tmp_path / "adapter"
    summary = train(_cfg(qckpt, pattern_data, out, method=method, max_steps=30, lr=lr,
                         schedule="cosine"))
    evals = _records(tmp_path / "adapter.run", "eval_loss")
    assert set(evals) == {0, 30}
    assert evals[30] < evals[0] - 0.5, evals
    assert summary["eval_loss"] == evals[30]
    adapter = load_adapter(out)
    assert adapter.config.adapter_type == method
    assert (out / "training_log.jsonl").exists()


def test_resume_is_bit_for_bit(qckpt, pattern_data, tmp_path):
    kw = dict(method="qbara", max_steps=10, dropout=0.1, grad_accum=2, batch_size=2)
    train(_cfg(qckpt, pattern_data, tmp_path / "full", save_steps=4, **kw))
    full_run = tmp_path / "full.run"
    # A second run directory holding only the step-4 checkpoint, as if the run had died there.
    part_run = tmp_path / "part.run"
    (part_run / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(full_run / "checkpoints" / "step-000004",
                    part_run / "checkpoints" / "step-000004")
    summary = train(_cfg(qckpt, pattern_data, tmp_path / "part", resume="auto", **kw))
    assert summary["resumed_from_step"] == 4
    full, part = _records(full_run, "loss"), _records(part_run, "loss")
    assert sorted(part) == list(range(5, 11))
    assert [part[s] for s in range(5, 11)] == [full[s] for s in range(5, 11)]  # exact floats
    a = load_file(str(tmp_path / "full" / WEIGHTS_NAME))
    b = load_file(str(tmp_path / "part" / WEIGHTS_NAME))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_changed_settings(qckpt, pattern_data, tmp_path):
    train(_cfg(qckpt, pattern_data, tmp_path / "a", method="lora", max_steps=4, save_steps=2))
    with pytest.raises(ValueError, match=r"different settings \['lr'\]"):
        train(_cfg(qckpt, pattern_data, tmp_path / "b", method="lora", max_steps=4, lr=1e-3,
                   resume=str(tmp_path / "a.run" / "checkpoints" / "step-000002")))
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        train(_cfg(qckpt, pattern_data, tmp_path / "c", method="lora", max_steps=4,
                   resume="auto"))


def test_gradient_accumulation_matches_big_batch(qckpt, pattern_data, tmp_path):
    losses = []
    for name, bs, acc in (("big", 4, 1), ("acc", 2, 2)):
        train(_cfg(qckpt, pattern_data, tmp_path / name, method="qbara", max_steps=2,
                   batch_size=bs, grad_accum=acc))
        losses.append(_records(tmp_path / f"{name}.run", "loss"))
    # Same examples per step, loss normalised by all target tokens of the step.
    assert losses[0][1] == pytest.approx(losses[1][1], rel=1e-5)
    assert losses[0][2] == pytest.approx(losses[1][2], rel=1e-4)


def test_bf16_and_checkpointing_run(qckpt, pattern_data, tmp_path):
    s = train(_cfg(qckpt, pattern_data, tmp_path / "x", method="qahira", max_steps=2,
                   bf16=True, gradient_checkpointing=True))
    assert s["steps"] == 2 and s["eval_loss"] is not None


def test_cli_train_and_existing_output(qckpt, pattern_data, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", "--base", str(qckpt), "--method", "qbara", "--data", str(pattern_data),
            "--out", str(out), "--max-steps", "2", "--max-length", "32", "--no-progress",
            "--targets", "q,v"]
    assert cli_main(args) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 2
    assert load_adapter(out).config.target_modules == ("q_proj", "v_proj")
    assert cli_main(args) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err
