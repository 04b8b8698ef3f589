"""Where a batch-1 decode step goes on this CPU, and how fast INT4 could be at best.

The foundation issue's CPU target is INT4 >= 3x bf16 decode tok/s at batch 1 on the 1B shape.
This script measures, on one thread (what vLLM's CPU backend computes on by default here):

1. the single-core streaming read bandwidth (fp32 `sum` over 512 MiB), the ceiling of any
   weight-streaming GEMV;
2. M = 1 time of every linear layer of the 1B-shaped Llama as vLLM builds it (merged qkv and
   gate_up), for bf16 `F.linear`, qahira INT4 1x32 on the `cpu_int4pack` kernel (the one the
   plugin selects), and the bf16 tied lm_head (never converted);
3. optional (`gcc` present): an exact fp32-accumulating AVX2/FMA GEMV written for this
   measurement (nibbles -> fp32 -> FMA, per-block scale, offset via block sums of x), to see
   whether a hand-written exact kernel beats torch's.

With the engine's batch-1 tok/s from `decode_throughput.json` (same machine, separate run), the
non-linear time per step is step time - linear time, and the best INT4 speedup this engine can
reach is bf16 step time / (non-linear + lm_head + INT4 bytes / stream bandwidth).

    .venv/bin/python benchmarks/cpu_decode_ceiling.py     # ~2 min; run alone
Writes cpu_decode_ceiling.json and .png to benchmarks/results/ (or $OUT).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import tempfile
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

AVX2_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
/* y[n] = sum_b s[n,b] * sum_{k in b} x[k] q[n,k] + o[n,b] * xsum[b]   (exact up to fp32 order)
 * w: uint8 [N, K/2]; in each 32-column group, byte j = q[j] | q[16 + j] << 4.
 * s, o: fp16 [N, K/bi]; x: fp32 [K]; xsum: fp32 [K/bi]; y: fp32 [N]. */
static inline float hsum(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  return _mm_cvtss_f32(_mm_add_ss(a, _mm_movehdup_ps(a)));
}
void qgemv1(const uint8_t *w, const uint16_t *s, const uint16_t *o, const float *x,
            const float *xsum, float *y, int N, int K, int bi) {
  const int nb = K / bi, gpb = bi / 32;
  const __m128i mask = _mm_set1_epi8(0x0F);
  for (int n = 0; n < N; n++) {
    const uint8_t *wr = w + (size_t)n * (K / 2);
    const uint16_t *sr = s + (size_t)n * nb, *orow = o + (size_t)n * nb;
    __m256 tot = _mm256_setzero_ps();
    float off = 0.f;
    for (int b = 0; b < nb; b++) {
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;  /* FMA latency: 4 chains */
      for (int g = 0; g < gpb; g++) {
        const int k = (b * gpb + g) * 32;
        __m128i v = _mm_loadu_si128((const __m128i *)(wr + k / 2));
        __m128i lo = _mm_and_si128(v, mask), hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)),
                             _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))),
                             _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)),
                             _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))),
                             _mm256_loadu_ps(x + k + 24), a3);
      }
      __m256 a = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
      tot = _mm256_fmadd_ps(a, _mm256_set1_ps(_cvtsh_ss(sr[b])), tot);
      off += _cvtsh_ss(orow[b]) * xsum[b];
    }
    y[n] = hsum(tot) + off;
  }
}
"""


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
        self.q = q
        self.qweight = torch.nn.Parameter(pack_qweight(q, 4), requires_grad=False)
        self.scales = torch.nn.Parameter((torch.rand(nb) * 0.01 + 1e-3).half(),
                                         requires_grad=False)
        self.offsets = torch.nn.Parameter((torch.randn(nb) * 0.01).half(), requires_grad=False)


def _build_avx2():
    if shutil.which("gcc") is None:
        return None
    work = Path(tempfile.mkdtemp(prefix="qahira-avx2-"))
    (work / "g.c").write_text(AVX2_SOURCE)
    proc = subprocess.run(["gcc", "-O3", "-mavx2", "-mfma", "-mf16c", "-shared", "-fPIC",
                           "-o", str(work / "g.so"), str(work / "g.c")], capture_output=True)
    return ctypes.CDLL(str(work / "g.so")) if proc.returncode == 0 else None


def _avx2_linear(lib, layer: _Layer):
    out_f, in_f = layer.q.shape
    g = layer.q.view(out_f, in_f // 32, 2, 16).to(torch.uint8)
    w = (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(out_f, in_f // 2).contiguous()
    s, o = layer.scales.data.contiguous(), layer.offsets.data.contiguous()
    ptr = ctypes.c_void_p

    def run(x: torch.Tensor) -> torch.Tensor:
        xf = x.float().reshape(-1).contiguous()
        xs = xf.view(-1, BLOCK[1]).sum(-1)
        y = torch.empty(out_f)
        lib.qgemv1(ptr(w.data_ptr()), ptr(s.data_ptr()), ptr(o.data_ptr()), ptr(xf.data_ptr()),
                   ptr(xs.data_ptr()), ptr(y.data_ptr()), out_f, in_f, BLOCK[1])
        return y
    return run


def measure() -> dict:
    from qahira_vllm.linear_kernels import CpuInt4PackKernel, LinearSpec, reference_linear

    torch.manual_seed(0)
    torch.set_num_threads(1)
    lib = _build_avx2()
    res = {"threads": 1, "stream_read_gbps": stream_bandwidth() / 1e9, "layers": {}}
    for name, (out_f, in_f) in LAYER_SHAPES.items():
        x = torch.randn(1, in_f).bfloat16()
        w = torch.randn(out_f, in_f).bfloat16()
        layer = _Layer(out_f, in_f)
        ref = reference_linear(x.float(), layer.qweight.data, layer.scales.data,
                               layer.offsets.data, 4, BLOCK)
        avx2 = _avx2_linear(lib, layer) if lib is not None else None
        kernel = CpuInt4PackKernel(LinearSpec(4, BLOCK, out_f, in_f, torch.bfloat16, "cpu"))
        kernel.prepare(layer)
        row = {"shape": [out_f, in_f],
               "bf16_ms": _time(lambda: F.linear(x, w)) * 1e3,
               "int4_cpu_int4pack_ms": _time(lambda: kernel.apply(layer, x)) * 1e3,
               "int4_bytes": out_f * in_f // 2 + 2 * 2 * out_f * in_f // BLOCK[1]}
        rel = lambda y: ((y.float().reshape(-1) - ref.reshape(-1)).abs().max()  # noqa: E731
                         / ref.abs().max()).item()
        row["int4_cpu_int4pack_rel_err"] = rel(kernel.apply(layer, x))
        if avx2 is not None:
            row["int4_avx2_exact_ms"] = _time(lambda: avx2(x)) * 1e3
            row["int4_avx2_exact_rel_err"] = rel(avx2(x))
        res["layers"][name] = row
        print(name, json.dumps(row), flush=True)
    x = torch.randn(1, HIDDEN).bfloat16()
    lm_head = torch.randn(VOCAB, HIDDEN).bfloat16()
    res["lm_head_bf16_ms"] = _time(lambda: F.linear(x, lm_head)) * 1e3
    per_step = lambda key: LAYERS * sum(r[key] for r in res["layers"].values())  # noqa: E731
    res["per_step_ms"] = {"bf16_linears": per_step("bf16_ms"),
                          "int4_linears_cpu_int4pack": per_step("int4_cpu_int4pack_ms"),
                          "lm_head_bf16": res["lm_head_bf16_ms"]}
    if lib is not None:
        res["per_step_ms"]["int4_linears_avx2_exact"] = per_step("int4_avx2_exact_ms")
    int4_bytes = LAYERS * sum(r["int4_bytes"] for r in res["layers"].values())
    res["int4_linear_bytes_per_step"] = int4_bytes
    res["per_step_ms"]["int4_linears_at_stream_bw"] = int4_bytes / res["stream_read_gbps"] / 1e6
    return res


def ceiling(res: dict, decode: dict) -> dict:
    """Combine with the engine's batch-1 step times (decode_throughput.json)."""
    m = decode["models"]["Llama-1B-shape (random)"]
    step_bf16 = 1e3 / m["bf16"]["tok_per_s"]["1"]
    step_int4 = 1e3 / m["qahira INT4"]["tok_per_s"]["1"]
    p = res["per_step_ms"]
    rest_bf16 = step_bf16 - p["bf16_linears"] - p["lm_head_bf16"]
    rest_int4 = step_int4 - p["int4_linears_cpu_int4pack"] - p["lm_head_bf16"]
    best_step = rest_int4 + p["lm_head_bf16"] + p["int4_linears_at_stream_bw"]
    return {"engine_step_ms": {"bf16": step_bf16, "qahira INT4": step_int4},
            "engine_speedup_measured": step_bf16 / step_int4,
            "non_linear_ms": {"bf16 engine": rest_bf16, "qahira INT4 engine": rest_int4},
            "int4_step_if_linears_at_stream_bw_ms": best_step,
            "max_speedup_at_stream_bw": step_bf16 / best_step,
            "decode_throughput_date": decode.get("date"),
            "decode_reserved_cpu": decode.get("reserved_cpu_note")}


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c, p = res["ceiling"], res["per_step_ms"]
    bars = {"bf16 (engine)": (p["bf16_linears"], p["lm_head_bf16"],
                              c["non_linear_ms"]["bf16 engine"]),
            "INT4 cpu_int4pack (engine)": (p["int4_linears_cpu_int4pack"], p["lm_head_bf16"],
                                           c["non_linear_ms"]["qahira INT4 engine"]),
            "INT4 at stream BW (bound)": (p["int4_linears_at_stream_bw"], p["lm_head_bf16"],
                                          c["non_linear_ms"]["qahira INT4 engine"])}
    fig, ax = plt.subplots(figsize=(7, 4))
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
