"""Benchmark the Triton kernels (qahira_kernels) on one GPU; written for an H200.

    python benchmarks/gpu_kernels.py            # GPU: checks, then timings (< 8 min on an H200)
    python benchmarks/gpu_kernels.py --smoke    # CPU: tiny shapes in Triton's interpreter

Needs torch + triton only (no vLLM, no network, no install: the repo root is put on sys.path).
First checks every timed kernel against the fp32 torch reference on the device, then times
(median of triton.testing.do_bench):
- block-wise GEMM, M in {1, 4, 16, 64, 256, 4096}, layers [out, in] = 4096x4096, 14336x4096,
  4096x14336: our kernel (4-bit 1x64, 1x128, 2-D 4x32 and 8x4, 8-bit 1x64; the auto route plus
  the fused and dense paths side by side to place DENSE_MIN_M) against torch bf16 F.linear and
  torch's tinygemm int4 (_weight_int4pack_mm); TFLOP/s and GB/s against 4.8 TB/s.
- Q-BaRA (p = q = 2, R = 128) with 1, 8, 64 adapters: our shrink+expand against the same
  kernels on the expanded LoRA (A' = rep(A, p)/p, B' = rep(B, q), p = q = 1) and against a
  per-token gathered bgmv in torch on the expanded LoRA.
Writes gpu_kernels.json (+ .png if matplotlib is there) to $OUT if set, else benchmarks/results/
(smoke: gpu_kernels_smoke.*). Smoke timings are interpreter timings: they mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEAK_BW = 4.8e12  # H200 HBM3e, bytes/s


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on CPU in Triton's interpreter (sets TRITON_INTERPRET=1)")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="stop starting new timings after this many seconds (default 420)")
    ap.add_argument("--out", help="output folder (default $OUT, else benchmarks/results)")
    return ap.parse_args()


ARGS = parse_args()
if ARGS.smoke:
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def _import_project():
    """qahira_vllm from the repo root; qahira_kernels installed, or loaded from kernels/."""
    sys.path.insert(0, str(ROOT))
    try:
        import qahira_kernels  # noqa: F401
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "qahira_kernels", ROOT / "kernels" / "__init__.py",
            submodule_search_locations=[str(ROOT / "kernels")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["qahira_kernels"] = module
        spec.loader.exec_module(module)


_import_project()
import triton  # noqa: E402

from qahira_kernels import blockwise_gemm as bg  # noqa: E402
from qahira_kernels import qbara as qb  # noqa: E402
from qahira_kernels import reference as ref  # noqa: E402
from qahira_vllm.format import QahiraQuantConfig  # noqa: E402
from qahira_vllm.quant_math import dequantize, pack_qweight, unpack_qweight  # noqa: E402

SMOKE = ARGS.smoke
DEVICE = torch.device("cpu" if SMOKE else "cuda")
ACT = torch.bfloat16
T0 = time.monotonic()

if SMOKE:
    LAYERS = [(48, 128), (96, 128), (48, 256)]            # (out, in)
    MS = [1, 4, 16]
    QBARA_LAYERS = [(128, 96)]                            # (in, out)
    QBARA_TOKENS, QBARA_ADAPTERS, QBARA_RANK = [1, 8], [1, 2], 32
else:
    LAYERS = [(4096, 4096), (14336, 4096), (4096, 14336)]
    MS = [1, 4, 16, 64, 256, 4096]
    QBARA_LAYERS = [(4096, 4096), (4096, 14336)]
    QBARA_TOKENS, QBARA_ADAPTERS, QBARA_RANK = [1, 64, 256], [1, 8, 64], 128

# name -> (bits, block)
VARIANTS = {
    "q4_1x64": (4, (1, 64)),
    "q4_1x128": (4, (1, 128)),
    "q4_4x32": (4, (4, 32)),
    "q4_8x4": (4, (8, 4)),      # QA-HiRA-mergeable with pi = 4, qo = 8 (per-element path)
    "q8_1x64": (8, (1, 64)),
}
FUSED_AND_DENSE_MS = {64, 256, 4096} if not SMOKE else {16}
CHECK_MS = [1, 16, 256, 4096] if not SMOKE else [1, 16]
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
if SMOKE:
    TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-3}   # the interpreter truncates to bf16

RESULTS: dict = {"smoke": SMOKE, "checks": [], "gemm": [], "qbara": [], "skipped": [],
                 "errors": []}


# ----------------------------------------------------------------------------- helpers

def bench_ms(fn) -> float:
    """Median milliseconds: do_bench on the GPU, a few perf_counter runs in the interpreter."""
    if SMOKE:
        fn()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def out_of_time() -> bool:
    return time.monotonic() - T0 > ARGS.budget_s


def rel_err(y, r) -> float:
    return ((y.float() - r).abs().max() / r.abs().max()).item()


def check(name: str, run, r: torch.Tensor, tol: float, **where) -> None:
    """Compare run() with the reference r; a crash counts as a failed check, the run goes on."""
    try:
        err = rel_err(run(), r)
    except Exception as e:  # noqa: BLE001 - one broken kernel must not stop the benchmark
        RESULTS["checks"].append({"name": name, "ok": False, "error": repr(e)[:800], **where})
        print(f"  check {name} {where}: ERROR {e!r}"[:400], flush=True)
        return
    ok = err < tol
    RESULTS["checks"].append({"name": name, "rel_err": err, "tol": tol, "ok": ok, **where})
    print(f"  check {name} {where}: rel_err {err:.2e} {'ok' if ok else 'FAILED'}", flush=True)


def timed(label: str, fn) -> float | None:
    """Median ms of fn, or None (recorded) when out of time budget or fn crashes."""
    if out_of_time():
        RESULTS["skipped"].append(label)
        return None
    try:
        return bench_ms(fn)
    except Exception as e:  # noqa: BLE001
        RESULTS["errors"].append({"what": label, "error": repr(e)[:800]})
        print(f"  {label}: ERROR {e!r}"[:400], flush=True)
        return None


def make_weight(out_f, in_f, bits, block, seed=0):
    """Random format_version 1 tensors, made on the device (packing 14336x4096 on CPU is slow)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    bo, bi = block
    kw = {"generator": g, "device": DEVICE}
    q = torch.randint(0, 2 ** bits, (out_f, in_f), dtype=torch.uint8, **kw)
    scales = (0.004 + 0.02 * torch.rand(out_f // bo, in_f // bi, **kw)).half()
    offsets = (0.15 * torch.randn(out_f // bo, in_f // bi, **kw)).half()
    return pack_qweight(q, bits), scales, offsets


def weight_bytes(out_f, in_f, bits, block) -> int:
    blocks = (out_f // block[0]) * (in_f // block[1])
    return out_f * in_f * bits // 8 + blocks * 4   # fp16 scale + fp16 offset


class TinyGemmInt4:
    """torch's int4 kernel ("tinygemm"): W = (q - 8) * scale + zero per group of g inputs, so
    zero = offset + 8 * scale reproduces a qahira 1 x g block exactly (up to bf16 rounding)."""

    def __init__(self, qweight, scales, offsets, group):
        q = unpack_qweight(qweight, 4).to(torch.int32)
        scale, offset = scales.float(), offsets.float()
        sz = torch.stack([scale.t(), (offset + 8 * scale).t()], dim=-1).to(ACT).contiguous()
        self.group, self.scale_zero = group, sz
        if DEVICE.type == "cuda":
            q_bytes = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)   # two columns per byte
            self.packed = torch.ops.aten._convert_weight_to_int4pack(q_bytes.contiguous(), 8)
            self.mm = torch.ops.aten._weight_int4pack_mm
        else:
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
            self.mm = torch.ops.aten._weight_int4pack_mm_for_cpu

    def __call__(self, x):
        return self.mm(x, self.packed, self.group, self.scale_zero)


# ----------------------------------------------------------------------------- GEMM

def gemm_row(layer, variant, m, path, ms, bits=16, block=None, **extra):
    if ms is None:
        return
    out_f, in_f = layer
    wbytes = out_f * in_f * 2 if bits == 16 else weight_bytes(out_f, in_f, bits, block)
    total = wbytes + m * in_f * 2 + m * out_f * 2
    row = {"out": out_f, "in": in_f, "M": m, "variant": variant, "path": path, "ms": ms,
           "tflops": 2 * m * out_f * in_f / (ms * 1e-3) / 1e12,
           "gbps": total / (ms * 1e-3) / 1e9, "frac_peak_bw": total / (ms * 1e-3) / PEAK_BW,
           **extra}
    RESULTS["gemm"].append(row)
    print(f"  {out_f}x{in_f} M={m:<5} {variant:<18} {path:<6} {ms * 1e3:9.1f} us "
          f"{row['tflops']:7.2f} TFLOP/s {row['gbps']:7.0f} GB/s", flush=True)


def make_tinygemm(qw, sc, of, block, where):
    try:
        return TinyGemmInt4(qw, sc, of, block[1])
    except Exception as e:  # noqa: BLE001
        RESULTS["errors"].append({"what": f"tinygemm setup {where}", "error": repr(e)[:800]})
        print(f"  tinygemm setup: ERROR {e!r}"[:400], flush=True)
        return None


def bench_gemm_layer(layer):
    out_f, in_f = layer
    print(f"GEMM layer out={out_f} in={in_f}", flush=True)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    xs = {m: torch.randn(m, in_f, generator=g, device=DEVICE).to(ACT)
          for m in sorted(set(MS) | set(CHECK_MS))}
    dense_w = None
    for name, (bits, block) in VARIANTS.items():
        qw, sc, of = make_weight(out_f, in_f, bits, block)
        w = bg.pack_blockwise_weight(qw, sc, of, bits, block)
        w_ref = dequantize(qw, sc, of, QahiraQuantConfig(bits=bits, block_size=block))  # fp32
        if dense_w is None:
            dense_w = w_ref.to(ACT)                              # the bf16 baseline's weight
        tiny = (make_tinygemm(qw, sc, of, block, f"{name} {out_f}x{in_f}")
                if bits == 4 and block[0] == 1 else None)
        configs = {m: bg.choose_config(m, out_f, in_f, block, sm_count()) for m in MS}
        for m in CHECK_MS:                                       # correctness on the device
            x = xs[m]
            r = x.float() @ w_ref.t()
            where = {"variant": name, "out": out_f, "in": in_f, "M": m, "dtype": "bf16"}
            check("blockwise_gemm_auto", lambda: bg.blockwise_gemm(x, w), r, TOL[ACT], **where)
            if m in FUSED_AND_DENSE_MS:
                check("blockwise_gemm_fused", lambda: bg.fused_gemm(x, w, None, configs[m]), r,
                      TOL[ACT], **where)
                check("blockwise_gemm_dense", lambda: bg.blockwise_gemm(x, w, dense=True), r,
                      TOL[ACT], **where)
            if tiny is not None and m == CHECK_MS[0]:
                check("tinygemm_int4", lambda: tiny(x), r, TOL[ACT], **where)
        if layer == LAYERS[0]:                                   # fp16 once per variant
            x = torch.randn(16, in_f, device=DEVICE).half()
            check("blockwise_gemm_auto", lambda: bg.blockwise_gemm(x, w), x.float() @ w_ref.t(),
                  TOL[torch.float16], variant=name, out=out_f, M=16, dtype="fp16",
                  **{"in": in_f})
        del w_ref
        for m in MS:
            x, label = xs[m], f"gemm {out_f}x{in_f} {name} M={m}"
            dense_route = m >= bg.DENSE_MIN_M
            gemm_row(layer, name, m, "auto", timed(label, lambda: bg.blockwise_gemm(x, w)),
                     bits, block, dense_route=dense_route,
                     config=None if dense_route else dataclasses.asdict(configs[m]))
            if m in FUSED_AND_DENSE_MS:
                gemm_row(layer, name, m, "fused", timed(
                    label + " fused", lambda: bg.fused_gemm(x, w, None, configs[m])),
                    bits, block, config=dataclasses.asdict(configs[m]))
                gemm_row(layer, name, m, "dense", timed(
                    label + " dense", lambda: bg.blockwise_gemm(x, w, dense=True)), bits, block)
            if tiny is not None:
                gemm_row(layer, f"tinygemm_{name}", m, "torch",
                         timed(label + " tinygemm", lambda: tiny(x)), bits, block)
        del w, qw, sc, of, tiny
    for m in MS:
        x = xs[m]
        gemm_row(layer, "bf16", m, "torch",
                 timed(f"gemm {out_f}x{in_f} bf16 M={m}", lambda: F.linear(x, dense_w)))
    del dense_w, xs
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def sm_count() -> int:
    from qahira_kernels._triton_utils import sm_count as _sm
    return _sm(DEVICE)


# ----------------------------------------------------------------------------- Q-BaRA

def make_adapters(n_adapters, in_f, out_f, rank, p=2, q=2, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    A = (0.05 * torch.randn(n_adapters, rank, in_f // p, generator=g)).to(ACT)
    B = (0.05 * torch.randn(n_adapters, out_f // q, rank, generator=g)).to(ACT)
    per_slot = lambda v: torch.full((n_adapters,), v, dtype=torch.int32)  # noqa: E731
    scaling = torch.full((n_adapters,), 0.25, dtype=torch.float32)
    return [t.to(DEVICE) for t in (A, B, per_slot(p), per_slot(q), per_slot(rank), scaling)]


def torch_bgmv_expanded(y, x, A_exp, B_exp, scaling, slot):
    """Per-token gathered LoRA on the expanded weights, bf16, as a plain torch engine would."""
    h = torch.bmm(A_exp[slot], x.unsqueeze(-1))          # [T, R, 1]
    delta = torch.bmm(B_exp[slot], h).squeeze(-1)        # [T, out]
    return y.add_(delta * scaling[slot].to(y.dtype)[:, None])


def qbara_row(layer, n_adapters, t, method, ms, adapter_bytes, **extra):
    if ms is None:
        return
    in_f, out_f = layer
    total = adapter_bytes + t * in_f * 2 + 2 * t * out_f * 2
    row = {"in": in_f, "out": out_f, "T": t, "adapters": n_adapters, "method": method, "ms": ms,
           "gbps": total / (ms * 1e-3) / 1e9, **extra}
    RESULTS["qbara"].append(row)
    print(f"  {in_f}->{out_f} T={t:<4} adapters={n_adapters:<3} {method:<25} "
          f"{ms * 1e3:9.1f} us", flush=True)


def bench_qbara_layer(layer):
    in_f, out_f = layer
    rank = QBARA_RANK
    print(f"Q-BaRA layer in={in_f} out={out_f} R={rank} p=q=2", flush=True)
    for n_ad in QBARA_ADAPTERS:
        A, B, pool, repeat, ranks, scaling = make_adapters(n_ad, in_f, out_f, rank)
        A_exp, B_exp = ref.expand_to_lora(A, B, pool, repeat, ranks, in_f, out_f)
        A_exp, B_exp = A_exp.to(ACT), B_exp.to(ACT)
        ones = torch.ones_like(pool)
        for t in QBARA_TOKENS:
            g = torch.Generator(device="cpu").manual_seed(t)
            x = torch.randn(t, in_f, generator=g).to(device=DEVICE, dtype=ACT)
            y0 = (0.01 * torch.randn(t, out_f, generator=g)).to(device=DEVICE, dtype=ACT)
            slot = (torch.arange(t, dtype=torch.int32) % n_ad).to(DEVICE)
            active = min(t, n_ad)
            methods = {   # name -> (y -> y updated in place, adapter bytes it must read)
                "qbara_native": (lambda y: qb.qbara_apply(
                    y, x, A, B, pool, repeat, ranks, scaling, slot),
                    active * rank * (in_f // 2 + out_f // 2) * 2),
                "qbara_kernel_on_expanded": (lambda y: qb.qbara_apply(
                    y, x, A_exp, B_exp, ones, ones, ranks, scaling, slot),
                    active * rank * (in_f + out_f) * 2),
                "torch_bgmv_expanded": (lambda y: torch_bgmv_expanded(
                    y, x, A_exp, B_exp, scaling, slot), active * rank * (in_f + out_f) * 2),
            }
            if t in (1, QBARA_TOKENS[-1]):
                delta_ref = ref.lora_bgmv_ref(y0, x, A_exp, B_exp, scaling, slot) - y0.float()
                for name, (fn, _) in methods.items():
                    def delta(fn=fn):
                        y = y0.clone()
                        fn(y)
                        return y.float() - y0.float()
                    check(name, delta, delta_ref, 2e-2, T=t, adapters=n_ad, out=out_f,
                          **{"in": in_f})
            y = y0.clone()   # timed calls accumulate into one buffer: no copy in the timing
            for name, (fn, nbytes) in methods.items():
                qbara_row(layer, n_ad, t, name,
                          timed(f"qbara {in_f}->{out_f} {name} T={t} n={n_ad}", lambda: fn(y)),
                          nbytes)
        del A, B, A_exp, B_exp
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- output

def plot(path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(LAYERS) + 1, figsize=(6 * (len(LAYERS) + 1), 4.5))
    for ax, (out_f, in_f) in zip(axes, LAYERS):
        rows = [r for r in RESULTS["gemm"] if (r["out"], r["in"]) == (out_f, in_f)
                and r["path"] in ("auto", "torch")]
        for variant in dict.fromkeys(r["variant"] for r in rows):
            pts = sorted((r["M"], r["ms"] * 1e3) for r in rows if r["variant"] == variant)
            ax.plot(*zip(*pts), marker="o", label=variant)
        ax.set(xscale="log", yscale="log", xlabel="M", ylabel="time (us)",
               title=f"W [{out_f} x {in_f}]")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[-1]
    for method in ("qbara_native", "qbara_kernel_on_expanded", "torch_bgmv_expanded"):
        rows = [r for r in RESULTS["qbara"] if r["method"] == method
                and (r["in"], r["out"]) == QBARA_LAYERS[0]]
        for n_ad in QBARA_ADAPTERS:
            pts = sorted((r["T"], r["ms"] * 1e3) for r in rows if r["adapters"] == n_ad)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{method} n={n_ad}")
    ax.set(xscale="log", yscale="log", xlabel="tokens T", ylabel="time (us)",
           title=f"Q-BaRA {QBARA_LAYERS[0][0]}->{QBARA_LAYERS[0][1]}, R={QBARA_RANK}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6)
    fig.suptitle(f"qahira Triton kernels on {RESULTS['device']}"
                 + (" (SMOKE: interpreter timings, meaningless)" if SMOKE else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> int:
    if not SMOKE and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke for the CPU interpreter check", file=sys.stderr)
        return 2
    RESULTS.update({
        "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu (interpreter)",
        "torch": torch.__version__, "triton": triton.__version__, "act_dtype": "bf16",
        "peak_bw_bytes_per_s": PEAK_BW, "dense_min_m": bg.DENSE_MIN_M,
        "timing": "triton.testing.do_bench median, ms" if not SMOKE else "perf_counter median, ms",
    })
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False   # fp32 references stay fp32
    sections = [(bench_gemm_layer, layer) for layer in LAYERS]
    sections += [(bench_qbara_layer, layer) for layer in QBARA_LAYERS]
    for bench, layer in sections:
        try:
            bench(layer)
        except Exception as e:  # noqa: BLE001 - keep the other sections and write the JSON
            RESULTS["errors"].append({"what": f"{bench.__name__} {layer}", "error": repr(e)[:800]})
            print(f"{bench.__name__} {layer}: ERROR {e!r}"[:400], flush=True)
            if DEVICE.type == "cuda":
                torch.cuda.empty_cache()
    RESULTS["wall_s"] = time.monotonic() - T0
    RESULTS["all_checks_ok"] = all(c["ok"] for c in RESULTS["checks"]) and not RESULTS["errors"]

    out_dir = Path(ARGS.out or os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "gpu_kernels_smoke" if SMOKE else "gpu_kernels"
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(RESULTS, indent=1))
    png = out_dir / f"{stem}.png"
    try:
        plotted = plot(png)
    except Exception as e:  # noqa: BLE001 - the JSON is what matters
        plotted = False
        print(f"plot failed: {e!r}")
    print(f"wrote {json_path}" + (f" and {png}" if plotted else " (no plot)"))
    print(f"checks: {sum(c['ok'] for c in RESULTS['checks'])}/{len(RESULTS['checks'])} ok, "
          f"{len(RESULTS['errors'])} errors, {len(RESULTS['skipped'])} timings skipped, "
          f"{RESULTS['wall_s']:.0f} s")
    return 0 if RESULTS["all_checks_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
