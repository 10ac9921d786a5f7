"""Aggregates benchmark records and writes results.json, results.md and results.png."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .runner import PLAIN, RunRecord

ALL = "all"


def summarize(records: list[RunRecord]) -> dict[str, dict[str, dict[str, Any]]]:
    """
    Per strategy and category (plus "all"): median tokens/s, speedup (total plain time over total strategy time
    on the same prompts, and the median of per-prompt ratios), mean tau, mean draft share, peak memory, and which
    outputs differ from plain greedy output.
    """
    plain_seconds = {r.prompt_id: r.seconds for r in records if r.strategy == PLAIN}
    groups: dict[tuple[str, str], list[RunRecord]] = defaultdict(list)
    for record in records:
        groups[(record.strategy, record.category)].append(record)
        groups[(record.strategy, ALL)].append(record)
    summary: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for (strategy, category), group in sorted(groups.items()):
        summary[strategy][category] = {
            "prompts": len(group),
            "new_tokens": sum(r.new_tokens for r in group),
            "tokens_per_second_median": statistics.median(r.tokens_per_second for r in group),
            "speedup": sum(plain_seconds[r.prompt_id] for r in group) / sum(r.seconds for r in group),
            "speedup_median": statistics.median(plain_seconds[r.prompt_id] / r.seconds for r in group),
            "tau_mean": statistics.fmean(r.tau for r in group),
            "draft_share_mean": statistics.fmean(r.draft_share for r in group),
            "peak_memory_mb": max(r.peak_memory_mb for r in group),
            "identical": sum(r.identical for r in group),
            "different_prompt_ids": [r.prompt_id for r in group if not r.identical],
        }
    return dict(summary)


def markdown_table(summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = [
        "| strategy | category | tok/s (median) | speedup | tau | draft share | peak MB | identical to plain |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for strategy, categories in summary.items():
        for category, s in categories.items():
            lines.append(
                f"| {strategy} | {category} | {s['tokens_per_second_median']:.1f} | {s['speedup']:.2f}x | "
                f"{s['tau_mean']:.2f} | {s['draft_share_mean']:.0%} | {s['peak_memory_mb']:.0f} | "
                f"{s['identical']}/{s['prompts']} |"
            )
    return "\n".join(lines) + "\n"


def _chart(summary: dict[str, dict[str, dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = [s for s in summary if s != PLAIN]
    categories = sorted({c for s in strategies for c in summary[s]} - {ALL}) + [ALL]
    figure, axes = plt.subplots(1, 2, figsize=(max(10.0, 1.6 * len(categories)), 4))
    width = 0.8 / max(1, len(strategies))
    for metric, axis, title in (("speedup", axes[0], "speedup over plain generate"), ("tau_mean", axes[1], "tau")):
        for i, strategy in enumerate(strategies):
            values = [summary[strategy].get(c, {}).get(metric, 0.0) for c in categories]
            axis.bar([x + i * width for x in range(len(categories))], values, width, label=strategy)
        axis.axhline(1.0, color="gray", linewidth=0.8)
        axis.set_xticks([x + width * (len(strategies) - 1) / 2 for x in range(len(categories))])
        axis.set_xticklabels(categories, rotation=30, ha="right")
        axis.set_title(title)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_results(
    output_dir: str | Path, records: list[RunRecord], metadata: dict[str, Any]
) -> dict[str, dict[str, dict[str, Any]]]:
    """Writes the raw records, the summary and the metadata; returns the summary."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(records)
    payload = {
        "metadata": metadata,
        "summary": summary,
        "records": [asdict(r) | {"tau": r.tau, "tokens_per_second": r.tokens_per_second} for r in records],
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    header = "\n".join(f"- {key}: {value}" for key, value in metadata.items())
    (out / "results.md").write_text(f"{header}\n\n{markdown_table(summary)}")
    _chart(summary, out / "results.png")
    return summary
