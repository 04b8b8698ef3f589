"""`qahira quantize` speed: the torch path against the compiled clip search (same output bits).

    .venv/bin/python benchmarks/quantize_speed.py [--layers 16] [--skip-model] [--out DIR]

Part 1, per layer: one decoder layer of a 1B Llama (TinyLlama-1.1B shapes: q/o 2048x2048, k/v
256x2048, gate/up 5632x2048, down 2048x5632), bf16 random-normal weights, INT4 1x64 fp16
offsets with the MSE clip search (the CLI default). Columns:
  old          the path `qahira quantize` ran up to 2026-11-30: check_quantizable, the torch
               clip search, pack, then a second dequantization for the error statistics
  torch        quantize.quantize_layer on the torch definition (the fallback without the
               compiled library; error statistics from the search)
  kernel       quantize.quantize_layer on kernels/cpu_quantize.c, all torch threads
  kernel_1t    the same on one thread
Every path's qweight / scales / offsets are checked equal to the kernel's, bit for bit.
Part 2, end to end: `qahira quantize --device cpu` on a random ~850M-parameter 1B-shaped Llama
(hidden 2048, intermediate 5632, 32 heads / 4 KV heads, vocab 32000, --layers decoder layers,
bf16 safetensors), once with the compiled kernel and once without it (CC=/bin/false and an
empty kernel cache: the torch fallback), each in its own process; the two checkpoints are
compared tensor by tensor. Ratios come from this one run. Threads: torch's default (all cores);
run it alone. Writes quantize_speed.json and .png to benchmarks/results/ (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from qahira_vllm import quant_math as qm
from qahira_vllm.format import QahiraQuantConfig
from qahira_vllm.quantize import quantize_layer

REPO = Path(__file__).resolve().parent.parent
LAYER = {"q_proj": (2048, 2048), "k_proj": (256, 2048), "v_proj": (256, 2048),
         "o_proj": (2048, 2048), "gate_proj": (5632, 2048), "up_proj": (5632, 2048),
         "down_proj": (2048, 5632)}
CFG = QahiraQuantConfig(bits=4, block_size=(1, 64), offset_dtype="float16")
FLAGS_OF_INTEREST = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                     "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


def machine() -> dict:
    model, flags = platform.machine(), []
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = line.split(":", 1)[1].split()
            break
    return {"cpu": model, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_flags": [f for f in FLAGS_OF_INTEREST if f in flags], "cpu_flags_all": flags,
            "torch": torch.__version__, "load_average_at_start": os.getloadavg()}


def old_layer(t: torch.Tensor):
    """The pre-2026-11-30 per-layer work of quantize_state_dict."""
    qm.check_quantizable(t, CFG, "w")
    q, scales, offsets = qm.quantize(t, CFG)
    qweight = qm.pack_qweight(q, 4)
    w = t.float()
    deq = qm.dequantize(qweight, scales, offsets, CFG)
    return qweight, scales, offsets, (deq - w).square().sum().item(), w.square().sum().item()


def torch_layer(t: torch.Tensor):
    """quantize_layer's torch path (what runs without the compiled library)."""
    qm.check_quantizable(t, CFG, "w")
    q, scales, offsets, err = qm.quantize_with_error(t, CFG)
    return (qm.pack_qweight(q, 4), scales, offsets, err.double().sum().item(),
            t.float().square().sum(dtype=torch.float64).item())


def per_layer() -> dict:
    g = torch.Generator().manual_seed(0)
    weights = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in LAYER.items()}
    threads = torch.get_num_threads()

    def kernel_1t(t):
        torch.set_num_threads(1)
        try:
            return quantize_layer(t, CFG, True, "w")
        finally:
            torch.set_num_threads(threads)

    paths = {"old": old_layer, "torch": torch_layer,
             "kernel": lambda t: quantize_layer(t, CFG, True, "w"), "kernel_1t": kernel_1t}
    out: dict = {}
    for name, w in weights.items():
        ref = paths["kernel"](w)  # warm-up, and the bits the other paths must equal
        row = {}
        for path, fn in paths.items():
            t0 = time.perf_counter()
            got = fn(w)
            row[path] = time.perf_counter() - t0
            assert all(torch.equal(a, b) for a, b in zip(got[:3], ref[:3])), (name, path)
            row[f"{path}_sq_err"] = got[3]
        out[name] = row
        print(name, {k: round(v, 4) for k, v in row.items() if "sq_err" not in k}, flush=True)
    total = {p: sum(r[p] for r in out.values()) for p in paths}
    return {"layers": out, "decoder_layer_total_s": total,
            "speedup_kernel_vs_old": total["old"] / total["kernel"],
            "speedup_kernel_vs_torch": total["torch"] / total["kernel"],
            "speedup_kernel_1t_vs_old": total["old"] / total["kernel_1t"]}


def build_model(out: Path, layers: int) -> int:
    """A random 1B-shaped Llama in bf16 safetensors; returns its parameter count."""
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
              "intermediate_size": 5632, "num_hidden_layers": layers,
              "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000,
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu"}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    g = torch.Generator().manual_seed(1)
    sd = {"model.embed_tokens.weight": (torch.randn(32000, 2048, generator=g) * 0.02).bfloat16(),
          "lm_head.weight": (torch.randn(32000, 2048, generator=g) * 0.02).bfloat16(),
          "model.norm.weight": torch.ones(2048, dtype=torch.bfloat16)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for k, s in LAYER.items():
            mod = "self_attn." if k in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp."
            sd[p + mod + k + ".weight"] = (torch.randn(s, generator=g) * 0.02).bfloat16()
        sd[p + "input_layernorm.weight"] = torch.ones(2048, dtype=torch.bfloat16)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(2048, dtype=torch.bfloat16)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    return sum(t.numel() for t in sd.values())


def end_to_end(work: Path, layers: int) -> dict:
    src = work / "src"
    params = build_model(src, layers)
    runs = {}
    for name, env in (("kernel", {}),
                      ("torch", {"CC": "/bin/false", "QAHIRA_KERNEL_CACHE": str(work / "none")})):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "qahira_vllm.cli", "quantize", str(src),
                               str(work / name), "--device", "cpu"], cwd=REPO,
                              env={**os.environ, **env}, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        summary = json.loads(proc.stdout)
        runs[name] = {"wall_s": wall, "summary_seconds": summary["seconds"],
                      "backend": summary["quantizer_backend"],
                      "relative_weight_error": summary["relative_weight_error"],
                      "layers_converted": summary["layers_converted"]}
        print(name, runs[name], flush=True)
    from safetensors import safe_open

    same = True
    with safe_open(str(work / "kernel" / "model.safetensors"), "pt") as a, \
            safe_open(str(work / "torch" / "model.safetensors"), "pt") as b:
        same = set(a.keys()) == set(b.keys()) and all(
            torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    return {"parameters": params, "decoder_layers": layers, "runs": runs,
            "checkpoints_identical": same,
            "speedup_kernel_vs_torch": runs["torch"]["wall_s"] / runs["kernel"]["wall_s"]}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    layers = results["per_layer"]["layers"]
    names, paths = list(layers), ["old", "torch", "kernel_1t", "kernel"]
    for j, p in enumerate(paths):
        axes[0].bar([i + 0.2 * j for i in range(len(names))], [layers[n][p] for n in names],
                    0.2, label=p)
    axes[0].set_xticks([i + 0.3 for i in range(len(names))], names, rotation=30)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("seconds per layer (log)")
    axes[0].set_title("one 1B decoder layer, INT4 1x64 mse_clip")
    axes[0].legend()
    e2e = results.get("end_to_end")
    if e2e:
        runs = e2e["runs"]
        axes[1].bar(list(runs), [r["wall_s"] for r in runs.values()])
        axes[1].set_ylabel("seconds (qahira quantize, whole process)")
        axes[1].set_title(f"{e2e['parameters'] / 1e6:.0f}M-parameter model, end to end")
    fig.suptitle(f"{results['machine']['cpu']}, {results['machine']['torch_threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16, help="decoder layers of the end-to-end model")
    ap.add_argument("--skip-model", action="store_true", help="per-layer part only")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or
                                                     REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(),
               "config": "INT4 1x64 float16 offsets, mse_clip (13 ratios)"}
    results["per_layer"] = per_layer()
    if not args.skip_model:
        with tempfile.TemporaryDirectory(dir=REPO / ".cache" if (REPO / ".cache").is_dir()
                                         else None) as work:
            results["end_to_end"] = end_to_end(Path(work), args.layers)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quantize_speed.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out / "quantize_speed.png")
    print(json.dumps({k: v for k, v in results["per_layer"].items() if k != "layers"}, indent=2))


if __name__ == "__main__":
    main()
