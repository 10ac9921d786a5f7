"""
How PRISM drafting's rounds go on the benchmark prompts: which rounds end in a copy streak, how often a streak is
accepted whole, and whether a whole streak predicts the next one (what `PrismConfig.copy_streak_max_tokens` relies on).

For each prompt of a `prism-hf bench` selection (same options: Spec-Bench tasks per category, HumanEval limit, new
tokens), the target generates greedily with each draft as `generate(assistant_model=draft)` does, and every
verification round is recorded: tokens drafted, tokens of them copied by a streak, tokens accepted. The drafts' own
config decides the drafting (edit a copy of `config.json` to compare settings). Output identical to plain greedy output
is not checked here (`prism-hf bench` does); this only reads the rounds, through the candidate generator's
`update_candidate_strategy`.

`python benchmarks/copy_streak_rounds.py --draft published=hub_models/SmolLM2-135M-Instruct-PRISM` writes
`benchmarks/results/copy-streak-rounds-<target>.json` (or `--output`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from prism_hf import PrismDraftModel, enable_fast_cpu_linears, quantize_cpu_linears_int8
from prism_hf.benchmarking.prompts import encode_prompt, load_prompts
from prism_hf.benchmarking.report import machine_metadata
from prism_hf.benchmarking.strategies import parse_draft_spec
from prism_hf.generation_prism import PrismCandidateGenerator
from prism_hf.reference_models import load_reference_model

RESULTS = Path(__file__).resolve().parent / "results"


def record_rounds(target, tokenizer, draft, prompts, max_new_tokens: int) -> list[list[dict]]:
    """Per prompt, each verification round of greedy `generate` with `draft`: drafted, copied and accepted tokens."""
    rounds: list[dict] = []
    update = PrismCandidateGenerator.update_candidate_strategy

    def recording_update(self, input_ids, scores, num_matches):
        if not self._round_is_prefill:
            copied = self.stats.copied_tokens - getattr(self, "_copied_before", 0)
            rounds.append({"drafted": scores.shape[1] - 1, "copied": copied, "accepted": int(num_matches)})
        update(self, input_ids, scores, num_matches)
        self._copied_before = self.stats.copied_tokens

    per_prompt = []
    PrismCandidateGenerator.update_candidate_strategy = recording_update
    try:
        for prompt in prompts:
            ids = encode_prompt(tokenizer, prompt).input_ids[None].to(target.device)
            rounds.clear()
            target.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                assistant_model=draft,
                max_new_tokens=max_new_tokens,
                do_sample=False,
            )
            per_prompt.append(list(rounds))
    finally:
        PrismCandidateGenerator.update_candidate_strategy = update
    return per_prompt


def summarize(per_prompt: list[list[dict]]) -> dict:
    """
    Streak rounds, how often they are accepted whole, and the same after a whole and after a cut streak; `tau` counts
    the tokens of the verification rounds (accepted + the target's own), not each prompt's first, which its prefill
    gives.
    """
    all_rounds = [r for rounds in per_prompt for r in rounds]
    streaks = [r for r in all_rounds if r["copied"]]
    after = {"whole": [0, 0], "cut": [0, 0]}  # [whole, all] among streak rounds following that kind of streak
    for rounds in per_prompt:
        previous = None
        for r in rounds:
            if not r["copied"]:
                continue
            whole = r["accepted"] == r["drafted"]
            if previous is not None:
                after[previous][0] += whole
                after[previous][1] += 1
            previous = "whole" if whole else "cut"
    tokens = sum(r["accepted"] + 1 for r in all_rounds)

    def share(count: int, total: int) -> float | None:
        return round(count / total, 4) if total else None

    return {
        "rounds": len(all_rounds),
        "tau": share(tokens, len(all_rounds)),
        "streak_rounds": len(streaks),
        "streak_round_tokens_share": share(sum(r["accepted"] + 1 for r in streaks), tokens),
        "streak_drafted_mean": share(sum(r["drafted"] for r in streaks), len(streaks)),
        "streak_accepted_mean": share(sum(r["accepted"] for r in streaks), len(streaks)),
        "streak_whole": share(sum(r["accepted"] == r["drafted"] for r in streaks), len(streaks)),
        "streak_whole_after_whole": share(*after["whole"]),
        "streak_whole_after_cut": share(*after["cut"]),
        "streaks_after_whole": after["whole"][1],
        "streaks_after_cut": after["cut"][1],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="smollm2-135m-instruct", help="reference model name or directory")
    parser.add_argument("--dtype", default="float32", help="the target's dtype (as in the benchmark)")
    parser.add_argument("--draft", action="append", required=True, metavar="NAME=DIR", help="a PRISM draft (repeat)")
    parser.add_argument("--per-category", type=int, default=2, help="Spec-Bench prompts per task")
    parser.add_argument("--limit", type=int, default=2, help="HumanEval prompts")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--output", type=Path, help="results file (default: under benchmarks/results)")
    args = parser.parse_args(argv)

    drafts = dict(parse_draft_spec(spec) for spec in args.draft)
    target, tokenizer = load_reference_model(args.target, dtype=args.dtype)
    enable_fast_cpu_linears(target)
    prompts = load_prompts(("spec_bench", "humaneval"), per_category=args.per_category, limit=args.limit)
    results = {
        "target": args.target,
        "dtype": str(target.dtype),
        "max_new_tokens": args.max_new_tokens,
        "prompts": [p.id for p in prompts],
        "machine": machine_metadata(),
        "drafts": {},
    }
    for name, path in drafts.items():
        draft = PrismDraftModel.from_pretrained(path).to(dtype=target.dtype, device=target.device).eval()
        quantize_cpu_linears_int8(draft)  # as `prism-hf bench --draft-int8` drafts (0 where there is no head slice)
        enable_fast_cpu_linears(draft)
        per_prompt = record_rounds(target, tokenizer, draft, prompts, args.max_new_tokens)
        drafting = {key: getattr(draft.config, key) for key in ("copy_streak_tokens", "copy_streak_max_tokens")}
        results["drafts"][name] = {"path": str(path), **drafting, **summarize(per_prompt)}
        print(name, json.dumps(results["drafts"][name]))
    output = args.output or RESULTS / f"copy-streak-rounds-{Path(args.target).name}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved {output}")
    return results


if __name__ == "__main__":
    main()
