"""
Ouroboros drafting inside `generate()` (arXiv 2402.13720): a small model drafts phrase by phrase with a phrase pool.

`target.generate(**inputs, assistant_model=Ouroboros(small_model, pool=pool))` drafts with the small model and, after
every token it proposes, extends the draft with a phrase from the pool; `Ouroboros(pool=pool)` drafts from the pool
alone. The target verifies every token, so greedy output equals plain `generate` and sampling stays exact.
"""

from __future__ import annotations

import copy
import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, GenerationConfig, LogitsProcessorList, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, LinearAttentionCacheLayerMixin
from transformers.generation.candidate_generator import CandidateGenerator

from .configuration_prism import DRAFT_LENGTH_SCHEDULES
from .cpu_linear import FastCpuLinear
from .generation_prism import (
    PrismCandidateGenerator,
    SpeculationStats,
    check_exact_drafting,
    resolve_draft_length,
)
from .modeling_prism import _same_key
from .phrase_pool import PhrasePool

_Int8Linear = torch.ao.nn.quantized.dynamic.Linear  # what `quantize_cpu_linears_int8` puts in

# `Ouroboros` options that shape a small causal LM's drafting; a PRISM draft drafts by its own config instead
SMALL_LM_OPTIONS = frozenset({"confidence_threshold", "pool_suffix", "small_model_context", "small_model_vocab"})
# `Ouroboros` options for a PRISM draft only
PRISM_DRAFT_OPTIONS = frozenset({"pool_rounds"})


@dataclass
class OuroborosStats(SpeculationStats):
    """
    `SpeculationStats` plus where drafted tokens came from. `verifications` counts every target forward, except the
    prompt's first forward with a PRISM draft, which holds no draft (`mean_accepted_tokens` stays tau).
    """

    pool_drafted_tokens: int = 0
    pool_accepted_tokens: int = 0
    small_model_forwards: int = 0


class OuroborosCandidateGenerator(CandidateGenerator):
    """
    Proposes tokens phrase by phrase: one small-model step proposes a token, then the [`PhrasePool`] appends the
    newest phrase stored under the longest n-gram ending the draft (phrases chain), so one small-model forward can
    yield several draft tokens. Without a small model the pool drafts alone (prompt lookup over all earlier text).

    The pool learns from (a) the prompt and every accepted token, (b) the target's own predictions at the verified
    positions that follow a rejected draft token (phrases keyed by the rejected context, so drafts that drift the
    same way are corrected next time) and (c) earlier calls, since the pool outlives the generator.

    Draft length: at most `num_draft_tokens` per round; the `"heuristic"` schedules add 2 after a round whose full
    budget was accepted and remove 1 after a rejection. The small model also stops at its first token whose
    probability is below `confidence_threshold`.

    Sampling: small-model tokens are sampled from the small model's processed distribution q and returned with it;
    pool tokens are deterministic proposals and get a one-hot q (logits `-inf` except the proposed token), so
    transformers' speculative sampling accepts them with probability p(token) and otherwise resamples from p without
    that token, which is exact. A pool-only draft returns no logits: transformers then accepts a token iff the
    target's own sample equals it, the same rule. Greedy rounds return no logits (they are not needed).
    """

    requires_model_outputs = False

    def __init__(
        self,
        assistant: Ouroboros,
        target: PreTrainedModel,
        input_ids: torch.LongTensor,
        generation_config: GenerationConfig,
        logits_processor: LogitsProcessorList | None,
        model_kwargs: dict[str, Any],
    ):
        check_exact_drafting("Ouroboros", target, input_ids, generation_config, model_kwargs)
        self.schedule, self.num_draft_tokens = resolve_draft_length(
            generation_config,
            assistant.draft_length_schedule,
            assistant.num_draft_tokens,
            assistant._heuristic_num_draft_tokens,
        )
        self.assistant = assistant
        self.pool = assistant.pool
        self.small_model = assistant.small_model
        self.confidence_threshold = assistant.confidence_threshold
        self.unchecked_min_key_length = assistant.unchecked_min_key_length
        self.do_sample = bool(generation_config.do_sample)
        self.logits_processor = logits_processor if logits_processor is not None else LogitsProcessorList()
        self.max_length = generation_config.max_length
        self.stats = OuroborosStats()
        assistant.last_generation_stats = self.stats
        # The caller's `inputs_embeds` cover the prompt only: transformers feeds them to the target's first pass
        # only when that pass holds no draft, so the first round drafts nothing (as PRISM's always does).
        self._verify_prompt_alone = model_kwargs.get("inputs_embeds") is not None

        # (a) the prompt goes into the pool before the first draft
        self.tokens: list[int] = input_ids[0].tolist()
        self.pool.add_text(self.tokens)
        self._draft: list[int] = []
        self._from_pool: list[bool] = []

        if self.small_model is not None:
            self.small_cache = _rollback_cache(self.small_model.config)
            # positions are counted in the whole sequence; the small model skips the start of a prompt longer than
            # `small_model_context` (the pool still holds all of it), so its cache begins there
            window = assistant.small_model_context
            skipped = 0 if window is None else max(0, len(self.tokens) - window)
            self.small_cached = skipped  # end of the part of the sequence the small model's cache covers
            self.small_valid = skipped  # end of the cached part still on the accepted path
            self._small_keeps_logits = self.small_model._supports_logits_to_keep()
            # transformers 5.24 renamed the forward argument `past_key_values` to `cache` (the old name goes in 5.40)
            forward_arguments = inspect.signature(self.small_model.forward).parameters
            self._cache_argument = "cache" if "cache" in forward_arguments else "past_key_values"
            self.small_head = self.small_body = None
            if assistant.small_model_vocab is not None:
                self.small_body = self.small_model.get_decoder()  # its hidden states go to the reduced head
                eos = generation_config.eos_token_id
                always = self.tokens + ([] if eos is None else torch.tensor(eos).flatten().tolist())
                self.small_head = assistant._reduced_vocabulary_head().with_tokens(always)

    @property
    def num_drafting_tokens(self) -> int:
        """The most tokens the next round drafts, pool phrases included (see `PrismCandidateGenerator`'s)."""
        return self.num_draft_tokens

    # ------------------------------------------------------------------------------------------------- drafting

    @torch.no_grad()
    def get_candidates(
        self, input_ids: torch.LongTensor, **kwargs: Any
    ) -> tuple[torch.LongTensor, torch.Tensor | None]:
        began = time.perf_counter()
        self.tokens = _sync_tokens(self.tokens, input_ids, self.pool)
        budget = min(self.num_draft_tokens, self.max_length - input_ids.shape[1] - 1)
        if self._verify_prompt_alone:
            self._verify_prompt_alone, budget = False, 0
        self._draft, self._from_pool = [], []
        logits = None
        if budget >= 1:
            if self.small_model is None:
                self._draft = self.pool.draft(self.tokens, budget, self.unchecked_min_key_length)
                self._from_pool = [True] * len(self._draft)
            else:
                logits = self._draft_with_small_model(input_ids, budget)
        self.stats.draft_seconds += time.perf_counter() - began
        if not self._draft:
            return input_ids, None
        draft = torch.tensor([self._draft], dtype=input_ids.dtype, device=input_ids.device)
        return torch.cat([input_ids, draft], dim=-1), logits

    def _draft_with_small_model(self, input_ids: torch.LongTensor, budget: int) -> torch.Tensor | None:
        """
        Fills `self._draft` with the small model's own tokens, phrase by phrase: every forward feeds the last drafted
        token together with the pool's phrase after it, and keeps the phrase tokens the small model itself picks at
        their positions (plus its next token), so one forward can draft several tokens. Returns the candidate
        logits when sampling (the small model's processed q; one-hot rows for an unverified pool suffix).
        """
        if self.small_cached > self.small_valid:
            self.small_cache.crop(-(self.small_cached - self.small_valid))
        self.small_cached = self.small_valid
        rows: list[torch.Tensor | None] = []
        # the first forward also checks a pool phrase after the context, like every later one after a drafted token
        proposal = self.pool.draft(self.tokens, budget - 1)
        fed = self.tokens[self.small_valid :] + proposal
        while True:
            # logits[j] predicts the token after the draft extended by proposal[:j]
            logits = self._small_forward(fed, keep=len(proposal) + 1, device=input_ids.device)
            stop, taken = False, 0
            for j in range(len(proposal) + 1):
                token, confident = self._pick(logits[j], rows, input_ids.device)
                from_pool = j < len(proposal) and token == proposal[j]
                self._draft.append(token)
                self._from_pool.append(from_pool)
                taken += from_pool
                stop = len(self._draft) >= budget or not confident
                if stop or not from_pool:
                    break
            unused = len(proposal) - taken  # fed phrase tokens off the drafted path
            if unused:
                self.small_cache.crop(-unused)
                self.small_cached -= unused
            if stop:
                break
            # (the last proposed token's successor would be past the budget: propose one fewer)
            proposal = self.pool.draft(self.tokens + self._draft, budget - len(self._draft) - 1)
            fed = [self._draft[-1], *proposal]
        if self.assistant.pool_suffix and len(self._draft) < budget:
            room = budget - len(self._draft)
            suffix = self.pool.draft(self.tokens + self._draft, room, self.unchecked_min_key_length)
            self._draft.extend(suffix)
            self._from_pool.extend([True] * len(suffix))
            rows.extend([None] * len(suffix))
        if not self.do_sample:
            return None
        vocab = rows[0].shape[-1]
        candidate_logits = torch.full((1, len(rows), vocab), float("-inf"), device=input_ids.device)
        for i, (row, token) in enumerate(zip(rows, self._draft, strict=True)):
            if row is None:
                candidate_logits[0, i, token] = 0.0
            else:
                candidate_logits[0, i] = row
        return candidate_logits

    def _small_forward(self, tokens: list[int], keep: int, device: torch.device) -> torch.Tensor:
        """Runs the small model over `tokens` on its cache; returns the float logits of the last `keep` positions."""
        small = self.small_model
        step_inputs = torch.tensor([tokens], dtype=torch.long, device=small.device)
        cache = {self._cache_argument: self.small_cache}
        if self.small_head is not None:
            hidden = self.small_body(input_ids=step_inputs, use_cache=True, **cache).last_hidden_state
            logits = self.small_head(hidden[0, -keep:])
        else:
            extra = {"logits_to_keep": keep} if self._small_keeps_logits else {}
            logits = small(input_ids=step_inputs, use_cache=True, **cache, **extra).logits[0]
        self.small_cached += len(tokens)
        self.stats.small_model_forwards += 1
        return logits[-keep:].float().to(device)

    def _pick(self, logits: torch.Tensor, rows: list[torch.Tensor | None], device: torch.device) -> tuple[int, bool]:
        """Chooses the small model's token after the current draft; records its processed logits in `rows`."""
        logits = logits[None]
        if len(self.logits_processor) > 0:
            candidates = torch.tensor([self.tokens + self._draft], dtype=torch.long, device=device)
            logits = self.logits_processor(candidates, logits)
        probs = logits.softmax(dim=-1)
        if self.do_sample:
            token = int(torch.multinomial(probs, num_samples=1))
        else:
            token = int(logits.argmax(dim=-1))
        rows.append(logits[0])
        return token, float(probs[0, token]) >= self.confidence_threshold

    # ------------------------------------------------------------------------------------------------- feedback

    @torch.no_grad()
    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, num_matches: int):
        began = time.perf_counter()
        num_matches = int(num_matches)
        drafted = scores.shape[1] - 1
        start = len(self.tokens)
        self.tokens = _learn_from_verification(
            self.stats, self.pool, self.tokens, self._draft, self._from_pool, scores, num_matches, input_ids
        )
        if self.small_model is not None:
            self.small_valid = min(self.small_cached, start + num_matches)

        if self.schedule != "constant" and drafted > 0:
            if num_matches == drafted and drafted >= self.num_draft_tokens:
                self.num_draft_tokens += 2
            elif num_matches < drafted:
                self.num_draft_tokens = max(1, self.num_draft_tokens - 1)
            if self.schedule == "heuristic":
                self.assistant._heuristic_num_draft_tokens = self.num_draft_tokens
        self.stats.draft_seconds += time.perf_counter() - began


class PooledPrismCandidateGenerator(PrismCandidateGenerator):
    """
    PRISM drafting with the phrase pool (`Ouroboros(prism_draft, pool=pool)`). At every draft step the pool's next
    token for the context (its newest phrase under the longest matching key of at least `unchecked_min_key_length`
    tokens) is taken when there is one, the PRISM draft's own token otherwise; the draft's modules run over whichever
    token was taken, so its features follow the draft. After the draft's budget the pool appends its phrase (up to
    `Ouroboros.num_draft_tokens` tokens) while it has one. The target verifies everything.

    A small LM checks a whole pool phrase in one forward (`OuroborosCandidateGenerator`); a PRISM step needs the
    previous step's feature, so here the pool leads and PRISM fills the gaps. The pool learns from every
    verification as in `OuroborosCandidateGenerator`; the draft-length schedule adapts the budgeted part. Pool tokens
    get one-hot candidate logits, which keeps sampling exact.

    With `Ouroboros.pool_rounds` set, the pool and the draft take turns by rounds instead: a round where the pool
    drafts at least `pool_rounds` tokens (keys of `unchecked_min_key_length` or more) and the draft's copy index has no
    match long enough for a copy streak goes to the target as the pool's phrase alone; every other round is the
    PRISM draft's own, as without a pool. A pool round costs no draft step: the draft runs module 0 over the text
    verified meanwhile at the start of its next round, in one call. A pool round drafts up to
    `Ouroboros.num_draft_tokens` tokens at first; the length doubles after a pool round accepted whole, up to the
    draft's `copy_streak_max_tokens` (when larger), and halves after one cut short.
    """

    def __init__(
        self,
        assistant: Ouroboros,
        target: PreTrainedModel,
        input_ids: torch.LongTensor,
        generation_config: GenerationConfig,
        logits_processor: LogitsProcessorList | None,
        model_kwargs: dict[str, Any],
    ):
        super().__init__(
            assistant.small_model,
            target,
            input_ids,
            generation_config,
            logits_processor,
            model_kwargs,
            draft_length_schedule=assistant.draft_length_schedule,  # None: the draft config's
        )
        self.assistant = assistant
        self.pool = assistant.pool
        self.stats = OuroborosStats()
        self.draft.last_generation_stats = assistant.last_generation_stats = self.stats
        self.tokens: list[int] = input_ids[0].tolist()
        self.pool.add_text(self.tokens)
        self._draft_tokens: list[int] = []
        self._from_pool: list[bool] = []
        self._num_budgeted = 0
        self._vocab_size = target.config.get_text_config().vocab_size  # the width of the target's logits
        self._pool_round = False  # whether the last round was the pool's alone (`Ouroboros.pool_rounds`)
        self.pool_round_tokens = assistant.num_draft_tokens  # the next pool round's length (`pool_rounds`)
        self.max_pool_round_tokens = max(assistant.num_draft_tokens, self.copy_streak_max_tokens)

    @property
    def num_drafting_tokens(self) -> int:
        """
        The draft's budget, then the pool's phrase of up to `Ouroboros.num_draft_tokens` after it; with `pool_rounds`,
        the longer of the draft's round and the next pool round.
        """
        if self.assistant.pool_rounds is not None:
            return max(super().num_drafting_tokens, self.pool_round_tokens)
        return self.num_draft_tokens + self.assistant.num_draft_tokens

    def _next_token(
        self, candidate_ids: torch.LongTensor, draft_hidden: torch.Tensor
    ) -> tuple[torch.LongTensor, torch.FloatTensor]:
        """The pool's next token when it has one (the draft's head is then skipped), else the draft's own."""
        if self.assistant.pool_rounds is not None:  # the draft's rounds are its own
            self._from_pool.append(False)
            return super()._next_token(candidate_ids, draft_hidden)
        context = self.tokens + candidate_ids[0, len(self.tokens) :].tolist()
        proposal = self.pool.draft(context, 1, self.assistant.unchecked_min_key_length)
        self._from_pool.append(bool(proposal))
        if not proposal:
            return super()._next_token(candidate_ids, draft_hidden)
        token = torch.tensor([proposal], dtype=candidate_ids.dtype, device=candidate_ids.device)
        return token, _one_hot_logits(proposal, self._vocab_size, candidate_ids.device)[:, 0]

    @torch.no_grad()
    def get_candidates(
        self, input_ids: torch.LongTensor, **kwargs: Any
    ) -> tuple[torch.LongTensor, torch.FloatTensor | None]:
        self.tokens = _sync_tokens(self.tokens, input_ids, self.pool)
        self._from_pool, self._pool_round = [], False
        copied = self.stats.copied_tokens
        candidate_ids, candidate_logits = super().get_candidates(input_ids, **kwargs)
        began = time.perf_counter()
        self._draft_tokens = candidate_ids[0, input_ids.shape[1] :].tolist()
        self._num_budgeted = 0 if self._pool_round else len(self._draft_tokens)
        # a copy streak ends the draft's part of a round: its tokens are the draft's, with no draft step
        self._from_pool += [False] * (len(self._draft_tokens) - len(self._from_pool))
        if not self._pool_round:
            copied = self.stats.copied_tokens - copied
            self.stats.small_model_forwards += self._num_budgeted - sum(self._from_pool) - copied
        room = min(self.assistant.num_draft_tokens, self.max_length - candidate_ids.shape[1] - 1)
        suffix = []
        if not self._round_is_prefill and room > 0 and self.assistant.pool_rounds is None:
            suffix = self.pool.draft(self.tokens + self._draft_tokens, room, self.assistant.unchecked_min_key_length)
        if suffix:
            self._draft_tokens += suffix
            self._from_pool += [True] * len(suffix)
            suffix_ids = torch.tensor([suffix], dtype=candidate_ids.dtype, device=candidate_ids.device)
            candidate_ids = torch.cat([candidate_ids, suffix_ids], dim=-1)
            if candidate_logits is not None:
                rows = _one_hot_logits(suffix, candidate_logits.shape[-1], candidate_logits.device)
                candidate_logits = torch.cat([candidate_logits, rows], dim=1)
        self.stats.draft_seconds += time.perf_counter() - began
        return candidate_ids, candidate_logits

    @torch.no_grad()
    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, num_matches: int):
        began = time.perf_counter()
        if self._round_is_prefill:  # no draft was verified: only the bonus token is new
            self.tokens = _sync_tokens(self.tokens, input_ids, self.pool)
        else:
            num_matches = int(num_matches)
            self.tokens = _learn_from_verification(
                self.stats, self.pool, self.tokens, self._draft_tokens, self._from_pool, scores, num_matches, input_ids
            )
            budgeted = min(self._num_budgeted, scores.shape[1] - 1)
            self._adapt_draft_length(budgeted, min(num_matches, budgeted))
            if self.assistant.pool_rounds is not None:
                self._adapt_round_lengths(scores.shape[1] - 1, num_matches)
        self.stats.draft_seconds += time.perf_counter() - began

    def _draft_round(
        self, input_ids: torch.LongTensor, budget: int
    ) -> tuple[torch.LongTensor, torch.FloatTensor | None]:
        """With `pool_rounds`: the pool's phrase alone when it takes the round (see the class docstring)."""
        if self.assistant.pool_rounds is not None and not self._copy_streak_ahead():
            room = min(self.pool_round_tokens, budget)
            phrase = self.pool.draft(self.tokens, room, self.assistant.unchecked_min_key_length) if room > 0 else []
            if len(phrase) >= self.assistant.pool_rounds:
                self._pool_round = True
                self._from_pool = [True] * len(phrase)
                ids = torch.tensor([phrase], dtype=input_ids.dtype, device=input_ids.device)
                logits = _one_hot_logits(phrase, self.vocab_width, input_ids.device) if self.do_sample else None
                return torch.cat([input_ids, ids], dim=-1), logits
        return super()._draft_round(input_ids, budget)

    def _copy_streak_ahead(self) -> bool:
        """Whether the draft's copy index matches enough of the text's end to start its round with a copy streak."""
        return bool(self.copy_streak_tokens) and self.copy_index.lookup()[1] >= self.copy_index.max_ngram

    def _adapt_round_lengths(self, drafted: int, num_matches: int) -> None:
        """After a pool round, its length schedule; after a draft round, the draft's copy streak schedule."""
        if not self._pool_round:
            self._adapt_streak_length(drafted, num_matches)
        elif num_matches >= drafted >= self.pool_round_tokens:
            self.pool_round_tokens = min(2 * self.pool_round_tokens, self.max_pool_round_tokens)
        elif num_matches < drafted:
            self.pool_round_tokens = max(self.pool_round_tokens // 2, self.assistant.num_draft_tokens)


class ReducedVocabularyHead:
    """
    The small model's output layer restricted to some token ids, so that its LM head (a quarter of a
    Qwen2.5-Coder-0.5B forward over a 151936-token vocabulary) costs a fraction. Returns full-vocabulary logits,
    `-inf` outside the kept ids: the small model can then only draft kept tokens, and when sampling, its q is that
    restricted distribution, which it samples from and reports, so speculative sampling stays exact.

    `vocab`: an int N keeps the ids below N (byte-level BPE and SentencePiece vocabularies list frequent tokens
    first), a sequence keeps those ids. `with_tokens` adds more ids (a prompt's tokens, the end-of-sequence ids) as
    a few extra rows, without copying the kept rows again. The output layer may be an `nn.Linear`, a [`FastCpuLinear`]
    or an int8 layer from [`quantize_cpu_linears_int8`]; the kept rows stay of that kind. Logit transforms a model
    applies after its LM head (softcapping, scaling) are skipped: they only shape drafts.
    """

    def __init__(self, small_model: PreTrainedModel, vocab: int | Sequence[int]):
        head = small_model.get_output_embeddings()
        weight = getattr(head, "weight", None)  # (a method on torch's quantized linears)
        float_linear = type(head) in (nn.Linear, FastCpuLinear) and weight.is_floating_point()
        if not float_linear and type(head) is not _Int8Linear:
            kind = weight.dtype if isinstance(weight, torch.Tensor) else "quantized" if callable(weight) else "no"
            raise ValueError(
                "small_model_vocab needs a small model whose output layer is a floating-point nn.Linear or an int8 "
                f"one from quantize_cpu_linears_int8, got {type(head).__module__}.{type(head).__name__} with {kind} "
                "weights."
            )
        self.vocab_size = head.out_features
        if isinstance(vocab, int):
            ids = torch.arange(min(max(vocab, 0), self.vocab_size))
        else:
            ids = torch.tensor(sorted({int(t) for t in vocab}), dtype=torch.long)
        if ids.numel() == 0 or ids.min() < 0 or ids.max() >= self.vocab_size:
            first, last = (int(ids.min()), int(ids.max())) if ids.numel() else (None, None)
            raise ValueError(
                f"small_model_vocab must keep token ids in [0, {self.vocab_size}), got {ids.numel()} ids from "
                f"{first} to {last}."
            )
        self._rows_of = _row_slicer(head)
        device = torch.device("cpu") if type(head) is _Int8Linear else head.weight.device  # (int8: CPU-only)
        self.parts = [(ids.to(device), self._rows_of(ids))]

    @property
    def token_ids(self) -> torch.Tensor:
        """The kept token ids, sorted."""
        return torch.cat([ids for ids, _ in self.parts]).sort().values

    def with_tokens(self, tokens: Sequence[int]) -> ReducedVocabularyHead:
        """A copy that also keeps `tokens` (those not kept yet become one extra block of rows)."""
        kept = torch.zeros(self.vocab_size, dtype=torch.bool)
        for ids, _ in self.parts:
            kept[ids.cpu()] = True
        wanted = torch.tensor(sorted({int(t) for t in tokens if 0 <= int(t) < self.vocab_size}), dtype=torch.long)
        missing = wanted[~kept[wanted]] if wanted.numel() else wanted
        extended = copy.copy(self)
        if missing.numel():
            device = self.parts[0][0].device  # where the kept ids already live
            extended.parts = [*self.parts, (missing.to(device), self._rows_of(missing))]
        return extended

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[rows, hidden]` final hidden states to `[rows, vocab_size]` logits."""
        logits = hidden.new_full((hidden.shape[0], self.vocab_size), float("-inf"))
        for ids, linear in self.parts:
            logits[:, ids] = linear(hidden)
        return logits


def _row_slicer(head: nn.Module) -> Callable[[torch.Tensor], nn.Module]:
    """
    Makes layers from rows of an output layer, of its kind: a FastCpuLinear head gives FastCpuLinear rows, an int8
    head int8 rows with the very same int8 values and per-row scales (so their logits equal the full head's). An int8
    layer's weights are unpacked once, here (fbgemm's packed format takes seconds to unpack), and kept unpacked for
    every call's extra rows.
    """
    if type(head) is _Int8Linear:
        packed, bias = head._weight_bias()  # one unpack for both (`weight()` and `bias()` unpack each)
        values, scales, zero_points = (
            packed.int_repr(),
            packed.q_per_channel_scales(),
            packed.q_per_channel_zero_points(),
        )

        def int8_rows(ids: torch.Tensor) -> nn.Module:
            rows = _Int8Linear(head.in_features, ids.numel(), bias_=bias is not None, dtype=torch.qint8)
            weight = torch._make_per_channel_quantized_tensor(values[ids], scales[ids], zero_points[ids], 0)
            rows.set_weight_bias(weight, None if bias is None else bias[ids])
            return rows

        return int8_rows
    weight = head.weight.detach()
    bias = None if head.bias is None else head.bias.detach()

    def float_rows(ids: torch.Tensor) -> nn.Module:
        ids = ids.to(weight.device)
        rows = nn.Linear(head.in_features, ids.numel(), bias=bias is not None, device="meta")
        rows.weight = nn.Parameter(weight[ids], requires_grad=False)
        if bias is not None:
            rows.bias = nn.Parameter(bias[ids], requires_grad=False)
        rows.__class__ = type(head)  # nn.Linear or FastCpuLinear
        if type(head) is FastCpuLinear:
            # the head's measured routing (a rows-only shape would need a timing per prompt's extra rows)
            rows.fast_row_buckets = head.fast_row_buckets
        return rows

    return float_rows


def _rollback_cache(config: PretrainedConfig) -> DynamicCache:
    """
    The small model's cache, with full layers in place of sliding-window ones: a rejected draft rolls back tokens fed
    over several forwards, further than a sliding layer keeps them (the attention mask still applies the window).
    """
    cache = DynamicCache(config=config)
    cache.layers = [DynamicLayer() if type(layer) is DynamicSlidingWindowLayer else layer for layer in cache.layers]
    return cache


def _check_small_cache_rolls_back(small_model: PreTrainedModel) -> None:
    """
    Refuses small models with recurrent state (Mamba, linear attention, short convolutions: hybrid models such as
    Qwen3-Next, Jamba or LFM2): a rejected draft must roll their cache back over tokens fed in several forwards, and
    such a state only moves forward.
    """
    cache = _rollback_cache(small_model.config)
    recurrent = sorted(
        {type(layer).__name__ for layer in cache.layers if isinstance(layer, LinearAttentionCacheLayerMixin)}
    )
    if recurrent:
        raise ValueError(
            f"Ouroboros rolls the small model's cache back after rejected drafts, but {type(small_model).__name__} "
            f"keeps a recurrent state ({', '.join(recurrent)}) that cannot be rolled back. Use a small model with "
            "attention layers only, or no small model (the pool drafts alone)."
        )


def _sync_tokens(tokens: list[int], input_ids: torch.LongTensor, pool: PhrasePool) -> list[int]:
    """`tokens` brought level with `input_ids`, the new text added to `pool` (usually already done on update)."""
    if len(tokens) == input_ids.shape[1]:
        return tokens
    start = min(len(tokens), input_ids.shape[1])
    tokens = input_ids[0].tolist()
    pool.add_text(tokens, start)
    return tokens


def _learn_from_verification(
    stats: OuroborosStats,
    pool: PhrasePool,
    prefix: list[int],
    draft: list[int],
    from_pool: list[bool],
    scores: torch.FloatTensor,
    num_matches: int,
    input_ids: torch.LongTensor,
) -> list[int]:
    """
    Counts one verification of `draft` after `prefix` in `stats` and teaches `pool` from it: (b) the target's own
    predictions after a rejected draft token, keyed by the rejected context, then (a) the accepted tokens and the
    target's bonus token. Returns the tokens of `input_ids` (the new prefix).
    """
    drafted = scores.shape[1] - 1
    stats.verifications += 1
    stats.drafted_tokens += drafted
    stats.accepted_tokens += num_matches
    stats.pool_drafted_tokens += sum(from_pool[:drafted])
    stats.pool_accepted_tokens += sum(from_pool[:num_matches])
    if num_matches < drafted:
        predictions = scores[0, num_matches + 1 :].argmax(dim=-1).tolist()  # after draft[: num_matches + 1] ...
        pool.add_corrections(prefix, draft[:drafted], num_matches, predictions)
    tokens = input_ids[0].tolist()
    pool.add_text(tokens, len(prefix))
    return tokens


def _one_hot_logits(tokens: list[int], vocab_size: int, device: torch.device) -> torch.Tensor:
    """`[1, len(tokens), vocab_size]` float logits that put all probability on `tokens` (deterministic proposals)."""
    rows = torch.full((1, len(tokens), vocab_size), float("-inf"), device=device)
    rows[0, torch.arange(len(tokens)), torch.tensor(tokens)] = 0.0
    return rows


def _is_prism_draft(model: Any) -> bool:
    """PRISM drafts by config type, so copies loaded through `trust_remote_code` count too."""
    return getattr(getattr(model, "config", None), "model_type", None) == "prism_draft"


class Ouroboros:
    """
    The `assistant_model` of Ouroboros drafting: `target.generate(**inputs, assistant_model=Ouroboros(small, pool))`.

    Args:
        small_model (`PreTrainedModel`, *optional*):
            Any causal LM sharing the target's tokenizer (same vocabulary), or a [`PrismDraftModel`] of the target
            (then PRISM drafts and the pool extends each draft, see [`PooledPrismCandidateGenerator`]; the options
            `confidence_threshold` and `pool_suffix` concern small LMs only). Without it the pool drafts alone. On
            an x86 CPU, [`quantize_cpu_linears_int8`] makes a float32 small LM's forwards about 2.5x cheaper (the
            output stays exact: the target verifies every token).
        pool (`PhrasePool`, *optional*):
            The phrase pool; reuse one (or `PhrasePool.load(path)`) to warm-start later calls. Default: a new pool.
        num_draft_tokens (`int`, *optional*, defaults to 8):
            Initial draft budget per verification. `num_assistant_tokens` in the `generate` call overrides it
            (except transformers' default value 20, which cannot be told apart from "unset"). With a PRISM draft:
            the most pool tokens appended after its draft (whose own length the draft's config sets).
        draft_length_schedule (`str`, *optional*):
            `"constant"`, `"heuristic"` (+2 after a fully accepted full-budget round, -1 after a rejection, carried
            over to the next call) or `"heuristic_transient"` (the same within one call). Default:
            `"heuristic_transient"`; with a PRISM draft, its config's `num_draft_tokens_schedule` (the schedule then
            adapts the draft's own part). `num_assistant_tokens_schedule` in the `generate` call overrides it (except
            the default `"constant"`).
        confidence_threshold (`float`, *optional*, defaults to 0.3):
            The small model stops drafting after a token it gives a lower probability than this.
        pool_suffix (`bool`, *optional*, defaults to `False`):
            With a small model: after it stops, append the pool's phrase (unchecked by the small model, as the
            paper's candidate suffixes) while the budget allows.
        unchecked_min_key_length (`int`, *optional*, defaults to 2):
            Shortest key (in tokens) for phrases that go to the target unchecked (pool-only drafts, pool suffixes).
            A wrong draft token costs a target verification position, and single-token keys match almost
            everywhere; phrases the small model checks use every key length (a wrong one only costs a position in
            the small model's forward). At most the pool's longest key (`max(pool.ngram_sizes)`).
        small_model_context (`int`, *optional*):
            With a small LM: it reads only the last `small_model_context` tokens of a longer prompt (and all the
            text generated after them), so a long prompt costs it a short prefill; the pool still holds the whole
            prompt, so phrases copied from its start are still drafted. Default: the whole prompt.
        pool_rounds (`int`, *optional*):
            With a PRISM draft: the pool and the draft take turns by rounds (see [`PooledPrismCandidateGenerator`]).
            A round where the pool drafts at least this many tokens is the pool's alone (unless the draft's copy
            index starts a copy streak), any other round the draft's own, so a pool round costs no draft step.
            Default (`None`): the pool leads token by token and PRISM fills the gaps.
        small_model_vocab (`int` or `Sequence[int]`, *optional*):
            With a small LM: it scores only these token ids (an int N: the ids below N, where BPE and SentencePiece
            vocabularies keep their frequent tokens), plus the prompt's tokens and the end-of-sequence ids, so its
            LM head costs a fraction on large vocabularies (see [`ReducedVocabularyHead`]). It then never drafts
            another token; the output stays exact. Default: the whole vocabulary.
    """

    def __init__(
        self,
        small_model: PreTrainedModel | None = None,
        pool: PhrasePool | None = None,
        num_draft_tokens: int = 8,
        draft_length_schedule: str | None = None,
        confidence_threshold: float = 0.3,
        pool_suffix: bool = False,
        unchecked_min_key_length: int = 2,
        small_model_context: int | None = None,
        small_model_vocab: int | Sequence[int] | None = None,
        pool_rounds: int | None = None,
    ):
        if small_model is not None and not isinstance(small_model, PreTrainedModel):
            raise TypeError(
                f"Ouroboros needs a transformers causal LM as small model, got {type(small_model).__name__}."
            )
        if small_model is not None and small_model.config.is_encoder_decoder:
            raise ValueError("Ouroboros drafts with decoder-only small models; this one is an encoder-decoder.")
        if small_model is not None and not _is_prism_draft(small_model):
            _check_small_cache_rolls_back(small_model)
        if pool is not None and not isinstance(pool, PhrasePool):
            raise TypeError(f"pool must be a prism_hf.PhrasePool, got {type(pool).__name__}.")
        if not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be a positive integer, got {num_draft_tokens!r}.")
        for name, value in (("small_model_context", small_model_context), ("small_model_vocab", small_model_vocab)):
            if value is not None and (small_model is None or _is_prism_draft(small_model)):
                drafter = (
                    "no small model" if small_model is None else "a PRISM draft (it has its own draft vocabulary)"
                )
                raise ValueError(f"{name} concerns a small causal LM; this Ouroboros has {drafter}.")
        if pool_rounds is not None and not _is_prism_draft(small_model):
            drafter = "no small model" if small_model is None else "a small causal LM"
            raise ValueError(f"pool_rounds concerns a PRISM draft; this Ouroboros has {drafter}.")
        if pool_rounds is not None and (type(pool_rounds) is not int or pool_rounds < 1):
            raise ValueError(f"pool_rounds must be a positive integer or None, got {pool_rounds!r}.")
        if small_model_context is not None and (not isinstance(small_model_context, int) or small_model_context < 1):
            raise ValueError(f"small_model_context must be a positive integer or None, got {small_model_context!r}.")
        if draft_length_schedule is None and not _is_prism_draft(small_model):
            draft_length_schedule = "heuristic_transient"
        if draft_length_schedule is not None and draft_length_schedule not in DRAFT_LENGTH_SCHEDULES:
            raise ValueError(
                f"draft_length_schedule must be one of {DRAFT_LENGTH_SCHEDULES}, got {draft_length_schedule!r}."
            )
        pool = pool if pool is not None else PhrasePool()
        longest_key = max(pool.ngram_sizes)
        if not isinstance(unchecked_min_key_length, int) or not 1 <= unchecked_min_key_length <= longest_key:
            raise ValueError(
                f"unchecked_min_key_length must be an integer from 1 to the pool's longest key ({longest_key}), got "
                f"{unchecked_min_key_length!r}: above it the pool would never draft unchecked phrases."
            )
        if not isinstance(confidence_threshold, (int, float)) or not confidence_threshold >= 0:  # (NaN too)
            raise ValueError(f"confidence_threshold must be a number >= 0, got {confidence_threshold!r}.")
        self.small_model = small_model.eval() if small_model is not None else None
        self.pool = pool
        self.num_draft_tokens = num_draft_tokens
        self.draft_length_schedule = draft_length_schedule
        self.confidence_threshold = float(confidence_threshold)
        self.pool_suffix = pool_suffix
        self.unchecked_min_key_length = unchecked_min_key_length
        self.small_model_context = small_model_context
        self.small_model_vocab = small_model_vocab
        self.pool_rounds = pool_rounds
        self._small_head_cache: tuple[tuple, ReducedVocabularyHead] | None = None
        self.last_generation_stats: OuroborosStats | None = None
        self._heuristic_num_draft_tokens: int | None = None

    def _reduced_vocabulary_head(self) -> ReducedVocabularyHead:
        """The small model's `small_model_vocab` head, built once (again if its output layer changed)."""
        head = self.small_model.get_output_embeddings()
        # an int8 layer holds its weights in packed parameters, swapped (not changed in place) when they change
        weight = head._packed_params if type(head) is _Int8Linear else getattr(head, "weight", None)
        # the same tensors, unchanged in place since, as for PRISM's reduced LM head (`modeling_prism._same_key`)
        key = ((head, weight), (getattr(weight, "_version", None), type(head)))
        if self._small_head_cache is None or not _same_key(self._small_head_cache[0], key):
            self._small_head_cache = (key, ReducedVocabularyHead(self.small_model, self.small_model_vocab))
        return self._small_head_cache[1]

    def __repr__(self) -> str:
        small = "pool only" if self.small_model is None else (self.small_model.name_or_path or "small model")
        return f"Ouroboros({small}, {self.pool!r})"

    def check_target(self, target: PreTrainedModel) -> None:
        """Raises a `ValueError` when the small model or the pool does not share the target's vocabulary."""
        vocab_size = target.config.get_text_config().vocab_size
        if _is_prism_draft(self.small_model):
            self.small_model.check_target(target)
        elif self.small_model is not None:
            small_vocab = self.small_model.config.get_text_config().vocab_size
            if small_vocab != vocab_size:
                raise ValueError(
                    f"The Ouroboros small model has a vocabulary of {small_vocab} tokens but the target has "
                    f"{vocab_size}: the small model must share the target's tokenizer (different tokenizers are not "
                    "supported)."
                )
        if self.pool.vocab_size is not None and self.pool.vocab_size != vocab_size:
            self.pool.bind_vocab_size(vocab_size)  # raises with the explanation

    def build_candidate_generator(
        self,
        target: PreTrainedModel,
        input_ids: torch.LongTensor,
        generation_config: GenerationConfig,
        logits_processor: LogitsProcessorList | None,
        model_kwargs: dict[str, Any],
    ) -> OuroborosCandidateGenerator:
        """Entry point of the generation hook (see `generation_hooks`)."""
        self.check_target(target)
        self.pool.bind_vocab_size(target.config.get_text_config().vocab_size)
        generator = PooledPrismCandidateGenerator if _is_prism_draft(self.small_model) else OuroborosCandidateGenerator
        return generator(self, target, input_ids, generation_config, logits_processor, model_kwargs)
