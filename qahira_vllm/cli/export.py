"""qahira export ADAPTER OUT_DIR --format peft-lora"""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="Q-BaRA (or LoRA) adapter folder")
    p.add_argument("out_dir")
    p.add_argument("--format", choices=("peft-lora",), default="peft-lora",
                   help="peft-lora: the equal standard LoRA (PEFT, stock vLLM --enable-lora)")
    p.add_argument("--overwrite", action="store_true")


def run(args) -> int:
    from ..export import export_peft_lora

    print(json.dumps(export_peft_lora(args.adapter, args.out_dir, overwrite=args.overwrite),
                     indent=2))
    return 0
