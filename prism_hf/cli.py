"""`prism-hf` command line: `prism-hf train ...` (more subcommands: see `prism-hf --help`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence


def _add_train_parser(subparsers) -> None:
    from .training.pipeline import DraftTrainingArguments

    parser = subparsers.add_parser("train", help="train a PRISM draft for a causal LM")
    for f in dataclasses.fields(DraftTrainingArguments):
        name = "--" + f.name.replace("_", "-")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.name == "feature_layers":
            parser.add_argument(name, type=int, nargs="+", default=[-1], help="verifier hidden-state indices")
            continue
        if f.type == "bool":
            parser.add_argument(name, action="store_true", help="(flag)")
            continue
        kind = {"int": int, "float": float, "str": str, "int | None": int, "str | None": str}[str(f.type)]
        default = None if required else f.default
        parser.add_argument(name, type=kind, required=required, default=default)
    parser.set_defaults(handler=_run_train)


def _run_train(namespace: argparse.Namespace) -> None:
    from .training.pipeline import DraftTrainingArguments, train_draft

    fields = {f.name for f in dataclasses.fields(DraftTrainingArguments)}
    args = DraftTrainingArguments(**{k: v for k, v in vars(namespace).items() if k in fields})
    train_draft(args)
    print(json.dumps({"saved": args.output_dir}))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prism-hf", description=__doc__)
    subparsers = parser.add_subparsers(required=True)
    _add_train_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    namespace = build_parser().parse_args(argv)
    namespace.handler(namespace)


if __name__ == "__main__":
    main()
