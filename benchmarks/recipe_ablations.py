"""
Draft training recipes compared on held-out numbers: each variant trains on the same replies dataset and token
budget and is scored on the dataset's held-out conversations (per-step acceptance, predicted tau at draft lengths
1-5, vocabulary coverage).

`python benchmarks/recipe_ablations.py --data DIR --target smollm2-135m-instruct --max-train-tokens 200000` trains
every variant in `VARIANTS` (or those named with `--variants`) and writes `results.json` and `results.md` into
`--output-dir`. A variant already in `results.json` is skipped, so an interrupted run continues; features are
computed once into `--feature-cache-dir` and shared by all variants with the same feature layers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from prism_hf.benchmarking.report import machine_metadata
from prism_hf.training.pipeline import DraftTrainingArguments, train_draft

RESULTS = Path(__file__).resolve().parent / "results"

# The recipe the pipeline had before held-out evaluation existed (the committed drafts were trained with it).
TODAY = dict(
    warmup_learning_rate=1e-3,
    finetune_learning_rate=3e-4,
    warmup_epochs=2.0,
    finetune_epochs=1.0,
    batch_size=4,
    num_steps=3,
    draft_vocab_size=8192,
)
# Each variant changes the candidate recipe in one respect (the candidate is `base`).
BASE = dict(TODAY, draft_vocab_size=32768)
VARIANTS: dict[str, dict] = {
    "today": TODAY,
    "base": BASE,
    "vocab-16k": dict(BASE, draft_vocab_size=16384),
    "feature-noise-0.2": dict(BASE, feature_noise=0.2),
    "weight-decay-0.01": dict(BASE, weight_decay=0.01),
    "init-from-target": dict(BASE, init_from_target=True),
    "steps-5": dict(BASE, num_steps=5),
    "lr-3e-3": dict(BASE, warmup_learning_rate=3e-3, finetune_learning_rate=1e-3),
    "lr-3e-4": dict(BASE, warmup_learning_rate=3e-4, finetune_learning_rate=1e-4),
    "fused-low-mid-high": dict(BASE, feature_layers=[3, 16, 28]),
    "m1": dict(BASE, num_modules=1),
}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a replies dataset folder (prism-hf data)")
    parser.add_argument("--target", required=True)
    parser.add_argument("--max-train-tokens", type=int, required=True)
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--output-dir", type=Path)
    parser.add_argument("--feature-cache-dir", type=Path)
    parser.add_argument("--drafts-dir", type=Path, help="where the trained drafts go (default: a temporary folder)")
    parser.add_argument("--target-dtype", default="float32")
    parser.add_argument("--mixed-precision", default="no", help="'bf16' autocasts training matmuls")
    parser.add_argument("--eval-every", type=int, default=0)
    args = parser.parse_args(argv)
    output = args.output_dir or RESULTS / f"{Path(args.target).name}-recipe-ablations"
    output.mkdir(parents=True, exist_ok=True)
    results_path = output / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"runs": []}
    done = {run["variant"] for run in results["runs"]}
    drafts = args.drafts_dir or Path("/tmp") / f"prism-hf-ablations-{Path(args.target).name}"
    for name in args.variants:
        if name in done:
            print(f"{name}: already measured")
            continue
        overrides = VARIANTS[name]
        training = DraftTrainingArguments(
            target=args.target,
            output_dir=str(drafts / name),
            data=args.data,
            max_train_tokens=args.max_train_tokens,
            target_dtype=args.target_dtype,
            mixed_precision=args.mixed_precision,
            eval_every=args.eval_every,
            feature_cache_dir=str(args.feature_cache_dir) if args.feature_cache_dir else None,
            **overrides,
        )
        started = time.perf_counter()
        train_draft(training)
        record = json.loads((drafts / name / "training_record.json").read_text())
        run = {
            "variant": name,
            "overrides": overrides,
            "command": record["command"],
            "train_tokens": record["num_tokens"],
            "train_reply_tokens": record["num_loss_tokens"],
            "updates": {phase: len_ for phase, len_ in _updates(drafts / name).items()},
            "heldout_tokens": record["heldout_tokens"],
            "heldout_predicted_tau": record["heldout_predicted_tau"],
            "heldout_step_accuracy": record["heldout_step_accuracy"],
            "heldout_vocab_coverage": record["heldout_vocab_coverage"],
            "train_tokens_per_second": record["train_tokens_per_second"],
            "feature_tokens_per_second": record["feature_tokens_per_second"],
            "seconds": round(time.perf_counter() - started, 1),
        }
        results["runs"].append(run)
        results["machine"] = machine_metadata()
        results["args"] = {k: str(v) for k, v in vars(args).items()}
        results_path.write_text(json.dumps(results, indent=2) + "\n")
        (output / "results.md").write_text(render(results))
        print(json.dumps(run))
    return results["runs"]


def _updates(draft_dir: Path) -> dict[str, int]:
    """Updates per phase, from the training log's last evaluation of each phase."""
    counts: dict[str, int] = {}
    for line in (draft_dir / "training_log.jsonl").read_text().splitlines():
        entry = json.loads(line)
        counts[entry["phase"]] = entry["update"]
    return counts


def render(results: dict) -> str:
    machine = results.get("machine", {})
    lines = [
        "# Recipe ablations (held-out)",
        "",
        f"Machine: {machine.get('device_name')} ({machine.get('cpu_capability')}), "
        f"{machine.get('torch_threads')} torch threads, prism_hf {machine.get('prism_hf_commit')}.",
        "",
        "| variant | changes | train tokens | updates | held-out tau @1..5 | step acc @1..3 | vocab coverage | "
        "train tok/s | minutes |",
        "| --- | --- | ---: | ---: | --- | --- | ---: | ---: | ---: |",
    ]
    for run in results["runs"]:
        changes = {k: v for k, v in run["overrides"].items() if TODAY.get(k) != v} or "-"
        taus = " / ".join(f"{t:.2f}" for t in run["heldout_predicted_tau"])
        accs = " / ".join(f"{a:.3f}" for a in run["heldout_step_accuracy"][:3])
        speed = " / ".join(f"{v:.0f}" for v in run["train_tokens_per_second"].values())
        lines.append(
            f"| {run['variant']} | {changes} | {run['train_tokens']} | {sum(run['updates'].values())} | {taus} | "
            f"{accs} | {run['heldout_vocab_coverage']:.3f} | {speed} | {run['seconds'] / 60:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
