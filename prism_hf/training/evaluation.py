"""
Held-out evaluation of a draft: how often it would be accepted, measured on conversations it never trained on.

Teacher-forced over the target's features of held-out sequences, the draft drafts `num_steps` tokens ahead from every
position, feeding back its own features exactly as in generation. A drafted token counts as accepted when it is the
target's top-1 token over the target's whole vocabulary (greedy verification), so a position whose target top-1 lies
outside a reduced draft vocabulary is a miss. On the target's own greedy replies the accepted tokens are the reply's
tokens, so the chain statistics below are what greedy `generate` would see from each position.

Averaged over every position, they overstate what generation gets: a long easy stretch (a copied phrase, a formula)
counts once per position in it, while generation crosses it in one or two rounds, and generation starts its rounds
only where the last one stopped, often at a hard token. `rounds_tau` walks each reply as greedy generation does (a
round from the end of the prompt, each next round after the last one's bonus token) and averages over those rounds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..modeling_prism import PrismDraftModel
from .recipe import TargetFeatures, copy_proposals


@dataclass
class HeldOutMetrics:
    """
    Args:
        num_tokens (`int`): held-out positions scored (reply tokens with a drafting context).
        step_accuracy (`list[float]`): entry `k - 1`: how often the draft's step-k token is the target's top-1.
        conditional_accuracy (`list[float]`): entry `k - 1`: the same, among positions whose steps 1..k-1 all were.
        predicted_tau (`list[float]`): entry `K - 1`: expected tokens per verification with a constant draft length
            `K`, bonus token included: `1 + sum_k prod_{j<=k} conditional_accuracy[j]`.
        vocab_coverage (`float`): share of held-out reply tokens inside the draft vocabulary.
        rounds_tau (`float`, *optional*): tokens per verification of greedy `generate` itself at the longest scored
            draft length: rounds taken as generation takes them over each reply (see the module docstring), without
            confidence stops. Lower than `predicted_tau[-1]`, which averages over rounds from every position.
        by_source (`dict[str, HeldOutMetrics]`, *optional*): the same numbers for each source of the held-out
            sequences, when [`evaluate_draft`] was told their sources (a code and a chat source score differently).
        by_mode (`dict[str, HeldOutMetrics]`, *optional*): the same numbers for the target's greedy and its sampled
            replies, when [`evaluate_draft`] was told them: greedy `generate` meets the greedy kind, and a reply
            sampled at temperature 1 is far harder to draft, so the pooled figure depends on the mix.
    """

    num_tokens: int
    step_accuracy: list[float]
    conditional_accuracy: list[float]
    predicted_tau: list[float]
    vocab_coverage: float
    rounds_tau: float | None = None
    by_source: dict[str, HeldOutMetrics] | None = None
    by_mode: dict[str, HeldOutMetrics] | None = None

    def to_dict(self, prefix: str = "heldout_") -> dict:
        """The fields under `prefix`-ed names (`by_source` and `by_mode` only when set, their entries unprefixed)."""
        fields = asdict(self)
        for group in ("by_source", "by_mode"):
            del fields[group]
            if getattr(self, group) is not None:
                fields[group] = {key: metrics.to_dict(prefix="") for key, metrics in getattr(self, group).items()}
        return {prefix + key: value for key, value in fields.items()}

    def summary(self) -> dict[str, float]:
        """Short numbers for a progress bar."""
        return {"heldout_acc1": round(self.step_accuracy[0], 3), "heldout_tau": round(self.predicted_tau[-1], 3)}


@dataclass
class _ChainCounts:
    """What [`evaluate_draft`] counts over a set of sequences; counts of disjoint sets add up to the counts of both."""

    matched: torch.Tensor  # [K] step-k hits among scored positions
    scored: torch.Tensor  # [K] positions where step k is scored
    chain_reached: torch.Tensor  # [K + 1] rounds whose steps 1..k all matched (k = 0..K)
    covered: int = 0
    reply_tokens: int = 0
    rounds: int = 0  # greedy generation's rounds over the replies (`_greedy_rounds`)
    round_tokens: int = 0  # the tokens those rounds produce

    @classmethod
    def zeros(cls, num_steps: int) -> _ChainCounts:
        return cls(*(torch.zeros(size, dtype=torch.float64) for size in (num_steps, num_steps, num_steps + 1)))

    def add(self, other: _ChainCounts) -> None:
        self.matched += other.matched
        self.scored += other.scored
        self.chain_reached += other.chain_reached
        self.covered += other.covered
        self.reply_tokens += other.reply_tokens
        self.rounds += other.rounds
        self.round_tokens += other.round_tokens

    def metrics(self) -> HeldOutMetrics:
        if self.chain_reached[0] == 0:
            raise ValueError("No held-out positions to score: the held-out data has no reply tokens.")
        step_accuracy = (self.matched / self.scored.clamp(min=1)).tolist()
        conditional = (self.chain_reached[1:] / self.chain_reached[:-1].clamp(min=1)).tolist()
        return HeldOutMetrics(
            num_tokens=int(self.chain_reached[0]),
            step_accuracy=[round(a, 4) for a in step_accuracy],
            conditional_accuracy=[round(a, 4) for a in conditional],
            predicted_tau=[round(t, 4) for t in predicted_tau(conditional)],
            vocab_coverage=round(self.covered / max(self.reply_tokens, 1), 4),
            rounds_tau=round(self.round_tokens / self.rounds, 4) if self.rounds else None,
        )


def _greedy_rounds(chain_lengths: list[int], reply: list[bool], num_steps: int) -> tuple[int, int]:
    """
    `(rounds, tokens)` of greedy generation over one sequence's replies. `chain_lengths[c - 1]` is how many tokens the
    round after token `c` gets accepted in a row (at most `num_steps`), `reply[t]` whether token `t` is a reply token.
    Each reply's first token comes from the prompt's forward pass; each round after token `c` then drafts at most
    `num_steps` tokens and no further than one before the reply's end (as `generate` drafts within `max_new_tokens`),
    produces its accepted tokens and a bonus token, and the next round starts after that one.
    """
    rounds = tokens = 0
    start = 1  # token 0 has no feature to draft from
    while start < len(reply):
        if not reply[start]:
            start += 1
            continue
        end = start
        while end < len(reply) and reply[end]:
            end += 1
        last = start  # the last token produced so far
        while last < end - 1:
            accepted = min(chain_lengths[last - 1], num_steps, end - last - 2)
            rounds += 1
            tokens += accepted + 1
            last += accepted + 1
        start = end
    return rounds, tokens


def chunked_rows(function, hidden: torch.Tensor, *columns: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """
    `function(rows, *column_rows)`, one value per row, over the rows of `hidden` (`[..., hidden]`) a few at a time
    (each of `columns` holds one value per row), back in `hidden`'s leading shape: a sequence's whole-vocabulary
    logits take gigabytes.
    """
    flat = hidden.reshape(-1, hidden.shape[-1])
    columns = tuple(column.reshape(-1) for column in columns)
    parts = [
        function(flat[start : start + chunk], *(column[start : start + chunk] for column in columns))
        for start in range(0, flat.shape[0], chunk)
    ]
    if not parts:
        return torch.zeros(hidden.shape[:-1], dtype=torch.long, device=hidden.device)
    return torch.cat(parts).reshape(hidden.shape[:-1])


def _chunked_argmax(head, hidden: torch.Tensor, *columns: torch.Tensor) -> torch.Tensor:
    """`head(hidden, *columns).argmax(-1)`, a few rows at a time (`chunked_rows`)."""
    return chunked_rows(lambda rows, *values: head(rows, *values).argmax(-1), hidden, *columns)


def drafted_tokens(
    draft: PrismDraftModel, hidden: torch.Tensor, proposals: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """
    The draft-vocabulary token a draft step picks from each row of draft features `hidden` (`[rows, hidden]`), with
    the copy head's `(proposals, lengths)` of those rows mixed in when given.
    """
    if proposals is None:
        return _chunked_argmax(draft.drafting_logits, hidden)
    return _chunked_argmax(lambda rows, *copy: draft.drafting_logits(rows, copy), hidden, *proposals)


def predicted_tau(conditional_accuracy: list[float]) -> list[float]:
    """Tokens per verification for draft lengths 1..K, from the chain's conditional acceptance rates."""
    taus, survive, total = [], 1.0, 1.0
    for rate in conditional_accuracy:
        survive *= rate
        total += survive
        taus.append(total)
    return taus


@torch.no_grad()
def target_top1(draft: PrismDraftModel, batch: TargetFeatures) -> torch.Tensor:
    """The target's greedy token after each pair position of `batch` (`[batch, seq - 2]`), whole vocabulary."""
    last = batch.last_hidden_state[:, 1:-1].to(device=draft.device, dtype=draft.verifier.head_dtype)
    return _chunked_argmax(draft.verifier.lm_head, last)


@torch.no_grad()
def evaluate_draft(
    draft: PrismDraftModel,
    batches: Iterable[TargetFeatures],
    num_steps: int = 5,
    targets: Iterable[torch.Tensor] | None = None,
    sources: Sequence[str] | None = None,
    modes: Sequence[str | None] | None = None,
    progress: bool = False,
) -> HeldOutMetrics:
    """
    Held-out acceptance of `draft` over `batches` of target features (see the module docstring); `progress` shows a
    bar (a large held-out part takes minutes on a CPU).

    Step k at pair position `p` drafts token `p + 2` from context up to `p - k + 1`, so the round that starts after
    token `c` drafts token `c + k` at pair `c + k - 2`. A round is scored from every `c` whose next token is in the
    loss mask; its chain ends at the first miss or at a token outside the mask (the end of the reply).

    `sources` names the source of each batch (a batch holds sequences of one source): the result then also holds each
    source's numbers in `by_source`, counted in the same pass as the pooled ones. `modes` likewise names how the
    target wrote each batch's replies ("greedy", "sampled", or None where unknown: counted in the pooled numbers only),
    for `by_mode`.
    """
    batches = list(batches)
    for name, labels in (("sources", sources), ("modes", modes)):
        if labels is not None and len(labels) != len(batches):
            raise ValueError(
                f"{len(labels)} {name} for {len(batches)} held-out batches: give one {name[:-1]} per batch."
            )
    was_training = draft.training
    draft.eval()
    counts: dict[tuple[str, str | None], _ChainCounts] = {}  # by (source, mode): disjoint sets that add up
    in_vocab = None
    if draft.draft_to_target is not None:
        in_vocab = torch.zeros(draft.config.verifier_vocab_size, dtype=torch.bool, device=draft.device)
        in_vocab[draft.draft_to_target] = True
    targets = iter(targets) if targets is not None else None
    bar = tqdm(batches, desc="held-out evaluation", unit="seq", disable=not progress, leave=False)
    for index, batch in enumerate(bar):
        batch = batch.to(draft.device)
        features = draft.fuse_selected_features(batch.hidden_states)
        output = draft(batch.input_ids, features, num_steps=num_steps, output_logits=False)
        top1 = next(targets).to(draft.device) if targets is not None else target_top1(draft, batch)
        token_mask = batch.loss_mask[:, 2:].bool()  # pair p scores token p + 2
        pairs = token_mask.shape[1]
        batch_counts = _ChainCounts.zeros(num_steps)
        match = []
        proposals = copy_proposals(draft, batch, token_mask)
        for k, hidden in enumerate(output.step_hidden_states, start=1):
            # logits only where a reply token is drafted (the LM head is most of the cost; prompts are often half)
            drafted = drafted_tokens(draft, hidden[:, :pairs][token_mask], proposals)
            if draft.draft_to_target is not None:
                drafted = draft.draft_to_target[drafted]
            hit = torch.zeros_like(token_mask)
            hit[token_mask] = drafted == top1[token_mask]
            valid = token_mask.clone()
            valid[:, : k - 1] = False
            batch_counts.matched[k - 1] = float((hit & valid).sum())
            batch_counts.scored[k - 1] = float(valid.sum())
            match.append(hit)
        # the round after token c = i + 1 (column i) is scored when token c + 1 (pair i) is a reply token; its step k
        # is pair i + k - 1. Token 0 has no feature to draft from.
        alive = token_mask.clone()
        batch_counts.chain_reached[0] = float(alive.sum())
        chain_lengths = torch.zeros(alive.shape, dtype=torch.long, device=alive.device)
        for k in range(1, num_steps + 1):
            shifted = torch.zeros_like(alive)
            width = max(0, pairs - (k - 1))
            shifted[:, :width] = match[k - 1][:, k - 1 : k - 1 + width]
            alive &= shifted
            batch_counts.chain_reached[k] = float(alive.sum())
            chain_lengths += alive
        for lengths, row_mask in zip(chain_lengths.tolist(), batch.loss_mask.bool().tolist(), strict=True):
            rounds, round_tokens = _greedy_rounds(lengths, row_mask, num_steps)
            batch_counts.rounds += rounds
            batch_counts.round_tokens += round_tokens
        reply = batch.loss_mask[:, 1:].bool()
        batch_counts.reply_tokens = int(reply.sum())
        covered = reply if in_vocab is None else in_vocab[batch.input_ids[:, 1:]] & reply
        batch_counts.covered = int(covered.sum())
        key = (sources[index] if sources is not None else "", modes[index] if modes is not None else None)
        counts.setdefault(key, _ChainCounts.zeros(num_steps)).add(batch_counts)
    draft.train(was_training)

    def grouped(position: int) -> dict[str, _ChainCounts]:
        groups: dict[str, _ChainCounts] = {}
        for key, group_counts in counts.items():
            if key[position] is not None:
                groups.setdefault(key[position], _ChainCounts.zeros(num_steps)).add(group_counts)
        return groups

    pooled = _ChainCounts.zeros(num_steps)
    for group_counts in counts.values():
        pooled.add(group_counts)
    metrics = pooled.metrics()
    if sources is not None:
        metrics.by_source = {source: group.metrics() for source, group in grouped(0).items()}
    if modes is not None and any(mode is not None for mode in modes):
        metrics.by_mode = {mode: group.metrics() for mode, group in sorted(grouped(1).items())}
    return metrics


class HeldOutTracker:
    """
    Evaluates a draft during a training phase, logs each evaluation and keeps the weights with the best held-out
    predicted tau (at the longest scored draft length), so the phase can end on them rather than on its last update.

    The best weights are also written to `state_path` (with their metrics in its metadata) so that a resumed run keeps
    them; `log_path` receives one JSON line per evaluation.
    """

    def __init__(
        self,
        model: PrismDraftModel,
        evaluate: Callable[[], HeldOutMetrics],
        phase: str,
        log_path: str | Path | None = None,
        state_path: str | Path | None = None,
        resume: bool = False,
    ):
        self.model, self._evaluate, self.phase = model, evaluate, phase
        self.log_path = Path(log_path) if log_path is not None else None
        self.state_path = Path(state_path) if state_path is not None else None
        self.best: dict | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.seconds = 0.0  # time spent evaluating (not training)
        if resume and self.state_path is not None and self.state_path.is_file():
            self.best_state = load_file(self.state_path)
            with safe_open(self.state_path, framework="pt") as handle:
                self.best = json.loads(handle.metadata()["best"])

    def evaluate(self, update: int, train_metrics: dict[str, float] | None = None) -> dict[str, float]:
        """Scores the model now; returns short numbers for a progress bar."""
        started = time.perf_counter()
        metrics = self._evaluate()
        self.seconds += time.perf_counter() - started
        entry = {"phase": self.phase, "update": update, **metrics.to_dict()}
        if train_metrics:
            entry["train"] = {key: round(value, 4) for key, value in train_metrics.items()}
        if self.log_path is not None:
            with self.log_path.open("a", encoding="utf-8") as log:
                log.write(json.dumps(entry) + "\n")
        if self.best is None or metrics.predicted_tau[-1] > self.best["metrics"]["predicted_tau"][-1]:
            self.best = {"update": update, "metrics": metrics.to_dict(prefix="")}
            self.best_state = {name: value.detach().clone() for name, value in self.model.state_dict().items()}
            if self.state_path is not None:
                self.state_path.parent.mkdir(parents=True, exist_ok=True)
                save_file(
                    {k: v.contiguous() for k, v in self.best_state.items()},
                    self.state_path,
                    metadata={"best": json.dumps(self.best)},
                )
        return metrics.summary()

    def restore_best(self) -> dict:
        """Loads the best weights into the model; returns `{"update": n, "metrics": {...}}` of that evaluation."""
        if self.best is None or self.best_state is None:
            raise RuntimeError(f"Phase {self.phase!r} was never evaluated on held-out data.")
        self.model.load_state_dict(self.best_state)
        return self.best
