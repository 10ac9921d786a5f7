"""Reproduces the committed benchmark tables: `python benchmarks/run.py [smollm2 | qwen-1.5b]` (see README.md)."""

from __future__ import annotations

import sys
from pathlib import Path

from prism_hf.cli import main

REPO = Path(__file__).resolve().parents[1]
RUNS = {
    "smollm2": [
        "--target", "smollm2-135m-instruct",
        "--output-dir", str(REPO / "benchmarks/results/smollm2-135m-instruct"),
        "--draft", f"prism-m2={REPO / 'hub_models/SmolLM2-135M-Instruct-PRISM'}",
        "--prompt-lookup", "--per-category", "3", "--humaneval", "4", "--max-new-tokens", "96",
    ],
    "qwen-1.5b": [
        "--target", "qwen2.5-coder-1.5b-instruct",
        "--output-dir", str(REPO / "benchmarks/results/qwen2.5-coder-1.5b-instruct"),
        "--assistant", "qwen2.5-coder-0.5b-instruct",
        "--prompt-lookup", "--per-category", "3", "--humaneval", "4", "--max-new-tokens", "96",
    ],
}

if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "smollm2"
    if name not in RUNS:
        raise SystemExit(f"unknown run {name!r}; choose from {sorted(RUNS)}")
    main(["bench", *RUNS[name], *sys.argv[2:]])
