"""Where a batch-1 decode step goes on this CPU, and how fast INT4 could be at best.

The foundation issue's CPU target is INT4 >= 3x bf16 decode tok/s at batch 1 on the 1B shape.
This script measures, on one thread (what vLLM's CPU backend computes on by default here):

1. the single-core streaming read bandwidth (fp32 `sum` over 512 MiB), the ceiling of any
   weight-streaming GEMV;
2. M = 1 time of every linear layer of the 1B-shaped Llama as vLLM builds it (merged qkv and
   gate_up), for bf16 `F.linear`, qahira INT4 1x32 on the `cpu_int4pack` kernel (the one the
   plugin selects), and the bf16 tied lm_head (never converted);
3. the same layers on `cpu_int4` (qahira_vllm.linear_kernels.cpu_int4,
   kernels/cpu_intdot.c: integer dot products on the nibbles against 16-bit-quantized
   activations; the plugin's default CPU INT4 kernel).
   An earlier version of this script also timed an exact nibble -> fp32 -> FMA AVX2 GEMV: it
   was no faster than torch's kernel (3.1-4.5 GB/s), which is why the default kernel uses
   integer dot products instead.

With the engine's batch-1 tok/s from `decode_throughput.json` (same machine, separate run), the
non-linear time per step is step time - linear time, and the best INT4 speedup this engine can
reach is bf16 step time / (non-linear + lm_head + INT4 bytes / stream bandwidth).

    .venv/bin/python benchmarks/cpu_decode_ceiling.py     # ~2 min; run alone
Writes cpu_decode_ceiling.json and .png to benchmarks/results/ (or $OUT).
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
HIDDEN, INTER, LAYERS, KV, VOCAB = 2048, 8192, 16, 512, 49152
# [out, in] of each linear in one decoder layer, as vLLM merges them.
LAYER_SHAPES = {"qkv_proj": (HIDDEN + 2 * KV, HIDDEN), "o_proj": (HIDDEN, HIDDEN),
                "gate_up_proj": (2 * INTER, HIDDEN), "down_proj": (HIDDEN, INTER)}
BLOCK = (1, 32)  # the INT4 block decode_throughput.py uses

def _time(fn, repeats: int = 20) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def stream_bandwidth() -> float:
    a = torch.randn(512 * 2**20 // 4)
    return a.numel() * 4 / _time(a.sum, 10)


class _Layer(torch.nn.Module):
    """Holds a random qahira INT4 layer the way the vLLM plugin does."""

    def __init__(self, out_f: int, in_f: int):
        super().__init__()
        from qahira_vllm.quant_math import pack_qweight

        q = torch.randint(0, 16, (out_f, in_f), dtype=torch.int32)
        nb = (out_f // BLOCK[0], in_f // BLOCK[1])
        self.qweight = torch.nn.Parameter(pack_qweight(q, 4), requires_grad=False)
        self.scales = torch.nn.Parameter((torch.rand(nb) * 0.01 + 1e-3).half(),
                                         requires_grad=False)
        self.offsets = torch.nn.Parameter((torch.randn(nb) * 0.01).half(), requires_grad=False)


def measure() -> dict:
    from qahira_vllm.format import QahiraQuantConfig
    from qahira_vllm.linear_kernels import CpuInt4Kernel, CpuInt4PackKernel, LinearSpec
    from qahira_vllm.quant_math import dequantize

    torch.manual_seed(0)
    torch.set_num_threads(1)
    spec_ok, why = CpuInt4Kernel.can_implement(LinearSpec(4, BLOCK, 64, 64, torch.bfloat16,
                                                              "cpu"))
    if not spec_ok:
        raise SystemExit(f"cpu_int4 unavailable: {why}")
    res = {"threads": 1, "stream_read_gbps": stream_bandwidth() / 1e9, "layers": {}}
    for name, (out_f, in_f) in LAYER_SHAPES.items():
        x = torch.randn(1, in_f).bfloat16()
        w = torch.randn(out_f, in_f).bfloat16()
        layer = _Layer(out_f, in_f)
        ref = x.float() @ dequantize(layer.qweight.data, layer.scales.data, layer.offsets.data,
                                     QahiraQuantConfig(bits=4, block_size=BLOCK)).t()
        spec = LinearSpec(4, BLOCK, out_f, in_f, torch.bfloat16, "cpu")
        avx2_layer = copy.deepcopy(layer)  # each kernel repacks (and frees) its own copy
        avx2 = CpuInt4Kernel(spec)
        avx2.prepare(avx2_layer)
        kernel = CpuInt4PackKernel(spec)
        kernel.prepare(layer)
        row = {"shape": [out_f, in_f],
               "bf16_ms": _time(lambda: F.linear(x, w)) * 1e3,
               "int4_cpu_int4pack_ms": _time(lambda: kernel.apply(layer, x)) * 1e3,
               "int4_bytes": out_f * in_f // 2 + 2 * 2 * out_f * in_f // BLOCK[1]}
        rel = lambda y: ((y.float().reshape(-1) - ref.reshape(-1)).abs().max()  # noqa: E731
                         / ref.abs().max()).item()
        row["int4_cpu_int4pack_rel_err"] = rel(kernel.apply(layer, x))
        row["int4_cpu_int4_ms"] = _time(lambda: avx2.apply(avx2_layer, x)) * 1e3
        row["int4_cpu_int4_rel_err"] = rel(avx2.apply(avx2_layer, x))
        res["layers"][name] = row
        print(name, json.dumps(row), flush=True)
    x = torch.randn(1, HIDDEN).bfloat16()
    lm_head = torch.randn(VOCAB, HIDDEN).bfloat16()
    res["lm_head_bf16_ms"] = _time(lambda: F.linear(x, lm_head)) * 1e3
    per_step = lambda key: LAYERS * sum(r[key] for r in res["layers"].values())  # noqa: E731
    res["per_step_ms"] = {"bf16_linears": per_step("bf16_ms"),
                          "int4_linears_cpu_int4pack": per_step("int4_cpu_int4pack_ms"),
                          "lm_head_bf16": res["lm_head_bf16_ms"]}
    res["per_step_ms"]["int4_linears_cpu_int4"] = per_step("int4_cpu_int4_ms")
    int4_bytes = LAYERS * sum(r["int4_bytes"] for r in res["layers"].values())
    res["int4_linear_bytes_per_step"] = int4_bytes
    res["per_step_ms"]["int4_linears_at_stream_bw"] = int4_bytes / res["stream_read_gbps"] / 1e6
    return res


def ceiling(res: dict, decode: dict) -> dict:
    """Combine with the engine's batch-1 step times (decode_throughput.json): "qahira INT4" ran
    the default kernel (cpu_int4), "qahira INT4 (cpu_int4pack)" torch's int4 kernel."""
    m = decode["models"]["Llama-1B-shape (random)"]
    step = {fmt: 1e3 / r["tok_per_s"]["1"] for fmt, r in m.items()}
    p = res["per_step_ms"]
    linears = {"bf16": p["bf16_linears"], "qahira INT4": p["int4_linears_cpu_int4"],
               "qahira INT4 (cpu_int4pack)": p["int4_linears_cpu_int4pack"]}
    rest = {fmt: step[fmt] - lin - p["lm_head_bf16"] for fmt, lin in linears.items()
            if fmt in step}
    best_step = rest["qahira INT4"] + p["lm_head_bf16"] + p["int4_linears_at_stream_bw"]
    return {"engine_step_ms": step,
            "engine_speedup_measured": {fmt: step["bf16"] / t for fmt, t in step.items()},
            "non_linear_ms": rest,
            "int4_step_if_linears_at_stream_bw_ms": best_step,
            "max_speedup_at_stream_bw": step["bf16"] / best_step,
            "decode_throughput_date": decode.get("date"),
            "decode_reserved_cpu": decode.get("reserved_cpu_note")}


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c, p = res["ceiling"], res["per_step_ms"]
    rest = c["non_linear_ms"]
    bars = {"bf16": (p["bf16_linears"], p["lm_head_bf16"], rest["bf16"])}
    if "qahira INT4 (cpu_int4pack)" in rest:
        bars["INT4\ncpu_int4pack"] = (p["int4_linears_cpu_int4pack"], p["lm_head_bf16"],
                                      rest["qahira INT4 (cpu_int4pack)"])
    bars["INT4\ncpu_int4"] = (p["int4_linears_cpu_int4"], p["lm_head_bf16"],
                                   rest["qahira INT4"])
    bars["INT4 at stream\nBW (bound)"] = (p["int4_linears_at_stream_bw"], p["lm_head_bf16"],
                                          rest["qahira INT4"])
    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(bars)
    bottom = [0.0] * len(names)
    for k, label in enumerate(("linear layers", "lm_head (bf16)", "everything else")):
        vals = [bars[n][k] for n in names]
        ax.bar(names, vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.axhline(c["engine_step_ms"]["bf16"] / 3, color="k", ls="--", label="3x bf16 target")
    ax.set_ylabel("ms per decode step (batch 1, 1 thread)")
    ax.set_title("1B-shaped Llama decode step on this CPU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    out = Path(os.environ.get("OUT") or REPO / "benchmarks" / "results")
    res = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "block": list(BLOCK),
           **measure()}
    decode = out / "decode_throughput.json"
    if decode.exists():
        res["ceiling"] = ceiling(res, json.loads(decode.read_text()))
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_decode_ceiling.json").write_text(json.dumps(res, indent=2) + "\n")
    if "ceiling" in res:
        plot(res, out / "cpu_decode_ceiling.png")
    print(json.dumps({"per_step_ms": res["per_step_ms"], **res.get("ceiling", {})}, indent=1))


if __name__ == "__main__":
    main()
