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


BENCH_MODES = {
    "quick": {"per_category": 2, "humaneval": 3, "sharegpt": 2, "max_new_tokens": 64},
    "full": {"per_category": 80, "humaneval": 164, "sharegpt": 100, "max_new_tokens": 256},
}


def _add_bench_parser(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmark strategies side by side (Spec-Bench style)")
    parser.add_argument("--target", required=True, help="reference model name, local dir or Hub id")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--draft", action="append", default=[], metavar="NAME=DIR", help="a PRISM draft (repeat)")
    parser.add_argument("--assistant", help="small same-tokenizer model for HF assisted generation")
    parser.add_argument("--prompt-lookup", action="store_true", help="include HF prompt lookup decoding")
    parser.add_argument("--categories", nargs="+", help="Spec-Bench tasks (default: all six)")
    parser.add_argument("--mode", choices=sorted(BENCH_MODES), default="quick",
                        help="preset sizes: quick (~10 min for SmolLM2 on a 2-core CPU) or full (every prompt)")
    parser.add_argument("--per-category", type=int, help="Spec-Bench prompts per task (overrides --mode)")
    parser.add_argument("--humaneval", type=int, help="HumanEval prompts (overrides --mode)")
    parser.add_argument("--sharegpt", type=int, help="held-out ShareGPT first turns (overrides --mode)")
    parser.add_argument("--max-new-tokens", type=int, help="new tokens per prompt (overrides --mode)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.set_defaults(handler=_run_bench)


def _run_bench(namespace: argparse.Namespace) -> None:
    from .benchmark.report import markdown_table
    from .benchmark.suite import BenchArguments, run_suite

    for key, value in BENCH_MODES[namespace.mode].items():
        if getattr(namespace, key) is None:
            setattr(namespace, key, value)
    drafts = {}
    for item in namespace.draft:
        name, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"--draft expects NAME=DIR, got {item!r}")
        drafts[name] = path
    args = BenchArguments(
        target=namespace.target, output_dir=namespace.output_dir, drafts=drafts, assistant=namespace.assistant,
        prompt_lookup=namespace.prompt_lookup, categories=namespace.categories, per_category=namespace.per_category,
        humaneval=namespace.humaneval, sharegpt=namespace.sharegpt, max_new_tokens=namespace.max_new_tokens,
        dtype=namespace.dtype,
    )
    print(markdown_table(run_suite(args)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prism-hf", description=__doc__)
    subparsers = parser.add_subparsers(required=True)
    _add_train_parser(subparsers)
    _add_bench_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    namespace = build_parser().parse_args(argv)
    namespace.handler(namespace)


if __name__ == "__main__":
    main()
