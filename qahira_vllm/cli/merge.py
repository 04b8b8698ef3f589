"""qahira merge QCKPT ADAPTER OUT_DIR [--verify] [--requantize]"""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("qckpt", help="qahira checkpoint the adapter was trained on")
    p.add_argument("adapter", help="QA-HiRA adapter folder (Q-BaRA / LoRA need --requantize)")
    p.add_argument("out_dir")
    p.add_argument("--verify", action="store_true",
                   help="run base + adapter and the merged model on sample text; print the max "
                        "logit difference")
    p.add_argument("--verify-text", help="text for --verify (default: a fixed sentence)")
    p.add_argument("--requantize", action="store_true",
                   help="merge a Q-BaRA / LoRA adapter by dequantize + add + re-quantize (lossy; "
                        "reports the error)")
    p.add_argument("--overwrite", action="store_true")


def run(args) -> int:
    from ..merge import merge_qahira

    summary = merge_qahira(args.qckpt, args.adapter, args.out_dir, requantize=args.requantize,
                           verify=args.verify, verify_text=args.verify_text,
                           overwrite=args.overwrite)
    print(json.dumps(summary, indent=2))
    return 0
