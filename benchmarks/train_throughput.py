"""Training throughput and peak memory: `qahira train` (Q-BaRA, QA-HiRA on the packed INT4 base)
vs PEFT's LoRA on the same model dequantized to float (CPU).

    .venv/bin/python benchmarks/train_throughput.py [--profile]  # ~15 min, +10 with --profile
    .venv/bin/python benchmarks/train_throughput.py --smoke      # tiny model, one process, < 1 min

Model: a randomly initialised Llama (default hidden 1024, 12 layers, intermediate 2816, 16 heads /
4 KV heads, SmolLM2's 49152-token vocabulary and tokenizer, tied embeddings: 186M parameters),
built locally (no hub access) and quantized with `qahira quantize` to INT4 block 1x32. The float
baseline is that checkpoint's exact dequantized weights in fp32, saved as an ordinary
transformers folder and loaded with `from_pretrained`: what a user would otherwise train on.

Methods, with equal trainable parameters on q,k,v,o,gate,up,down of every layer:
    qbara   `qahira train --method qbara` (the trainer's Python API, `train(TrainConfig)`):
            R = 2r, p = q = 2
    qahira  `qahira train --method qahira`: pi = 32, qo = 1 (the tile holds the 1x32 blocks);
            its count, sum(out * in) / 32, fixes r
    peft    PEFT LoraConfig(r, lora_alpha, target_modules) on the float model, the same step as
            the trainer's (same data stream, loss, AdamW, schedule, clipping, autocast)
r = round(QA-HiRA count / sum(in + out)); the counts are recorded.

Every (method, dtype) runs in its own child process (so peak RSS is its own), one after the
other, with the same torch thread count (`--threads`, default 1), packed sequences of
`--seq-len` tokens, batch `--batch-size`, `--warmup` steps excluded from timing and `--steps`
timed, and `--rounds` (default 2) runs of each method, the methods alternated, their step
times pooled (this VM's speed drifts over minutes, by up to 1.5x: one run per method would
compare different speeds). tokens/s = target tokens of the timed steps / their time, from the
median step time (the mean is recorded too). Trainer step times come from its own
log.jsonl (`elapsed_s` per step). tokens per CPU second = the same tokens / the process's CPU
time over the timed steps (time.process_time; for the trainer read by a thread that polls
its log every 50 ms, so meaningless for --smoke's millisecond steps): with one torch thread,
less affected than wall time when other processes take the cores (cache contention still
counts). Peak memory: the trainer's `peak_mem_mb` (whole-process peak RSS, loading included);
for PEFT the peak RSS of the training phase only (the high-water mark is reset after the model
is loaded, which biases the comparison towards PEFT), its load peak recorded beside it. A short
per-layer timing of the base's dequantization (the trainer's QuantLinear rebuilds W in forward
and in backward) says how much of a step it takes; --profile adds torch.profiler's top ops.

Then, per dtype, the interleaved phase (`interleaved`): all three models in this one process,
their steps alternated (`--interleaved-rounds`, default 6 rounds of 2 steps per method, the
order rotated each round): the same step as above under the same drift of the VM's speed,
so its ratios are the ones to quote (the separate processes give peak memory and the trainer's
own step times). On this project's VMs, per-process medians of the same method differed by up
to 1.4x between rounds minutes apart.

Writes train_throughput.json and .png to benchmarks/results/ (or $OUT, or --out);
--smoke writes train_throughput_smoke.*.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FULL_SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                  num_attention_heads=16, num_key_value_heads=4, head_dim=64)
SMOKE_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=32)
BLOCK = (1, 32)
QAHIRA_POOL, QAHIRA_REPEAT = 32, 1
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_ALPHA = 16.0
METHODS = ("qbara", "qahira", "peft")
CPU_FLAGS_OF_INTEREST = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                         "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


# ----------------------------------------------------------------------------- machine

def machine_info(threads: int) -> dict:
    """CPU model, flags (the ones that matter for fp32/bf16 GEMMs, and all of them), cores,
    torch threads, library versions."""
    import peft
    import torch
    import transformers

    model, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                break
    except OSError:
        pass
    return {"cpu": model, "cpus": os.cpu_count(), "torch_threads": threads,
            "cpu_flags": [f for f in CPU_FLAGS_OF_INTEREST if f in flags],
            "cpu_flags_all": flags, "torch": torch.__version__, "peft": peft.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


# ----------------------------------------------------------------------------- inputs

def build_models(work: Path, shape: dict) -> tuple[Path, Path]:
    """(INT4 checkpoint, float folder of its dequantized weights), cached under `work`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qahira_vllm.checkpoint import load_reference_model
    from qahira_vllm.models import fetch_model
    from qahira_vllm.quantize import quantize_model

    tag = "llama-h{hidden_size}-l{num_hidden_layers}-i{intermediate_size}".format(**shape)
    src, qckpt, flt = (work / f"{tag}-random", work / f"{tag}-int4-1x32",
                       work / f"{tag}-int4-1x32-dequant-fp32")
    smol = fetch_model("smollm2-135m", verbose=False)  # tokenizer and vocabulary only
    tokenizer_files = [f for f in smol.iterdir()
                       if f.name.startswith("tokenizer") or f.name == "chat_template.jinja"]
    if not (src / "config.json").exists():
        cfg = AutoConfig.from_pretrained(smol)
        cfg.update(dict(shape, tie_word_embeddings=True, dtype="float32"))
        torch.manual_seed(0)
        _save_folder(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32), src,
                     tokenizer_files)
    if not (qckpt / "config.json").exists():
        quantize_model(src, qckpt, bits=4, block_size=BLOCK, progress=False)
    if not (flt / "config.json").exists():
        _save_folder(load_reference_model(qckpt, torch.float32), flt, tokenizer_files)
    return qckpt, flt


def _save_folder(model, out: Path, tokenizer_files) -> None:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in tokenizer_files:
        shutil.copy2(f, tmp / f.name)
    tmp.rename(out)


def write_data(work: Path, words: int, seed: int = 0) -> tuple[Path, Path]:
    """train.jsonl (`words` pseudo-English words in records of ~60) and a one-record eval set
    (the trainer evaluates once at the end; kept negligible)."""
    rng = random.Random(seed)
    lexicon = ("the of and to in is that for it as with was on be by this are from at or an "
               "model weight block scale offset train adapter rank pool repeat token layer "
               "quantized memory speed packed float gradient step batch sequence value output "
               "input matrix kernel serve request merge data loss learning rate").split()
    records = []
    for _ in range(max(1, words // 60)):
        records.append(" ".join(rng.choice(lexicon) for _ in range(60)).capitalize() + ".")
    train, held = work / "train.jsonl", work / "eval.jsonl"
    train.write_text("".join(json.dumps({"text": r}) + "\n" for r in records))
    held.write_text(json.dumps({"text": records[0][:200]}) + "\n")
    return train, held


def adapter_plan(qckpt: Path) -> dict:
    """Equal trainable parameters: QA-HiRA's count fixes LoRA's r; Q-BaRA R = 2r, p = q = 2
    has exactly LoRA's count."""
    from qahira_vllm.training.model import load_quantized_model, quant_layer_dims

    model, _ = load_quantized_model(qckpt)
    dims = [d for n, d in quant_layer_dims(model).items() if n.rsplit(".", 1)[-1] in TARGETS]
    qahira = sum(o * i // (QAHIRA_POOL * QAHIRA_REPEAT) for o, i in dims)
    per_rank = sum(o + i for o, i in dims)
    r = max(1, round(qahira / per_rank))
    return {"lora_r": r, "qbara_R": 2 * r, "qbara_pool": 2, "qbara_repeat": 2,
            "qahira_pool": QAHIRA_POOL, "qahira_repeat": QAHIRA_REPEAT,
            "expected_params": {"qbara": r * per_rank, "qahira": qahira, "peft": r * per_rank},
            "adapted_layers": len(dims)}


# ----------------------------------------------------------------------------- children

def _train_config(spec: dict, method: str):
    from qahira_vllm.training.trainer import TrainConfig

    plan = spec["plan"]
    common = dict(base=spec["qckpt"], data=spec["data"], eval_data=spec["eval_data"],
                  # a fresh folder per round: the CPU-time watcher reads this run's log only
                  out=str(Path(spec["work"]) / f"adapter-{method}-{spec['dtype']}"
                                               f"-r{spec.get('round', 0)}"),
                  targets=TARGETS, lora_r=plan["lora_r"], lora_alpha=LORA_ALPHA,
                  max_length=spec["seq_len"], packing=True, batch_size=spec["batch_size"],
                  max_steps=spec["warmup"] + spec["steps"], bf16=spec["dtype"] == "bf16",
                  device="cpu", eval_steps=0, eval_at_start=False, threads=spec["threads"],
                  progress=False, overwrite=True, seed=0)
    if method == "qbara":
        return TrainConfig(method="qbara", rank=plan["qbara_R"], pool=plan["qbara_pool"],
                           repeat=plan["qbara_repeat"], **common)
    if method == "qahira":
        return TrainConfig(method="qahira", pool=plan["qahira_pool"],
                           repeat=plan["qahira_repeat"], **common)
    # peft: the trainer's defaults for everything the step does (lr, schedule, clipping)
    return TrainConfig(method="lora", **common)


def _run_trainer(spec: dict, method: str) -> dict:
    """`qahira train` through its Python API; step times from its log.jsonl."""
    from qahira_vllm.training.trainer import train

    cfg = _train_config(spec, method)
    log_path = cfg.run_path() / "log.jsonl"
    # CPU time of the timed steps (less sensitive than wall time to other processes on the
    # cores): a watcher thread reads this process's CPU clock when the log shows the last
    # warm-up step and the last step (the log is written right after each step).
    marks, stop = {}, threading.Event()

    def watch():
        while not stop.wait(0.05):
            try:
                n = log_path.read_text().count('"loss"')
            except OSError:
                continue
            if n >= spec["warmup"] and "start" not in marks:
                marks["start"] = time.process_time()
            if n >= spec["warmup"] + spec["steps"]:
                marks["end"] = time.process_time()
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        summary = train(cfg)
    finally:
        stop.set()
        watcher.join()
    rows = [json.loads(l) for l in log_path.read_text().splitlines() if l.strip()]
    steps = [r for r in rows if "loss" in r and "event" not in r]
    times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(steps, steps[1:])]
    return {"trainable_params": summary["trainable_params"],
            "step_s": times[spec["warmup"] - 1:],  # steps warmup+1 .. end
            "tokens": [r["tokens"] for r in steps[spec["warmup"]:]],
            "cpu_s": marks.get("end", float("nan")) - marks.get("start", float("nan")),
            "peak_rss_mb": summary["peak_mem_mb"], "final_loss": summary["final_loss"],
            "steps_logged": len(steps)}


def _peft_model(spec: dict, cfg):
    """The float model (from_pretrained) with PEFT's LoRA on TARGETS."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec["float_model"], dtype=torch.float32)
    model.config.use_cache = False
    return get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                            target_modules=list(TARGETS), lora_dropout=0.0,
                                            bias="none", task_type="CAUSAL_LM"))


def _stepper(model, cfg, model_dir: str):
    """A function doing one training step as the trainer's (qahira_vllm.training.trainer._train)
    on one process: the same data stream, token-summed NLL / target tokens, AdamW, warmup +
    constant schedule, clipping, autocast. Each call returns (wall seconds, CPU seconds, target
    tokens, loss) of its step; the optimizer and data stream persist between calls."""
    import torch
    from transformers import AutoTokenizer, get_scheduler

    from qahira_vllm.training.data import BatchStream, target_tokens
    from qahira_vllm.training.trainer import SCHEDULES, prepare_data, token_nll_sum

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
        tokenizer.eos_token_id or 0)
    train_set, _ = prepare_data(cfg, tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(SCHEDULES[cfg.schedule], optimizer,
                              num_warmup_steps=math.ceil(cfg.warmup_ratio * cfg.max_steps),
                              num_training_steps=cfg.max_steps)
    stream = BatchStream(train_set, cfg.batch_size, cfg.seed, pad_id)
    model.train()

    def step():
        t, c = time.perf_counter(), time.process_time()
        batch = stream.next_batch()
        n_tokens = target_tokens(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
        nll = token_nll_sum(logits, batch["labels"])
        (nll / max(n_tokens, 1)).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss = nll.item() / max(n_tokens, 1)
        return time.perf_counter() - t, time.process_time() - c, n_tokens, loss

    return step


def _step_loop(model, cfg, model_dir: str, steps: int) -> tuple[list, list, list, float]:
    """`steps` steps of _stepper. Returns (wall seconds, CPU seconds and target tokens per step,
    last loss)."""
    step = _stepper(model, cfg, model_dir)
    times, cpu, tokens, loss = [], [], [], None
    for _ in range(steps):
        t, c, n, loss = step()
        times.append(t)
        cpu.append(c)
        tokens.append(n)
    return times, cpu, tokens, loss


def _method_model(spec: dict, method: str):
    """(model, TrainConfig, model folder) of one method, seeded as the trainer seeds: the
    trainer's model (build_training_model) for qbara / qahira, PEFT's on the float model."""
    import torch

    from qahira_vllm.training.model import build_training_model

    cfg = _train_config(spec, method)
    torch.manual_seed(cfg.seed)
    if method == "peft":
        return _peft_model(spec, cfg), cfg, spec["float_model"]
    model, _ = build_training_model(cfg.base, cfg.spec(), seed=cfg.seed)
    return model, cfg, cfg.base


def interleaved(spec: dict, rounds: int, steps: int) -> dict:
    """Every method's model in this one process, their steps alternated: `rounds` rounds of
    `steps` steps per method, the order rotated each round, after one untimed step each. The
    VM's speed drifts over seconds to minutes (by up to 1.5x here), so methods timed in separate
    processes minutes apart can compare different speeds; alternating steps exposes every method
    to the same drift. Per method: step times, median, tokens/s; `round_ratio_vs_peft` is each
    round's PEFT median step / the method's (paired, same minute)."""
    import statistics

    import torch

    torch.set_num_threads(spec["threads"])
    steppers = {}
    for method in METHODS:
        model, cfg, model_dir = _method_model(spec, method)
        steppers[method] = _stepper(model, cfg, model_dir)
        steppers[method]()  # untimed: first-call allocations, AdamW state
    times = {m: [] for m in METHODS}
    tokens = {m: [] for m in METHODS}
    per_round = {m: [] for m in METHODS}
    for r in range(rounds):
        order = METHODS[r % len(METHODS):] + METHODS[:r % len(METHODS)]
        for method in order:
            ts = []
            for _ in range(steps):
                t, _, n, _ = steppers[method]()
                ts.append(t)
                tokens[method].append(n)
            times[method] += ts
            per_round[method].append(statistics.median(ts))
    out = {}
    for m in METHODS:
        med = statistics.median(times[m])
        out[m] = {"step_s": times[m], "median_step_s": med,
                  "tok_per_s": statistics.mean(tokens[m]) / med,
                  "round_median_step_s": per_round[m]}
    for m in METHODS:
        out[m]["tok_per_s_vs_peft"] = out[m]["tok_per_s"] / out["peft"]["tok_per_s"]
        out[m]["round_ratio_vs_peft"] = [p / q for p, q in zip(per_round["peft"], per_round[m])]
    return {"rounds": rounds, "steps_per_round": steps, "methods": out}


def _run_peft(spec: dict) -> dict:
    """PEFT LoRA on the float model, in _step_loop (the trainer's step)."""
    import torch

    from qahira_vllm.training.trainer import peak_memory_mb

    cfg = _train_config(spec, "peft")
    torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = _peft_model(spec, cfg)
    load_peak = peak_memory_mb(torch.device("cpu"))
    # The training phase's own peak: reset the high-water mark of RSS (Linux) after loading.
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    times, cpu, tokens, loss = _step_loop(model, cfg, spec["float_model"], cfg.max_steps)
    return {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "step_s": times[spec["warmup"]:], "tokens": tokens[spec["warmup"]:],
            "cpu_s": sum(cpu[spec["warmup"]:]),
            "peak_rss_mb": round(peak_memory_mb(torch.device("cpu")), 1),
            "peak_rss_is_training_phase_only": reset, "load_peak_rss_mb": round(load_peak, 1),
            "final_loss": loss}


def profile_method(spec: dict, method: str, steps: int = 2, top: int = 15) -> list[dict]:
    """torch.profiler over `steps` steps after one warm-up step: the ops with the most self CPU
    time. Trainer methods use the trainer's model (build_training_model) in _step_loop, PEFT its
    float model."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(spec["threads"])
    model, cfg, model_dir = _method_model(spec, method)
    _step_loop(model, cfg, model_dir, 1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        times, _, _, _ = _step_loop(model, cfg, model_dir, steps)
    total = sum(times)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "calls_per_step": e.count / steps,
             "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
             "share": e.self_cpu_time_total / 1e6 / total} for e in rows[:top]]


def child(spec_path: str, method: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    if method == "interleaved":
        Path(out_path).write_text(json.dumps(
            interleaved(spec, spec["interleaved_rounds"], spec["interleaved_steps"])))
        return
    result = _run_peft(spec) if method == "peft" else _run_trainer(spec, method)
    result["torch_threads_seen"] = torch.get_num_threads()
    Path(out_path).write_text(json.dumps(result))


def run_method(spec: dict, method: str, work: Path, in_process: bool) -> dict:
    """One (method, dtype) run: in a child process (its own peak RSS), or in this one (--smoke:
    saves the children's imports; peak RSS is then this process's, not the method's)."""
    if in_process:
        import torch

        torch.set_num_threads(spec["threads"])
        return _run_peft(spec) if method == "peft" else _run_trainer(spec, method)
    return run_child(spec, method, work)


def run_interleaved(spec: dict, work: Path, in_process: bool) -> dict:
    """The interleaved phase in its own child process (or this one with --in-process): its three
    models would otherwise stay in this process's peak RSS, which Linux carries into the
    children started after it (exec keeps the parent's high-water mark in ru_maxrss)."""
    if in_process:
        return interleaved(spec, spec["interleaved_rounds"], spec["interleaved_steps"])
    return run_child(spec, "interleaved", work)


def run_child(spec: dict, method: str, work: Path) -> dict:
    spec_path = work / f"spec-{spec['dtype']}.json"
    spec_path.write_text(json.dumps(spec))
    out = work / f"result-{method}-{spec['dtype']}.json"
    out.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, __file__, "--child", method, str(spec_path), str(out)],
                          env=env, capture_output=True, text=True)
    (work / f"log-{method}-{spec['dtype']}.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode or not out.exists():
        raise RuntimeError(f"{method} ({spec['dtype']}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def merge_rounds(acc: dict | None, r: dict) -> dict:
    """One method's runs pooled over rounds: step times, tokens and CPU seconds together, the
    highest peak RSS, the last loss; each round's own median step kept in `round_median_step_s`."""
    import statistics

    med = statistics.median(r["step_s"])
    if acc is None:
        return {**r, "rounds": 1, "round_median_step_s": [med]}
    return {**acc, "step_s": acc["step_s"] + r["step_s"], "tokens": acc["tokens"] + r["tokens"],
            "cpu_s": acc["cpu_s"] + r["cpu_s"], "final_loss": r["final_loss"],
            "peak_rss_mb": max(acc["peak_rss_mb"], r["peak_rss_mb"]), "rounds": acc["rounds"] + 1,
            "round_median_step_s": acc["round_median_step_s"] + [med]}


# ----------------------------------------------------------------------------- dequant profile

def dequant_profile(qckpt: Path, threads: int, repeats: int = 3) -> dict:
    """Seconds to rebuild every adapted layer's W once (QuantLinear's _dequantize, the C kernel
    on CPU, writing fp32 or bf16 directly into the trainer's reused buffers); best of `repeats`.
    A training step rebuilds each W twice (forward and backward)."""
    import torch

    from qahira_vllm.training.model import load_quantized_model
    from qahira_vllm.training.qlinear import QuantLinear, _dequantize

    torch.set_num_threads(threads)
    model, cfg = load_quantized_model(qckpt)
    layers = [m for n, m in model.named_modules()
              if isinstance(m, QuantLinear) and n.rsplit(".", 1)[-1] in TARGETS]
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            for m in layers:
                _dequantize(m.qweight, m.scales, m.offsets, cfg, dtype, reuse=True)
            best = min(best, time.perf_counter() - t)
        out[name] = best
    out["weights"] = sum(m.in_features * m.out_features for m in layers)
    return out


# ----------------------------------------------------------------------------- report

def summarize(res: dict) -> None:
    import statistics

    for dtype, methods in res["runs"].items():
        for r in methods.values():
            med = statistics.median(r["step_s"])
            tok = statistics.mean(r["tokens"])
            r["median_step_s"] = med
            r["tok_per_s"] = tok / med
            r["tok_per_s_mean"] = sum(r["tokens"]) / sum(r["step_s"])
            r["tok_per_cpu_s"] = sum(r["tokens"]) / r["cpu_s"]
        base = methods.get("peft")
        for r in methods.values():
            if base:
                r["tok_per_s_vs_peft"] = r["tok_per_s"] / base["tok_per_s"]
                r["tok_per_cpu_s_vs_peft"] = r["tok_per_cpu_s"] / base["tok_per_cpu_s"]
                r["peak_rss_vs_peft"] = r["peak_rss_mb"] / base["peak_rss_mb"]
            dq = res.get("dequant_profile", {}).get(dtype)
            if dq is not None and r is not base:
                r["dequant_share_of_step"] = 2 * dq / r["median_step_s"]


LABELS = {"qbara": "qahira train Q-BaRA (INT4 packed)",
          "qahira": "qahira train QA-HiRA (INT4 packed)",
          "peft": "PEFT LoRA (float fp32 weights)"}


def plot(res: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    dtypes = list(res["runs"])
    fig, axes = plt.subplots(1, 4, figsize=(19, 4))
    width = 0.8 / len(METHODS)
    panels = (("tok_per_s", 1, "tokens / s, each method in its own process"),
              ("tok_per_cpu_s", 1, "training tokens / CPU second"),
              ("peak_rss_mb", 1024, "peak RSS (GiB)"))
    for k, m in enumerate(METHODS):
        xs = [i + k * width for i in range(len(dtypes))]
        for ax, (key, div, _) in zip(axes, panels):
            ax.bar(xs, [res["runs"][d][m][key] / div for d in dtypes], width, label=LABELS[m])
        inter = res.get("interleaved", {})
        axes[3].bar(xs, [inter[d]["methods"][m]["tok_per_s"] if d in inter else 0
                         for d in dtypes], width, label=LABELS[m])
    panels = (*panels, (None, 1, "tokens / s, steps interleaved in one process"))
    for ax, (_, _, ylabel) in zip(axes, panels):
        ax.set_xticks([i + width * (len(METHODS) - 1) / 2 for i in range(len(dtypes))])
        ax.set_xticklabels([{"fp32": "fp32", "bf16": "bf16 autocast"}[d] for d in dtypes])
        ax.set_ylabel(ylabel)
    axes[0].legend(fontsize=8)
    m = res["model"]
    fig.suptitle(f"{m['params'] / 1e6:.0f}M Llama ({m['shape']['num_hidden_layers']} layers, "
                 f"hidden {m['shape']['hidden_size']}), {res['batch_size']} x {res['seq_len']} "
                 f"tokens/step, {res['machine']['torch_threads']} thread(s), "
                 f"{res['plan']['expected_params']['peft'] / 1e6:.2f}M trainable")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model, few steps (< 1 minute)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in every run (default 1: on a shared 2-core machine)")
    ap.add_argument("--steps", type=int, help="timed steps per run (default 8; smoke 2)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="runs of every method, alternated, step times pooled (default 2; "
                         "smoke 1): this VM's speed drifts over minutes")
    ap.add_argument("--warmup", type=int, help="untimed first steps (default 2; smoke 1)")
    ap.add_argument("--batch-size", type=int, help="sequences per step (default 4; smoke 2)")
    ap.add_argument("--seq-len", type=int, help="tokens per sequence (default 128; smoke 32)")
    ap.add_argument("--dtypes", help="comma list of fp32, bf16 (default both; smoke fp32)")
    ap.add_argument("--in-process", action=argparse.BooleanOptionalAction, default=None,
                    help="run the methods in this process (default with --smoke; peak RSS is "
                    "then not per method)")
    ap.add_argument("--interleaved-rounds", type=int, default=None,
                    help="rounds of the in-process phase with the methods' steps alternated "
                         "(default 6, 2 steps each; smoke 1; 0 skips it)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile 2 steps of each method per dtype (torch.profiler, in this "
                    "process, after the timed runs): the top ops by self CPU time")
    ap.add_argument("--work", help="cache for models and data (default "
                    "$QAHIRA_HOME/bench/train_throughput)")
    ap.add_argument("--out", help="results folder (default $OUT or benchmarks/results)")
    ap.add_argument("--child", nargs=3, metavar=("METHOD", "SPEC", "RESULT"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child[1], args.child[0], args.child[2])
        return 0

    sys.path.insert(0, str(REPO))
    from qahira_vllm.models import cache_root

    smoke = args.smoke
    if args.in_process is None:
        args.in_process = smoke
    shape = SMOKE_SHAPE if smoke else FULL_SHAPE
    steps = args.steps or (2 if smoke else 8)
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 2)
    rounds = args.rounds if args.rounds is not None else (1 if smoke else 2)
    inter_rounds = (args.interleaved_rounds if args.interleaved_rounds is not None
                    else (1 if smoke else 6))
    if rounds < 1:
        ap.error(f"--rounds {rounds}: expected at least 1")
    batch = args.batch_size or (2 if smoke else 4)
    seq = args.seq_len or (32 if smoke else 128)
    dtypes = (args.dtypes or ("fp32" if smoke else "fp32,bf16")).split(",")
    if not set(dtypes) <= {"fp32", "bf16"}:
        ap.error(f"--dtypes {args.dtypes!r}: expected a comma list of fp32, bf16")
    if warmup < 1 or steps < 1:
        # The trainer logs the time at the end of each step: step times are differences.
        ap.error(f"--warmup {warmup} --steps {steps}: expected at least 1 of each")
    work = Path(args.work) if args.work else cache_root() / "bench" / "train_throughput"
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out or os.environ.get("OUT") or REPO / "benchmarks" / "results")
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    qckpt, flt = build_models(work, shape)
    data, held = write_data(work, words=int(batch * seq * (steps + warmup) * 1.2) + 600)
    plan = adapter_plan(qckpt)
    from transformers import AutoConfig

    mcfg = AutoConfig.from_pretrained(flt)
    h, i, L, v = (mcfg.hidden_size, mcfg.intermediate_size, mcfg.num_hidden_layers,
                  mcfg.vocab_size)
    kv = mcfg.num_key_value_heads * getattr(mcfg, "head_dim", h // mcfg.num_attention_heads)
    params = v * h + L * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h  # tied lm_head
    res = {"date": time.strftime("%Y-%m-%d"), "smoke": smoke,
           "machine": machine_info(args.threads),
           "model": {"kind": "random Llama (local), SmolLM2 tokenizer", "shape": shape,
                     "vocab": v, "params": params, "quantization": "qahira INT4 block 1x32, "
                     "fp16 scales+offsets", "int4_checkpoint": str(qckpt),
                     "float_baseline": "the INT4 checkpoint's dequantized weights, fp32"},
           "peak_rss_per_method": not args.in_process, "batch_size": batch, "seq_len": seq,
           "warmup_steps_excluded": warmup,
           "timed_steps": steps, "rounds": rounds, "lora_alpha": LORA_ALPHA, "targets": list(TARGETS),
           "plan": plan, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="train-tp-", dir=work) as tmp:
        for dtype in dtypes:
            spec = {"qckpt": str(qckpt), "float_model": str(flt), "data": str(data),
                    "eval_data": str(held), "work": tmp, "seq_len": seq, "batch_size": batch,
                    "warmup": warmup, "steps": steps, "threads": args.threads, "dtype": dtype,
                    "plan": plan}
            res["runs"][dtype] = {}
            for round_ in range(rounds):   # methods alternate: the VM's drift hits each alike
                for method in METHODS:
                    spec["round"] = round_
                    r = run_method(spec, method, Path(tmp), in_process=args.in_process)
                    res["runs"][dtype][method] = merge_rounds(res["runs"][dtype].get(method), r)
                    print(f"{dtype} {method} round {round_ + 1}/{rounds}: "
                          f"{r['trainable_params']} trainable, median step "
                          f"{sorted(r['step_s'])[len(r['step_s']) // 2]:.3f} s, peak RSS "
                          f"{r['peak_rss_mb']:.0f} MiB", flush=True)
            if inter_rounds > 0:
                res.setdefault("interleaved", {})[dtype] = run_interleaved(
                    {**spec, "interleaved_rounds": inter_rounds,
                     "interleaved_steps": 1 if smoke else 2}, Path(tmp), args.in_process)
                print(f"{dtype} interleaved: " + ", ".join(
                    f"{m} {r['tok_per_s']:.1f} tok/s ({r['tok_per_s_vs_peft']:.2f}x)"
                    for m, r in res["interleaved"][dtype]["methods"].items()), flush=True)
        if args.profile:
            res["profile"] = {d: {m: profile_method({**spec, "dtype": d}, m) for m in METHODS}
                              for d in dtypes}
    res["dequant_profile"] = dequant_profile(qckpt, args.threads)
    summarize(res)
    res["wall_s"] = round(time.time() - t0, 1)
    stem = out / ("train_throughput" + ("_smoke" if smoke else ""))
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    plot(res, stem.with_suffix(".png"))
    for dtype, methods in res["runs"].items():
        for m, r in methods.items():
            print(f"{dtype:5s} {m:7s} {r['tok_per_s']:8.1f} tok/s ({r['tok_per_s_vs_peft']:.2f}x "
                  f"PEFT)  {r['tok_per_cpu_s']:8.1f} tok/CPU-s "
                  f"({r['tok_per_cpu_s_vs_peft']:.2f}x)  peak {r['peak_rss_mb']:7.0f} MiB "
                  f"({r['peak_rss_vs_peft']:.2f}x)  {r['trainable_params']} params")
    for dtype, inter in res.get("interleaved", {}).items():
        for m, r in inter["methods"].items():
            print(f"{dtype:5s} {m:7s} {r['tok_per_s']:8.1f} tok/s ({r['tok_per_s_vs_peft']:.2f}x "
                  f"PEFT), steps interleaved in one process")
    print(f"wrote {stem}.json/.png in {res['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
