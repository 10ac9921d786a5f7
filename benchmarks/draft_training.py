"""
Draft training runs compared on held-out numbers: every run trains on the same replies dataset and is scored on its
held-out conversations (per-step acceptance, predicted tau at draft lengths 1-5, vocabulary coverage).

Three experiments:

- `ablations`: recipe variants at one token budget (`--max-train-tokens`), each changing the candidate recipe in
  one respect: `python benchmarks/draft_training.py ablations --data DIR --target smollm2-135m-instruct
  --max-train-tokens 200000` writes `benchmarks/results/<target>-recipe-ablations/`.
- `scaling`: one recipe at several token budgets, PRISM (M = 2) beside the M = 1 baseline at equal data and updates:
  `python benchmarks/draft_training.py scaling --data DIR --target smollm2-135m-instruct --budgets 100000 400000
  1600000 3200000` writes `benchmarks/results/<target>-data-scaling/` (entries keyed by training tokens and
  `num_modules`, with a chart).
- `epochs`: one recipe at one token budget with several phase-2 lengths from one phase 1, to tell whether the draft
  is short of data or of updates: `python benchmarks/draft_training.py epochs --data DIR --target
  smollm2-135m-instruct --max-train-tokens 350000 --finetune-epochs 0.5 5` writes
  `benchmarks/results/<target>-finetune-epochs/`.

Each writes `results.json` and `results.md`; a run already in `results.json` is skipped and an interrupted run
continues from its checkpoints, so an interrupted experiment continues. Features are computed once into
`--feature-cache-dir` and shared by runs with the same feature layers; drafts go to `--drafts-dir`.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import asdict, fields
from pathlib import Path

from prism_hf.benchmarking.report import machine_metadata
from prism_hf.training.pipeline import DraftTrainingArguments, resolve_init_draft_defaults, train_draft
from prism_hf.training.replies import load_reply_examples

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
    "batch-2": dict(BASE, batch_size=2),  # twice the updates per training token
    "fused-low-mid-high": dict(BASE, feature_layers=[3, 16, 28]),
    "m1": dict(BASE, num_modules=1),
    "ce-weight-1": dict(BASE, ce_weight=1.0),  # cross-entropy as heavy as the regression
    "ce-only": dict(BASE, ce_weight=1.0, regression_weight=0.0),  # EAGLE-3: no feature regression
    # what the 80K-token ablations and the references (EAGLE/HASS noise, the artifact's AdamW decay) point to
    "candidate": dict(BASE, feature_noise=0.2, weight_decay=0.01),
    # each pair also reads the token before its own, so that one attention hop can copy (an induction lookup)
    "batch-2-previous-token": dict(BASE, batch_size=2, previous_token_input=True),
}
# settings that change speed or what else is saved, not the trained draft: left out of a run's "changes"
NOT_RECIPE = {"compile_loss", "save_warmup", "init_draft", "max_heldout_tokens"}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", choices=["ablations", "scaling", "epochs"])
    parser.add_argument("--data", required=True, help="a replies dataset folder (prism-hf data)")
    parser.add_argument("--target", required=True)
    parser.add_argument("--max-train-tokens", type=int, help="ablations, epochs: the token budget of every run")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), help="ablations: which (default: all)")
    parser.add_argument("--budgets", type=int, nargs="+", help="scaling: training-token budgets")
    parser.add_argument("--recipe", choices=sorted(VARIANTS), default="base", help="scaling, epochs: the recipe")
    parser.add_argument("--finetune-epochs", type=float, nargs="+", help="epochs: the phase-2 lengths")
    parser.add_argument("--output-dir", type=Path)
    parser.add_argument("--feature-cache-dir", type=Path)
    parser.add_argument("--drafts-dir", type=Path, help="where the trained drafts go (default: under /tmp)")
    parser.add_argument("--target-dtype", default="float32")
    parser.add_argument("--mixed-precision", default="no", help="'bf16' autocasts training matmuls")
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument(
        "--bench-results",
        type=Path,
        help="a `prism-hf bench` results.json whose --draft names are this experiment's run names: adds each draft's "
        "benchmark tau and speedup (all prompts) to the results",
    )
    parser.add_argument(
        "--override",
        nargs="+",
        default=[],
        metavar="FIELD=JSON",
        help="training arguments set for every run, e.g. draft_vocab_size=16384 warmup_epochs=1.5",
    )
    args = parser.parse_args(argv)
    try:
        common = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.override)}
    except ValueError as error:
        parser.error(f"--override takes FIELD=JSON items: {error}")
    name = Path(args.target).name
    drafts = args.drafts_dir or Path("/tmp") / f"prism-hf-{args.experiment}-{name}"
    if args.experiment == "ablations":
        if args.max_train_tokens is None:
            parser.error("ablations need --max-train-tokens")
        runs = [(v, VARIANTS[v] | common, args.max_train_tokens) for v in (args.variants or VARIANTS)]
        output = args.output_dir or RESULTS / f"{name}-recipe-ablations"
    elif args.experiment == "epochs":
        if args.max_train_tokens is None or not args.finetune_epochs:
            parser.error("epochs needs --max-train-tokens and --finetune-epochs")
        recipe, budget = VARIANTS[args.recipe] | common, args.max_train_tokens
        # the shortest phase 2 trains the shared phase 1; the longer ones fine-tune its warmed-up module (as the
        # scaling experiment's M = 1 baseline does), so they differ in phase-2 updates only
        first, *longer = sorted(set(args.finetune_epochs))
        runs = [(f"{budget}-ft{first:g}", dict(recipe, finetune_epochs=first, save_warmup=True), budget)]
        warmup = str(drafts / runs[0][0] / "warmup")
        for epochs in longer:
            overrides = dict(recipe, finetune_epochs=epochs, init_draft=warmup, warmup_epochs=0.0)
            runs.append((f"{budget}-ft{epochs:g}", overrides, budget))
        output = args.output_dir or RESULTS / f"{name}-finetune-epochs"
    else:
        if not args.budgets:
            parser.error("scaling needs --budgets")
        recipe = VARIANTS[args.recipe] | common
        runs = []
        for budget in sorted(args.budgets):
            # phase 1 trains one module for both: the M = 1 baseline fine-tunes the M = 2 run's warmed-up module
            # (equal data and updates, a quarter of the cost of training it again)
            runs.append((f"{budget}-m2", dict(recipe, num_modules=2, save_warmup=True), budget))
            warmup = str(drafts / f"{budget}-m2" / "warmup")
            runs.append((f"{budget}-m1", dict(recipe, num_modules=1, init_draft=warmup, warmup_epochs=0.0), budget))
        output = args.output_dir or RESULTS / f"{name}-data-scaling"
    output.mkdir(parents=True, exist_ok=True)
    results_path = output / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"runs": []}
    done = {run["variant"] for run in results["runs"]}
    for run_name, overrides, budget in runs:
        if run_name in done:
            print(f"{run_name}: already measured")
            continue
        scored_on = {run["heldout_tokens"] for run in results["runs"]}
        if len(scored_on) > 1:
            raise ValueError(f"The runs in {results_path} were scored on different held-out sets: {sorted(scored_on)}")
        if scored_on and "max_heldout_tokens" not in overrides:
            # a replies dataset grows by appending shards, which brings new held-out conversations: score this run on
            # the ones the earlier runs were scored on, or its point is not on their curve
            max_length = overrides.get("max_length", DraftTrainingArguments.max_length)
            limit = heldout_token_limit(args.data, max_length, next(iter(scored_on)))
            if limit is not None:
                print(f"{run_name}: {args.data} has grown; scored on the earlier runs' held-out conversations only")
                overrides = overrides | {"max_heldout_tokens": limit}
        training = DraftTrainingArguments(
            target=args.target,
            output_dir=str(drafts / run_name),
            data=args.data,
            max_train_tokens=budget,
            target_dtype=args.target_dtype,
            mixed_precision=args.mixed_precision,
            eval_every=args.eval_every,
            feature_cache_dir=str(args.feature_cache_dir) if args.feature_cache_dir else None,
            **overrides,
        )
        trained = _trained_with(drafts / run_name, training)
        if trained is not None:
            # e.g. the process ended before writing its results, or the folder links to another experiment's draft
            print(f"{run_name}: the draft in {drafts / run_name} was trained with these arguments: not retrained")
            seconds = trained["total_seconds"]
        else:
            # an interrupted run with the same arguments continues from its checkpoints (long runs span sessions)
            pending = drafts / run_name / "pending_training_args.json"
            wanted = json.dumps(asdict(training), indent=2) + "\n"
            checkpoints = drafts / run_name / "checkpoints"
            resume = pending.is_file() and pending.read_text() == wanted and checkpoints.is_dir()
            if resume:
                print(f"{run_name}: continuing the interrupted run in {drafts / run_name} from its checkpoints")
            else:
                shutil.rmtree(checkpoints, ignore_errors=True)  # another run's: never to be continued by this one
            pending.parent.mkdir(parents=True, exist_ok=True)
            pending.write_text(wanted)
            started = time.perf_counter()
            train_draft(training, resume=resume)
            seconds = time.perf_counter() - started
            pending.unlink()
        entry = _run_entry(run_name, overrides, drafts / run_name, seconds)
        if scored_on and entry["heldout_tokens"] not in scored_on:
            raise ValueError(
                f"{run_name} was scored on {entry['heldout_tokens']} held-out reply tokens, the runs in "
                f"{results_path} on {next(iter(scored_on))}: its point would not be on their curve."
            )
        # re-read: another process may have added its runs meanwhile (variants run side by side, one thread each)
        results = json.loads(results_path.read_text()) if results_path.exists() else {"runs": []}
        if "init_draft" in overrides:
            # its phase 1 is the other run's: count those updates and that time too
            source_name = Path(overrides["init_draft"]).parent.name
            source = next(r for r in results["runs"] if r["variant"] == source_name)
            entry["updates"] = {"warmup": source["updates"]["warmup"], **entry["updates"]}
            entry["warmup_from"] = source["variant"]
        results["runs"] = [run for run in results["runs"] if run["variant"] != run_name] + [entry]
        results["experiment"] = args.experiment
        if args.experiment == "scaling":
            results["fit"] = fit_scaling(results)
        results["machine"] = machine_metadata()
        results["args"] = {k: str(v) for k, v in vars(args).items()}
        results_path.write_text(json.dumps(results, indent=2) + "\n")
        (output / "results.md").write_text(render(results))
        if args.experiment == "scaling":
            plot_scaling(results, output / "results.png")
        print(json.dumps(results["runs"][-1]))
    if args.bench_results is not None:
        results = json.loads(results_path.read_text())
        attach_benchmark(results, args.bench_results)
        if args.experiment == "scaling":
            results["fit"] = fit_scaling(results)
        results_path.write_text(json.dumps(results, indent=2) + "\n")
        (output / "results.md").write_text(render(results))
        if args.experiment == "scaling":
            plot_scaling(results, output / "results.png")
    return results["runs"]


def attach_benchmark(results: dict, bench_results: Path) -> None:
    """Adds `benchmark` (tau, speedup over plain `generate`, identical outputs) to each run the bench measured."""
    bench = json.loads(bench_results.read_text())
    aggregates = bench["aggregates"]
    missing = [run["variant"] for run in results["runs"] if run["variant"] not in aggregates]
    if len(missing) == len(results["runs"]):
        raise ValueError(f"{bench_results} measured none of these runs (its drafts: {', '.join(aggregates)}).")
    for run in results["runs"]:
        overall = aggregates.get(run["variant"], {}).get("all")
        if overall is None:
            continue
        run["benchmark"] = {
            "tau": round(overall["tau_mean"], 3),
            "speedup": round(overall["speedup"], 3),
            "prompts": overall["prompts"],
            "identical": overall["identical"],
            "new_tokens": bench["metadata"]["max_new_tokens"],
            "prompt_sets": bench["metadata"]["prompt_sets"],
            "results": str(bench_results),
        }


def heldout_token_limit(data: str | Path, max_length: int, heldout_reply_tokens: int) -> int | None:
    """
    The `max_heldout_tokens` (prompt and reply tokens) that scores a grown replies dataset on the held-out
    conversations that earlier runs, scored on `heldout_reply_tokens` reply tokens, saw: those of its first
    shards. None when its held-out part is still just those.
    """
    _, heldout = load_reply_examples(data, max_length)
    reply_tokens = sequence_tokens = 0
    for example in (example for _, examples in heldout for example in examples):
        if reply_tokens == heldout_reply_tokens:
            return sequence_tokens  # the pipeline keeps the first examples up to this many tokens: these
        reply_tokens += int(example.loss_mask.sum())
        sequence_tokens += len(example.input_ids)
    if reply_tokens == heldout_reply_tokens:
        return None
    raise ValueError(
        f"No first held-out conversations of {data} add up to the {heldout_reply_tokens} held-out reply tokens the "
        "earlier runs were scored on: the dataset changed in other ways than by growing. Start a new results folder."
    )


def _trained_with(draft_dir: Path, training: DraftTrainingArguments) -> dict | None:
    """The training record of the draft in `draft_dir` if it was trained with `training`'s arguments (any folder)."""
    args_path, record_path = draft_dir / "training_args.json", draft_dir / "training_record.json"
    if not (args_path.is_file() and record_path.is_file()):
        return None
    try:  # the arguments as a run saves them: defaults taken from an --init-draft resolved
        wanted = json.loads(json.dumps(asdict(resolve_init_draft_defaults(training))))
    except OSError:  # its --init-draft is not there (yet): this draft cannot have been trained from it
        return None
    # a field added to the arguments since the draft was trained counts as its default
    default_args = resolve_init_draft_defaults(DraftTrainingArguments(target=training.target, output_dir=""))
    defaults = json.loads(json.dumps(asdict(default_args)))
    saved = {k: defaults[k] for k in wanted if k in defaults} | json.loads(args_path.read_text())
    known = {f.name for f in fields(DraftTrainingArguments)}
    if set(saved) <= known:  # resolved as the run is now: a default an --init-draft sets since then counts as taken
        try:
            saved = json.loads(json.dumps(asdict(resolve_init_draft_defaults(DraftTrainingArguments(**saved)))))
        except OSError:  # its own --init-draft is gone: compared as saved
            pass
    if {k: v for k, v in saved.items() if k != "output_dir"} != {k: v for k, v in wanted.items() if k != "output_dir"}:
        return None
    return json.loads(record_path.read_text())


def _run_entry(name: str, overrides: dict, draft_dir: Path, seconds: float) -> dict:
    record = json.loads((draft_dir / "training_record.json").read_text())
    return {
        "variant": name,
        "overrides": overrides,
        "num_modules": overrides.get("num_modules", 2),
        "command": record["command"],
        "train_tokens": record["num_tokens"],
        "train_reply_tokens": record["num_loss_tokens"],
        "updates": _updates(draft_dir),
        "heldout_tokens": record["heldout_tokens"],
        "heldout_predicted_tau": record["heldout_predicted_tau"],
        "heldout_step_accuracy": record["heldout_step_accuracy"],
        "heldout_vocab_coverage": record["heldout_vocab_coverage"],
        "train_tokens_per_second": record["train_tokens_per_second"],
        "feature_tokens_per_second": record["feature_tokens_per_second"],
        "seconds": round(seconds, 1),
        # the machine that trained it (runs of one experiment may span sessions on different CPUs)
        "machine": record.get("machine"),
    }


# the smallest budgets sit on the flat start of the curve (the draft has barely learnt anything): the trend is fitted
# from here on
FIT_FROM_TOKENS = 100_000
PROJECTED_TAUS = (2.0, 2.5, 3.0)


def fit_scaling(results: dict) -> dict[str, dict]:
    """
    Per number of modules: the least-squares line of held-out predicted tau (longest draft length) on log2 of the
    training tokens, over the runs with at least `FIT_FROM_TOKENS` tokens, and the tokens at which that line reaches
    each of `PROJECTED_TAUS`. The projections are extrapolations, an order of magnitude: a measured curve may still
    steepen with data (then they overstate the data a tau needs), and acceptance saturates eventually (then they
    understate it).
    """
    fits = {}
    for modules in sorted({run["num_modules"] for run in results["runs"]}, reverse=True):
        points = sorted(
            (run["train_tokens"], run["heldout_predicted_tau"][-1])
            for run in results["runs"]
            if run["num_modules"] == modules and run["train_tokens"] >= FIT_FROM_TOKENS
        )
        if len(points) < 2:
            continue
        xs, ys = [math.log2(tokens) for tokens, _ in points], [tau for _, tau in points]
        mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
        covariance = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
        slope = covariance / sum((x - mean_x) ** 2 for x in xs)
        intercept = mean_y - slope * mean_x
        fits[f"m{modules}"] = {
            "num_modules": modules,
            "runs": len(points),
            "tau_per_doubling": round(slope, 4),
            "tau_at_1m_tokens": round(intercept + slope * math.log2(1e6), 4),
            "tokens_for_tau": {
                str(tau): (round(2 ** ((tau - intercept) / slope)) if slope > 0 else None) for tau in PROJECTED_TAUS
            },
        }
    return fits


def plot_scaling(results: dict, path: Path) -> None:
    """Held-out predicted tau (longest draft length) against training tokens, one line per number of modules."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for modules in sorted({run["num_modules"] for run in results["runs"]}, reverse=True):
        runs = sorted((r for r in results["runs"] if r["num_modules"] == modules), key=lambda r: r["train_tokens"])
        label = f"PRISM M = {modules}" if modules > 1 else "M = 1 baseline"
        line = axis.plot(
            [r["train_tokens"] for r in runs], [r["heldout_predicted_tau"][-1] for r in runs], "o-", label=label
        )[0]
        benched = [r for r in runs if "benchmark" in r]
        if benched:
            axis.plot(
                [r["train_tokens"] for r in benched],
                [r["benchmark"]["tau"] for r in benched],
                "s--",
                color=line.get_color(),
                label=f"{label}, benchmark tau",
            )
        fit = results.get("fit", {}).get(f"m{modules}")
        if fit is not None and fit["tau_per_doubling"] > 0:
            start = min(r["train_tokens"] for r in runs if r["train_tokens"] >= FIT_FROM_TOKENS)
            end = max(start * 2, max(v for v in fit["tokens_for_tau"].values() if v is not None))
            xs = [start * (end / start) ** (i / 20) for i in range(21)]
            base = fit["tau_at_1m_tokens"]
            axis.plot(
                xs,
                [base + fit["tau_per_doubling"] * math.log2(x / 1e6) for x in xs],
                ":",
                color=line.get_color(),
                label=f"{label}, trend (+{fit['tau_per_doubling']:.3f} per doubling)",
            )
    axis.set_xscale("log")
    axis.set_xlabel("training tokens")
    axis.set_ylabel("tau (held-out: predicted at draft length 5)")
    axis.grid(True, alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


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
        f"# Draft training: {results.get('experiment', 'ablations')} (held-out numbers)",
        "",
        f"Machine: {machine.get('device_name')} ({machine.get('cpu_capability')}"
        f"{'; ' + ' '.join(machine['cpu_isa']) if machine.get('cpu_isa') else ''}), "
        f"{machine.get('torch_threads')} torch threads, prism_hf {machine.get('prism_hf_commit')}.",
        "",
        "| variant | changes | train tokens | updates | held-out tau @1..5 | step acc @1..3 | vocab coverage | "
        "train tok/s | minutes |",
        "| --- | --- | ---: | ---: | --- | --- | ---: | ---: | ---: |",
    ]
    benched = [run for run in results["runs"] if "benchmark" in run]
    trained_on: dict[str, list[str]] = {}
    for run in results["runs"]:
        trained_on.setdefault(run.get("machine") or "not recorded", []).append(run["variant"])
    if set(trained_on) != {"not recorded"}:
        # timings are the machine's that trained each run: the latest run's machine is not every run's
        lines[2] = f"Latest run's machine: {lines[2].removeprefix('Machine: ')}"
        lines[3:3] = [
            "Each run's timings (train tok/s, minutes) are its own machine's: "
            + "; ".join(f"{machine}: {', '.join(variants)}" for machine, variants in trained_on.items())
            + "."
        ]
    if benched:
        bench = benched[0]["benchmark"]
        sources = sorted({run["benchmark"]["results"] for run in benched})
        lines[2:2] = [
            f"Benchmark tau and speedup: `prism-hf bench` over {bench['prompts']} prompts "
            f"({', '.join(bench['prompt_sets'])}), {bench['new_tokens']} new tokens, greedy ({', '.join(sources)}; "
            "a speedup is over plain `generate` in the same run).",
            "",
        ]
        lines[-2] = lines[-2][: -len(" minutes |")] + " minutes | benchmark tau | speedup |"
        lines[-1] += " ---: | ---: |"
    runs = results["runs"]
    if results.get("experiment") == "scaling":  # by data size, PRISM before its baseline
        runs = sorted(runs, key=lambda run: (run["train_tokens"], -run["num_modules"]))
    for run in runs:
        changes = {k: v for k, v in run["overrides"].items() if TODAY.get(k) != v and k not in NOT_RECIPE} or "-"
        if run.get("warmup_from"):
            changes = f"phase 1 of {run['warmup_from']}; {changes}"
        taus = " / ".join(f"{t:.2f}" for t in run["heldout_predicted_tau"])
        accs = " / ".join(f"{a:.3f}" for a in run["heldout_step_accuracy"][:3])
        speed = " / ".join(f"{v:.0f}" for v in run["train_tokens_per_second"].values())
        lines.append(
            f"| {run['variant']} | {changes} | {run['train_tokens']} | {sum(run['updates'].values())} | {taus} | "
            f"{accs} | {run['heldout_vocab_coverage']:.3f} | {speed} | {run['seconds'] / 60:.1f} |"
        )
        if benched:
            bench = run.get("benchmark")
            lines[-1] += f" {bench['tau']:.2f} | {bench['speedup']:.2f}x |" if bench else " - | - |"
    if results.get("fit"):
        lines += [
            "",
            f"Trend: least-squares line of held-out predicted tau (draft length 5) on log2(training tokens), runs "
            f"from {FIT_FROM_TOKENS:,} tokens on, and the tokens where that line would reach each tau: an "
            "extrapolation, an order of magnitude (a curve may still steepen, and acceptance saturates eventually).",
            "",
            "| modules | runs | tau per doubling of data | tau at 1M tokens | "
            + " | ".join(f"tokens for tau {tau}" for tau in PROJECTED_TAUS)
            + " |",
            "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in PROJECTED_TAUS) + " |",
        ]
        for fit in results["fit"].values():
            needs = [fit["tokens_for_tau"][str(tau)] for tau in PROJECTED_TAUS]
            lines.append(
                f"| M = {fit['num_modules']} | {fit['runs']} | {fit['tau_per_doubling']:+.3f} | "
                f"{fit['tau_at_1m_tokens']:.2f} | "
                + " | ".join(f"{n / 1e6:,.1f}M" if n is not None else "never" for n in needs)
                + " |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
