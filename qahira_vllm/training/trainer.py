"""The training loop: AdamW (torch), warmup + constant/cosine (transformers.get_scheduler),
gradient accumulation, clipping, bf16 autocast, gradient checkpointing, held-out eval, JSONL logs,
checkpoints and an exact resume, on CPU or CUDA, in one process or data-parallel under torchrun.

Devices: `device` auto (CUDA when available) | cpu | cuda | cuda:N. bf16 autocast is on by
default on CUDA (GPUs with native bf16) and off on CPU. Data parallel: when torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK) says WORLD_SIZE > 1, the model is wrapped in torch's DistributedDataParallel (gloo
on CPU, nccl on CUDA, rank r on cuda:LOCAL_RANK); every rank reads rows [r*b, (r+1)*b) of each
global micro-batch of b * world_size sequences, so one optimizer step sees
batch_size * world_size * grad_accum sequences, the same as one process with batch_size *
world_size. Losses, token counts, eval and peak memory are reduced across ranks; rank 0 alone
writes the log, checkpoints (holding every rank's RNG state) and the adapter.

A run directory (default `<out>.run/`) holds `log.jsonl` and `checkpoints/step-NNNNNN/`. A
checkpoint stores the trainable tensors, optimizer, scheduler, torch and python RNG states and
the data stream position, so `resume` continues the same run bit for bit (same machine, same
thread count, same number of ranks). The finished adapter is written atomically to `out`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import resource
import sys
import time
import warnings
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
    bf16: bool | None = None       # bf16 autocast; None: on for CUDA with native bf16, else off
    device: str = "auto"           # auto (CUDA when available) | cpu | cuda | cuda:N
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
        if d["device"] != "auto":  # the kind of device changes the numbers, not its index
            d["device"] = torch.device(d["device"]).type
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()
                if k not in self._NOT_STATE}


# ----------------------------------------------------------------------------- devices, ranks

@dataclass(frozen=True)
class DistInfo:
    """This process's place in a torchrun launch (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def parallel(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_from_env(env=None) -> DistInfo:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK (absent: a single process).

    Raises ValueError when they are not integers or do not fit together."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return DistInfo()
    try:
        world = int(env["WORLD_SIZE"])
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ValueError(f"torchrun environment RANK={env.get('RANK')!r} WORLD_SIZE="
                         f"{env.get('WORLD_SIZE')!r} LOCAL_RANK={env.get('LOCAL_RANK')!r}: "
                         "expected integers") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"torchrun environment RANK={rank} WORLD_SIZE={world} LOCAL_RANK="
                         f"{local}: expected 0 <= RANK < WORLD_SIZE")
    return DistInfo(rank, world, local)


def resolve_device(device: str, dist: DistInfo = DistInfo()) -> torch.device:
    """`auto` | `cpu` | `cuda` | `cuda:N` -> torch.device. Under torchrun with more than one
    rank, CUDA means cuda:LOCAL_RANK. Raises ValueError for an unknown name, CUDA without a
    usable GPU, an index past the GPU count, or an explicit index with several ranks."""
    name = (device or "auto").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index):
        raise ValueError(f"device={device!r}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: no CUDA device is usable here (torch "
                         f"{torch.__version__}, torch.cuda.is_available() is False); use "
                         "--device cpu or auto")
    if dist.parallel:
        if dev.index is not None:
            raise ValueError(f"device={device!r} with {dist.world_size} ranks: each rank uses "
                             "cuda:LOCAL_RANK; pass --device cuda (choose GPUs with "
                             "CUDA_VISIBLE_DEVICES)")
        dev = torch.device("cuda", dist.local_rank)
    elif dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if dev.index >= torch.cuda.device_count():
        raise ValueError(f"device={device!r}: {dev} does not exist ({torch.cuda.device_count()} "
                         "CUDA device(s) visible)")
    return dev


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far, MiB: CUDA torch.cuda.max_memory_allocated (tensors
    torch allocated on `device`); CPU the peak resident set size: on Linux the kernel's
    high-water mark of this program's memory (VmHWM, /proc/self/status), elsewhere getrusage's
    ru_maxrss. Not ru_maxrss on Linux: exec keeps the parent's high-water mark in it, so a
    trainer started by a large process (a benchmark, a launcher) would report the parent's."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 2**10
    except (OSError, StopIteration, ValueError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, else KiB


def _all_reduce(values: list[float], device: torch.device, dist: DistInfo,
                op: str = "sum") -> list[float]:
    """Sum (or max) floats over the ranks, in fp64; identity in one process."""
    if not dist.parallel:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(
        t, op=torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM)
    return t.tolist()


def _rng_state(device: torch.device) -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_python_rng(state["python"]))
    if device.type == "cuda":
        if state.get("cuda") is None:
            raise ValueError("checkpoint has no CUDA RNG state (written by a CPU run): resume "
                             "on the device kind it was written on")
        torch.cuda.set_rng_state(state["cuda"], device)


# ----------------------------------------------------------------------------- pieces

def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over target tokens of -log p(token), in fp32 (logits at t predict t + 1)."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                           labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def _autocast(enabled: bool, device_type: str = "cpu"):
    return (torch.autocast(device_type, dtype=torch.bfloat16) if enabled
            else contextlib.nullcontext())


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, examples, batch_size: int, pad_id: int, bf16: bool = False,
             dist: DistInfo = DistInfo()) -> dict:
    """Mean held-out loss per target token and its perplexity, on the model's device.

    With several ranks each evaluates examples[rank::world_size] and the sums of token NLL and
    target tokens are all-reduced, so every rank returns the loss over all examples."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, tokens = 0.0, 0
    for batch in eval_batches(examples[dist.rank::dist.world_size], batch_size, pad_id):
        batch = _to(batch, device)
        with _autocast(bf16, device.type):
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
        nll += token_nll_sum(logits, batch["labels"]).item()
        tokens += target_tokens(batch)
    model.train(was_training)
    nll, tokens = _all_reduce([nll, float(tokens)], device, dist)
    tokens = int(tokens)
    loss = nll / max(tokens, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": tokens}


def _latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted((run_dir / "checkpoints").glob("step-*"))
    return ckpts[-1] if ckpts else None


class _Log:
    """Append-only JSONL log (rewritten up to the resume step when resuming); path None: off
    (ranks other than 0)."""

    def __init__(self, path: Path | None, keep_until_step: int | None):
        self.path = path
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if keep_until_step is None:
            path.write_text("")
        elif path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= keep_until_step
                    and json.loads(line).get("event") != "done"]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.path is None:
            return
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
    """Train an adapter on cfg.base and write it to cfg.out. Returns a summary (every rank).

    Under torchrun (WORLD_SIZE > 1 in the environment) it joins, or creates and at the end
    destroys, the default process group. Raises ValueError for bad settings (device, schedule,
    resume with other settings or another rank count), FileExistsError when `out` exists
    without overwrite, FileNotFoundError for a missing checkpoint."""
    from tqdm import tqdm
    from transformers import AutoTokenizer, get_scheduler

    t0 = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"schedule={cfg.schedule!r}: expected one of {sorted(SCHEDULES)}")
    dist = dist_from_env()
    device = resolve_device(cfg.device, dist)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # nccl collectives and Triton launch on the current device
    if cfg.bf16 is None:  # default: bf16 autocast where the GPU does bf16 natively
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    else:
        bf16 = cfg.bf16
    cfg = dataclasses.replace(cfg, device=str(device), bf16=bf16)
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
    own_group = dist.parallel and not torch.distributed.is_initialized()
    if own_group:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return _train(cfg, dist, device, run_dir, resume_from, t0, tqdm, AutoTokenizer,
                      get_scheduler)
    finally:
        if own_group:
            torch.distributed.destroy_process_group()


def _train(cfg, dist, device, run_dir, resume_from, t0, tqdm, AutoTokenizer, get_scheduler):
    out = Path(cfg.out)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.base)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
        tokenizer.eos_token_id or 0)
    train_set, eval_set = prepare_data(cfg, tokenizer)
    model, adapter_config = build_training_model(
        cfg.base, cfg.spec(), seed=cfg.seed, gradient_checkpointing=cfg.gradient_checkpointing)
    model.to(device)  # the base moves packed: QuantLinear buffers keep their stored dtypes
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    n_params = sum(p.numel() for p in params.values())
    if dist.parallel:
        # Same adapter init on every rank (seeded above; DDP also broadcasts rank 0's), then
        # different dropout streams per rank.
        torch.manual_seed(cfg.seed * 1_000_003 + dist.rank)
    net = model
    if dist.parallel:
        with warnings.catch_warnings():
            # broadcast_buffers=False is deprecated but is the only switch that also skips the
            # init broadcast of the packed base (identical on every rank: read from one file).
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*",
                                    category=FutureWarning)
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                broadcast_buffers=False)

    global_batch = cfg.batch_size * dist.world_size
    steps_per_epoch = math.ceil(len(train_set) / (global_batch * cfg.grad_accum))
    max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = math.ceil(cfg.warmup_ratio * max_steps)
    optimizer = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(SCHEDULES[cfg.schedule], optimizer, num_warmup_steps=warmup,
                              num_training_steps=max_steps)
    # One global stream on every rank; each takes its rows of every micro-batch.
    stream = BatchStream(train_set, global_batch, cfg.seed, pad_id)

    start_step = 0
    if resume_from is not None:
        state = torch.load(resume_from / STATE_FILE, map_location="cpu", weights_only=True)
        saved = {"device": "cpu", **state["config"]}  # checkpoints from before `device`
        if saved != cfg.identity():
            diff = sorted(k for k in cfg.identity() if cfg.identity()[k] != saved.get(k))
            raise ValueError(f"{resume_from}: resume with different settings {diff}: expected "
                             "the same run (only out/run_dir/progress/eval/save options may "
                             "change)")
        saved_world = int(state.get("world_size", 1))
        if saved_world != dist.world_size:
            raise ValueError(f"{resume_from}: written by {saved_world} rank(s), resumed with "
                             f"{dist.world_size}: resume with the same number of ranks "
                             "(torchrun --nproc-per-node) so the batches and RNG continue")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state["trainable"][name])
        optimizer.load_state_dict(state["optimizer"])  # moves the moments to the params' device
        scheduler.load_state_dict(state["scheduler"])
        stream.load_state_dict(state["data"])
        rng = state.get("rng") or [{"torch": state["torch_rng"], "python": state["python_rng"]}]
        _set_rng_state(rng[dist.rank], device)
        start_step = int(state["step"])
    log = _Log(run_dir / "log.jsonl" if dist.main else None,
               start_step if resume_from is not None else None)
    if resume_from is None:
        log.write({"event": "start", "step": 0, "method": cfg.method,
                   "trainable_params": n_params, "train_sequences": len(train_set),
                   "eval_sequences": len(eval_set), "max_steps": max_steps,
                   "device": str(device), "world_size": dist.world_size, "bf16": cfg.bf16,
                   "global_batch": global_batch * cfg.grad_accum,
                   "adapter": adapter_config.to_json_dict()["qahira"]})
        if eval_set and cfg.eval_at_start:
            log.write({"step": 0, **evaluate(model, eval_set, cfg.eval_batch_size, pad_id,
                                             cfg.bf16, dist)})

    net.train()
    bar = tqdm(total=max_steps, initial=start_step, desc=f"train {cfg.method}", unit="step",
               disable=not (cfg.progress and dist.main))
    last = {}
    for step in range(start_step + 1, max_steps + 1):
        micro = [stream.next_shard(dist.rank, dist.world_size) for _ in range(cfg.grad_accum)]
        # Normalise by all target tokens of the global step, on every rank: DDP averages the
        # ranks' gradients, hence the factor world_size.
        n_tokens = int(_all_reduce([float(sum(target_tokens(b) for b in micro))], device,
                                   dist)[0])
        micro = [_to(b, device) for b in micro]
        loss_sum = 0.0
        for i, batch in enumerate(micro):
            sync = not dist.parallel or i == len(micro) - 1  # all-reduce once per step
            with contextlib.nullcontext() if sync else net.no_sync():
                with _autocast(cfg.bf16, device.type):
                    logits = net(input_ids=batch["input_ids"],
                                 attention_mask=batch["attention_mask"]).logits
                nll = token_nll_sum(logits, batch["labels"])
                (nll / max(n_tokens, 1) * dist.world_size).backward()
            loss_sum += nll.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum = _all_reduce([loss_sum], device, dist)[0]
        peak = _all_reduce([peak_memory_mb(device)], device, dist, op="max")[0]
        last = {"step": step, "loss": loss_sum / max(n_tokens, 1), "lr": lr,
                "grad_norm": float(grad_norm), "tokens": n_tokens,
                "peak_mem_mb": round(peak, 1), "elapsed_s": round(time.time() - t0, 3)}
        log.write(last)
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{lr:.2e}")
        if eval_set and (step == max_steps or (cfg.eval_steps and step % cfg.eval_steps == 0)):
            ev = evaluate(model, eval_set, cfg.eval_batch_size, pad_id, cfg.bf16, dist)
            last.update(ev)
            log.write({"step": step, **ev})
            if cfg.progress and dist.main:
                bar.write(f"step {step}: eval loss {ev['eval_loss']:.4f}, ppl "
                          f"{ev['eval_ppl']:.2f}", file=sys.stderr)
        if cfg.save_steps and step % cfg.save_steps == 0 and step < max_steps:
            _save_checkpoint(run_dir / "checkpoints" / f"step-{step:06d}", cfg, step, params,
                             optimizer, scheduler, stream, device, dist)
    bar.close()

    summary = {"out": str(out.resolve()), "method": cfg.method, "steps": max_steps,
               "resumed_from_step": start_step if resume_from is not None else None,
               "trainable_params": n_params, "final_loss": last.get("loss"),
               "eval_loss": last.get("eval_loss"), "eval_ppl": last.get("eval_ppl"),
               "device": str(device), "world_size": dist.world_size,
               "peak_mem_mb": round(_all_reduce([peak_memory_mb(device)], device, dist,
                                                op="max")[0], 1),
               "seconds": round(time.time() - t0, 2)}
    if dist.main:
        extra = {"training_log.jsonl": (run_dir / "log.jsonl").read_text(),
                 "training_args.json": json.dumps(cfg.identity(), indent=2) + "\n"}
        tensors = {n: {k: t.cpu() for k, t in kinds.items()}
                   for n, kinds in adapter_tensors(model).items()}
        save_adapter(out, adapter_config, tensors, overwrite=cfg.overwrite, extra_files=extra)
        log.write({"event": "done", "step": max_steps, **summary})
    if dist.parallel:
        torch.distributed.barrier()  # every rank returns once the adapter exists
    return summary


def _to_python_rng(state):
    # torch.load(weights_only) gives lists back; random.setstate wants (int, tuple, None|float).
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def _save_checkpoint(path: Path, cfg: TrainConfig, step: int, params, optimizer, scheduler,
                     stream: BatchStream, device: torch.device = torch.device("cpu"),
                     dist: DistInfo = DistInfo()) -> None:
    """Rank 0 writes the state (tensors on CPU) atomically; with several ranks every rank's RNG
    state is gathered into it first (a collective: all ranks call this)."""
    rng = _rng_state(device)
    if dist.parallel:
        gathered = [None] * dist.world_size
        torch.distributed.all_gather_object(gathered, rng)
        rng_all = gathered
    else:
        rng_all = [rng]
    if not dist.main:
        return
    state = {"step": step, "config": cfg.identity(), "world_size": dist.world_size,
             "trainable": {n: p.detach().cpu().clone() for n, p in params.items()},
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "data": stream.state_dict(), "rng": rng_all,
             # rank 0's, under the names older versions read
             "torch_rng": rng_all[0]["torch"], "python_rng": rng_all[0]["python"]}
    with atomic_dir(path, overwrite=True) as tmp:
        torch.save(state, tmp / STATE_FILE)
        (tmp / "step.json").write_text(json.dumps({"step": step, **stream.state_dict()}) + "\n")


__all__ = ["TrainConfig", "train", "evaluate", "token_nll_sum", "prepare_data", "DistInfo",
           "dist_from_env", "resolve_device", "peak_memory_mb"]
