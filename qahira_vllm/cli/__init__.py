"""qahira: quantize models to block-wise INT4/INT8 with float offsets, serve them with vLLM
(many Q-BaRA / LoRA adapters per batch), fine-tune adapters against the served weights and
merge QA-HiRA adapters exactly. Run `qahira VERB --help` for a verb's options."""

# Each verb lives in qahira_vllm/cli/VERB.py with add_arguments(parser) and run(args).

from __future__ import annotations

import argparse
import importlib
import sys

# verb -> module (imported only when that verb runs, so `qahira --help` stays fast)
VERBS = {
    "quantize": "Quantize a Hugging Face model folder or hub repo into a qahira checkpoint",
    "serve": "Serve a model with vLLM's OpenAI-compatible server (arguments pass through)",
    "models": "Fetch and list the embedded default models",
    "train": "Train a Q-BaRA, QA-HiRA or LoRA adapter on a qahira checkpoint",
    "merge": "Merge a QA-HiRA adapter exactly into a qahira checkpoint",
    "export": "Export a Q-BaRA adapter as an equivalent standard PEFT LoRA",
    "convert": "Convert a quantized checkpoint (GGUF today) into a qahira checkpoint, exactly",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qahira", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, help_text in VERBS.items():
        p = sub.add_parser(verb, help=help_text, description=help_text, add_help=verb != "serve")
        p.set_defaults(_module=f"qahira_vllm.cli.{verb}")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    verb = argv[0]
    if verb not in VERBS:
        parser.error(f"unknown verb {verb!r}; choose from {', '.join(VERBS)}")
    try:
        module = importlib.import_module(f"qahira_vllm.cli.{verb}")
    except ModuleNotFoundError as e:
        if e.name != f"qahira_vllm.cli.{verb}":
            raise  # a missing dependency of the verb: keep the real error
        parser.error(f"verb {verb!r} is not implemented in this installation "
                     f"(no module qahira_vllm.cli.{verb})")
    sub = argparse.ArgumentParser(prog=f"qahira {verb}", description=VERBS[verb],
                                  add_help=verb != "serve")
    module.add_arguments(sub)
    if verb == "serve":  # everything after `serve` belongs to vLLM
        return int(module.run(argv[1:]) or 0)
    args = sub.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"qahira {verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
