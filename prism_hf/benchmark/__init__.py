"""Spec-Bench-style benchmarking: strategies side by side on one target, interleaved, with exactness checks."""

from .report import summarize, write_results
from .runner import BenchPrompt, RunRecord, Strategy, run_benchmark

__all__ = ["BenchPrompt", "RunRecord", "Strategy", "run_benchmark", "summarize", "write_results"]
