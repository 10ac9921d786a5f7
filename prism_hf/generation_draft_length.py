"""
The `"cost_aware"` draft-length schedule: each round drafts the number of tokens that maximises the expected tokens
per second, from the acceptance and the costs measured during the call.

Why: the best draft length depends on the hardware as much as on the drafter. On a GPU, verifying 8 positions costs
about as much as verifying 1, so long drafts pay; on a CPU each verified position adds a few percent to the target's
forward and each small-model step is a sizeable share of a target step, so a task with low acceptance (translation)
is fastest with one draft token or none, and code with high acceptance with more than a fixed budget gives.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# exponential forgetting per round: acceptance follows the text (recent rounds matter), costs hardly change
_ACCEPTANCE_MEMORY = 0.9
_COST_MEMORY = 0.97
# a prior of one accepted and one rejected draft token, so the first rounds neither trust nor dismiss the drafter
_PRIOR_ACCEPTED = 1.0
_PRIOR_REJECTED = 1.0
# keeps the slope of the verification cost near 0 until the verified lengths spread (rows^2 of variance)
_SLOPE_RIDGE = 0.1


class CostAwareDraftLength:
    """
    Picks each round's draft length k, from 0 (a plain decoding step) to `max_length`, that maximises

        E[tokens](k) / (k * d + a + b * (k + 1)),   E[tokens](k) = 1 + alpha + ... + alpha^k

    where alpha is the recent rate at which a draft token is accepted given the earlier ones were (accepted tokens /
    (accepted + first rejected), a geometric model), d the drafting seconds per drafted token and a + b * rows the
    rest of a round (the target's verification of k + 1 positions and the generation loop's bookkeeping), a line
    fitted to the rounds measured so far. The first round is not timed (it holds the prompt's prefill). After
    `probe_every` rounds without a draft, one token is drafted so that acceptance is measured again.

    The generator calls [`begin_round`] before drafting (it returns the length), [`end_draft`] when the draft is
    ready and [`end_verification`] with the outcome. `clock` is for tests.
    """

    def __init__(
        self,
        initial_length: int,
        max_length: int = 16,
        probe_every: int = 8,
        clock: Callable[[], float] = time.perf_counter,
    ):
        if initial_length < 0 or max_length < 1 or probe_every < 1:
            raise ValueError(
                f"CostAwareDraftLength needs initial_length >= 0, max_length >= 1 and probe_every >= 1, got "
                f"{initial_length}, {max_length} and {probe_every}."
            )
        self.length = initial_length
        self.max_length = max(max_length, initial_length)
        self.probe_every = probe_every
        self._clock = clock
        self._accepted = _PRIOR_ACCEPTED
        self._rejected = _PRIOR_REJECTED
        self._draft_seconds = 0.0
        self._drafted_tokens = 0.0
        # decayed sums of the round-rest fit: weight, rows, seconds, rows^2, rows * seconds
        self._fit = [0.0] * 5
        self._rounds = 0
        self._round_began: float | None = None
        self._draft_ended: float | None = None
        self._drafted = 0
        self._rounds_without_draft = 0

    # ------------------------------------------------------------------------------------------------ the model

    @property
    def acceptance(self) -> float:
        """alpha: the recent probability that a draft token is accepted, given the earlier ones were."""
        return self._accepted / (self._accepted + self._rejected)

    @property
    def seconds_per_draft_token(self) -> float | None:
        return self._draft_seconds / self._drafted_tokens if self._drafted_tokens > 0 else None

    @property
    def verification_cost(self) -> tuple[float, float] | None:
        """(a, b): the seconds of a round besides drafting, a + b * verified positions; None before any measurement."""
        weight, rows, seconds, rows_squared, rows_seconds = self._fit
        if weight <= 0:
            return None
        variance = weight * rows_squared - rows * rows
        slope = (weight * rows_seconds - rows * seconds) / (variance + weight * weight * _SLOPE_RIDGE)
        slope = max(slope, 0.0)
        intercept = max((seconds - slope * rows) / weight, 1e-9)
        return intercept, slope

    def expected_tokens_per_second(self, length: int) -> float | None:
        """The model's throughput for a draft of `length` tokens; None until costs have been measured."""
        cost = self.verification_cost
        per_token = self.seconds_per_draft_token
        if cost is None or (length > 0 and per_token is None):
            return None
        alpha = self.acceptance
        expected = sum(alpha**i for i in range(length + 1))
        intercept, slope = cost
        return expected / ((per_token or 0.0) * length + intercept + slope * (length + 1))

    def _best_length(self) -> int:
        if self.verification_cost is None or self.seconds_per_draft_token is None:
            return self.length  # nothing measured yet: keep the initial length
        rates = [self.expected_tokens_per_second(k) for k in range(self.max_length + 1)]
        best = max(range(len(rates)), key=rates.__getitem__)
        if best == 0:
            self._rounds_without_draft += 1
            if self._rounds_without_draft >= self.probe_every:
                self._rounds_without_draft = 0
                return 1
        else:
            self._rounds_without_draft = 0
        return best

    # ------------------------------------------------------------------------------------------- the measurements

    def begin_round(self) -> int:
        """Closes the previous round's timing; returns the draft length for this round."""
        now = self._clock()
        if self._draft_ended is not None and self._rounds > 1:  # the first round holds the prompt's prefill
            self._add_round_rest(self._drafted + 1, now - self._draft_ended)
        self._round_began, self._draft_ended = now, None
        self._rounds += 1
        if self._rounds > 1:
            self.length = self._best_length()
        return self.length

    def end_draft(self, num_drafted: int) -> None:
        """The draft of this round is ready, with `num_drafted` tokens."""
        self._draft_ended = self._clock()
        self._drafted = num_drafted
        if num_drafted > 0 and self._rounds > 1 and self._round_began is not None:
            self._draft_seconds = _COST_MEMORY * self._draft_seconds + (self._draft_ended - self._round_began)
            self._drafted_tokens = _COST_MEMORY * self._drafted_tokens + num_drafted

    def end_verification(self, num_drafted: int, num_accepted: int) -> None:
        """The target accepted `num_accepted` of the `num_drafted` draft tokens."""
        if num_drafted <= 0:
            return
        self._accepted = _ACCEPTANCE_MEMORY * self._accepted + num_accepted
        self._rejected = _ACCEPTANCE_MEMORY * self._rejected + (num_accepted < num_drafted)

    def _add_round_rest(self, rows: int, seconds: float) -> None:
        self._fit = [_COST_MEMORY * total for total in self._fit]
        for i, value in enumerate((1.0, rows, seconds, rows * rows, rows * seconds)):
            self._fit[i] += value
