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
# The committed tables (float32: measured on an AVX2-only CPU, where bfloat16 is ~100x slower).
PRESETS = {
    "smollm2": [
        "--target", "smollm2-135m-instruct", "--dtype", "float32",
        "--draft", f"prism-m2={REPO / 'hub_models' / 'SmolLM2-135M-Instruct-PRISM'}",
        "--draft", f"prism-m1-baseline={REPO / 'benchmarks' / 'drafts' / 'SmolLM2-135M-Instruct-M1-baseline'}",
        "--prompt-lookup", "--ouroboros", "--ouroboros-prism", "--ouroboros-warm",
        "--per-category", "2", "--limit", "3", "--max-new-tokens", "64",
        "--output-dir", str(RESULTS / "smollm2-135m-instruct"),
    ],
    "qwen-1.5b": [
        "--target", "qwen2.5-coder-1.5b-instruct", "--dtype", "float32",
        "--draft", f"prism-m2={REPO / 'hub_models' / 'Qwen2.5-Coder-1.5B-Instruct-PRISM'}",
        "--draft", f"prism-m1-baseline={REPO / 'benchmarks' / 'drafts' / 'Qwen2.5-Coder-1.5B-Instruct-M1-baseline'}",
        "--assistant", "qwen2.5-coder-0.5b-instruct",
        "--ouroboros", "--ouroboros-assistant", "qwen2.5-coder-0.5b-instruct", "--ouroboros-warm",
        "--prompt-lookup", "--per-category", "1", "--limit", "4", "--max-new-tokens", "48",
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
