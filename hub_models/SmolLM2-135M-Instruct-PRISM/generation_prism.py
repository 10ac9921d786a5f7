"""The PRISM candidate generator: drafts from the verifier's own hidden states inside `generate()`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import GenerationConfig, LogitsProcessorList, PreTrainedModel
from transformers.generation.candidate_generator import CandidateGenerator
from transformers.utils import ModelOutput

from .configuration_prism import DRAFT_LENGTH_SCHEDULES, check_confidence_threshold
from .modeling_prism import CopyIndex, PrismKeyValues

if TYPE_CHECKING:
    from .modeling_prism import PrismDraftModel

# `GenerationConfig` fills these in when the caller leaves them unset, so they mean "use the draft's default".
_HF_DEFAULT_NUM_ASSISTANT_TOKENS = 20
_HF_DEFAULT_SCHEDULE = "constant"
_HF_DEFAULT_CONFIDENCE_THRESHOLD = 0.4


def check_exact_drafting(
    strategy: str,
    target: PreTrainedModel,
    input_ids: torch.LongTensor,
    generation_config: GenerationConfig,
    model_kwargs: dict[str, Any],
) -> None:
    """The requests every exact drafting strategy here refuses, with what to do instead."""
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"{strategy} drafting supports batch size 1 only (as does transformers' assisted generation), got a batch "
            f"of {input_ids.shape[0]}. Generate the sequences one at a time."
        )
    if input_ids.shape[1] == 0:
        raise ValueError(
            f"{strategy} drafting needs the prompt's token ids: pass `input_ids` (together with `inputs_embeds` if "
            "you need custom embeddings); with `inputs_embeds` alone the drafter has no tokens to continue."
        )
    if target.device.type == "meta":
        raise ValueError(
            "The target's first parameter (usually its input embedding) is offloaded to disk, so `target.device` "
            "is 'meta', and transformers' assisted generation moves every candidate there. Keep that module on "
            "an execution device, e.g. `device_map={'model.embed_tokens': 'cpu', ...}`."
        )
    if generation_config.assistant_ensemble_weight is not None:
        raise ValueError(f"`assistant_ensemble_weight` is lossy; {strategy} drafting keeps generation exact.")
    if generation_config.guidance_scale not in (None, 1):
        # the guidance processor keeps its own one-token-per-call cache, which verification of several tokens breaks
        raise ValueError(
            f"{strategy} drafting does not support classifier-free guidance (guidance_scale="
            f"{generation_config.guidance_scale}): its logits processor scores one new token per call, and a "
            "verification pass scores several. Generate without an assistant."
        )
    for name in ("cache", "past_key_values"):
        cache = model_kwargs.get(name)
        if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
            raise ValueError(
                f"{strategy} drafting starts from an empty KV cache; the `{name}` passed to `generate` already holds "
                f"{cache.get_seq_length()} positions. Pass a new cache (or none) with the whole prompt as input_ids."
            )


def resolve_draft_length(
    generation_config: GenerationConfig, default_schedule: str, default_length: int, carried_length: int | None
) -> tuple[str, int]:
    """
    The draft-length schedule and initial length of one `generate` call: the call's `num_assistant_tokens(_schedule)`
    unless they hold transformers' defaults (then the drafter's), and under `"heuristic"` the length the drafter's
    previous call ended with (`carried_length`).
    """
    schedule = generation_config.num_assistant_tokens_schedule
    if schedule in (None, _HF_DEFAULT_SCHEDULE):
        schedule = default_schedule
    if schedule not in DRAFT_LENGTH_SCHEDULES:
        raise ValueError(
            f"num_assistant_tokens_schedule={schedule!r} is not supported; use one of {DRAFT_LENGTH_SCHEDULES}."
        )
    requested = generation_config.num_assistant_tokens
    if requested is not None and requested != _HF_DEFAULT_NUM_ASSISTANT_TOKENS:
        if requested < 1:
            raise ValueError(f"num_assistant_tokens must be >= 1, got {requested}.")
        return schedule, int(requested)
    if schedule == "heuristic" and carried_length is not None:
        return schedule, carried_length
    return schedule, default_length


@dataclass
class SpeculationStats:
    """Counts of one `generate()` call; `mean_accepted_tokens` is tau (accepted drafts + 1 bonus per verification)."""

    verifications: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    draft_seconds: float = 0.0
    confidence_stops: int = 0  # rounds that ended before their draft length at a token below the confidence threshold
    copied_tokens: int = 0  # tokens a copy streak drafted without a draft step (`PrismConfig.copy_streak_tokens`)

    @property
    def mean_accepted_tokens(self) -> float:
        if self.verifications == 0:
            return 0.0
        return (self.accepted_tokens + self.verifications) / self.verifications

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0


class PrismDraftCache:
    """
    The single draft KV cache shared by all modules: later steps attend to the keys and values that module 0 wrote
    for the accepted context. Entries past `num_accepted` are speculative and are dropped before the next round.

    Keys and values live in buffers with room to spare (doubled when full), so a drafting step's `append` copies its
    own new position rather than the whole cache, and `crop` only moves the end; `get` returns views of the filled
    part, valid until the next `append`.
    """

    def __init__(self) -> None:
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None
        self._length = 0

    def __len__(self) -> int:
        return self._length

    def get(self) -> PrismKeyValues | None:
        if self._keys is None or self._values is None:
            return None
        return PrismKeyValues(self._keys[..., : self._length, :], self._values[..., : self._length, :])

    def append(self, new: PrismKeyValues) -> None:
        end = self._length + new.keys.shape[-2]
        if self._keys is None or self._values is None or end > self._keys.shape[-2]:
            capacity = max(end, 2 * (0 if self._keys is None else self._keys.shape[-2]))
            keys = new.keys.new_empty((*new.keys.shape[:-2], capacity, new.keys.shape[-1]))
            values = new.values.new_empty((*new.values.shape[:-2], capacity, new.values.shape[-1]))
            if self._keys is not None and self._values is not None:
                keys[..., : self._length, :] = self._keys[..., : self._length, :]
                values[..., : self._length, :] = self._values[..., : self._length, :]
            self._keys, self._values = keys, values
        self._keys[..., self._length : end, :] = new.keys
        self._values[..., self._length : end, :] = new.values
        self._length = end

    def crop(self, length: int) -> None:
        """Keeps the first `length` positions."""
        self._length = max(0, min(self._length, length))


class PrismCandidateGenerator(CandidateGenerator):
    """
    Proposes tokens with a [`PrismDraftModel`] fed by the target's hidden states.

    It uses the `requires_model_outputs` protocol of `_assisted_decoding`: each verification pass also returns the
    configured hidden states, the first iteration returns no candidates so the target's prefill produces them, and
    the draft KV cache keeps exactly one module-0 entry per accepted position (speculative entries are cropped).
    Candidates are picked from the draft logits after the same logits processors as the target, and those processed
    logits are returned, so speculative sampling stays exact.

    Draft length: `num_assistant_tokens` of the `generate()` call when set, else the draft config's
    `num_draft_tokens`; `num_assistant_tokens_schedule` (else the config's `num_draft_tokens_schedule`) set to
    `"heuristic"` adapts it (+2 after a fully accepted round, -1 otherwise) and carries it over to the next call,
    `"heuristic_transient"` adapts it within the call only, `"constant"` keeps it (`draft_length_schedule`, when
    given, replaces the config's). The generate-call values that equal transformers' defaults (20 tokens,
    `"constant"`, a confidence threshold of 0.4) cannot be told apart from "unset" and defer to the draft config.
    A round also ends early after a token the draft gave less than `assistant_confidence_threshold` of probability
    (else the config's `draft_confidence_threshold`), so rounds are long where the draft is sure and short where it
    guesses; with the config's `draft_confidence_rule="path"` the probability compared is the product over the
    round's tokens so far.

    A draft with a copy head (`PrismConfig.copy_max_ngram`) keeps a [`CopyIndex`] of the accepted text (the drafted
    tokens of a round in its speculative overlay) and draws each token from the draft's distribution mixed with the
    index's proposal ([`PrismDraftModel.mix_copy`]), exactly as in training. With `PrismConfig.copy_streak_tokens`, a
    round whose lookup matches a full `copy_max_ngram` tokens drafts the copied continuation itself from there (a
    copy streak: probability 1 per token, which is the candidate distribution sampling checks against). With
    `PrismConfig.copy_streak_max_tokens` the streak length doubles after a round whose streak was accepted whole and
    halves after one cut short, between `copy_streak_tokens` and that bound, within the call.
    """

    requires_model_outputs = True

    def __init__(
        self,
        draft_model: PrismDraftModel,
        target: PreTrainedModel,
        input_ids: torch.LongTensor,
        generation_config: GenerationConfig,
        logits_processor: LogitsProcessorList | None,
        model_kwargs: dict[str, Any],
        draft_length_schedule: str | None = None,
    ):
        check_exact_drafting("PRISM", target, input_ids, generation_config, model_kwargs)
        self.schedule, self.num_draft_tokens = resolve_draft_length(
            generation_config,
            draft_length_schedule or draft_model.config.num_draft_tokens_schedule,
            draft_model.config.num_draft_tokens,
            getattr(draft_model, "_heuristic_num_draft_tokens", None),
        )
        threshold = generation_config.assistant_confidence_threshold
        if threshold is None or threshold == _HF_DEFAULT_CONFIDENCE_THRESHOLD:
            threshold = draft_model.config.draft_confidence_threshold
        check_confidence_threshold("assistant_confidence_threshold", threshold)
        self.confidence_threshold = float(threshold)
        self.confidence_rule = draft_model.config.draft_confidence_rule
        draft_model.bind_target(target)
        self.draft = draft_model
        self.do_sample = bool(generation_config.do_sample)
        self.logits_processor = logits_processor if logits_processor is not None else LogitsProcessorList()
        self.max_length = generation_config.max_length
        self.cache = PrismDraftCache()
        self.num_cached_pairs = 0
        # fused target features of verified pairs that module 0 has not run over yet (see `_collect_features`)
        self._pending_features: list[torch.Tensor] = []
        self.copy_index = CopyIndex(draft_model.config.copy_max_ngram) if draft_model.config.copy_max_ngram else None
        self.copy_streak_tokens = draft_model.config.copy_streak_tokens if self.copy_index is not None else 0
        self.copy_streak_max_tokens = max(self.copy_streak_tokens, draft_model.config.copy_streak_max_tokens)
        self.streak_length = self.copy_streak_tokens  # the next streak's length (adapted with copy_streak_max_tokens)
        self._round_streak = False  # whether the last drafted round ended in a copy streak
        self.vocab_width = 0  # of the target's logits (a copy streak's one-hot candidate logits take it)
        self.stats = SpeculationStats()
        self._round_is_prefill = True
        draft_model.last_generation_stats = self.stats

        # Ask the verification passes for the draft's feature layers only (all of them if the user wants them).
        if generation_config.output_hidden_states:
            self.model_kwargs_overrides = {"output_hidden_states": True}
        else:
            self.model_kwargs_overrides = {"output_hidden_states": list(draft_model.config.feature_layers)}

    @property
    def num_drafting_tokens(self) -> int:
        """
        The most tokens the next round drafts (transformers >= 5.25 reads it to size the target cache's rollback of
        recurrent states); like transformers' own drafters, the current length, which the heuristic schedules adapt,
        or the next copy streak's length if longer.
        """
        return max(self.num_draft_tokens, self.streak_length)

    @torch.no_grad()
    def get_candidates(
        self,
        input_ids: torch.LongTensor,
        model_kwargs: dict[str, Any] | None = None,
        model_outputs: ModelOutput | None = None,
        is_first_iteration: bool = False,
        n_last_matches: int = 0,
        **kwargs: Any,
    ) -> tuple[torch.LongTensor, torch.FloatTensor | None]:
        self._round_is_prefill = is_first_iteration
        self._round_streak = False
        if is_first_iteration:
            return input_ids, None
        if model_outputs is None or getattr(model_outputs, "hidden_states", None) is None:
            raise ValueError("PRISM drafting needs the target's hidden states; the verification pass returned none.")
        began = time.perf_counter()
        self._collect_features(input_ids, model_outputs.hidden_states)
        self._sync_copy_index(input_ids)
        self.vocab_width = model_outputs.logits.shape[-1]
        candidates = self._draft_round(input_ids, self.max_length - input_ids.shape[1] - 1)
        self.stats.draft_seconds += time.perf_counter() - began
        return candidates

    def _draft_round(
        self, input_ids: torch.LongTensor, budget: int
    ) -> tuple[torch.LongTensor, torch.FloatTensor | None]:
        """This round's candidates after `input_ids`, at most `budget` tokens: the draft catches up, then drafts."""
        draft_hidden = self._extend(input_ids)
        length = min(self.num_draft_tokens, budget)
        if length < 1:
            return input_ids, None
        return self._draft(input_ids, draft_hidden, length, min(self.num_drafting_tokens, budget))

    def _collect_features(self, input_ids: torch.LongTensor, hidden_states: tuple[torch.Tensor | None, ...]) -> None:
        """
        Keeps the fused target features of the pairs the last verification added (its first positions are the
        accepted ones), for `_extend`. A round drafted by other means (a pool's phrase) leaves them pending: the
        draft's next round runs module 0 over all pending pairs in one call.
        """
        total_pairs = input_ids.shape[1] - 1  # pair p = (feature after token p, token p + 1)
        pending = sum(features.shape[1] for features in self._pending_features)
        new_pairs = total_pairs - self.num_cached_pairs - pending
        self._pending_features.append(self.draft.fuse_features(hidden_states, length=new_pairs))

    def _sync_copy_index(self, input_ids: torch.LongTensor) -> None:
        """Drops the copy index's speculative tokens and adds the accepted ones."""
        if self.copy_index is not None:
            self.copy_index.discard_speculative()
            self.copy_index.extend(input_ids[0, len(self.copy_index) :].tolist())

    def _extend(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Runs module 0 over the pending verified pairs; returns the draft feature of the last one."""
        draft = self.draft
        self.cache.crop(self.num_cached_pairs)
        total_pairs = input_ids.shape[1] - 1
        features = torch.cat(self._pending_features, dim=1)
        self._pending_features = []
        token_embeds = draft.embed_pairs(input_ids, start=self.num_cached_pairs)
        positions = torch.arange(self.num_cached_pairs, total_pairs, device=draft.device)[None]
        hidden, new_kv = draft.run_module(0, token_embeds, features, positions, self.cache.get())
        self.cache.append(new_kv)
        self.num_cached_pairs = total_pairs
        return hidden[:, -1:]

    def _draft(
        self, input_ids: torch.LongTensor, draft_hidden: torch.Tensor, length: int, streak_length: int
    ) -> tuple[torch.LongTensor, torch.FloatTensor]:
        """
        Drafts up to `length` tokens after `input_ids`, or up to `streak_length` once a copy streak starts (the copy
        lookup matching a full `copy_max_ngram` tokens, with `config.copy_streak_tokens` set).
        """
        draft = self.draft
        candidate_ids = input_ids
        step_logits = []
        confidence = 1.0
        streak = False
        for step in range(1, streak_length + 1):
            if self.copy_streak_tokens:  # (a streak copies a seen n-gram's continuation, so its match stays full)
                proposal, match = self.copy_index.lookup()
                streak = streak or match >= self.copy_index.max_ngram
            if streak:
                token, logits = self._copied_token(proposal)
                self.stats.copied_tokens += 1
            elif step > length:
                break
            else:
                if step > 1:
                    position = torch.tensor([[self.num_cached_pairs + step - 2]], device=draft.device)
                    module = draft.config.module_for_step(step)
                    token_embeds = draft.embed_pairs(candidate_ids, start=candidate_ids.shape[1] - 2)
                    draft_hidden, new_kv = draft.run_module(
                        module, token_embeds, draft_hidden, position, self.cache.get()
                    )
                    self.cache.append(new_kv)
                token, logits = self._next_token(candidate_ids, draft_hidden)
            candidate_ids = torch.cat([candidate_ids, token], dim=-1)
            if self.copy_index is not None:
                self.copy_index.extend(token[0].tolist(), speculative=True)
            step_logits.append(logits)
            if not streak and step < length and self.confidence_threshold:
                probability = float(logits.softmax(-1)[0, token[0, 0]])
                confidence = confidence * probability if self.confidence_rule == "path" else probability
                if confidence < self.confidence_threshold:
                    self.stats.confidence_stops += 1
                    break
        self._round_streak = streak
        return candidate_ids, torch.stack(step_logits, dim=1)

    def _copied_token(self, proposal: int) -> tuple[torch.LongTensor, torch.FloatTensor]:
        """A copy streak's next token, the copy lookup's `proposal`, and its logits: probability 1 on that token."""
        logits = torch.full((1, self.vocab_width), float("-inf"), device=self.draft.device)
        logits[0, proposal] = 0.0
        return torch.tensor([[proposal]], device=self.draft.device), logits

    def _next_token(
        self, candidate_ids: torch.LongTensor, draft_hidden: torch.Tensor
    ) -> tuple[torch.LongTensor, torch.FloatTensor]:
        """
        The next draft token (`[1, 1]`) after `candidate_ids`, given the draft's last hidden state, and the processed
        target-vocabulary logits (`[1, vocab]`) it was drawn from.
        """
        draft = self.draft
        copy_proposals = None
        if self.copy_index is not None:
            proposal, length = self.copy_index.lookup()
            proposal = draft.to_draft_ids(torch.tensor([proposal], device=draft.device))
            copy_proposals = (proposal, torch.tensor([length], device=draft.device))
        logits = draft.drafting_logits(draft_hidden[:, -1], copy_proposals).float()
        logits = draft.to_target_logits(logits)
        logits = self.logits_processor(candidate_ids, logits.to(candidate_ids.device))
        if self.do_sample:
            return torch.multinomial(logits.softmax(dim=-1), num_samples=1), logits
        return logits.argmax(dim=-1, keepdim=True), logits

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, num_matches: int):
        if self._round_is_prefill:
            return
        drafted = scores.shape[1] - 1
        num_matches = int(num_matches)
        self.stats.verifications += 1
        self.stats.drafted_tokens += drafted
        self.stats.accepted_tokens += num_matches
        self._adapt_draft_length(drafted, num_matches)
        self._adapt_streak_length(drafted, num_matches)

    def _adapt_draft_length(self, drafted: int, num_matches: int) -> None:
        """The `"heuristic"` schedules: +2 after a round whose `drafted` tokens were all accepted, -1 otherwise."""
        if self.schedule != "constant" and drafted > 0:
            if num_matches == drafted:
                self.num_draft_tokens += 2
            else:
                self.num_draft_tokens = max(1, self.num_draft_tokens - 1)
            if self.schedule == "heuristic":
                self.draft._heuristic_num_draft_tokens = self.num_draft_tokens

    def _adapt_streak_length(self, drafted: int, num_matches: int) -> None:
        """
        With `copy_streak_max_tokens`: after a round that ended in a copy streak, the next streak's length doubles if
        all `drafted` tokens were accepted and halves otherwise, within `[copy_streak_tokens, copy_streak_max_tokens]`.
        """
        if not self._round_streak or self.copy_streak_max_tokens <= self.copy_streak_tokens:
            return
        if num_matches >= drafted:
            self.streak_length = min(2 * self.streak_length, self.copy_streak_max_tokens)
        else:
            self.streak_length = max(self.streak_length // 2, self.copy_streak_tokens)
