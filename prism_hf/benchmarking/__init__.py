"""
Spec-Bench-style benchmarking: generation strategies side by side on one target, interleaved, with exactness checks.

`run_suite(BenchmarkConfig(...))` is what `prism-hf bench` runs; `run_benchmark` + `write_results` measure any
strategies (any `generate` keyword arguments, any `assistant_model`) on a target you built yourself.
"""

from .prompts import PROMPT_SETS, BenchPrompt, encode_prompt, load_prompt_sets, load_prompts
from .report import markdown_table, summarize, write_results
from .runner import RunRecord, run_benchmark
from .strategies import (
    PLAIN,
    Strategy,
    assistant_strategy,
    hf_assisted_strategy,
    load_small_model,
    ouroboros_strategy,
    parse_draft_spec,
    plain_strategy,
    prism_strategy,
    prompt_lookup_strategy,
)
from .suite import MODES, TARGET_QUANTIZATIONS, BenchmarkConfig, run_suite, target_quantization_config

__all__ = [
    "MODES",
    "PLAIN",
    "PROMPT_SETS",
    "TARGET_QUANTIZATIONS",
    "BenchPrompt",
    "BenchmarkConfig",
    "RunRecord",
    "Strategy",
    "assistant_strategy",
    "encode_prompt",
    "hf_assisted_strategy",
    "load_prompt_sets",
    "load_prompts",
    "load_small_model",
    "markdown_table",
    "ouroboros_strategy",
    "parse_draft_spec",
    "plain_strategy",
    "prism_strategy",
    "prompt_lookup_strategy",
    "run_benchmark",
    "run_suite",
    "summarize",
    "target_quantization_config",
    "write_results",
]
