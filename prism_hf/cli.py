"""`prism-hf` command line: `prism-hf data|train|bench|push ...` (see `prism-hf --help`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence


def _add_dataclass_arguments(parser: argparse.ArgumentParser, arguments_class: type) -> None:
    """One `--flag` per field of an arguments dataclass, with its help text and default."""
    for f in dataclasses.fields(arguments_class):
        name = "--" + f.name.replace("_", "-")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.name == "feature_layers":
            parser.add_argument(name, type=int, nargs="+", default=[-1], help="verifier hidden-state indices")
            continue
        if str(f.type) == "list[str] | None":
            parser.add_argument(name, nargs="+", default=None, help=f.metadata.get("help"))
            continue
        if f.type == "bool":
            parser.add_argument(name, action="store_true", help=f.metadata.get("help"))
            continue
        kind = {"int": int, "float": float, "str": str, "int | None": int, "str | None": str}[str(f.type)]
        default = None if required else f.default
        help_text = f.metadata.get("help", "")
        if not required and default is not None:
            help_text += f" (default: {default})"
        parser.add_argument(name, type=kind, required=required, default=default, help=help_text)


def _add_train_parser(subparsers) -> None:
    from .training.pipeline import DraftTrainingArguments

    parser = subparsers.add_parser("train", help="train a PRISM draft for a causal LM")
    _add_dataclass_arguments(parser, DraftTrainingArguments)
    parser.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from its checkpoints (same arguments)"
    )
    parser.set_defaults(handler=_run_train)


def _add_data_parser(subparsers) -> None:
    from .training.replies import ReplyDatasetArguments

    parser = subparsers.add_parser(
        "data",
        help="write a replies dataset: prompts answered by the target itself (resumable, incremental)",
        description="The target answers prompts (greedy and sampled) in length-sorted batches; shards of token ids "
        "and loss masks are written as gzipped JSON lines that `datasets` loads. Re-running continues an interrupted "
        "run, and a larger --num-prompts adds only the missing shards.",
    )
    _add_dataclass_arguments(parser, ReplyDatasetArguments)
    parser.set_defaults(handler=_run_data)


def _run_data(namespace: argparse.Namespace) -> None:
    from .training.replies import ReplyDatasetArguments, write_reply_dataset

    fields = {f.name for f in dataclasses.fields(ReplyDatasetArguments)}
    args = ReplyDatasetArguments(**{k: v for k, v in vars(namespace).items() if k in fields})
    paths = write_reply_dataset(args)
    print(json.dumps({"saved": args.output_dir, "shards": len(paths)}))


def _run_train(namespace: argparse.Namespace) -> None:
    from .training.pipeline import DraftTrainingArguments, train_draft

    fields = {f.name for f in dataclasses.fields(DraftTrainingArguments)}
    args = DraftTrainingArguments(**{k: v for k, v in vars(namespace).items() if k in fields})
    train_draft(args, resume=namespace.resume)
    # under `accelerate launch`, the process group is shut down before the interpreter exits: left to exit with it,
    # its threads can abort a process whose work is done ("terminate called without an active exception")
    from accelerate import PartialState

    PartialState().destroy_process_group()
    print(json.dumps({"saved": args.output_dir}))


def _add_bench_parser(subparsers) -> None:
    from .benchmarking import PROMPT_SETS, TARGET_QUANTIZATIONS
    from .configuration_prism import DRAFT_LENGTH_SCHEDULES

    parser = subparsers.add_parser(
        "bench",
        help="benchmark generation strategies side by side (Spec-Bench style)",
        description="Plain generate first, then each strategy, prompt by prompt (greedy, batch 1, after warm-up); "
        "writes results.json, results.md and results.png.",
    )
    parser.add_argument("--target", required=True, help="reference model name, local dir or Hub id")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="target dtype, drafts are cast to it (default auto: bfloat16 where the hardware runs it natively, else "
        "float32)",
    )
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument(
        "--target-quantization",
        choices=TARGET_QUANTIZATIONS,
        help="load the target with bitsandbytes (8-bit LLM.int8 or 4-bit NF4 computing in --dtype)",
    )
    parser.add_argument(
        "--target-device-map",
        metavar="MAP",
        help="dispatch the target with accelerate: auto, balanced, balanced_low_0, sequential, or a JSON object / "
        'file {module: device} ("disk" offloads)',
    )
    parser.add_argument(
        "--target-max-memory",
        nargs="+",
        metavar="DEVICE=SIZE",
        help="budgets for a --target-device-map strategy, e.g. cpu=200MB (the rest is offloaded to disk)",
    )
    parser.add_argument("--draft", action="append", default=[], metavar="NAME=DIR", help="a PRISM draft (repeat)")
    parser.add_argument("--assistant", metavar="MODEL", help="same-tokenizer model for HF assisted generation")
    parser.add_argument("--prompt-lookup", action="store_true", help="include HF prompt lookup (10 tokens, 2-gram)")
    parser.add_argument("--ouroboros", action="store_true", help="include Ouroboros (phrase pool alone)")
    parser.add_argument("--ouroboros-assistant", metavar="MODEL", help="include Ouroboros with this small model")
    parser.add_argument(
        "--ouroboros-prism",
        action="store_true",
        help="include Ouroboros with each --draft (the phrase pool leads, the PRISM draft fills the gaps)",
    )
    parser.add_argument(
        "--ouroboros-warm",
        action="store_true",
        help="also run each Ouroboros strategy with one phrase pool kept across prompts (warm start)",
    )
    parser.add_argument(
        "--ouroboros-variant",
        dest="ouroboros_variants",
        action="append",
        default=[],
        type=_ouroboros_options,
        metavar="OPTION=VALUE[,...]",
        help="also run Ouroboros with --ouroboros-assistant (each copy that runs) and, with --ouroboros-prism, each "
        "--draft, with these Ouroboros options, e.g. small_model_vocab=32768 or unchecked_min_key_length=3 (a "
        "num_draft_tokens or draft_length_schedule here replaces the run's; repeat for more runs)",
    )
    parser.add_argument(
        "--num-draft-tokens", type=int, help="initial draft length of PRISM drafts, --assistant and Ouroboros"
    )
    parser.add_argument(
        "--draft-length-schedule",
        choices=DRAFT_LENGTH_SCHEDULES,
        help="draft-length schedule of PRISM drafts, --assistant and Ouroboros (with this or --num-draft-tokens, HF "
        "assisted also runs at transformers' defaults)",
    )
    parser.add_argument(
        "--fast-cpu-linears",
        action="store_true",
        help="compute float32 CPU linear layers with prism_hf.enable_fast_cpu_linears, for every strategy and plain "
        "generate alike (cheap few-token forwards on x86 CPUs)",
    )
    parser.add_argument(
        "--small-model-int8",
        action="store_true",
        help="also run HF assisted generation and Ouroboros with an int8 copy of their small model "
        "(prism_hf.quantize_cpu_linears_int8), named ...-int8",
    )
    parser.add_argument(
        "--draft-int8",
        action="store_true",
        help="also run each --draft with an int8 draft-vocabulary LM head "
        "(prism_hf.quantize_cpu_linears_int8), named NAME-int8",
    )
    parser.add_argument(
        "--no-float-draft",
        dest="float_draft",
        action="store_false",
        help="with --draft-int8: run each --draft with the int8 LM head only",
    )
    parser.add_argument(
        "--draft-own-length",
        action="store_true",
        help="PRISM drafts draft as their configs say (length, schedule, confidence stop); --num-draft-tokens and "
        "--draft-length-schedule then set only --assistant and Ouroboros",
    )
    parser.add_argument(
        "--no-float-small-model",
        dest="float_small_model",
        action="store_false",
        help="with --small-model-int8: run HF assisted generation and Ouroboros with the int8 copies only",
    )
    parser.add_argument("--prompt-sets", nargs="+", choices=PROMPT_SETS, default=["spec_bench", "humaneval"])
    parser.add_argument("--categories", nargs="+", help="Spec-Bench tasks or MT-Bench categories (default: all)")
    size = parser.add_mutually_exclusive_group()
    quick_help = "2 per Spec-Bench task, 3 HumanEval, 64 new tokens (default)"
    size.add_argument("--quick", dest="mode", action="store_const", const="quick", help=quick_help)
    size.add_argument("--full", dest="mode", action="store_const", const="full", help="every prompt, 256 new tokens")
    size.add_argument("--mode", choices=["quick", "full"], help=argparse.SUPPRESS)
    parser.add_argument("--per-category", type=int, help="Spec-Bench prompts per task (overrides the mode)")
    parser.add_argument(
        "--limit", type=int, help="HumanEval / held-out ShareGPT / copy prompts, each (overrides the mode)"
    )
    parser.add_argument("--max-new-tokens", type=int, help="new tokens per prompt (overrides the mode)")
    parser.add_argument("--output-dir", help="default: benchmarks/results/<target name>/")
    parser.add_argument("--spec-bench-path", help="a Spec-Bench question.jsonl (default: shared/data/spec_bench)")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the warm-up calls")
    parser.add_argument(
        "--temperature",
        type=float,
        help="sample at this temperature (top-k and top-p off) instead of greedy decoding; outputs are then not "
        "compared with plain generate's (the test suite checks the distribution)",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed of the first prompt (prompt i: seed + i)")
    parser.set_defaults(handler=_run_bench, mode="quick")


def _ouroboros_options(text: str) -> dict[str, object]:
    """`small_model_vocab=32768,small_model_context=256` as keyword arguments of `prism_hf.Ouroboros` (JSON values)."""
    import inspect

    from .generation_ouroboros import Ouroboros

    allowed = set(inspect.signature(Ouroboros).parameters) - {"small_model", "pool"}
    options = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in allowed:
            raise argparse.ArgumentTypeError(
                f"{item!r} is not OPTION=VALUE with an Ouroboros option; options: {', '.join(sorted(allowed))}."
            )
        try:
            options[name.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[name.strip()] = value
    return options


def _run_bench(namespace: argparse.Namespace) -> None:
    from .benchmarking import BenchmarkConfig, markdown_table, parse_draft_spec, run_suite

    try:
        drafts = dict(parse_draft_spec(spec) for spec in namespace.draft)
    except ValueError as error:
        raise SystemExit(f"prism-hf bench: {error}") from None
    fields = {f.name for f in dataclasses.fields(BenchmarkConfig)} - {"drafts", "target_max_memory"}
    max_memory = None
    if namespace.target_max_memory:
        pairs = [spec.partition("=") for spec in namespace.target_max_memory]
        if any(not sep or not key or not value for key, sep, value in pairs):
            raise SystemExit("prism-hf bench: --target-max-memory takes DEVICE=SIZE pairs, e.g. cpu=200MB.")
        max_memory = {int(key) if key.isdigit() else key: value for key, _, value in pairs}
    config = BenchmarkConfig(
        drafts=drafts, target_max_memory=max_memory, **{k: v for k, v in vars(namespace).items() if k in fields}
    )
    results = run_suite(config)
    print(markdown_table(results["aggregates"]))
    print(json.dumps({"saved": config.resolved().output_dir}))


def _add_push_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "push",
        help="publish a draft folder, or a replies dataset, on the Hugging Face Hub",
        description="Validates the draft folder (config, safetensors weights, trust_remote_code files, model card), "
        "rewrites its model card from the recorded training and benchmark numbers, then uploads it with "
        "huggingface_hub. A replies dataset folder (`prism-hf data`) goes up as a dataset repository with a "
        "dataset card. The token comes from --token, HF_TOKEN or `hf auth login`; HF_ENDPOINT selects the Hub.",
    )
    parser.add_argument(
        "draft_dir", help="the draft folder (`prism-hf train` / save_pretrained) or replies dataset (`prism-hf data`)"
    )
    parser.add_argument("--repo-id", required=True, help="the Hub repository, org/name (created if missing)")
    parser.add_argument(
        "--dry-run", action="store_true", help="validate and refresh the card, print the upload, send nothing"
    )
    parser.add_argument(
        "--benchmark",
        dest="benchmark_results",
        metavar="RESULTS_JSON",
        help="a `prism-hf bench` results.json to record in the card",
    )
    parser.add_argument("--benchmark-strategy", help="this draft's strategy name in that run (default: found by path)")
    parser.add_argument("--base-model", help="the target's Hub id (default: from the draft config)")
    parser.add_argument("--license", default="apache-2.0")
    parser.add_argument(
        "--keep-card",
        dest="refresh_card",
        action="store_false",
        help="upload README.md as it is (after checking its metadata)",
    )
    parser.add_argument(
        "--refresh-code", action="store_true", help="replace stale code files with the installed prism_hf's"
    )
    parser.add_argument("--commit-message")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--revision", help="branch to commit to (default: main)")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or the saved login)")
    parser.add_argument("--endpoint", help="Hub endpoint (default: HF_ENDPOINT or https://huggingface.co)")
    parser.set_defaults(handler=_run_push)


def _run_push(namespace: argparse.Namespace) -> None:
    from .hub import push_draft, push_reply_dataset
    from .training.replies import is_reply_dataset

    kwargs = {k: v for k, v in vars(namespace).items() if k not in ("handler", "draft_dir", "repo_id")}
    push = push_draft
    if is_reply_dataset(namespace.draft_dir):
        given = [flag for key, (flag, default) in _DRAFT_ONLY_PUSH_OPTIONS.items() if kwargs.pop(key) != default]
        if given:
            raise SystemExit(f"prism-hf push: {', '.join(given)} apply to drafts, not to a replies dataset.")
        push = push_reply_dataset
    try:
        plan = push(namespace.draft_dir, namespace.repo_id, **kwargs)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"prism-hf push: {error}") from None
    if namespace.dry_run:
        print("dry run: nothing was sent. The upload would be:")
    print(plan.describe())
    if plan.commit_url:
        print(f"uploaded: {plan.commit_url}")


# `prism-hf push` options that only a draft takes: option name, flag and default
_DRAFT_ONLY_PUSH_OPTIONS = {
    "benchmark_results": ("--benchmark", None),
    "benchmark_strategy": ("--benchmark-strategy", None),
    "refresh_card": ("--keep-card", True),
    "refresh_code": ("--refresh-code", False),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prism-hf", description=__doc__)
    subparsers = parser.add_subparsers(required=True)
    _add_data_parser(subparsers)
    _add_train_parser(subparsers)
    _add_bench_parser(subparsers)
    _add_push_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    namespace = build_parser().parse_args(argv)
    namespace.handler(namespace)


if __name__ == "__main__":
    main()
