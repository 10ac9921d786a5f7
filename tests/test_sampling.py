"""Sampling with a PRISM draft draws from the same distribution as plain sampling."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from conftest import make_peaked_llama

import prism_hf

VOCAB = 12
SAMPLES = 1500


def chi2_two_sample(a: Counter, b: Counter) -> tuple[float, int]:
    """Chi-square homogeneity statistic of two samples of equal size, and its degrees of freedom."""
    cells = [k for k in set(a) | set(b) if a[k] + b[k] >= 5]
    stat = sum((a[k] - b[k]) ** 2 / (a[k] + b[k]) for k in cells)
    rest_a = sum(a[k] for k in a if k not in cells)
    rest_b = sum(b[k] for k in b if k not in cells)
    if rest_a + rest_b:
        stat += (rest_a - rest_b) ** 2 / (rest_a + rest_b)
        return stat, len(cells)
    return stat, len(cells) - 1


def chi2_quantile_999(df: int) -> float:
    """Wilson-Hilferty approximation of the 99.9 % quantile of chi-square with `df` degrees of freedom."""
    z = 3.090
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize(
    ("int8", "confidence_threshold", "copy_max_ngram", "copy_streak_tokens"),
    [(False, 0.0, 0, 0), (True, 0.0, 0, 0), (False, 0.3, 0, 0), (False, 0.0, 2, 0), (False, 0.0, 1, 3)],
    ids=["float32-draft", "int8-draft", "confidence-stopped-rounds", "copy-head", "copy-streaks"],
)
def test_sampled_tokens_follow_the_target_distribution(int8, confidence_threshold, copy_max_ngram, copy_streak_tokens):
    target = make_peaked_llama(VOCAB, seed=0)
    # a random draft proposes from a distribution far from the target's: only exact rejection sampling fixes that
    draft = prism_hf.PrismDraftModel.from_target(
        target,
        initializer_range=1.0,
        draft_vocab_size=VOCAB,
        copy_max_ngram=copy_max_ngram,
        copy_streak_tokens=copy_streak_tokens,
    )
    if copy_max_ngram:  # a gate that puts most of each step's probability on the copy proposal (g = 0.88)
        with torch.no_grad():
            draft.copy_gate.bias.fill_(2.0)
    if int8:  # an int8 LM head: the draft's probabilities are the int8 logits' own, so sampling stays exact
        assert prism_hf.quantize_cpu_linears_int8(draft) == 1
        assert draft.verifier.draft_lm_int8 is not None
    # with a copy head, a prompt holding every other token, so that most rounds draft a copy proposal
    prompt = torch.tensor([[*range(1, VOCAB), 3, 7, 1]] if copy_max_ngram else [[3, 7, 1]])
    start = prompt.shape[1]
    # rounds that end at a draft token below the threshold depend on the draft's own draws only: still exact
    draft.config.draft_confidence_threshold = confidence_threshold
    # (6 new tokens: after the prefill's token a round can draft more than the one the threshold may stop it at)
    kwargs = dict(do_sample=True, temperature=0.9, top_k=10, max_new_tokens=6 if confidence_threshold else 3)
    kwargs["pad_token_id"] = 0

    torch.manual_seed(1)
    plain = target.generate(prompt.repeat(SAMPLES, 1), **kwargs)[:, start : start + 3]
    assisted_rows, accepted, stops, copied = [], 0, 0, 0
    for _ in range(SAMPLES):
        assisted = target.generate(prompt, assistant_model=draft, num_assistant_tokens=3, **kwargs)
        assisted_rows.append(assisted[0, start : start + 3])
        accepted += draft.last_generation_stats.accepted_tokens
        stops += draft.last_generation_stats.confidence_stops
        copied += draft.last_generation_stats.copied_tokens
    assisted = torch.stack(assisted_rows)
    # (this target seldom repeats itself, so copy proposals are mostly rejected; a generator that sampled them but
    # reported the draft's own q would still fail the statistic)
    assert accepted > SAMPLES // (20 if copy_max_ngram else 4), "the draft must get tokens accepted to mean anything"
    if confidence_threshold:  # the threshold must have ended rounds early for the test to mean anything
        assert stops > SAMPLES // 10, stops
    if copy_streak_tokens:  # with 1-token matches and a prompt holding every token, every round is a copy streak
        assert copied > SAMPLES // 10, copied

    for name, key in [
        ("first token", lambda row: row[0]),
        ("second token", lambda row: row[1]),
        ("first three tokens", lambda row: tuple(row)),
    ]:
        a = Counter(key(row) for row in plain.tolist())
        b = Counter(key(row) for row in assisted.tolist())
        stat, df = chi2_two_sample(a, b)
        assert stat < chi2_quantile_999(df), f"{name}: chi2 {stat:.1f} with {df} dof"


def test_sampling_with_a_skewed_draft_distribution_is_detected_by_the_statistic():
    """The statistic above is sensitive: two samples from different distributions fail it."""
    generator = torch.Generator().manual_seed(0)
    p = torch.tensor([0.4, 0.3, 0.2, 0.1])
    q = torch.tensor([0.34, 0.3, 0.23, 0.13])
    a = Counter(torch.multinomial(p, SAMPLES, replacement=True, generator=generator).tolist())
    b = Counter(torch.multinomial(q, SAMPLES, replacement=True, generator=generator).tolist())
    stat, df = chi2_two_sample(a, b)
    assert stat > chi2_quantile_999(df)
