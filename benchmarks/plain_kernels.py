"""
Plain greedy `generate` with stock linear layers vs `prism_hf.enable_fast_cpu_linears`, interleaved on the same
prompts: does the kernel change plain decoding, and do the outputs stay identical?

`python benchmarks/plain_kernels.py --model smollm2-135m-instruct` writes
`benchmarks/results/plain-kernels-<model>.json`: per prompt, the seconds of every call (each mode runs `--rounds`
times, alternating in ABBA order) and whether the outputs agree; in all, the summed median seconds of each mode and
their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from prism_hf import disable_fast_cpu_linears, enable_fast_cpu_linears
from prism_hf.benchmarking.prompts import encode_prompt, load_prompt_sets
from prism_hf.benchmarking.report import describe_machine, machine_metadata
from prism_hf.reference_models import load_reference_model

RESULTS = Path(__file__).resolve().parent / "results"
SWITCHES = {"stock": disable_fast_cpu_linears, "fast": enable_fast_cpu_linears}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="reference model name or directory")
    parser.add_argument("--categories", nargs="+", help="Spec-Bench tasks (default: all)")
    parser.add_argument("--per-category", type=int, default=1, help="Spec-Bench prompts per task")
    parser.add_argument("--limit", type=int, default=2, help="HumanEval prompts")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4, help="calls per mode and prompt")
    parser.add_argument("--spec-bench-path", help="a Spec-Bench question.jsonl (default: shared/data/spec_bench)")
    parser.add_argument("--output", type=Path, help="results file (default: under benchmarks/results)")
    args = parser.parse_args(argv)
    print(f"Machine: {describe_machine()}", flush=True)

    model, tokenizer = load_reference_model(args.model, dtype=torch.float32)
    prompt_sets = load_prompt_sets(
        ["spec_bench", "humaneval"], args.categories, args.per_category, args.limit, args.spec_bench_path
    )
    records = []
    for prompt in (p for group in prompt_sets.values() for p in group):
        input_ids = encode_prompt(tokenizer, prompt).input_ids[None]
        seconds, outputs = {mode: [] for mode in SWITCHES}, {}
        for round_index in range(args.rounds):
            # ABBA order: whichever mode runs second in a pair may pay for the first (allocator, clock), so each
            # mode runs first in every other round
            order = list(SWITCHES.items())
            for mode, switch in order if round_index % 2 == 0 else order[::-1]:
                switch(model)
                began = time.perf_counter()
                outputs[mode] = model.generate(input_ids, do_sample=False, max_new_tokens=args.max_new_tokens)
                seconds[mode].append(round(time.perf_counter() - began, 3))
        identical = torch.equal(outputs["stock"], outputs["fast"])
        records.append({"id": prompt.id, "category": prompt.category, "prompt_tokens": input_ids.shape[1]})
        records[-1].update(seconds=seconds, identical=identical)
        print(json.dumps(records[-1]), flush=True)
    totals = {mode: round(sum(statistics.median(r["seconds"][mode]) for r in records), 2) for mode in SWITCHES}
    result = {
        "model": args.model,
        "dtype": "float32",
        "max_new_tokens": args.max_new_tokens,
        "machine": machine_metadata("cpu"),
        "total_median_seconds": totals,
        "stock_over_fast": round(totals["stock"] / totals["fast"], 3),
        "identical": sum(r["identical"] for r in records),
        "prompts": len(records),
        "records": records,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"plain-kernels-{Path(args.model).name.lower()}.json"
    out = args.output or out
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("total_median_seconds", "stock_over_fast", "identical", "prompts")}))
    return result


if __name__ == "__main__":
    main()
