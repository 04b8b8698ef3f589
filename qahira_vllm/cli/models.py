"""qahira models {list,fetch NAME,path NAME}"""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="list embedded models and whether they are cached")
    f = sub.add_parser("fetch", help="build, verify and cache a model and its exact qahira "
                       "conversion; prints both folders (float first)")
    f.add_argument("name")
    f.add_argument("--force", action="store_true", help="rebuild even if cached")
    pth = sub.add_parser("path", help="print the cached folder of a model")
    pth.add_argument("name")


def run(args) -> int:
    from ..models import fetch_converted, fetch_model, list_models, model_dir

    if args.action == "list":
        print(json.dumps(list_models(), indent=2))
    elif args.action == "fetch":
        print(fetch_model(args.name, force=args.force))
        print(fetch_converted(args.name, force=args.force))
    else:
        print(model_dir(args.name))
    return 0
