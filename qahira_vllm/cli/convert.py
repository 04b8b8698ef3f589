"""qahira convert SRC OUT_DIR [--from FMT] [--revision REV] [--verify] [--offset-dtype float16|float32]"""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..convert import FLOAT_DTYPES, FORMATS

    p.add_argument("src", help="source checkpoint: a .gguf file (or a folder holding one), a "
                               "compressed-tensors, GPTQ, AWQ, MLX or HQQ model folder, or a "
                               "hub repo id of one (huggingface_hub: cache, HF_HUB_OFFLINE)")
    p.add_argument("--revision", help="hub branch, tag or commit of a repo id SRC")
    p.add_argument("out_dir")
    p.add_argument("--from", dest="from_format", choices=tuple(FORMATS),
                   help="source format (default: detected)")
    p.add_argument("--verify", action="store_true",
                   help="dequantize both sides; print the worst difference per layer")
    p.add_argument("--offset-dtype", choices=("float16", "float32"),
                   help="default: float16 only where every offset is exact in it, else "
                        "float32; a forced float16 reports its worst rounding")
    p.add_argument("--dtype", choices=tuple(FLOAT_DTYPES), default="float32",
                   help="dtype of the tensors that stay float (embeddings, norms), dequantized "
                        "by the source library (default float32: exact)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from ..convert import convert

    summary = convert(args.src, args.out_dir, from_format=args.from_format, verify=args.verify,
                      offset_dtype=args.offset_dtype, dtype=args.dtype, revision=args.revision,
                      overwrite=args.overwrite, progress=not args.no_progress)
    worst = summary.pop("verify_max_abs_diff", None)
    if worst is not None:
        for layer, diff in worst.items():
            print(f"{layer}: max |W_qahira - W_source| = {diff:.3g}")
    print(json.dumps(summary, indent=2))
    return 0
