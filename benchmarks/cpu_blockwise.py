"""The exact CPU general path (`cpu_blockwise`) against the torch one it replaces, per layer.

Times one linear layer's `apply` for M = 1..256 activation rows, on SmolLM2-135M's MLP shape
(1536 x 576) and a 1B-shaped one (8192 x 2048), for the format cases that reach the general
path: fp32 INT4 1x32, fp32 INT8 1x64, and bf16 INT4 8x4 (the paper's QA-HiRA tile). Columns:
  cpu_blockwise   (the kernel as the plugin runs it: the packed GEMV at every M; results up to
                   2026-11 had dequantize + fp32 GEMM above 32 rows, dropped as not batch-
                   invariant)
  packed_gemv     (the packed GEMV path called directly)
  dequant_torch   (qahira_vllm.linear_kernels.DequantTorchKernel, the torch fallback)
  dense_fp32      (F.linear on an already dequantized fp32 weight: no dequantization at all)
Ratios are within this one run. Threads: torch's default here (both cores); run it alone.

    .venv/bin/python benchmarks/cpu_blockwise.py          # ~1 min
Writes cpu_blockwise.json and .png to benchmarks/results/ (or $OUT).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qahira_kernels import ops
from qahira_vllm import linear_kernels as lk
from qahira_vllm.quant_math import pack_qweight

REPO = Path(__file__).resolve().parent.parent
SHAPES = {"smollm2 mlp 1536x576": (1536, 576), "1B mlp 8192x2048": (8192, 2048)}
CASES = [("fp32 INT4 1x32", 4, (1, 32), torch.float32),
         ("fp32 INT8 1x64", 8, (1, 64), torch.float32),
         ("bf16 INT4 8x4", 4, (8, 4), torch.bfloat16)]
MS = (1, 4, 16, 32, 64, 256)


def _time(fn, budget_s: float = 0.3) -> float:
    fn()
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < budget_s:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n


def _layer(out_f, in_f, bits, block):
    bo, bi = block
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Module()
    q = torch.randint(0, 2 ** bits, (out_f, in_f), generator=g)
    for name, t in (("qweight", pack_qweight(q, bits)),
                    ("scales", (0.01 * torch.rand(out_f // bo, in_f // bi, generator=g)).half()),
                    ("offsets", (0.1 * torch.randn(out_f // bo, in_f // bi, generator=g)).half())):
        layer.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))
    return layer


def main() -> None:
    rows = []
    for shape_name, (out_f, in_f) in SHAPES.items():
        for case, bits, block, dtype in CASES:
            spec = lk.LinearSpec(bits, block, out_f, in_f, dtype, "cpu")
            fast, slow = _layer(out_f, in_f, bits, block), _layer(out_f, in_f, bits, block)
            kernel, torch_path = lk.CpuBlockwiseKernel(spec), lk.DequantTorchKernel(spec)
            kernel.prepare(fast)
            torch_path.prepare(slow)
            w = ops.cpu_blockwise_dequant(fast.qweight, fast.scales, fast.offsets, bits, *block,
                                          in_f)
            for m in MS:
                x = torch.randn(m, in_f).to(dtype)
                r = {"shape": shape_name, "case": case, "M": m,
                     "cpu_blockwise_ms": 1e3 * _time(lambda: kernel.apply(fast, x)),
                     "packed_gemv_ms": 1e3 * _time(lambda: ops.cpu_blockwise(
                         x, fast.qweight, fast.scales, fast.offsets, bits, *block)),
                     "dequant_torch_ms": 1e3 * _time(lambda: torch_path.apply(slow, x)),
                     "dense_fp32_ms": 1e3 * _time(lambda: F.linear(x.float(), w))}
                r["speedup_vs_dequant_torch"] = r["dequant_torch_ms"] / r["cpu_blockwise_ms"]
                rows.append(r)
                print(f"{shape_name:22s} {case:16s} M={m:4d}  blockwise {r['cpu_blockwise_ms']:8.3f}"
                      f"  gemv {r['packed_gemv_ms']:8.3f}  torch {r['dequant_torch_ms']:8.3f}"
                      f"  dense {r['dense_fp32_ms']:8.3f} ms  ({r['speedup_vs_dequant_torch']:.1f}x)",
                      flush=True)
    out_dir = Path(os.environ.get("OUT", REPO / "benchmarks" / "results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"torch_threads": torch.get_num_threads(),
            "note": "ms per apply() of one layer; ratios within this run"}
    tmp = out_dir / "cpu_blockwise.json.tmp"
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    os.replace(tmp, out_dir / "cpu_blockwise.json")
    _plot(rows, out_dir / "cpu_blockwise.png")


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(SHAPES), len(CASES), figsize=(4.2 * len(CASES), 3.6 * len(SHAPES)),
                             squeeze=False)
    for i, shape in enumerate(SHAPES):
        for j, (case, *_rest) in enumerate(CASES):
            ax = axes[i][j]
            sel = [r for r in rows if r["shape"] == shape and r["case"] == case]
            for key, label in (("cpu_blockwise_ms", "cpu_blockwise"),
                               ("packed_gemv_ms", "packed GEMV only"),
                               ("dequant_torch_ms", "dequant_torch"),
                               ("dense_fp32_ms", "dense fp32 (no dequant)")):
                ax.plot([r["M"] for r in sel], [r[key] for r in sel], marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{shape}\n{case}", fontsize=9)
            ax.set_xlabel("M (rows)")
            ax.set_ylabel("ms per call")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
