"""
Drafts' predicted tau on the benchmark prompts' own greedy replies: where the gap between a draft's held-out tau and
its benchmark tau comes from.

For each prompt of a `prism-hf bench` selection (same options: Spec-Bench tasks per category, HumanEval limit, new
tokens), the target writes its greedy reply, as plain `generate` does, and each draft is scored teacher-forced on it
exactly as on the held-out conversations during training (`prism_hf.training.evaluation.evaluate_draft`: predicted
tau at constant draft lengths 1..`--num-steps`, bonus token included), overall and per task, and over the rounds
greedy generation itself takes at `--num-steps` tokens (`rounds_tau`). This is evaluation only: nothing is trained on
these prompts. The predicted tau averages rounds from every position, so it stands above what generation gets;
`rounds_tau` is generation's own tau at a constant draft length without confidence stops, so against the tau
`prism-hf bench` measures, the difference is what the draft config's confidence stops and copy streaks change.
Against the held-out tau of the training datasets, the difference is the distance between the training prompts and
the benchmark's.

Every scored set is also split by where in its reply each token stands (`step1_by_reply_position`): the first tokens
of a reply are the hardest to draft, so a benchmark of 96 new tokens sees only those. `step1_top_k` counts a
first step as accepted when the target's token is among the draft's k most likely: what drafting k branches at
the first step, verified together as a tree, would accept. `--replies DIR ...` scores the greedy held-out rows of
replies datasets the same way, beside the benchmark's prompts.

`python benchmarks/prompt_acceptance.py --target smollm2-135m-instruct --draft published=hub_models/...` writes
`benchmarks/results/prompt-acceptance-<target>.json` (or `--output`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from prism_hf import PrismDraftModel, quantize_cpu_linears_int8
from prism_hf.benchmarking.prompts import PROMPT_SETS, encode_prompt, load_prompts
from prism_hf.benchmarking.report import describe_machine, machine_metadata
from prism_hf.benchmarking.strategies import parse_draft_spec
from prism_hf.modeling_prism import copy_candidates
from prism_hf.reference_models import load_reference_model
from prism_hf.training.evaluation import HeldOutMetrics, chunked_rows, evaluate_draft, target_top1
from prism_hf.training.recipe import TargetFeatures, compute_target_features
from prism_hf.training.replies import check_reply_tokenizer, load_reply_examples

# reply token positions (1-based, first and last included) the first-step acceptance is split by
REPLY_POSITIONS = ((1, 32), (33, 96), (97, 256), (257, None))
# how many of the draft's most likely first-step tokens `step1_top_k` counts a hit among
TOP_K = (1, 2, 4, 8)

RESULTS = Path(__file__).resolve().parent / "results"


@torch.no_grad()
def greedy_reply_features(target, tokenizer, prompts, max_new_tokens: int, feature_layers: list[int]):
    """The target's features over each prompt and its greedy reply, the reply as the scored (loss-masked) part."""
    features: list[TargetFeatures] = []
    for prompt in prompts:
        ids = encode_prompt(tokenizer, prompt).input_ids[None].to(target.device)
        out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
        mask = torch.zeros_like(out)
        mask[:, ids.shape[1] :] = 1
        features.append(compute_target_features(target, out, feature_layers, loss_mask=mask))
    return features


def copyable_positions(input_ids: list[int], next_tokens: list[int]) -> list[bool]:
    """
    For each pair position `p` (drafting token `p + 2`, which is `next_tokens[p]`): whether tokens `p, p + 1` occurred
    earlier in the sequence followed by that same token, i.e. whether copying what came after their last occurrence,
    as prompt lookup and the phrase pool do, would draft it.
    """
    seen: dict[tuple[int, int], set[int]] = {}
    copyable = []
    for p, token in enumerate(next_tokens):
        copyable.append(token in seen.get((input_ids[p], input_ids[p + 1]), ()))
        if p + 2 < len(input_ids):
            seen.setdefault((input_ids[p], input_ids[p + 1]), set()).add(input_ids[p + 2])
    return copyable


def reply_positions(loss_mask: list[bool]) -> list[int]:
    """For each pair position `p` (drafting token `p + 2`), that token's 1-based place in its reply (0: no reply)."""
    places, run = [], 0
    for in_reply in loss_mask:
        run = run + 1 if in_reply else 0
        places.append(run)
    return places[2:]


def position_bucket(place: int) -> str:
    """The `REPLY_POSITIONS` range a 1-based reply position falls in, e.g. "tokens 33-96"."""
    for first, last in REPLY_POSITIONS:
        if place >= first and (last is None or place <= last):
            return f"tokens {first}-{last}" if last is not None else f"tokens {first}+"
    raise ValueError(f"reply position {place} is not a reply token's")


@torch.no_grad()
def step1_ranks(
    draft: PrismDraftModel, features: list[TargetFeatures]
) -> list[tuple[list[int], list[int], list[bool], list[int]]]:
    """
    For each sequence of `features`: its token ids, the target's top-1 after each pair position, its loss mask, and
    the rank of that top-1 among the tokens the draft's first step drafts from at each pair position (pair p drafts
    token p + 2; `draft_rank`): rank 0 is the token greedy drafting picks. Computed once, then grouped by
    `step1_accuracy_by_copyability`, `step1_accuracy_by_reply_position` and `step1_top_k`.
    """
    sequences = []
    for batch in features:
        output = draft(
            batch.input_ids, draft.fuse_selected_features(batch.hidden_states), num_steps=1, output_logits=False
        )
        top1 = target_top1(draft, batch)[0]
        hidden = output.step_hidden_states[0][0][: top1.shape[0]]
        proposals = None
        if draft.copy_gate is not None:
            ids, lengths = copy_candidates(batch.input_ids, draft.config.copy_max_ngram)
            proposals = (draft.to_draft_ids(ids)[0][: top1.shape[0]], lengths[0][: top1.shape[0]])
        ranks = chunked_rows(
            lambda rows, wanted, *copy: draft_rank(draft.drafting_logits(rows, copy or None), wanted),
            hidden,
            draft.to_draft_ids(top1),
            *(proposals or ()),
        )
        sequences.append(
            (batch.input_ids[0].tolist(), top1.tolist(), batch.loss_mask[0].bool().tolist(), ranks.tolist())
        )
    return sequences


def draft_rank(logits: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """
    Rank of each row's `wanted` column among its `logits` (`[rows, vocab]`): how many columns greedy drafting would
    put before it (a larger logit, or an equal one at a lower index, as `argmax` breaks ties), so rank 0 is exactly the
    argmax. A wanted id of -1 (outside the draft vocabulary) gets the vocabulary size: no draft of k tokens holds it.
    """
    inside = wanted >= 0
    index = wanted.clamp(min=0)
    value = logits.gather(-1, index[:, None])
    columns = torch.arange(logits.shape[-1], device=logits.device)
    before = (logits > value) | ((logits == value) & (columns[None] < index[:, None]))
    return torch.where(inside, before.sum(-1), logits.shape[-1])


def step1_accuracy_by_copyability(sequences: list) -> dict[str, dict]:
    """
    The draft's first-step acceptance (`step1_ranks`) on reply tokens a copy would draft (`copyable_positions`) and on
    the others: whether the draft copies from its context the way the phrase pool does.
    """
    return _step1_accuracy_by(
        sequences,
        lambda ids, top1, mask: ["copyable" if c else "other" for c in copyable_positions(ids, top1)],
        ("copyable", "other"),
    )


def step1_accuracy_by_reply_position(sequences: list) -> dict[str, dict]:
    """The draft's first-step acceptance (`step1_ranks`) by where in its reply the token stands (`REPLY_POSITIONS`)."""
    buckets = [position_bucket(first) for first, _ in REPLY_POSITIONS]
    return _step1_accuracy_by(
        sequences,
        lambda ids, top1, mask: [position_bucket(p) if p else "" for p in reply_positions(mask)],
        buckets,
    )


def _step1_accuracy_by(sequences: list, labels: Callable, groups: Sequence[str]) -> dict[str, dict]:
    """
    First-step acceptance over the scored reply tokens of `sequences` (`step1_ranks`) in each of `groups`, a token's
    group given by `labels(input_ids, target top-1, loss mask)` (one label per pair position).
    """
    counts = {group: [0, 0] for group in groups}
    for ids, top1, mask, ranks in sequences:
        for p, label in enumerate(labels(ids, top1, mask)):
            if mask[p + 2]:  # pair p drafts token p + 2
                kind = counts[label]
                kind[0] += 1
                kind[1] += int(ranks[p] == 0)
    return {
        kind: {"tokens": total, "step1_accuracy": round(hits / total, 4) if total else None}
        for kind, (total, hits) in counts.items()
    }


def step1_top_k(sequences: list) -> dict:
    """
    Share of the scored reply tokens whose target top-1 is among the `TOP_K` most likely tokens of the draft's first
    step (`step1_ranks`): what a first step that drafted k branches, verified together as a tree, would accept.
    """
    scored = [row[p] for _, _, mask, row in sequences for p in range(len(row)) if mask[p + 2]]
    return {
        "tokens": len(scored),
        "step1_accuracy": {
            f"top {k}": round(sum(rank < k for rank in scored) / len(scored), 4) if scored else None for k in TOP_K
        },
    }


def heldout_greedy_reply_features(
    target, tokenizer, dataset_dir: str, rows: int, feature_layers: list[int]
) -> list[TargetFeatures]:
    """The target's features over the first `rows` greedy held-out rows of a replies dataset (up to 2048 tokens)."""
    check_reply_tokenizer(dataset_dir, tokenizer)
    _, heldout = load_reply_examples(dataset_dir, max_length=2048)
    examples = [example for _, shard in heldout for example in shard if example.mode == "greedy"][:rows]
    if not examples:
        raise ValueError(f"{dataset_dir} holds no greedy held-out rows to score.")
    return [
        compute_target_features(
            target, example.input_ids[None].to(target.device), feature_layers, loss_mask=example.loss_mask[None]
        )
        for example in examples
    ]


def score_draft(
    draft: PrismDraftModel,
    features: list[TargetFeatures],
    layers: list[int],
    num_steps: int,
    sources: list[str] | None = None,
) -> tuple[HeldOutMetrics, dict]:
    """One draft's numbers over `features` (computed for the union `layers`; the draft reads its own)."""
    own = [
        TargetFeatures(
            f.input_ids,
            tuple(f.hidden_states[layers.index(layer)] for layer in draft.config.feature_layers),
            f.last_hidden_state,
            f.loss_mask,
        )
        for f in features
    ]
    metrics = evaluate_draft(draft, own, num_steps=num_steps, sources=sources)
    sequences = step1_ranks(draft, own)
    scores = {
        **metrics.to_dict(prefix=""),
        "step1_by_copyability": step1_accuracy_by_copyability(sequences),
        "step1_by_reply_position": step1_accuracy_by_reply_position(sequences),
        "step1_top_k": step1_top_k(sequences),
    }
    return metrics, scores


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="smollm2-135m-instruct", help="reference model name or directory")
    parser.add_argument("--dtype", default="float32", help="the target's dtype (as in the benchmark)")
    parser.add_argument("--draft", action="append", required=True, metavar="NAME=DIR", help="a PRISM draft (repeat)")
    parser.add_argument("--draft-int8", action="store_true", help="score the drafts with int8 draft LM heads")
    parser.add_argument(
        "--prompt-sets",
        nargs="+",
        default=["spec_bench", "humaneval"],
        choices=list(PROMPT_SETS),
        help="prompt sets, as prism-hf bench's (e.g. sharegpt-copy: copy tasks over held-out ShareGPT replies)",
    )
    parser.add_argument("--per-category", type=int, default=2, help="Spec-Bench prompts per task")
    parser.add_argument("--limit", type=int, default=3, help="HumanEval prompts")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--num-steps", type=int, default=6, help="longest constant draft length scored")
    parser.add_argument(
        "--replies", nargs="*", default=[], metavar="DIR", help="replies datasets whose greedy held-out rows to score"
    )
    parser.add_argument("--replies-rows", type=int, default=24, help="held-out rows scored per replies dataset")
    parser.add_argument("--output", type=Path, help="results file (default: under benchmarks/results)")
    args = parser.parse_args(argv)
    drafts = [parse_draft_spec(spec) for spec in args.draft]
    if len({name for name, _ in drafts}) != len(drafts):
        parser.error("Each --draft needs its own NAME.")
    print(f"Machine: {describe_machine()}", flush=True)
    target, tokenizer = load_reference_model(args.target, dtype=getattr(torch, args.dtype))
    target.eval()
    prompts = load_prompts(args.prompt_sets, per_category=args.per_category, limit=args.limit)
    loaded = []
    for name, path in drafts:
        draft = PrismDraftModel.from_pretrained(path).to(dtype=target.dtype, device=target.device).eval()
        draft.bind_target(target)
        if args.draft_int8 and quantize_cpu_linears_int8(draft) == 0:
            raise ValueError(f"Draft {name!r} has no float32 draft-vocabulary LM head to quantize on the CPU.")
        loaded.append((name, path, draft))
    layers = sorted({layer for _, _, draft in loaded for layer in draft.config.feature_layers})
    features = greedy_reply_features(target, tokenizer, prompts, args.max_new_tokens, layers)
    categories = [prompt.category for prompt in prompts]
    results: dict = {
        "metadata": {
            "target": args.target,
            "dtype": args.dtype,
            "draft_int8": args.draft_int8,
            "max_new_tokens": args.max_new_tokens,
            "per_category": args.per_category,
            "limit": args.limit,
            "prompt_sets": args.prompt_sets,
            "prompts": [prompt.id for prompt in prompts],
            "replies": args.replies,
            "replies_rows": args.replies_rows,
            "machine": machine_metadata(target.device),
        },
        "drafts": {},
        "replies": {},
    }
    for name, path, draft in loaded:
        metrics, scores = score_draft(draft, features, layers, args.num_steps, sources=categories)
        results["drafts"][name] = {"path": str(path), **scores}
        by_task = ", ".join(
            f"{c} {m.predicted_tau[-1]:.2f} / {m.rounds_tau:.2f}" for c, m in (metrics.by_source or {}).items()
        )
        print(
            f"{name}: predicted tau {metrics.predicted_tau}, over generation's rounds {metrics.rounds_tau} "
            f"({metrics.num_tokens} tokens); by task (predicted / rounds): {by_task}",
            flush=True,
        )
        print(f"{name}: step-1 acceptance by copyability {scores['step1_by_copyability']}", flush=True)
        print(f"{name}: step-1 acceptance by reply position {scores['step1_by_reply_position']}", flush=True)
    for dataset in args.replies:
        dataset_features = heldout_greedy_reply_features(target, tokenizer, dataset, args.replies_rows, layers)
        results["replies"][dataset] = {}
        for name, _, draft in loaded:
            metrics, scores = score_draft(draft, dataset_features, layers, args.num_steps)
            results["replies"][dataset][name] = scores
            print(
                f"{dataset}, {name}: predicted tau {metrics.predicted_tau[-1]}, rounds {metrics.rounds_tau}; "
                f"step-1 by reply position {scores['step1_by_reply_position']}",
                flush=True,
            )
    output = args.output or RESULTS / f"prompt-acceptance-{Path(args.target).name}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"Wrote {output}")
    return results


if __name__ == "__main__":
    main()
