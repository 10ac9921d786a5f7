"""Aggregates benchmark records per strategy and category, and writes results.json, results.md and results.png."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import transformers

from ..cpu_linear import _few_rows_kernel_loaded, cpu_isa_flags, cpu_model_name
from .runner import RunRecord
from .strategies import PLAIN

ALL = "all"
AGGREGATE_KEYS = (
    "prompts",
    "completed",
    "new_tokens",
    "seconds",
    "tokens_per_second_median",
    "speedup",
    "speedup_median",
    "tau_mean",
    "draft_share_mean",
    "peak_memory_mb",
    "identical",
    "sampled",
    "failures",
)
RecordLike = RunRecord | dict[str, Any]


def _seconds_per_token(seconds: float, new_tokens: int) -> float:
    return seconds / max(1, new_tokens)  # a call that wrote nothing measures its overhead alone


def _aggregate(group: list[RunRecord], plain: dict[str, RunRecord]) -> dict[str, Any]:
    done = [r for r in group if r.ok and r.prompt_id in plain]
    strategy_seconds = sum(r.seconds for r in done)
    # Speedups compare time per new token: sampled outputs differ in length from plain generate's (a reply that
    # stops early is not a faster one); for outputs identical to plain greedy output it is the plain time ratio.
    plain_seconds = sum(plain[r.prompt_id].seconds for r in done)
    plain_tokens = sum(plain[r.prompt_id].new_tokens for r in done)
    strategy_tokens = sum(r.new_tokens for r in done)
    failures = [
        {"prompt_id": r.prompt_id, "reason": r.error or f"differs from plain from new token {r.first_difference}"}
        for r in group
        if r.error or not (r.identical or r.sampled)
    ]
    return {
        "prompts": len(group),
        "completed": len(done),
        "new_tokens": strategy_tokens,
        "seconds": strategy_seconds,
        "tokens_per_second_median": statistics.median(r.tokens_per_second for r in done) if done else None,
        # Totals over totals weigh prompts by their length, as a user waiting for all of them would.
        "speedup": _seconds_per_token(plain_seconds, plain_tokens)
        / _seconds_per_token(strategy_seconds, strategy_tokens)
        if strategy_seconds
        else None,
        "speedup_median": statistics.median(
            _seconds_per_token(plain[r.prompt_id].seconds, plain[r.prompt_id].new_tokens)
            / _seconds_per_token(r.seconds, r.new_tokens)
            for r in done
        )
        if done
        else None,
        "tau_mean": statistics.fmean(r.tau for r in done) if done else None,
        "draft_share_mean": statistics.fmean(r.draft_share for r in done) if done else None,
        "peak_memory_mb": max((r.peak_memory_mb for r in done), default=None),
        "identical": sum(r.identical for r in group),
        "sampled": any(r.sampled for r in group),  # outputs drawn by sampling: `identical` does not apply
        "failures": failures,
    }


def summarize(records: Sequence[RecordLike]) -> dict[str, dict[str, dict[str, Any]]]:
    """
    `{strategy: {category: aggregate}}` with an `"all"` category, strategies in run order (plain first).

    Speedups compare each strategy's time per new token with plain generate's on the same prompts only (a failed call
    drops its prompt).
    """
    records = [r if isinstance(r, RunRecord) else RunRecord.from_dict(r) for r in records]
    plain = {r.prompt_id: r for r in records if r.strategy == PLAIN and r.ok}
    groups: dict[str, dict[str, list[RunRecord]]] = {}
    for record in records:
        categories = groups.setdefault(record.strategy, {})
        categories.setdefault(record.category, []).append(record)
    summary = {}
    for strategy, categories in groups.items():
        everything = [r for group in categories.values() for r in group]
        summary[strategy] = {c: _aggregate(g, plain) for c, g in (*categories.items(), (ALL, everything))}
    return summary


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def _identical_cell(aggregate: dict[str, Any]) -> str:
    if aggregate.get("sampled"):
        return "sampled"
    return f"{aggregate['identical']}/{aggregate['prompts']}"


def markdown_table(summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    """
    One row per strategy and category. `speedup` is plain generate's seconds per new token over the strategy's, totals
    over the same prompts (the total time ratio when outputs are identical); `per-prompt median` the median of the
    prompts' own ratios, which one call slowed by the machine moves far less. The `identical` column counts outputs
    equal to plain greedy output (`sampled` under sampling, where it does not apply).
    """
    lines = [
        "| strategy | category | tok/s (median) | speedup | per-prompt median | tau | draft share | peak MB "
        "| identical |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for strategy, categories in summary.items():
        for category, s in categories.items():
            lines.append(
                f"| {strategy} | {category} | {_fmt(s['tokens_per_second_median'], '.1f')} | "
                f"{_fmt(s['speedup'], '.2f', 'x')} | {_fmt(s['speedup_median'], '.2f', 'x')} | "
                f"{_fmt(s['tau_mean'], '.2f')} | "
                f"{_fmt(s['draft_share_mean'], '.0%')} | {_fmt(s['peak_memory_mb'], '.0f')} | "
                f"{_identical_cell(s)} |"
            )
    return "\n".join(lines) + "\n"


def failures_markdown(summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Every prompt whose output differs from plain greedy output, or whose call failed, by strategy."""
    lines = []
    for strategy, categories in summary.items():
        for failure in categories[ALL]["failures"]:
            lines.append(f"- {strategy} / {failure['prompt_id']}: {failure['reason']}")
    if lines:
        return "\n".join(lines) + "\n"
    if any(categories[ALL].get("sampled") for categories in summary.values()):
        return "None: no call failed (sampled outputs are not compared).\n"
    return "None: every output is identical to plain greedy output.\n"


def machine_metadata(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Where the numbers were measured: they mean little without the machine and library versions."""
    device = torch.device(device)
    from .. import __version__ as prism_hf_version

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model_name(),
        # e.g. AVX2 vs AVX512/AMX: decides whether bfloat16 is fast or ~100x slower than float32 on a CPU
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_isa": cpu_isa_flags(),  # avx2 / avx512f / avx512_bf16 / amx_bf16...: which kernels can win here
        # FastCpuLinear's few-row kernel, when fast linears are on (else torch.mm: plain decoding ~1.3x slower)
        "few_rows_kernel": _few_rows_kernel_loaded(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "prism_hf": prism_hf_version,
        # which code measured: a results folder is committed later than the code it measured, often many commits on
        "prism_hf_commit": _source_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def describe_machine() -> str:
    """One line naming the processor, its ISA extensions and the torch threads: printed before CPU numbers."""
    flags = " ".join(cpu_isa_flags()) or "ISA flags unknown"
    return (
        f"{cpu_model_name()} ({torch.backends.cpu.get_cpu_capability()}; {flags}), "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}"
    )


def _source_commit() -> str | None:
    """
    The git commit of the prism_hf source checkout, with "+changes" when its tracked files differ from it; None for
    an installed (non-editable) package or without git.
    """
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:
            return None  # the package sits inside some other repository (an environment under version control)
        commit = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+changes" if changed else "")


def plot_results(summary: dict[str, dict[str, dict[str, Any]]], path: str | os.PathLike) -> None:
    """Grouped bars per category: speedup over plain generate (left) and tau (right), one bar per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = [s for s in summary if s != PLAIN] or list(summary)
    categories = [c for c in dict.fromkeys(c for s in strategies for c in summary[s]) if c != ALL] + [ALL]
    figure, axes = plt.subplots(1, 2, figsize=(max(10.0, 1.4 * len(categories) + 2), 4.2))
    width = 0.8 / len(strategies)
    offsets = [x + width * (len(strategies) - 1) / 2 for x in range(len(categories))]
    for axis, metric, title in ((axes[0], "speedup", "speedup over plain generate"), (axes[1], "tau_mean", "tau")):
        for i, strategy in enumerate(strategies):
            values = [summary[strategy].get(c, {}).get(metric) or 0.0 for c in categories]
            axis.bar([x + i * width for x in range(len(categories))], values, width, label=strategy)
        axis.axhline(1.0, color="gray", linewidth=0.8)
        axis.set_xticks(offsets)
        axis.set_xticklabels(categories, rotation=30, ha="right")
        axis.set_title(title)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_results(
    output_dir: str | os.PathLike, records: Sequence[RunRecord], metadata: dict[str, Any]
) -> dict[str, Any]:
    """
    Writes `results.json` (metadata, aggregates, every per-prompt record), `results.md` and `results.png` into
    `output_dir`; returns what `results.json` holds.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(records)
    payload = {"metadata": metadata, "aggregates": summary, "records": [r.to_dict() for r in records]}
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    header = "\n".join(
        f"- {key}: {value if isinstance(value, str) else json.dumps(value)}" for key, value in metadata.items()
    )
    (out / "results.md").write_text(
        f"# Benchmark results\n\n{header}\n\n{markdown_table(summary)}\n## Outputs not identical to plain greedy\n\n"
        f"{failures_markdown(summary)}"
    )
    plot_results(summary, out / "results.png")
    return payload
