"""qahira quantize MODEL_DIR OUT_DIR --bits {4,8} --block BOxBI [--layer SUFFIX=BITS[:BOxBI]]...
[--scale-dtype float16|float32]"""

from __future__ import annotations

import argparse
import json
import sys


def parse_block(text: str) -> tuple[int, int]:
    try:
        bo, bi = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--block {text!r}: expected BOxBI, e.g. 1x64 or 8x4")
    if bo < 1 or bi < 1:
        raise argparse.ArgumentTypeError(f"--block {text!r}: both sizes must be >= 1")
    return bo, bi


def parse_layer(text: str) -> tuple[str, int, tuple[int, int] | None]:
    """--layer SUFFIX=BITS[:BOxBI] -> (suffix, bits, block or None)."""
    suffix, eq, spec = text.partition("=")
    bits_text, _, block_text = spec.partition(":")
    try:
        bits = int(bits_text)
    except ValueError:
        bits = None
    if not eq or not suffix or bits not in (4, 8):
        raise argparse.ArgumentTypeError(
            f"--layer {text!r}: expected SUFFIX=BITS[:BOxBI] with BITS 4 or 8, e.g. "
            "mlp.down_proj=8 or self_attn.v_proj=8:1x32")
    return suffix, bits, parse_block(block_text) if block_text else None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="local model folder or hub repo id")
    p.add_argument("out_dir")
    p.add_argument("--bits", type=int, choices=(4, 8), default=4)
    p.add_argument("--block", type=parse_block, default=(1, 64), metavar="BOxBI",
                   help="block of bo output rows x bi input columns (default 1x64)")
    p.add_argument("--offset-dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--scale-dtype", choices=("float16", "float32"), default="float16",
                   help="float32 keeps each scale (hi - lo) / qmax unrounded (format 2)")
    p.add_argument("--layer", action="append", default=[], type=parse_layer,
                   metavar="SUFFIX=BITS[:BOxBI]",
                   help="other bits (and block) for the modules ending in SUFFIX, e.g. "
                        "mlp.down_proj=8 or self_attn.v_proj=8:1x32; one of q/k/v or gate/up "
                        "sets its whole vLLM-fused group; repeatable, later wins (format 2)")
    p.add_argument("--quantizer", choices=("mse_clip", "minmax"), default="mse_clip",
                   help="mse_clip searches a clipping ratio per block (default; lower error)")
    p.add_argument("--keep-unconvertible", action="store_true",
                   help="keep layers the block does not divide in float (listed in "
                        "modules_not_converted) instead of failing")
    p.add_argument("--skip", action="append", default=[], metavar="MODULE",
                   help="keep this linear module in float (repeatable)")
    p.add_argument("--lm-head", action="store_true",
                   help="convert lm_head too (default: kept in float); a tied model is stored "
                        "untied, the input embedding staying in float")
    p.add_argument("--device", default="auto",
                   help="where the clip search runs: auto (CUDA when available) | cpu | cuda | "
                        "cuda:N; the same output on every device (CPU: compiled, all of torch's "
                        "threads)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--push-to-hub", metavar="REPO", help="upload the result to this hub repo")


def run(args) -> int:
    from ..quantize import quantize_model

    summary = quantize_model(args.model, args.out_dir, bits=args.bits, block_size=args.block,
                             offset_dtype=args.offset_dtype,
                             clip_search=args.quantizer == "mse_clip",
                             keep_unconvertible=args.keep_unconvertible, skip=tuple(args.skip),
                             overwrite=args.overwrite, lm_head=args.lm_head,
                             device=args.device, scale_dtype=args.scale_dtype,
                             layer_overrides=tuple(args.layer))
    if args.push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(args.push_to_hub, exist_ok=True)
        api.upload_folder(folder_path=args.out_dir, repo_id=args.push_to_hub)
        summary["pushed_to"] = args.push_to_hub
    for note in summary.get("notes", ()):
        print(f"qahira quantize: {note}", file=sys.stderr)
    print(json.dumps(summary, indent=2))
    return 0
