"""
How the cost of one forward grows with the number of new tokens it processes (on a cached context), the quantity that
decides whether drafting several tokens per small-model or target forward can pay on a machine.

`python benchmarks/forward_cost.py --model qwen2.5-coder-0.5b-instruct` writes
`benchmarks/results/forward-cost-<model>.json`: median seconds per forward and the ratio to a one-token forward.
`--fast-cpu-linears` measures the stock linear layers and `prism_hf.enable_fast_cpu_linears` side by side in one
process, alternating in ABBA order for every forward, so that their ratios compare on equal terms (file
`...-fast-linears.json`, both modes); `--int8` measures `prism_hf.quantize_cpu_linears_int8`, as a small drafting
model would run (file `...-int8.json`). `--compare-attention` measures instead transformers' default attention, which
repeats the key/value heads per query head whenever a mask is present (every forward over several new tokens on a
cache), against `prism_hf.grouped_query_attention_on_cpu`, alternating in the same way, with the linear layers
`--fast-cpu-linears` chooses (file `...-attention-<context>.json`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import DynamicCache

from prism_hf import (
    disable_fast_cpu_linears,
    enable_fast_cpu_linears,
    grouped_query_attention_on_cpu,
    quantize_cpu_linears_int8,
)
from prism_hf.benchmarking.report import describe_machine, machine_metadata
from prism_hf.reference_models import load_reference_model

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="reference model name or directory")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--context", type=int, default=300, help="tokens already in the cache")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 8, 16, 24], help="new tokens per forward")
    parser.add_argument("--repeats", type=int, default=6, help="forwards per size (the first is discarded)")
    parser.add_argument("--fast-cpu-linears", action="store_true", help="switch to prism_hf.FastCpuLinear layers")
    parser.add_argument("--int8", action="store_true", help="quantize the linear layers to int8 (drafting models)")
    parser.add_argument(
        "--compare-attention",
        action="store_true",
        help="repeated key/value heads (transformers' default with a mask) against grouped_query_attention_on_cpu",
    )
    parser.add_argument("--output", type=Path, help="results file (default: under benchmarks/results)")
    args = parser.parse_args(argv)
    print(f"Machine: {describe_machine()}", flush=True)
    if args.int8 and args.fast_cpu_linears:
        parser.error("--int8 replaces every float32 linear layer: it cannot be combined with --fast-cpu-linears.")
    if args.compare_attention and args.int8:
        parser.error("--compare-attention measures float32 targets: it cannot be combined with --int8.")

    model, _ = load_reference_model(args.model, dtype=getattr(torch, args.dtype))
    # each mode is a switch applied before its forwards; stock and fast linears swap back and forth on one model
    modes = {"stock": disable_fast_cpu_linears}
    if args.fast_cpu_linears:
        enable_fast_cpu_linears(model)  # routing is measured (or read from its cache) once, before any timing
        modes["fast"] = enable_fast_cpu_linears
    if args.int8:
        quantize_cpu_linears_int8(model)
        modes = {"int8": lambda model: None}
    if args.compare_attention:
        os.environ.pop("TRANSFORMERS_SDPA_FORCE_GQA", None)  # transformers' default outside the grouped block
        modes = {"repeated_heads": lambda model: None, "grouped_heads": lambda model: None}
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    context = torch.randint(100, vocab, (1, args.context), generator=generator)
    seconds: dict[str, dict[int, float]] = {mode: {} for mode in modes}
    with torch.no_grad():
        for k in args.tokens:
            times: dict[str, list[float]] = {mode: [] for mode in modes}
            for repeat in range(args.repeats):
                new = torch.randint(100, vocab, (1, k), generator=generator)
                order = list(modes.items())
                for mode, switch in order if repeat % 2 == 0 else order[::-1]:  # ABBA
                    switch(model)
                    cache = DynamicCache(config=model.config)
                    model(input_ids=context, cache=cache, use_cache=True)
                    with grouped_query_attention_on_cpu("cpu") if mode == "grouped_heads" else nullcontext():
                        began = time.perf_counter()
                        model(input_ids=new, cache=cache, use_cache=True, logits_to_keep=k)
                        times[mode].append(time.perf_counter() - began)
            for mode in modes:
                seconds[mode][k] = statistics.median(times[mode][1:])

    def table(mode_seconds: dict[int, float]) -> dict[str, dict[str, float]]:
        one = mode_seconds.get(1)
        return {
            str(k): {"seconds": round(s, 4), **({"ratio_to_one_token": round(s / one, 2)} if one else {})}
            for k, s in mode_seconds.items()
        }

    result = {
        "model": args.model,
        "dtype": args.dtype,
        "context_tokens": args.context,
        "fast_cpu_linears": args.fast_cpu_linears,
        "int8": args.int8,
        "attention": "repeated and grouped key/value heads" if args.compare_attention else "transformers' default",
        "machine": machine_metadata("cpu"),
        "forwards": {mode: table(mode_seconds) for mode, mode_seconds in seconds.items()},
    }
    if args.compare_attention:
        result["repeated_over_grouped"] = {
            str(k): round(seconds["repeated_heads"][k] / seconds["grouped_heads"][k], 3)
            for k in seconds["grouped_heads"]
        }
    elif args.fast_cpu_linears and 1 in seconds["stock"]:
        result["stock_over_fast"] = {
            str(k): round(seconds["stock"][k] / seconds["fast"][k], 3) for k in seconds["stock"]
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "-fast-linears" if args.fast_cpu_linears else "-int8" if args.int8 else ""
    suffix += f"-attention-{args.context}" if args.compare_attention else ""
    out = RESULTS / f"forward-cost-{Path(args.model).name.lower()}{suffix}.json"
    out = args.output or out
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["forwards"], indent=2))
    return result


if __name__ == "__main__":
    main()
