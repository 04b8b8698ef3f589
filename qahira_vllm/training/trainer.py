"""The training loop: AdamW (torch), warmup + constant/cosine (transformers.get_scheduler),
gradient accumulation, clipping, bf16 autocast, gradient checkpointing, held-out eval, JSONL logs,
checkpoints and an exact resume.

A run directory (default `<out>.run/`) holds `log.jsonl` and `checkpoints/step-NNNNNN/`. A
checkpoint stores the trainable tensors, optimizer, scheduler, torch and python RNG states and
the data stream position, so `resume` continues the same run bit for bit (same machine, same
thread count). The finished adapter is written atomically to `out`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..adapter_format import save_adapter
from ..atomic import atomic_dir
from .data import (IGNORE_INDEX, BatchStream, eval_batches, load_jsonl, shape_examples,
                   split_heldout, target_tokens)
from .model import DEFAULT_TARGETS, AdapterSpec, adapter_tensors, build_training_model

SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine"}
STATE_FILE = "training_state.pt"


@dataclass
class TrainConfig:
    base: str
    data: str
    out: str
    method: str = "qbara"
    targets: tuple[str, ...] = DEFAULT_TARGETS
    lora_r: int = 8
    lora_alpha: float = 16.0
    rank: int | None = None
    pool: int | None = None
    repeat: int | None = None
    scaling: float | None = None
    init: str = "zeros"
    dropout: float = 0.0
    eval_data: str | None = None
    eval_fraction: float = 0.05
    max_length: int = 512
    packing: bool = False
    batch_size: int = 4
    grad_accum: int = 1
    max_steps: int | None = None   # default: `epochs` passes over the training sequences
    epochs: float = 1.0
    lr: float = 2e-4
    weight_decay: float = 0.0
    schedule: str = "constant"     # constant | cosine (both after linear warmup)
    warmup_ratio: float = 0.03
    max_grad_norm: float = 0.3
    bf16: bool = False
    gradient_checkpointing: bool = False
    eval_steps: int = 50           # 0: only before and after training
    eval_at_start: bool = True     # evaluate before the first step (a zero-init adapter = base)
    eval_batch_size: int = 8
    save_steps: int = 0            # 0: no intermediate checkpoints
    run_dir: str | None = None
    resume: str | None = None      # "auto" (latest checkpoint in run_dir) or a checkpoint path
    seed: int = 0
    threads: int | None = None
    progress: bool = True
    overwrite: bool = False
    # Everything above except these affects the numbers; resume refuses to change those.
    _NOT_STATE = ("out", "run_dir", "resume", "progress", "overwrite", "eval_steps",
                  "eval_at_start", "eval_batch_size", "save_steps", "threads")

    def spec(self) -> AdapterSpec:
        return AdapterSpec(method=self.method, targets=tuple(self.targets), lora_r=self.lora_r,
                           lora_alpha=self.lora_alpha, rank=self.rank, pool=self.pool,
                           repeat=self.repeat, scaling=self.scaling, init=self.init,
                           dropout=self.dropout)

    def run_path(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path(f"{Path(self.out)}.run")

    def identity(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()
                if k not in self._NOT_STATE}


# ----------------------------------------------------------------------------- pieces

def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over target tokens of -log p(token), in fp32 (logits at t predict t + 1)."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                           labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def _autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


@torch.no_grad()
def evaluate(model, examples, batch_size: int, pad_id: int, bf16: bool = False) -> dict:
    """Mean held-out loss per target token and its perplexity."""
    was_training = model.training
    model.eval()
    nll, tokens = 0.0, 0
    for batch in eval_batches(examples, batch_size, pad_id):
        with _autocast(bf16):
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
        nll += token_nll_sum(logits, batch["labels"]).item()
        tokens += target_tokens(batch)
    model.train(was_training)
    loss = nll / max(tokens, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": tokens}


def _latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted((run_dir / "checkpoints").glob("step-*"))
    return ckpts[-1] if ckpts else None


class _Log:
    """Append-only JSONL log (rewritten up to the resume step when resuming)."""

    def __init__(self, path: Path, keep_until_step: int | None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if keep_until_step is None:
            path.write_text("")
        elif path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= keep_until_step
                    and json.loads(line).get("event") != "done"]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- training

def prepare_data(cfg: TrainConfig, tokenizer):
    examples = load_jsonl(cfg.data, tokenizer)
    if cfg.eval_data:
        train, held = examples, load_jsonl(cfg.eval_data, tokenizer)
    else:
        train, held = split_heldout(examples, cfg.eval_fraction, cfg.seed)
    return (shape_examples(train, cfg.max_length, cfg.packing),
            shape_examples(held, cfg.max_length, cfg.packing))


def train(cfg: TrainConfig) -> dict:
    """Train an adapter on cfg.base and write it to cfg.out. Returns a summary."""
    from tqdm import tqdm
    from transformers import AutoTokenizer, get_scheduler

    t0 = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"schedule={cfg.schedule!r}: expected one of {sorted(SCHEDULES)}")
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"output folder {out} already exists (pass --overwrite)")
    run_dir = cfg.run_path()
    resume_from = None
    if cfg.resume:
        resume_from = _latest_checkpoint(run_dir) if cfg.resume == "auto" else Path(cfg.resume)
        if resume_from is None or not (resume_from / STATE_FILE).exists():
            raise FileNotFoundError(f"no checkpoint to resume from in {run_dir / 'checkpoints'}"
                                    if cfg.resume == "auto" else
                                    f"{resume_from}: not a checkpoint (no {STATE_FILE})")

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.base)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
        tokenizer.eos_token_id or 0)
    train_set, eval_set = prepare_data(cfg, tokenizer)
    model, adapter_config = build_training_model(
        cfg.base, cfg.spec(), seed=cfg.seed, gradient_checkpointing=cfg.gradient_checkpointing)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    n_params = sum(p.numel() for p in params.values())

    steps_per_epoch = math.ceil(len(train_set) / (cfg.batch_size * cfg.grad_accum))
    max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = math.ceil(cfg.warmup_ratio * max_steps)
    optimizer = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(SCHEDULES[cfg.schedule], optimizer, num_warmup_steps=warmup,
                              num_training_steps=max_steps)
    stream = BatchStream(train_set, cfg.batch_size, cfg.seed, pad_id)

    start_step = 0
    if resume_from is not None:
        state = torch.load(resume_from / STATE_FILE, weights_only=True)
        if state["config"] != cfg.identity():
            diff = sorted(k for k in cfg.identity() if cfg.identity()[k] != state["config"].get(k))
            raise ValueError(f"{resume_from}: resume with different settings {diff}: expected "
                             "the same run (only out/run_dir/progress/eval/save options may "
                             "change)")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state["trainable"][name])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        stream.load_state_dict(state["data"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(_to_python_rng(state["python_rng"]))
        start_step = int(state["step"])
    log = _Log(run_dir / "log.jsonl", start_step if resume_from is not None else None)
    if resume_from is None:
        log.write({"event": "start", "step": 0, "method": cfg.method,
                   "trainable_params": n_params, "train_sequences": len(train_set),
                   "eval_sequences": len(eval_set), "max_steps": max_steps,
                   "adapter": adapter_config.to_json_dict()["qahira"]})
        if eval_set and cfg.eval_at_start:
            log.write({"step": 0, **evaluate(model, eval_set, cfg.eval_batch_size, pad_id,
                                             cfg.bf16)})

    model.train()
    bar = tqdm(total=max_steps, initial=start_step, desc=f"train {cfg.method}", unit="step",
               disable=not cfg.progress)
    last = {}
    for step in range(start_step + 1, max_steps + 1):
        micro = [stream.next_batch() for _ in range(cfg.grad_accum)]
        n_tokens = sum(target_tokens(b) for b in micro)
        loss_sum = 0.0
        for batch in micro:  # normalise by all target tokens of the step, not per micro-batch
            with _autocast(cfg.bf16):
                logits = model(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).logits
            nll = token_nll_sum(logits, batch["labels"])
            (nll / max(n_tokens, 1)).backward()
            loss_sum += nll.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        last = {"step": step, "loss": loss_sum / max(n_tokens, 1), "lr": lr,
                "grad_norm": float(grad_norm), "tokens": n_tokens,
                "elapsed_s": round(time.time() - t0, 3)}
        log.write(last)
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{lr:.2e}")
        if eval_set and (step == max_steps or (cfg.eval_steps and step % cfg.eval_steps == 0)):
            ev = evaluate(model, eval_set, cfg.eval_batch_size, pad_id, cfg.bf16)
            last.update(ev)
            log.write({"step": step, **ev})
            if cfg.progress:
                bar.write(f"step {step}: eval loss {ev['eval_loss']:.4f}, ppl "
                          f"{ev['eval_ppl']:.2f}", file=sys.stderr)
        if cfg.save_steps and step % cfg.save_steps == 0 and step < max_steps:
            _save_checkpoint(run_dir / "checkpoints" / f"step-{step:06d}", cfg, step, params,
                             optimizer, scheduler, stream)
    bar.close()

    extra = {"training_log.jsonl": (run_dir / "log.jsonl").read_text(),
             "training_args.json": json.dumps(cfg.identity(), indent=2) + "\n"}
    save_adapter(out, adapter_config, adapter_tensors(model), overwrite=cfg.overwrite,
                 extra_files=extra)
    summary = {"out": str(out.resolve()), "method": cfg.method, "steps": max_steps,
               "resumed_from_step": start_step if resume_from is not None else None,
               "trainable_params": n_params, "final_loss": last.get("loss"),
               "eval_loss": last.get("eval_loss"), "eval_ppl": last.get("eval_ppl"),
               "seconds": round(time.time() - t0, 2)}
    log.write({"event": "done", "step": max_steps, **summary})
    return summary


def _to_python_rng(state):
    # torch.load(weights_only) gives lists back; random.setstate wants (int, tuple, None|float).
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def _save_checkpoint(path: Path, cfg: TrainConfig, step: int, params, optimizer, scheduler,
                     stream: BatchStream) -> None:
    state = {"step": step, "config": cfg.identity(),
             "trainable": {n: p.detach().clone() for n, p in params.items()},
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "data": stream.state_dict(), "torch_rng": torch.get_rng_state(),
             "python_rng": random.getstate()}
    with atomic_dir(path, overwrite=True) as tmp:
        torch.save(state, tmp / STATE_FILE)
        (tmp / "step.json").write_text(json.dumps({"step": step, **stream.state_dict()}) + "\n")


__all__ = ["TrainConfig", "train", "evaluate", "token_nll_sum", "prepare_data"]
