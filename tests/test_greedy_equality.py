"""Greedy generation with a PRISM draft gives exactly the tokens of plain `generate` (fp32)."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import TARGET_FACTORIES, VOCAB, draft_config_set, training_prompts
from transformers import DynamicCache, GenerationConfig, StoppingCriteria, StoppingCriteriaList, TextStreamer

import prism_hf
from prism_hf.generation_prism import PrismCandidateGenerator, PrismDraftCache
from prism_hf.modeling_prism import CopyIndex, PrismKeyValues, copy_candidates


def assert_same_as_plain(target, draft, input_ids, **kwargs):
    plain = target.generate(input_ids, do_sample=False, **kwargs)
    assisted = target.generate(input_ids, assistant_model=draft, do_sample=False, **kwargs)
    assert torch.equal(plain, assisted), f"plain {plain.tolist()} != assisted {assisted.tolist()}"
    return assisted


@pytest.mark.parametrize("num_modules", [1, 2, 3])
def test_random_draft_matches_plain_greedy(tiny_target, num_modules):
    step_map = list(range(num_modules))
    draft = prism_hf.PrismDraftModel.from_target(tiny_target, num_modules=num_modules, step_module_map=step_map)
    generator = torch.Generator().manual_seed(7)
    for prompt_length, new_tokens in [(1, 12), (4, 30), (9, 45), (23, 17)]:
        prompt = torch.randint(3, VOCAB, (1, prompt_length), generator=generator)
        assert_same_as_plain(tiny_target, draft, prompt, max_new_tokens=new_tokens)


@pytest.mark.parametrize("draft_tokens", [1, 3, 8])
def test_trained_draft_accepts_tokens_and_matches(llama_target, trained_llama_draft, draft_tokens):
    accepted = 0
    for prompt in training_prompts():
        assert_same_as_plain(
            llama_target, trained_llama_draft, prompt[None], max_new_tokens=40, num_assistant_tokens=draft_tokens
        )
        stats = trained_llama_draft.last_generation_stats
        assert stats.drafted_tokens > 0
        accepted += stats.accepted_tokens
    assert accepted > 0
    assert trained_llama_draft.last_generation_stats.mean_accepted_tokens > 1.0


def test_trained_draft_on_unseen_prompts_still_matches(llama_target, trained_llama_draft):
    for prompt in training_prompts(num=6, length=7, seed=99):
        assert_same_as_plain(llama_target, trained_llama_draft, prompt[None], max_new_tokens=33)


def test_prism_beats_random_draft_acceptance(llama_target, trained_llama_draft):
    random_draft = prism_hf.PrismDraftModel.from_target(llama_target)
    taus = {}
    for name, draft in [("random", random_draft), ("trained", trained_llama_draft)]:
        prompt = training_prompts()[0][None]
        assert_same_as_plain(llama_target, draft, prompt, max_new_tokens=40)
        taus[name] = draft.last_generation_stats.mean_accepted_tokens
    assert taus["trained"] > taus["random"] + 0.5, taus


def test_heuristic_schedule_matches_and_adapts(llama_target, trained_llama_draft):
    prompt = training_prompts()[1][None]
    with draft_config_set(trained_llama_draft, draft_confidence_threshold=0.0):
        assert_same_as_plain(
            llama_target,
            trained_llama_draft,
            prompt,
            max_new_tokens=40,
            num_assistant_tokens=2,
            num_assistant_tokens_schedule="heuristic_transient",
        )
    stats = trained_llama_draft.last_generation_stats
    # with a constant length of 2 no round could draft more than 2 tokens
    assert stats.drafted_tokens > 2 * stats.verifications


def test_constant_schedule_from_the_draft_config(llama_target, trained_llama_draft):
    prompt = training_prompts()[1][None]
    with draft_config_set(trained_llama_draft, num_draft_tokens_schedule="constant", draft_confidence_threshold=0.0):
        assert_same_as_plain(
            llama_target, trained_llama_draft, prompt, max_new_tokens=40, eos_token_id=None, num_assistant_tokens=4
        )
    stats = trained_llama_draft.last_generation_stats
    # every round drafts 4 tokens, except near max_length where at most `budget - 1` are drafted
    assert stats.drafted_tokens > 4 * (stats.verifications - 4)
    assert stats.drafted_tokens <= 4 * stats.verifications


@pytest.mark.parametrize("where", ["config", "generate"])
def test_confidence_threshold_ends_rounds_early_and_matches(llama_target, trained_llama_draft, where):
    prompts = training_prompts()[:3]
    kwargs = dict(max_new_tokens=40, eos_token_id=None, num_assistant_tokens=6)
    full = {"drafted": 0, "verifications": 0}
    gated = {"drafted": 0, "verifications": 0, "accepted": 0, "stops": 0}
    with draft_config_set(trained_llama_draft, num_draft_tokens_schedule="constant", draft_confidence_threshold=0.0):
        for prompt in prompts:
            assert_same_as_plain(llama_target, trained_llama_draft, prompt[None], **kwargs)
            full["drafted"] += trained_llama_draft.last_generation_stats.drafted_tokens
            full["verifications"] += trained_llama_draft.last_generation_stats.verifications
        if where == "config":
            trained_llama_draft.config.draft_confidence_threshold = 0.999
        else:
            kwargs["assistant_confidence_threshold"] = 0.999
        for prompt in prompts:
            assert_same_as_plain(llama_target, trained_llama_draft, prompt[None], **kwargs)
            stats = trained_llama_draft.last_generation_stats
            gated["drafted"] += stats.drafted_tokens
            gated["verifications"] += stats.verifications
            gated["accepted"] += stats.accepted_tokens
            gated["stops"] += stats.confidence_stops
    # without the threshold every round but the last few drafts 6 tokens; with it a round stops after the first token
    # the draft is not almost sure of, so rounds are shorter, yet confident tokens still get accepted
    assert full["drafted"] > 4 * full["verifications"]
    assert gated["drafted"] < 0.8 * 6 * gated["verifications"] and gated["stops"] > 0
    assert gated["accepted"] > 0


@pytest.mark.parametrize(("rule", "drafted"), [("token", 6), ("path", 4)])
def test_confidence_rule_picks_the_probability_compared(llama_target, trained_llama_draft, rule, drafted):
    """Tokens of probability 0.9 each: one never falls below 0.7, their product does at the 4th (0.9**4 < 0.7)."""
    prompt = training_prompts()[0][None]
    config = GenerationConfig(num_assistant_tokens=6, assistant_confidence_threshold=0.7, max_length=99)
    with draft_config_set(trained_llama_draft, draft_confidence_rule=rule, num_draft_tokens_schedule="constant"):
        generator = PrismCandidateGenerator(trained_llama_draft, llama_target, prompt, config, None, {})

    def next_token(candidate_ids, draft_hidden):
        logits = torch.full((1, VOCAB), -1e9)
        logits[0, :2] = torch.tensor([0.9, 0.1]).log()
        return torch.zeros(1, 1, dtype=torch.long), logits

    generator._next_token = next_token
    outputs = llama_target(prompt, output_hidden_states=True)
    candidates, logits = generator.get_candidates(prompt, model_outputs=outputs, is_first_iteration=False)
    assert candidates.shape[1] - prompt.shape[1] == drafted == logits.shape[1]
    assert generator.stats.confidence_stops == (rule == "path")


def test_eos_stops_generation_like_plain(llama_target, trained_llama_draft):
    prompt = training_prompts()[2][None]
    reference = llama_target.generate(prompt, do_sample=False, max_new_tokens=40, eos_token_id=None)
    eos = int(reference[0, prompt.shape[1] + 6])  # a token that appears mid-continuation
    out = assert_same_as_plain(llama_target, trained_llama_draft, prompt, max_new_tokens=40, eos_token_id=eos)
    assert out[0, -1].item() == eos and out.shape[1] <= prompt.shape[1] + 7


def test_max_new_tokens_is_respected(llama_target, trained_llama_draft):
    prompt = training_prompts()[3][None]
    for n in (1, 2, 5, 11):
        out = assert_same_as_plain(llama_target, trained_llama_draft, prompt, max_new_tokens=n, eos_token_id=None)
        assert out.shape[1] == prompt.shape[1] + n


class StopAfter(StoppingCriteria):
    def __init__(self, length: int):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


def test_stopping_criteria_are_honoured(llama_target, trained_llama_draft):
    prompt = training_prompts()[4][None]
    stop_at = prompt.shape[1] + 9
    out = llama_target.generate(
        prompt,
        assistant_model=trained_llama_draft,
        do_sample=False,
        max_new_tokens=40,
        eos_token_id=None,
        stopping_criteria=StoppingCriteriaList([StopAfter(stop_at)]),
    )
    plain = llama_target.generate(prompt, do_sample=False, max_new_tokens=40, eos_token_id=None)
    assert out.shape[1] >= stop_at
    # criteria are checked once per verification round, so a round may overshoot by at most its accepted tokens
    assert out.shape[1] <= stop_at + 8
    assert torch.equal(out[0], plain[0, : out.shape[1]])


class RecordingStreamer(TextStreamer):
    def __init__(self):
        self.chunks: list[list[int]] = []
        self.ended = False

    def put(self, value):
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True


def test_streamer_receives_every_token(llama_target, trained_llama_draft):
    prompt = training_prompts()[5][None]
    streamer = RecordingStreamer()
    out = llama_target.generate(
        prompt, assistant_model=trained_llama_draft, do_sample=False, max_new_tokens=30, streamer=streamer
    )
    streamed = [t for chunk in streamer.chunks for t in chunk]
    assert streamer.ended
    assert streamed == prompt[0].tolist() + out[0, prompt.shape[1] :].tolist()
    assert any(len(chunk) > 1 for chunk in streamer.chunks[1:]), "expected multi-token accepted chunks"


def test_return_dict_with_hidden_states_and_scores(llama_target, trained_llama_draft):
    prompt = training_prompts()[6][None]
    kwargs = dict(
        do_sample=False, max_new_tokens=20, return_dict_in_generate=True, output_scores=True, output_hidden_states=True
    )
    plain = llama_target.generate(prompt, **kwargs)
    assisted = llama_target.generate(prompt, assistant_model=trained_llama_draft, **kwargs)
    assert torch.equal(plain.sequences, assisted.sequences)
    assert len(assisted.scores) == 20
    assert all(layer is not None for step in assisted.hidden_states for layer in step)


def test_feature_fusion_draft_matches(tiny_target):
    layers = tiny_target.config.num_hidden_layers
    draft = prism_hf.PrismDraftModel.from_target(tiny_target, feature_layers=[1, layers - 1, layers])
    prompt = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    assert_same_as_plain(tiny_target, draft, prompt, max_new_tokens=25)


def test_previous_token_input_draft_matches_and_saves(tiny_target, tmp_path):
    draft = prism_hf.PrismDraftModel.from_target(tiny_target, previous_token_input=True)
    prompt = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(5))
    assisted = assert_same_as_plain(tiny_target, draft, prompt, max_new_tokens=25)
    assert draft.last_generation_stats.drafted_tokens > 0
    draft.save_pretrained(tmp_path)
    reloaded = prism_hf.PrismDraftModel.from_pretrained(tmp_path)
    assert reloaded.config.previous_token_input
    for name, value in draft.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[name]), name
    assert torch.equal(tiny_target.generate(prompt, assistant_model=reloaded, max_new_tokens=25), assisted)


def test_fused_intermediate_states_are_normalised_first(tiny_target):
    """Each intermediate feature layer is RMS-normalised before the fusion (massive activations), the last one not."""
    layers = tiny_target.config.num_hidden_layers
    draft = prism_hf.PrismDraftModel.from_target(tiny_target, feature_layers=[1, layers - 1, layers])
    assert sorted(draft.feature_norms) == ["0", "1"]  # layer `layers` is the final, normalised state
    assert sorted(prism_hf.PrismDraftModel.from_target(tiny_target, feature_layers=[-1, 1]).feature_norms) == ["1"]
    assert prism_hf.PrismDraftModel.from_target(tiny_target).feature_norms is None
    size = draft.config.hidden_size
    states = [torch.randn(1, 4, size, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    fused = draft.fuse_selected_features(states)
    massive = [states[0] * 1000, states[1] * 10, states[2]]
    torch.testing.assert_close(draft.fuse_selected_features(massive), fused, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(draft.fuse_selected_features([*states[:2], states[2] * 2]), fused)


def test_reduced_vocabulary_draft_matches(llama_target):
    draft = prism_hf.PrismDraftModel.from_target(llama_target, draft_vocab_size=64)
    draft.draft_to_target.copy_(torch.arange(0, VOCAB, 4))
    draft.bind_target(llama_target)
    prompt = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    assert_same_as_plain(llama_target, draft, prompt, max_new_tokens=25)
    assert draft.last_generation_stats.drafted_tokens > 0


FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"


def test_our_assistants_verify_with_grouped_attention_heads(llama_target, trained_llama_draft, monkeypatch):
    """On a CPU the target verifies our drafts with grouped key/value heads; plain and HF-assisted decoding do not."""
    monkeypatch.delenv(FORCE_GQA, raising=False)
    seen: list[str | None] = []
    attention = llama_target.model.layers[0].self_attn
    handle = attention.register_forward_pre_hook(lambda module, args: seen.append(os.environ.get(FORCE_GQA)))
    prompt = training_prompts()[0][None]
    try:
        assert_same_as_plain(llama_target, trained_llama_draft, prompt, max_new_tokens=20)
        assert seen[:5] == [None] * 5 and set(seen[21:]) == {"1"}  # plain's 20 forwards, then the assisted call's
        assert os.environ.get(FORCE_GQA) is None
        seen.clear()
        llama_target.generate(prompt, prompt_lookup_num_tokens=3, do_sample=False, max_new_tokens=10)
        assert seen and set(seen) == {None}
    finally:
        handle.remove()


@pytest.mark.parametrize("previous", [None, "0"])
def test_grouped_attention_block_restores_the_environment(monkeypatch, previous):
    if previous is None:
        monkeypatch.delenv(FORCE_GQA, raising=False)
    else:
        monkeypatch.setenv(FORCE_GQA, previous)
    with prism_hf.grouped_query_attention_on_cpu("cpu"):
        assert os.environ[FORCE_GQA] == "1"
    assert os.environ.get(FORCE_GQA) == previous
    with prism_hf.grouped_query_attention_on_cpu(torch.device("cuda", 0)):
        assert os.environ.get(FORCE_GQA) == previous


def test_grouped_attention_heads_give_bit_identical_verification_logits(llama_target, monkeypatch):
    """A 5-token forward on a cache (masked attention) gives the same float32 logits with grouped or repeated heads."""
    assert llama_target.config.num_key_value_heads < llama_target.config.num_attention_heads
    prompt = training_prompts(num=1, length=40)[0][None]
    new = training_prompts(num=1, length=5, seed=3)[0][None]
    logits = {}
    for mode in ("0", "1"):
        monkeypatch.setenv(FORCE_GQA, mode)
        with torch.no_grad():
            cache = DynamicCache(config=llama_target.config)
            llama_target(prompt, cache=cache, use_cache=True)
            mask = torch.ones(1, prompt.shape[1] + new.shape[1], dtype=torch.long)
            logits[mode] = llama_target(new, attention_mask=mask, cache=cache, use_cache=True).logits
    assert torch.equal(logits["0"], logits["1"])


# ---------------------------------------------------------------- the copy head


def _brute_force_copy(tokens: list[int], max_ngram: int) -> tuple[int, int]:
    """The definition: the longest suffix (<= max_ngram) that occurred before, and what followed it there last."""
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                return tokens[start + n], n
    return -1, 0


def test_copy_index_proposes_the_latest_continuation_of_the_longest_match():
    generator = torch.Generator().manual_seed(0)
    for max_ngram in (1, 3, 8):
        tokens = torch.randint(0, 4, (120,), generator=generator).tolist()
        index = CopyIndex(max_ngram)
        for end in range(1, len(tokens) + 1):
            index.extend(tokens[end - 1 : end])
            assert index.lookup() == _brute_force_copy(tokens[:end], max_ngram), (max_ngram, end)
        proposals, lengths = copy_candidates(torch.tensor([tokens]), max_ngram)
        assert [(int(t), int(n)) for t, n in zip(proposals[0], lengths[0], strict=True)] == [
            _brute_force_copy(tokens[: p + 2], max_ngram) for p in range(len(tokens) - 1)
        ]


def test_copy_index_forgets_speculative_tokens():
    index = CopyIndex(3)
    index.extend([5, 6, 7, 5])
    assert index.lookup() == (6, 1)
    index.extend([6], speculative=True)
    assert index.lookup() == (7, 2)
    index.extend([9, 5, 6], speculative=True)
    assert index.lookup() == (9, 2)  # the speculative occurrence is the latest
    with pytest.raises(RuntimeError, match="Discard the speculative tokens before extending the accepted ones"):
        index.extend([1])
    index.discard_speculative()
    assert index.tokens == [5, 6, 7, 5] and index.lookup() == (6, 1)
    with pytest.raises(ValueError, match="at least one token, got max_ngram=0"):
        CopyIndex(0)


def test_mix_copy_moves_the_gate_share_onto_the_proposal(tiny_target):
    draft = prism_hf.PrismDraftModel.from_target(tiny_target, copy_max_ngram=4)
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(1))
    proposals, lengths = torch.tensor([7, -1, 2]), torch.tensor([4, 0, 1])
    mixed = draft.mix_copy(logits, proposals, lengths)
    probs = logits.softmax(-1)
    log_gate, _ = draft.copy_gate(
        lengths, probs.log().gather(-1, proposals.clamp(min=0)[:, None])[:, 0], probs.log().amax(-1)
    )
    gate = log_gate.exp()[:, None]
    expected = probs.clone()
    for row in (0, 2):
        expected[row] = (1 - gate[row]) * probs[row]
        expected[row, proposals[row]] += gate[row, 0]
    torch.testing.assert_close(mixed.exp(), expected)
    torch.testing.assert_close(mixed.exp().sum(-1), torch.ones(3))
    assert torch.equal(prism_hf.PrismDraftModel.from_target(tiny_target).mix_copy(logits, proposals, lengths), logits)


@pytest.mark.parametrize("copy_streak_tokens", [0, 9])
def test_copy_head_draft_matches_plain_and_saves(tiny_target, tmp_path, copy_streak_tokens):
    """A gate that trusts the copy proposal (g = 0.998): the drafts are mostly copies, the output stays exact."""
    draft = prism_hf.PrismDraftModel.from_target(tiny_target, copy_max_ngram=4, copy_streak_tokens=copy_streak_tokens)
    with torch.no_grad():
        draft.copy_gate.bias.fill_(6.0)
    prompt = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(5))
    assisted = assert_same_as_plain(tiny_target, draft, prompt, max_new_tokens=60)
    stats = draft.last_generation_stats
    assert stats.drafted_tokens > 0
    # this random target falls into a loop, so full 4-token matches come up and streaks draft them
    assert (stats.copied_tokens > 0) == bool(copy_streak_tokens)
    draft.save_pretrained(tmp_path)
    reloaded = prism_hf.PrismDraftModel.from_pretrained(tmp_path)
    assert (reloaded.config.copy_max_ngram, reloaded.config.copy_streak_tokens) == (4, copy_streak_tokens)
    for name, value in draft.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[name]), name
    assert torch.equal(tiny_target.generate(prompt, assistant_model=reloaded, max_new_tokens=60), assisted)


def test_copy_streak_drafts_the_copied_continuation_with_probability_one(tiny_target):
    """A full match at the round's start: the streak copies 6 tokens (past `num_draft_tokens` = 2), no draft step."""
    draft = prism_hf.PrismDraftModel.from_target(
        tiny_target, copy_max_ngram=4, copy_streak_tokens=6, num_draft_tokens=2
    )
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 5, 6, 7, 8]])
    config = GenerationConfig(max_length=99)
    generator = PrismCandidateGenerator(draft, tiny_target, prompt, config, None, {})
    assert generator.num_drafting_tokens == 6
    outputs = tiny_target(prompt, output_hidden_states=True)
    candidates, logits = generator.get_candidates(prompt, model_outputs=outputs, is_first_iteration=False)
    assert candidates[0, prompt.shape[1] :].tolist() == [9, 10, 11, 12, 5, 6]
    assert torch.equal(
        logits.softmax(-1), torch.nn.functional.one_hot(candidates[:, prompt.shape[1] :], VOCAB).float()
    )
    assert generator.stats.copied_tokens == 6
    assert len(generator.cache) == prompt.shape[1] - 1  # only the extend pass wrote draft keys: no draft step ran


def test_copy_streaks_grow_after_whole_ones_and_shrink_after_cut_ones(tiny_target):
    """`copy_streak_max_tokens`: 2 -> 4 -> 8 (bounded) after whole streaks, back down after cut ones, not below 2."""
    draft = prism_hf.PrismDraftModel.from_target(
        tiny_target, copy_max_ngram=4, copy_streak_tokens=2, copy_streak_max_tokens=8, num_draft_tokens=1
    )
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 5, 6, 7, 8]])
    generator = PrismCandidateGenerator(draft, tiny_target, prompt, GenerationConfig(max_length=99), None, {})
    outputs = tiny_target(prompt, output_hidden_states=True)
    candidates, logits = generator.get_candidates(prompt, model_outputs=outputs, is_first_iteration=False)
    assert candidates[0, prompt.shape[1] :].tolist() == [9, 10]  # a streak of copy_streak_tokens
    lengths = []
    for drafted, accepted in [(2, 2), (4, 4), (8, 8), (8, 3), (4, 0), (2, 1)]:
        generator._round_streak = True  # as `_draft` records it for a round that ended in a streak
        generator.update_candidate_strategy(candidates, torch.zeros(1, drafted + 1, VOCAB), accepted)
        lengths.append(generator.num_drafting_tokens)
    assert lengths == [4, 8, 8, 4, 2, 2]
    generator._round_streak = False  # a round the draft's own steps drafted leaves the streak length alone
    generator.update_candidate_strategy(candidates, torch.zeros(1, 2, VOCAB), 1)
    assert generator.num_drafting_tokens == 2


def test_growing_copy_streaks_match_plain_in_fewer_verifications():
    """The tiny random Gemma 3 repeats one token: streaks that grow verify the same output in fewer rounds."""
    target = TARGET_FACTORIES["gemma3"]()
    prompt = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(5))
    stats = {}
    for longest in (0, 32):
        draft = prism_hf.PrismDraftModel.from_target(
            target, copy_max_ngram=4, copy_streak_tokens=4, copy_streak_max_tokens=longest
        )
        assert_same_as_plain(target, draft, prompt, max_new_tokens=120)
        stats[longest] = draft.last_generation_stats
    assert stats[0].copied_tokens > 0
    assert stats[32].verifications < stats[0].verifications / 2


def test_draft_cache_appends_crops_and_grows_like_concatenation():
    """Appends past the buffer's room, crops and overwrites give what concatenating and slicing would."""
    cache = PrismDraftCache()
    assert cache.get() is None and len(cache) == 0
    chunks = [torch.randn(1, 2, n, 4) for n in (5, 1, 1, 7, 1)]
    expected = torch.empty(1, 2, 0, 4)
    for i, chunk in enumerate(chunks):
        cache.append(PrismKeyValues(chunk, -chunk))
        expected = torch.cat([expected, chunk], dim=-2)
        if i == 2:  # a rejected draft token: drop it, as `_extend` does before the next round
            cache.crop(len(cache) - 1)
            expected = expected[..., :-1, :]
        assert len(cache) == expected.shape[-2]
        assert torch.equal(cache.get().keys, expected) and torch.equal(cache.get().values, -expected)
    cache.crop(100)  # cropping to more than it holds keeps everything
    assert len(cache) == expected.shape[-2]
