"""qahira train --base QCKPT --method {qbara,qahira,lora} --data FILE.jsonl --out ADAPTER_DIR

Data parallel: torchrun --nproc-per-node N -m qahira_vllm.cli train ... (see docs/TRAINING.md).
"""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="qahira checkpoint folder (or hub repo id)")
    p.add_argument("--method", choices=("qbara", "qahira", "lora"), default="qbara")
    p.add_argument("--data", required=True, help="JSONL: {text} | {prompt, response} | {messages}")
    p.add_argument("--out", required=True, help="adapter folder to write (atomically)")
    a = p.add_argument_group("adapter")
    a.add_argument("--targets", default="q,k,v,o,gate,up,down",
                   help="comma-separated target modules (short or full names; never lm_head)")
    a.add_argument("--r", dest="lora_r", type=int, default=8,
                   help="LoRA rank r (Q-BaRA replaces a LoRA of this rank; default 8)")
    a.add_argument("--lora-alpha", type=float, default=16.0,
                   help="scaling = lora_alpha / r (default 16)")
    a.add_argument("--rank", type=int, help="Q-BaRA stored rank R (default 2r)")
    a.add_argument("--pool", type=int, help="Q-BaRA p (default 2) / QA-HiRA pi (default: "
                   "fitted to the base's block shape)")
    a.add_argument("--repeat", type=int, help="Q-BaRA q (default 2) / QA-HiRA qo")
    a.add_argument("--scaling", type=float, help="explicit adapter multiplier (overrides "
                   "lora_alpha / r)")
    a.add_argument("--init", choices=("zeros", "kaiming"), default="zeros",
                   help="QA-HiRA M init (default zeros: training starts from the base exactly)")
    a.add_argument("--dropout", type=float, default=0.0)
    d = p.add_argument_group("data")
    d.add_argument("--eval-data", help="held-out JSONL (default: split --eval-fraction off --data)")
    d.add_argument("--eval-fraction", type=float, default=0.05)
    d.add_argument("--max-length", type=int, default=512)
    d.add_argument("--packing", action="store_true",
                   help="concatenate records and cut into --max-length chunks")
    o = p.add_argument_group("optimization")
    o.add_argument("--batch-size", type=int, default=4)
    o.add_argument("--grad-accum", type=int, default=1)
    o.add_argument("--max-steps", type=int, help="optimizer steps (default: --epochs)")
    o.add_argument("--epochs", type=float, default=1.0)
    o.add_argument("--lr", type=float, default=2e-4)
    o.add_argument("--weight-decay", type=float, default=0.0)
    o.add_argument("--schedule", choices=("constant", "cosine"), default="constant")
    o.add_argument("--warmup-ratio", type=float, default=0.03)
    o.add_argument("--max-grad-norm", type=float, default=0.3)
    o.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA GPUs with native bf16, off for CPU)")
    o.add_argument("--device", default="auto",
                   help="auto (CUDA when available) | cpu | cuda | cuda:N; under torchrun each "
                   "rank uses cuda:LOCAL_RANK (pass cuda or auto)")
    o.add_argument("--gradient-checkpointing", action="store_true")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--threads", type=int, help="torch CPU threads")
    r = p.add_argument_group("run")
    r.add_argument("--eval-steps", type=int, default=50, help="0: only before and after")
    r.add_argument("--eval-batch-size", type=int, default=8)
    r.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: off)")
    r.add_argument("--run-dir", help="logs and checkpoints (default: OUT.run)")
    r.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
                   help="continue from the latest checkpoint in the run dir (or this one)")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--overwrite", action="store_true")


def run(args) -> int:
    from ..training.model import normalize_targets
    from ..training.trainer import TrainConfig, dist_from_env, train

    cfg = TrainConfig(
        base=args.base, data=args.data, out=args.out, method=args.method,
        targets=normalize_targets(args.targets), lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        rank=args.rank, pool=args.pool, repeat=args.repeat, scaling=args.scaling,
        init=args.init, dropout=args.dropout, eval_data=args.eval_data,
        eval_fraction=args.eval_fraction, max_length=args.max_length, packing=args.packing,
        batch_size=args.batch_size, grad_accum=args.grad_accum, max_steps=args.max_steps,
        epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, schedule=args.schedule,
        warmup_ratio=args.warmup_ratio, max_grad_norm=args.max_grad_norm, bf16=args.bf16, device=args.device,
        gradient_checkpointing=args.gradient_checkpointing, eval_steps=args.eval_steps,
        eval_batch_size=args.eval_batch_size, save_steps=args.save_steps, run_dir=args.run_dir,
        resume=args.resume, seed=args.seed, threads=args.threads,
        progress=not args.no_progress, overwrite=args.overwrite)
    summary = train(cfg)
    if dist_from_env().main:  # one summary per launch, not one per rank
        print(json.dumps(summary, indent=2))
    return 0
