"""vLLM offline decode throughput and weight memory: bf16 vs qahira INT4 vs INT8 (CPU).

    .venv/bin/python benchmarks/decode_throughput.py [--quick] [--out benchmarks/results]

Formats: bf16; stock vLLM GPTQ INT4 (group 128, symmetric: a checkpoint of the same model
written here in GPTQModel's v1 layout, served by vLLM's own CPU int4 kernel, which needs
AVX-512); qahira INT4 1x32 on the default CPU kernel choice (cpu_measured: the fastest kernel per
batch size, timed on this machine) and on torch's int4pack kernel alone
(QAHIRA_DISABLED_KERNELS=cpu_measured,cpu_int4); qahira INT4 1x64 (the quantizer's default
block), the same in the fixed kernel order (QAHIRA_DISABLED_KERNELS=cpu_measured: cpu_int4 at
every batch size), the same with lm_head converted too (`--lm-head`); qahira INT8 1x64.
Models: SmolLM2-135M (embedded) and a randomly initialised 1B-shaped Llama (hidden 2048,
16 layers, intermediate 8192, 32 heads / 8 KV heads, SmolLM2's 49152-token vocabulary), where
decode is weight-bound. Each (model, format) runs in its own engine in a child process; a
model's engines are started one after the other and then stay loaded together, and their
`generate` calls alternate: per batch size, `--repeats` rounds of one call per engine, the order
rotated each round, so that the VM's speed drifting during the run falls on every format alike.
A ratio to bf16 is the median of the per-round ratios. Throughput = generated tokens / wall time
of `LLM.generate` for `batch` prompts of 8 tokens, each decoding `--tokens` tokens
(ignore_eos). An engine that cannot start (stock GPTQ needs AVX-512) is reported with its
error. Weight memory = bytes of the checkpoint's tensors (safetensors payload).
Engines run with enforce_eager=True (torch.compile costs minutes per engine on CPU; `--compile`
runs vLLM's default compiled mode instead, results in decode_throughput_compiled.*) and the
vLLM CPU default VLLM_CPU_NUM_OF_RESERVED_CPU (unset: one core computes, one serves the front
end) unless the environment sets it; the JSON records both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BATCHES = (1, 8, 32, 128)


def write_gptq_checkpoint(src: Path, out: Path, group: int = 128) -> Path:
    """A GPTQ INT4 checkpoint of the bf16 model in `src` (symmetric round-to-nearest per group
    of `group` inputs; its speed, not its accuracy, is what is measured), in GPTQModel's v1
    layout: qweight int32 [in/8, out] (nibble j of word [r, o] = q[8r + j, o]), qzeros int32
    [in/group, out/8] (zero point 8, stored minus one as v1 does: 0x77777777), scales fp16
    [in/group, out], g_idx int32 [in]; every other tensor in fp16."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    if (out / "config.json").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        for name, t in load_file(f).items():
            if not (name.endswith(".weight") and t.ndim == 2 and ".layers." in name):
                tensors[name] = t.half()
                continue
            w = t.float().t()                                          # [in, out]
            n_in, n_out = w.shape
            g = w.reshape(n_in // group, group, n_out)
            scale = (g.abs().amax(dim=1) / 7).clamp_min(1e-6).half()   # [in/group, out]
            q = (g / scale.float()[:, None]).round().clamp(-8, 7).to(torch.int64) + 8
            q = q.reshape(n_in // 8, 8, n_out)
            word = sum(q[:, j] << (4 * j) for j in range(8))           # [in/8, out]
            base = name[: -len(".weight")]
            tensors[base + ".qweight"] = word.to(torch.uint32).view(torch.int32).contiguous()
            tensors[base + ".qzeros"] = torch.full((n_in // group, n_out // 8), 0x77777777,
                                                   dtype=torch.int32)
            tensors[base + ".scales"] = scale.contiguous()
            tensors[base + ".g_idx"] = torch.arange(n_in, dtype=torch.int32) // group
    save_file(tensors, str(tmp / "model.safetensors"))
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "config.json":
            shutil.copy2(f, tmp / f.name)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": group,
                                     "sym": True, "desc_act": False, "checkpoint_format": "gptq"}
    config["torch_dtype"] = "float16"
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tmp.rename(out)
    return out


def machine_facts() -> dict:
    """CPU model and vector flags (lscpu), and stream bandwidth: GB/s of a 512 MiB tensor copy
    (bytes read + written / time, best of 5) with one torch thread and with all cores."""
    import torch

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((l.split(":", 1)[1].strip() for l in lscpu.splitlines()
                  if l.startswith("Model name")), platform.processor())
    flags = sorted(set(re.findall(r"avx512[a-z_0-9]*|avx2|amx[a-z_0-9]*|avx_vnni|fma|f16c",
                                  lscpu)))
    src = torch.ones(2**27, dtype=torch.float32)
    dst = torch.empty_like(src)
    bandwidth = {}
    threads = torch.get_num_threads()
    for label, n in (("one_core", 1), ("all_cores", os.cpu_count() or 1)):
        torch.set_num_threads(n)
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t)
        bandwidth[label] = 2 * src.numel() * 4 / best / 1e9
    torch.set_num_threads(threads)
    return {"cpu_model": model, "cpu_flags": flags, "stream_gb_per_s": bandwidth}


def build_1b_llama(out: Path, tokenizer_src: Path) -> Path:
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (out / "config.json").exists():
        return out
    cfg = AutoConfig.from_pretrained(tokenizer_src)
    cfg.update(dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                    tie_word_embeddings=True, dtype="bfloat16"))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    for f in tokenizer_src.iterdir():
        if f.name.startswith("tokenizer") or f.name == "chat_template.jinja":
            shutil.copy2(f, tmp / f.name)
    tmp.rename(out)
    return out


def weight_bytes(model_dir: Path) -> int:
    from qahira_vllm.checkpoint import read_headers
    import math

    import torch

    total = 0
    for meta in read_headers(model_dir).values():
        total += math.prod(meta.shape) * torch.empty((), dtype=meta.dtype).element_size()
    return total


# KV cache per engine: every engine stays resident for the whole run, so it is sized for the
# run (batch x (8-token prompt + new tokens) fits with room), not as a share of RAM.
KV_CACHE_BYTES = 1 << 30
PROMPT = [1, 504, 3458, 5145, 6355, 281, 260, 1029]
MESSAGE = "QAHIRA_BENCH "   # prefix of the child's protocol lines (vLLM logs to stdout too)


def serve_child(model_dir: str, max_batch: int, compile_: bool) -> None:
    """Child process: one resident engine. Prints its start-up time once loaded, then answers
    `RUN batch tokens` lines on stdin with the tok/s of one `generate` call, until `QUIT`
    (each reply one MESSAGE-prefixed JSON line)."""
    from vllm import LLM, SamplingParams

    t0 = time.time()
    llm = LLM(model_dir, kv_cache_memory_bytes=KV_CACHE_BYTES, max_model_len=256,
              enforce_eager=not compile_, max_num_seqs=max_batch)
    startup = time.time() - t0
    prompt = {"prompt_token_ids": PROMPT}
    llm.generate([prompt], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    print(MESSAGE + json.dumps({"startup_s": startup}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "QUIT":
            return
        batch, tokens = int(cmd[1]), int(cmd[2])
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        t = time.perf_counter()
        res = llm.generate([prompt] * batch, params, use_tqdm=False)
        dt = time.perf_counter() - t
        out = sum(len(r.outputs[0].token_ids) for r in res)
        print(MESSAGE + json.dumps({"tok_per_s": out / dt, "seconds": dt}), flush=True)


class Engine:
    """One format's engine in a child process, kept loaded so that every format's calls can
    alternate. `error` is set (and no calls are made) when the engine failed to start, e.g.
    stock GPTQ on a CPU without AVX-512."""

    def __init__(self, model_dir: Path, env: dict, max_batch: int, compile_: bool,
                 log: Path):
        cmd = [sys.executable, __file__, "--child", str(model_dir),
               "--batches", str(max_batch)] + ["--compile"] * compile_
        self.log = log
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(log, "w"), text=True,
                                     env={**os.environ, **env})
        self.error = None
        try:
            self.startup_s = self._reply()["startup_s"]
        except RuntimeError as e:
            self.error = str(e)

    def _reply(self) -> dict:
        with open(self.log.with_suffix(".stdout.log"), "a") as stdout_log:
            for line in self.proc.stdout:
                if line.startswith(MESSAGE):
                    return json.loads(line[len(MESSAGE):])
                stdout_log.write(line)
        self.proc.wait()
        text = self.log.with_suffix(".stdout.log").read_text() + self.log.read_text()
        # The root cause, not the engine client's "EngineCore encountered an issue".
        causes = [l.strip() for l in text.splitlines()
                  if re.search(r"\w(Error|Exception): ", l) and "EngineDeadError" not in l]
        raise RuntimeError(f"engine exited with {self.proc.returncode}: "
                           + (causes[-1] if causes else text.strip().splitlines()[-1]))

    def run(self, batch: int, tokens: int) -> float:
        self.proc.stdin.write(f"RUN {batch} {tokens}\n")
        self.proc.stdin.flush()
        return self._reply()["tok_per_s"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("QUIT\n")
            self.proc.stdin.close()
            self.proc.wait()


def interleaved_runs(engines: dict, batches: list[int], tokens: int, repeats: int) -> dict:
    """tok/s of every engine at every batch size, in rounds: one `generate` call per engine
    per round, the order rotated each round, so that a change of the machine's speed during
    the run falls on every engine alike. Returns {format: {batch: [tok/s per round]}}."""
    names = [n for n, e in engines.items() if e.error is None]
    runs = {n: {str(b): [] for b in batches} for n in names}
    k = 0
    for b in batches:
        for _ in range(repeats):
            order = names[k % len(names):] + names[:k % len(names)]
            k += 1
            for n in order:
                runs[n][str(b)].append(engines[n].run(b, tokens))
    return runs


def summarise(runs: dict, baseline: str = "bf16") -> dict:
    """Per format: median tok/s per batch, and the ratio to the baseline as the median of the
    per-round ratios (each round's calls ran back to back)."""
    from statistics import median as med

    out = {}
    for n, per_b in runs.items():
        r = {"tok_per_s": {b: med(v) for b, v in per_b.items()},
             "tok_per_s_all_repeats": per_b}
        if baseline in runs:
            ratios = {b: [x / y for x, y in zip(v, runs[baseline][b])] for b, v in per_b.items()}
            r["speedup_vs_bf16"] = {b: med(v) for b, v in ratios.items()}
            r["speedup_vs_bf16_all_repeats"] = ratios
        out[n] = r
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, m in zip(axes[0], models):
        fmts = results["models"][m]
        width = 0.8 / len(fmts)
        for k, (fmt, r) in enumerate(fmts.items()):
            xs = [i + k * width for i in range(len(BATCHES))]
            ax.bar(xs, [r.get("tok_per_s", {}).get(str(b), 0) for b in BATCHES], width,
                   label=f"{fmt} ({r['weight_gib']:.2f} GiB)")
        ax.set_xticks([i + width * (len(fmts) - 1) / 2 for i in range(len(BATCHES))])
        ax.set_xticklabels([f"batch {b}" for b in BATCHES])
        ax.set_ylabel("decode tok/s")
        ax.set_title(m)
        ax.legend(fontsize=8)
    fig.suptitle(f"vLLM CPU decode, {results['reserved_cpu_note']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="SmolLM2 only, fewer tokens")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--child")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--compile", action="store_true",
                    help="vLLM's default torch.compile mode instead of enforce_eager")
    ap.add_argument("--models", default="smollm2,1b", help="comma list: smollm2, 1b")
    ap.add_argument("--repeats", type=int, default=3,
                    help="rounds per batch size (one generate call per engine per round); "
                         "medians are reported")
    ap.add_argument("--suffix", default="", help="appended to the result file names")
    ap.add_argument("--formats", default="all",
                    help="comma list of format names (e.g. 'bf16,qahira INT4'), or all")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.child:
        serve_child(args.child, max(batches), args.compile)
        return

    from qahira_vllm.models import cache_root, fetch_model
    from qahira_vllm.quantize import quantize_model

    smol = fetch_model("smollm2-135m", verbose=False)
    work = cache_root() / "bench"
    work.mkdir(parents=True, exist_ok=True)
    wanted = set(args.models.split(","))
    models = {"SmolLM2-135M": smol} if "smollm2" in wanted else {}
    if not args.quick and "1b" in wanted:
        models["Llama-1B-shape (random)"] = build_1b_llama(work / "llama-1b-random", smol)
    # SmolLM2 INT4 uses 1x32: its weights come from a 32-block Q4_1 GGUF (see README).
    # "qahira INT4" runs the default CPU kernel (cpu_int4); the int4pack row is the same
    # checkpoint on torch's int4 kernel, the previous default, for comparison in the same run.
    # "qahira INT4 1x64" is `qahira quantize`'s default block (4.5 bits per weight vs 5 for 1x32).
    # "+ lm_head": `qahira quantize --lm-head` (lm_head converted too; default: kept in bf16).
    formats = {"bf16": (None, {}), "vLLM GPTQ INT4 g128": ("gptq", {}),
               "qahira INT4": ((4, (1, 32)), {}),
               "qahira INT4 1x64": ((4, (1, 64)), {}),
               "qahira INT4 1x64 (fixed order)": ((4, (1, 64)),
                                                  {"QAHIRA_DISABLED_KERNELS": "cpu_measured"}),
               "qahira INT4 1x64 + lm_head": ((4, (1, 64), True), {}),
               "qahira INT4 (cpu_int4pack)": ((4, (1, 32)), {
                   "QAHIRA_DISABLED_KERNELS": "cpu_measured,cpu_int4"}),
               "qahira INT8": ((8, (1, 64)), {})}
    if args.formats != "all":
        formats = {f: formats[f] for f in args.formats.split(",")}
    tokens = 8 if args.quick else args.tokens
    results = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or
               platform.machine(), "cpus": os.cpu_count(), "tokens_per_request": tokens,
               "enforce_eager": not args.compile, "repeats_per_batch": args.repeats,
               "method": "every format's engine loaded at once, each in its own process "
                         f"(KV cache {KV_CACHE_BYTES >> 20} MiB each); per batch size "
                         "`repeats` rounds of one generate call per engine, the order rotated "
                         "each round; ratio = median of the per-round ratios",
               "VLLM_CPU_NUM_OF_RESERVED_CPU": os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU"),
               "reserved_cpu_note": "VLLM_CPU_NUM_OF_RESERVED_CPU="
               + os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "unset (1 compute core)"),
               **machine_facts(), "models": {}}
    logs = Path(args.out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for mname, mdir in models.items():
        paths = {}
        for fmt, (q, env) in formats.items():
            path = mdir
            if q == "gptq":
                path = write_gptq_checkpoint(mdir, work / f"{mdir.name}-gptq-int4-g128")
            elif q is not None:
                lm_head = len(q) > 2 and q[2]
                path = work / (f"{mdir.name}-int{q[0]}-{q[1][0]}x{q[1][1]}"
                               + ("-lm_head" if lm_head else ""))
                if not (path / "config.json").exists():
                    quantize_model(mdir, path, bits=q[0], block_size=q[1], progress=False,
                                   lm_head=lm_head)
            paths[fmt] = path
        # Engines start one at a time (a starting engine times its kernels: nothing else may
        # run), then stay loaded while their calls alternate.
        engines = {}
        try:
            for fmt, (_, env) in formats.items():
                log = logs / f"{mname.split()[0]}-{fmt.replace(' ', '_')}.log"
                engines[fmt] = Engine(paths[fmt], env, max(batches), args.compile, log)
                print(mname, fmt, engines[fmt].error or "started", flush=True)
            runs = interleaved_runs(engines, batches, tokens, args.repeats)
        finally:
            for e in engines.values():
                e.close()
        summary = summarise(runs)
        results["models"][mname] = {}
        for fmt, e in engines.items():
            r = {"weight_gib": weight_bytes(paths[fmt]) / 2**30}
            if e.error is None:
                r.update(startup_s=e.startup_s, **summary[fmt])
            else:
                r["error"] = e.error
            results["models"][mname][fmt] = r
            print(mname, fmt, json.dumps(r), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "decode_throughput" + ("_quick" if args.quick else "") + ("_compiled" if args.compile
                                                                     else "") + args.suffix
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))
    plot(results, out / f"{name}.png")
    print(json.dumps({m: {f: r.get("speedup_vs_bf16", r.get("error")) for f, r in v.items()}
                      for m, v in results["models"].items()}, indent=1))


if __name__ == "__main__":
    main()
