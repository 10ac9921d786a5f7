"""The `"cost_aware"` draft-length schedule: its choices on simulated costs, and exact output inside `generate`."""

from __future__ import annotations

import pytest
import torch
from conftest import make_llama, make_qwen2, training_prompts

from prism_hf import CostAwareDraftLength, Ouroboros

GREEDY = dict(do_sample=False, max_new_tokens=40, pad_token_id=0)


class FakeClock:
    """A clock the simulation moves by hand."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def simulate(acceptance: float, draft_seconds: float, base_seconds: float, per_row_seconds: float, rounds: int = 60):
    """
    Runs the controller over `rounds` rounds of a drafter whose tokens are accepted in a fixed pattern with rate
    `acceptance` (given the earlier ones), each drafted token costing `draft_seconds` and each verification
    `base_seconds + per_row_seconds * rows`. Returns the controller and the lengths it chose.
    """
    clock = FakeClock()
    controller = CostAwareDraftLength(3, clock=clock)
    lengths, credit = [], 0.0
    clock.now = 1.0
    for _ in range(rounds):
        length = controller.begin_round()
        lengths.append(length)
        clock.now += draft_seconds * length
        controller.end_draft(length)
        accepted = 0
        while accepted < length:  # deterministic: the running acceptance stays at `acceptance`
            credit += acceptance
            if credit < 1.0:
                break
            credit -= 1.0
            accepted += 1
        clock.now += base_seconds + per_row_seconds * (length + 1)
        controller.end_verification(length, accepted)
    return controller, lengths


def true_rate(length: int, acceptance: float, draft_seconds: float, base_seconds: float, per_row_seconds: float):
    expected = sum(acceptance**i for i in range(length + 1))
    return expected / (draft_seconds * length + base_seconds + per_row_seconds * (length + 1))


@pytest.mark.parametrize(
    "case",
    [
        # (acceptance, seconds per draft token, verification base, per verified row): the regime each stands for
        (0.9, 0.01, 1.0, 0.005),  # a GPU with a good, cheap drafter: long drafts
        (0.9, 0.15, 1.0, 0.07),  # this CPU, code: a few more tokens than a fixed budget of 3
        (0.45, 0.15, 1.0, 0.07),  # this CPU, translation: one token
        (0.15, 0.3, 1.0, 0.07),  # a poor drafter: no drafts, plain decoding steps
    ],
)
def test_chosen_lengths_are_near_the_best_throughput(case):
    controller, lengths = simulate(*case)
    rates = [true_rate(k, *case) for k in range(17)]
    best = max(range(17), key=rates.__getitem__)
    settled = lengths[20:]
    # within 3% of the best throughput once the costs are measured (probes aside)
    assert sum(rates[k] for k in settled) / len(settled) > 0.97 * rates[best], (best, settled)
    assert controller.acceptance == pytest.approx(case[0], abs=0.1)


def test_long_drafts_where_drafting_and_verifying_are_cheap():
    _, lengths = simulate(0.95, 0.01, 1.0, 0.002)
    assert min(lengths[10:]) >= 10


def test_no_drafts_for_a_poor_drafter_but_regular_probes():
    controller, lengths = simulate(0.0, 0.3, 1.0, 0.07, rounds=80)
    settled = lengths[10:]
    assert settled.count(0) > 0.8 * len(settled)
    # one probe of one token every `probe_every` rounds without a draft
    probes = [i for i, k in enumerate(settled) if k > 0]
    assert probes and all(settled[i] == 1 for i in probes)
    assert all(b - a == controller.probe_every for a, b in zip(probes, probes[1:], strict=False))


def test_the_first_round_is_not_timed():
    """The first round holds the prompt's prefill: its seconds must not count as verification or drafting cost."""
    clock = FakeClock()
    controller = CostAwareDraftLength(4, clock=clock)
    assert controller.begin_round() == 4
    clock.now += 50.0  # a long prefill of the small model
    controller.end_draft(4)
    clock.now += 100.0  # and of the target
    controller.end_verification(4, 4)
    assert controller.begin_round() == 4  # nothing measured yet: the initial length stays
    assert controller.verification_cost is None and controller.seconds_per_draft_token is None
    clock.now += 0.4
    controller.end_draft(4)
    clock.now += 1.0
    controller.end_verification(4, 2)
    controller.begin_round()
    assert controller.seconds_per_draft_token == pytest.approx(0.1)
    intercept, slope = controller.verification_cost
    assert intercept + 5 * slope == pytest.approx(1.0)


@pytest.mark.parametrize(
    "arguments", [dict(initial_length=-1), dict(initial_length=3, max_length=0), dict(initial_length=3, probe_every=0)]
)
def test_bad_arguments(arguments):
    with pytest.raises(ValueError, match="CostAwareDraftLength needs initial_length >= 0, max_length >= 1"):
        CostAwareDraftLength(**arguments)


# ------------------------------------------------------------------------------------------------- in generate


@pytest.mark.parametrize("small", ["none", "target", "other"])
def test_ouroboros_cost_aware_output_is_identical(llama_target, small):
    """Whatever lengths the measured costs lead to (rounds without a draft included), the output is plain greedy's."""
    small_model = {"none": None, "target": llama_target, "other": make_qwen2(seed=7)}[small]
    assistant = Ouroboros(small_model, draft_length_schedule="cost_aware", num_draft_tokens=3)
    for prompt in training_prompts(num=3, length=7, seed=4):
        prompt = prompt[None]
        plain = llama_target.generate(prompt, **GREEDY)
        assert torch.equal(llama_target.generate(prompt, assistant_model=assistant, **GREEDY), plain)
        stats = assistant.last_generation_stats
        assert stats.verifications + stats.accepted_tokens == plain.shape[1] - prompt.shape[1]


def test_prism_cost_aware_output_is_identical(llama_target, trained_llama_draft):
    prompt = training_prompts()[1][None]
    plain = llama_target.generate(prompt, **GREEDY)
    out = llama_target.generate(
        prompt, assistant_model=trained_llama_draft, num_assistant_tokens_schedule="cost_aware", **GREEDY
    )
    assert torch.equal(out, plain)
    stats = trained_llama_draft.last_generation_stats
    # (PRISM's first target forward, the prompt's, holds no draft and is not counted as a verification)
    assert 1 + stats.verifications + stats.accepted_tokens == plain.shape[1] - prompt.shape[1]


def test_cost_aware_generators_drive_their_controller(llama_target, monkeypatch):
    """The generator asks the controller for each round's budget and reports every verification to it."""
    calls = []

    class Recording(CostAwareDraftLength):
        def begin_round(self):
            calls.append("begin")
            return 2

        def end_draft(self, num_drafted):
            calls.append(("draft", num_drafted))

        def end_verification(self, num_drafted, num_accepted):
            calls.append(("verify", num_drafted, num_accepted))

    monkeypatch.setattr("prism_hf.generation_ouroboros.CostAwareDraftLength", Recording)
    prompt = training_prompts()[0][None]
    assistant = Ouroboros(make_llama(seed=0), draft_length_schedule="cost_aware", confidence_threshold=0.0)
    out = llama_target.generate(prompt, assistant_model=assistant, **GREEDY)
    assert torch.equal(out, llama_target.generate(prompt, **GREEDY))
    stats = assistant.last_generation_stats
    assert calls.count("begin") == stats.verifications
    drafts = [c[1] for c in calls if c[0] == "draft"]
    verified = [c for c in calls if c[0] == "verify"]
    assert len(drafts) == len(verified) == stats.verifications
    assert all(k == 2 for k in drafts[:-2])  # the budget the controller gave (the last rounds meet max_length)
    assert sum(c[2] for c in verified) == stats.accepted_tokens
