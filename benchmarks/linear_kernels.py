"""
Which float32 CPU kernel computes a linear layer over few rows fastest, and whether its rows round the same whatever
the row count (speculative decoding verifies k rows where plain decoding computes one: a kernel whose row results
depend on the row count flips near-ties, as bfloat16 does).

`python benchmarks/linear_kernels.py` times, for the Qwen2.5-Coder-1.5B layer shapes (random weights), median
milliseconds per product for 1..32 rows and a 512-row prefill with:
- `F.linear` (stock torch: MKL on x86),
- `FastCpuLinear` (`prism_hf.enable_fast_cpu_linears`: the compiled few-row kernel for up to 32 rows where it can be
  built, see `prism_hf/cpu_linear.py`),
- its fallback without the kernel, `weight @ x.T` on rows padded to a power of two (at least 2),
- oneDNN's `torch.ops.mkldnn._linear_pointwise` over the same dense weight, as is and with one row padded to two,
and checks, per row count k, whether each row of a k-row product equals bit for bit that row computed alone (what
greedy verification of k - 1 draft tokens needs to match one-token decoding exactly). With `--model NAME` it also
compares, for that whole model with stock and with fast linears, the logits of 6 tokens verified in one forward with
those of the same tokens decoded one by one. Writes `benchmarks/results/linear-kernels.json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache

from prism_hf.benchmarking.report import machine_metadata
from prism_hf.cpu_linear import FastCpuLinear, enable_fast_cpu_linears, padded_mm_linear
from prism_hf.reference_models import load_reference_model

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {"mlp_up": (8960, 1536), "mlp_down": (1536, 8960), "attn_out": (1536, 1536), "kv_proj": (256, 1536)}


def _onednn(weight: torch.Tensor, min_rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def linear(x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if rows < min_rows:
            x = torch.cat([x, x.new_zeros(min_rows - rows, x.shape[1])])
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")[:rows]

    return linear


def kernels(weight: torch.Tensor) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    fast = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    fast.weight = nn.Parameter(weight, requires_grad=False)
    fast.__class__ = FastCpuLinear
    return {
        "F.linear": lambda x: nn.functional.linear(x, weight),
        "FastCpuLinear": fast,
        "torch.mm on padded rows (fallback)": lambda x: padded_mm_linear(x, weight),
        "onednn": _onednn(weight, 1),
        "onednn, 1 row padded to 2": _onednn(weight, 2),
    }


def median_ms(function: Callable[[], torch.Tensor], repeats: int) -> float:
    function()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        function()
        times.append(time.perf_counter() - began)
    return round(statistics.median(times) * 1e3, 3)


def verification_against_decoding(model: nn.Module, context: int = 200, tokens: int = 6) -> dict[str, object]:
    """Logits of `tokens` new tokens in one forward vs one forward each, after the same cached random context."""
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.get_text_config().vocab_size
    prompt = torch.randint(100, vocab, (1, context), generator=generator)
    new = torch.randint(100, vocab, (1, tokens), generator=generator)

    def cached() -> DynamicCache:
        cache = DynamicCache(config=model.config)
        model(input_ids=prompt, cache=cache)
        return cache

    with torch.no_grad():
        cache = cached()
        one_by_one = torch.cat([model(input_ids=new[:, i : i + 1], cache=cache).logits[0] for i in range(tokens)])
        together = model(input_ids=new, cache=cached()).logits[0]
    return {
        "rows_bit_identical": int(sum(torch.equal(a, b) for a, b in zip(one_by_one, together, strict=True))),
        "rows": tokens,
        "max_abs_logit_difference": float((one_by_one - together).abs().max()),
        "same_argmax": bool((one_by_one.argmax(-1) == together.argmax(-1)).all()),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 512])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--model", help="also compare verification with one-token decoding on this reference model")
    args = parser.parse_args(argv)
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        parser.error("this torch build has no oneDNN linear (torch.ops.mkldnn._linear_pointwise).")
    generator = torch.Generator().manual_seed(0)
    timings: dict[str, dict[str, dict[str, float]]] = {}
    row_invariant: dict[str, dict[str, dict[str, bool]]] = {}
    with torch.no_grad():
        for shape_name, (out_features, in_features) in SHAPES.items():
            weight = torch.randn(out_features, in_features, generator=generator)
            x = torch.randn(max(args.rows), in_features, generator=generator)
            timings[shape_name] = {}
            row_invariant[shape_name] = {}
            for kernel_name, linear in kernels(weight).items():
                timings[shape_name][kernel_name] = {
                    str(k): median_ms(lambda k=k, linear=linear, x=x: linear(x[:k]), args.repeats) for k in args.rows
                }
                alone = torch.cat([linear(x[i : i + 1]) for i in range(32)])
                row_invariant[shape_name][kernel_name] = {
                    str(k): all(torch.equal(linear(x[s : s + k]), alone[s : s + k]) for s in (0, 32 - k))
                    for k in (2, 3, 4, 5, 6, 8, 16, 32)
                }
                same = [k for k, equal in row_invariant[shape_name][kernel_name].items() if equal]
                print(shape_name, kernel_name, timings[shape_name][kernel_name], "rows equal to one-row:", same)
    whole_model = {}
    if args.model:
        model, _ = load_reference_model(args.model, dtype=torch.float32)
        whole_model["model"] = args.model
        whole_model["stock"] = verification_against_decoding(model)
        enable_fast_cpu_linears(model)
        whole_model["fast_cpu_linears"] = verification_against_decoding(model)
        print(json.dumps(whole_model))
    result = {
        "shapes": {name: list(shape) for name, shape in SHAPES.items()},
        "machine": machine_metadata("cpu"),
        "median_ms": timings,
        "rows_equal_to_one_row_products": row_invariant,
        "whole_model_verification_vs_decoding": whole_model or None,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "linear-kernels.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
