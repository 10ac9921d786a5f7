"""
Runs the benchmark harness: `python benchmarks/run.py PRESET [flags]` or `python benchmarks/run.py [flags]`.

Flags are those of `prism-hf bench` (see `--help`); flags after a preset add to or override it (the last wins), e.g.
`python benchmarks/run.py smollm2 --draft prism-m1=path/to/m1-baseline --full`. See benchmarks/README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

from prism_hf.cli import main

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
# The committed tables: 3 prompts per Spec-Bench task + 4 HumanEval, 96 new tokens.
PRESETS = {
    "smollm2": [
        "--target", "smollm2-135m-instruct",
        "--draft", f"prism-m2={REPO / 'hub_models' / 'SmolLM2-135M-Instruct-PRISM'}",
        "--prompt-lookup", "--per-category", "3", "--limit", "4", "--max-new-tokens", "96",
        "--output-dir", str(RESULTS / "smollm2-135m-instruct"),
    ],
    "qwen-1.5b": [
        "--target", "qwen2.5-coder-1.5b-instruct",
        "--assistant", "qwen2.5-coder-0.5b-instruct",
        "--prompt-lookup", "--per-category", "3", "--limit", "4", "--max-new-tokens", "96",
        "--output-dir", str(RESULTS / "qwen2.5-coder-1.5b-instruct"),
    ],
}  # fmt: skip

if __name__ == "__main__":
    args = sys.argv[1:]
    if args and not args[0].startswith("-"):
        if args[0] not in PRESETS:
            raise SystemExit(f"Unknown preset {args[0]!r}; choose from {sorted(PRESETS)} or pass bench flags.")
        args = PRESETS[args[0]] + args[1:]
    main(["bench", *args])
