"""What converting lm_head costs in quality: SmolLM2-135M held-out perplexity, INT4 with and
without `qahira quantize --lm-head`, blocks 1x32 and 1x64 (transformers on the dequantized
weights, fp32, CPU; ~1 min).

    .venv/bin/python benchmarks/lm_head_perplexity.py

Writes results/lm_head_perplexity.json (or $OUT).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qahira_vllm.checkpoint import load_reference_model
    from qahira_vllm.models import HELDOUT_TEXT, fetch_model, perplexity
    from qahira_vllm.quantize import quantize_model

    src = fetch_model("smollm2-135m", verbose=False)
    tok = AutoTokenizer.from_pretrained(src)
    float_model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ppl = {"float (stored bf16 weights)": perplexity(float_model, tok, HELDOUT_TEXT)}
    with tempfile.TemporaryDirectory() as root:
        for block in ((1, 32), (1, 64)):
            for lm_head in (False, True):
                name = f"INT4 {block[0]}x{block[1]}" + (" + lm_head" if lm_head else "")
                out = Path(root) / name.replace(" ", "_")
                quantize_model(src, out, bits=4, block_size=block, lm_head=lm_head,
                               progress=False)
                ppl[name] = perplexity(load_reference_model(out), tok, HELDOUT_TEXT)
                print(f"{name}: {ppl[name]:.3f}", flush=True)
    out_dir = Path(os.environ.get("OUT") or REPO / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "lm_head_perplexity.json").write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d"), "model": "SmolLM2-135M-Instruct",
         "text": "qahira_vllm.models.HELDOUT_TEXT", "quantizer": "mse_clip",
         "perplexity": ppl}, indent=2) + "\n")


if __name__ == "__main__":
    main()
