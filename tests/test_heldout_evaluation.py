"""Held-out evaluation: per-step acceptance and the tau it predicts, checked against what `generate` measures."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import draft_config_set, training_prompts
from transformers import AutoTokenizer, LlamaForCausalLM

import prism_hf
from prism_hf.benchmarking.prompts import encode_prompt, load_prompts
from prism_hf.training import compute_target_features
from prism_hf.training.evaluation import _greedy_rounds, evaluate_draft, predicted_tau
from prism_hf.training.replies import ReplyDatasetArguments, read_reply_shard, reply_shards, write_reply_dataset

# Predicted tau averages rounds from every reply position, `generate`'s rounds start only after each rejection, and
# the last rounds of a reply are cut by max_new_tokens: the two agree closely, not exactly (`rounds_tau` exactly).
TAU_TOLERANCE = 0.08  # relative; measured here: 1.6%, 1.0% and 4.3% at draft lengths 1, 3 and 5


def test_greedy_rounds_walk_each_reply_as_generate_does():
    # prompt tokens 0-1, reply tokens 2-9; chain_lengths[c - 1]: accepted run of the round after token c
    reply = [False, False] + [True] * 8
    lengths = [0, 3, 9, 9, 0, 9, 2, 9]
    # after token 2: 3 accepted + bonus (tokens 3-6); after 6: 2 + bonus (7-9, its draft capped one before the end)
    assert _greedy_rounds(lengths, reply, num_steps=5) == (2, 7)
    assert _greedy_rounds(lengths, reply, num_steps=1) == (4, 7)  # 2, 2 and 2 tokens, then 1: no room to draft
    # two replies in one conversation: each starts from its own prompt's forward pass
    two = [False, True, True, True, False, False, True, True, True]
    assert _greedy_rounds([5] * 7, two, num_steps=5) == (2, 4)
    assert _greedy_rounds([0] * 7, two, num_steps=5) == (4, 4)


def test_predicted_tau_is_the_chain_of_conditional_rates():
    assert predicted_tau([1.0, 1.0, 1.0]) == [2.0, 3.0, 4.0]
    assert predicted_tau([0.5, 0.5]) == [1.5, 1.75]
    assert predicted_tau([0.0, 0.9]) == [1.0, 1.0]


@pytest.mark.parametrize("draft_tokens", [1, 3, 5])
def test_predicted_tau_agrees_with_generate(llama_target, trained_llama_draft, draft_tokens, one_thread):
    prompts = training_prompts()
    new_tokens = 40
    sequences = llama_target.generate(
        prompts, do_sample=False, max_new_tokens=new_tokens, pad_token_id=0, eos_token_id=None
    )
    loss_mask = torch.zeros_like(sequences)
    loss_mask[:, prompts.shape[1] :] = 1  # the replies, as a replies dataset marks them
    features = compute_target_features(llama_target, sequences, [-1], loss_mask=loss_mask)
    trained_llama_draft.bind_target(llama_target)
    metrics = evaluate_draft(trained_llama_draft, [features], num_steps=draft_tokens)

    verifications = accepted = 0
    # "constant" is also transformers' default, which leaves the draft config's schedule in charge: set it there;
    # no confidence stop, so every round drafts the full length the prediction assumes
    with draft_config_set(trained_llama_draft, num_draft_tokens_schedule="constant", draft_confidence_threshold=0.0):
        for prompt, expected in zip(prompts, sequences, strict=True):
            output = llama_target.generate(
                prompt[None],
                do_sample=False,
                max_new_tokens=new_tokens,
                pad_token_id=0,
                eos_token_id=None,
                assistant_model=trained_llama_draft,
                num_assistant_tokens=draft_tokens,
            )
            assert torch.equal(output[0], expected)
            stats = trained_llama_draft.last_generation_stats
            assert stats.drafted_tokens <= draft_tokens * stats.verifications
            verifications += stats.verifications
            accepted += stats.accepted_tokens
    measured = (accepted + verifications) / verifications
    assert measured > 1.3  # a draft that is accepted often enough for the comparison to mean something
    print(f"draft length {draft_tokens}: predicted tau {metrics.predicted_tau[-1]:.3f}, measured {measured:.3f}")
    assert abs(metrics.predicted_tau[-1] - measured) <= TAU_TOLERANCE * measured, (metrics, measured)
    assert metrics.rounds_tau == round(measured, 4)  # the rounds generation takes, walked exactly
    assert metrics.num_tokens == prompts.shape[0] * new_tokens  # a round starts before every reply token
    assert len(metrics.step_accuracy) == len(metrics.conditional_accuracy) == draft_tokens
    assert metrics.vocab_coverage == 1.0  # the full vocabulary


def test_tokens_outside_a_reduced_vocabulary_are_misses(llama_target, trained_llama_draft):
    """With a draft vocabulary that lacks every reply token, nothing can be accepted and coverage is zero."""
    import copy

    prompts = training_prompts(num=2)
    sequences = llama_target.generate(prompts, do_sample=False, max_new_tokens=12, pad_token_id=0, eos_token_id=None)
    replies = set(sequences[:, prompts.shape[1] :].flatten().tolist())
    loss_mask = torch.zeros_like(sequences)
    loss_mask[:, prompts.shape[1] :] = 1
    features = compute_target_features(llama_target, sequences, [-1], loss_mask=loss_mask)

    config = copy.deepcopy(trained_llama_draft.config)
    config.draft_vocab_size = 8
    draft = type(trained_llama_draft)(config)
    draft.load_state_dict(trained_llama_draft.state_dict(), strict=False)
    outside = [t for t in range(config.verifier_vocab_size) if t not in replies][:8]
    draft.draft_to_target.copy_(torch.tensor(sorted(outside)))
    draft.bind_target(llama_target)
    metrics = evaluate_draft(draft, [features], num_steps=2)
    assert metrics.vocab_coverage == 0.0
    assert metrics.step_accuracy == [0.0, 0.0] and metrics.predicted_tau == [1.0, 1.0]


def test_numbers_by_source_are_each_source_scored_alone(llama_target, trained_llama_draft):
    """One pass with `sources` gives the pooled numbers and, per source, what scoring that source alone gives."""
    prompts = training_prompts(num=4)
    sequences = llama_target.generate(prompts, do_sample=False, max_new_tokens=16, pad_token_id=0, eos_token_id=None)
    loss_mask = torch.zeros_like(sequences)
    loss_mask[:, prompts.shape[1] :] = 1
    trained_llama_draft.bind_target(llama_target)
    batches = [
        compute_target_features(llama_target, sequences[i : i + 1], [-1], loss_mask=loss_mask[i : i + 1])
        for i in range(len(sequences))
    ]
    sources = ["code", "chat", "code", "code"]
    metrics = evaluate_draft(trained_llama_draft, batches, num_steps=3, sources=sources)
    pooled = evaluate_draft(trained_llama_draft, batches, num_steps=3)
    assert pooled.by_source is None and "heldout_by_source" not in pooled.to_dict()
    by_source = {source: alone.to_dict(prefix="") for source, alone in metrics.by_source.items()}
    assert metrics.to_dict(prefix="") == {**pooled.to_dict(prefix=""), "by_source": by_source}
    assert "by_source" not in by_source["code"]
    assert list(metrics.by_source) == ["code", "chat"]
    for source, alone in metrics.by_source.items():
        chosen = [b for b, s in zip(batches, sources, strict=True) if s == source]
        assert alone == evaluate_draft(trained_llama_draft, chosen, num_steps=3)
    assert sum(m.num_tokens for m in metrics.by_source.values()) == metrics.num_tokens
    assert metrics.by_source["chat"].step_accuracy != metrics.by_source["code"].step_accuracy  # not one copy

    with pytest.raises(ValueError, match="3 sources for 4 held-out batches: give one source per batch."):
        evaluate_draft(trained_llama_draft, batches, num_steps=3, sources=sources[:3])


def test_numbers_by_mode_split_greedy_from_sampled_replies(llama_target, trained_llama_draft):
    """`modes` adds each reply mode's own numbers; a sequence of unknown mode (None) counts in the pooled ones only."""
    prompts = training_prompts(num=4)
    greedy = llama_target.generate(prompts, do_sample=False, max_new_tokens=16, pad_token_id=0, eos_token_id=None)
    torch.manual_seed(0)
    sampled = llama_target.generate(
        prompts, do_sample=True, top_k=0, max_new_tokens=16, pad_token_id=0, eos_token_id=None
    )
    trained_llama_draft.bind_target(llama_target)

    def features(sequences: torch.Tensor, row: int):
        loss_mask = torch.zeros_like(sequences[row : row + 1])
        loss_mask[:, prompts.shape[1] :] = 1
        return compute_target_features(llama_target, sequences[row : row + 1], [-1], loss_mask=loss_mask)

    batches = [features(greedy, 0), features(sampled, 1), features(greedy, 2), features(sampled, 3)]
    modes = ["greedy", "sampled", "greedy", None]
    metrics = evaluate_draft(trained_llama_draft, batches, num_steps=3, modes=modes)
    assert metrics.by_source is None and list(metrics.by_mode) == ["greedy", "sampled"]
    assert metrics.by_mode["greedy"] == evaluate_draft(trained_llama_draft, batches[0:3:2], num_steps=3)
    assert metrics.by_mode["sampled"] == evaluate_draft(trained_llama_draft, batches[1:2], num_steps=3)
    assert metrics.to_dict(prefix="")["by_mode"]["greedy"] == metrics.by_mode["greedy"].to_dict(prefix="")
    # the fourth sequence is in the pooled numbers, not in a mode's
    pooled = evaluate_draft(trained_llama_draft, batches, num_steps=3)
    assert metrics.num_tokens == pooled.num_tokens > sum(m.num_tokens for m in metrics.by_mode.values())
    # the target's own greedy continuation is drafted better than its samples (the draft learnt greedy replies)
    assert metrics.by_mode["greedy"].step_accuracy[0] > metrics.by_mode["sampled"].step_accuracy[0]
    # no mode known: no split
    assert evaluate_draft(trained_llama_draft, batches, num_steps=3, modes=[None] * 4).by_mode is None
    with pytest.raises(ValueError, match="2 modes for 4 held-out batches: give one mode per batch."):
        evaluate_draft(trained_llama_draft, batches, num_steps=3, modes=modes[:2])


def test_prompt_acceptance_scores_the_targets_greedy_replies_to_the_benchmark_prompts(
    tiny_chat_target, tiny_draft, chat_data, tmp_path, one_thread
):
    """
    benchmarks/prompt_acceptance.py: each draft scored on the replies plain greedy `generate` writes, per task, and on
    a replies dataset's greedy held-out rows; each split by copyability and by place in the reply.
    """
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "prompt_acceptance.py"
    spec = importlib.util.spec_from_file_location("prompt_acceptance", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    output = tmp_path / "acceptance.json"
    options = ["--target", str(tiny_chat_target), "--per-category", "1", "--limit", "1", "--max-new-tokens", "6"]
    drafts = ["--draft", f"a={tiny_draft}", "--draft", f"b={tiny_draft}"]
    replies = tmp_path / "replies"
    write_reply_dataset(
        ReplyDatasetArguments(
            target=str(tiny_chat_target),
            output_dir=str(replies),
            source=str(chat_data),
            num_prompts=8,
            max_new_tokens=12,
            sampled_fraction=0.0,
            heldout_fraction=0.5,
            dtype="float32",
        ),
        progress=False,
    )
    scored = ["--replies", str(replies), "--replies-rows", "2"]
    results = module.main([*options, *drafts, *scored, "--num-steps", "3", "--output", str(output)])
    assert json.loads(output.read_text()) == results

    target = LlamaForCausalLM.from_pretrained(tiny_chat_target)
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_target)
    prompts = load_prompts(("spec_bench", "humaneval"), per_category=1, limit=1)
    assert results["metadata"]["prompts"] == [prompt.id for prompt in prompts]
    reply_tokens: dict[str, int] = {}
    for prompt in prompts:
        ids = encode_prompt(tokenizer, prompt).input_ids[None]
        out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        reply_tokens[prompt.category] = reply_tokens.get(prompt.category, 0) + out.shape[1] - ids.shape[1]
    first, second = results["drafts"]["a"], results["drafts"]["b"]
    assert first == second  # the same weights score the same
    assert {task: scores["num_tokens"] for task, scores in first["by_source"].items()} == reply_tokens
    assert first["num_tokens"] == sum(reply_tokens.values())
    assert len(first["predicted_tau"]) == 3 and all(1.0 <= tau <= 4.0 for tau in first["predicted_tau"])
    assert all(1.0 <= scores["rounds_tau"] <= 4.0 for scores in (first, *first["by_source"].values()))
    # the first step's acceptance split by whether a copy of the context would draft the token adds up to it
    split = first["step1_by_copyability"]
    assert split["copyable"]["tokens"] + split["other"]["tokens"] == first["num_tokens"]
    hits = sum(part["tokens"] * (part["step1_accuracy"] or 0) for part in split.values())
    assert hits / first["num_tokens"] == pytest.approx(first["step_accuracy"][0], abs=1e-3)
    # pair p drafts token p + 2: copyable when tokens p, p + 1 came earlier followed by it ("1 2 3 ... 1 2 3")
    next_tokens = [3, 4, 1, 2, 3, 9, 5, 6]
    assert module.copyable_positions([1, 2, 3, 4, 1, 2, 3, 9, 5, 6], next_tokens) == [
        False,
        False,
        False,
        False,
        True,
        False,
        False,
        False,
    ]
    # the same split by place in the reply, which counts every reply token once (pair p drafts token p + 2)
    by_place = first["step1_by_reply_position"]
    assert list(by_place) == ["tokens 1-32", "tokens 33-96", "tokens 97-256", "tokens 257+"]
    assert by_place["tokens 1-32"]["tokens"] == first["num_tokens"]  # replies of 6 tokens
    assert by_place["tokens 1-32"]["step1_accuracy"] == pytest.approx(hits / first["num_tokens"], abs=1e-3)
    assert module.reply_positions([False, False, True, True, True, False, True]) == [1, 2, 3, 0, 1]
    assert [module.position_bucket(place) for place in (1, 32, 33, 96, 97, 257, 900)] == [
        "tokens 1-32",
        "tokens 1-32",
        "tokens 33-96",
        "tokens 33-96",
        "tokens 97-256",
        "tokens 257+",
        "tokens 257+",
    ]
    # the draft's k most likely first-step tokens: top 1 is the greedy step, and a larger k never holds fewer
    top_k = first["step1_top_k"]
    assert top_k["tokens"] == first["num_tokens"]
    assert list(top_k["step1_accuracy"]) == ["top 1", "top 2", "top 4", "top 8"]
    assert top_k["step1_accuracy"]["top 1"] == pytest.approx(hits / first["num_tokens"], abs=1e-4)
    rates = list(top_k["step1_accuracy"].values())
    assert rates == sorted(rates)
    # rank 0 is argmax's pick, ties going to the lower index; a token outside the draft vocabulary ranks last
    logits = torch.tensor([[0.5, 2.0, 2.0, -1.0], [3.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert module.draft_rank(logits, torch.tensor([1, 2, -1])).tolist() == [0, 2, 4]
    assert module.draft_rank(logits, torch.tensor([2, 0, 3])).tolist() == [1, 0, 3]
    assert (module.draft_rank(logits, logits.argmax(-1)) == 0).all()
    with pytest.raises(ValueError, match="reply position 0 is not a reply token's"):
        module.position_bucket(0)

    # --replies: the dataset's first two greedy held-out rows, every reply token scored once
    rows = [row for path in reply_shards(replies) for row in read_reply_shard(path)]
    heldout = [row for row in rows if row["split"] == "heldout" and row["mode"] == "greedy"][:2]
    assert len(heldout) == 2
    dataset_scores = results["replies"][str(replies)]
    assert dataset_scores["a"] == dataset_scores["b"]
    assert dataset_scores["a"]["num_tokens"] == sum(sum(row["loss_mask"][2:]) for row in heldout)
    assert sum(part["tokens"] for part in dataset_scores["a"]["step1_by_reply_position"].values()) == sum(
        sum(row["loss_mask"][2:]) for row in heldout
    )
    with pytest.raises(SystemExit):
        module.main([*options, "--draft", f"a={tiny_draft}", "--draft", f"a={tiny_draft}", "--output", str(output)])


def test_copy_streak_rounds_records_every_verification_round(tiny_chat_target, tiny_draft, tmp_path, one_thread):
    """
    benchmarks/copy_streak_rounds.py: the recorded rounds add up to each greedy reply, and the summary counts whole
    and cut streaks, and what follows each, as hand-counted here.
    """
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "copy_streak_rounds.py"
    spec = importlib.util.spec_from_file_location("copy_streak_rounds", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rounds = [
        {"drafted": 16, "copied": 14, "accepted": 16},  # whole streak
        {"drafted": 2, "copied": 0, "accepted": 1},  # the draft's own steps: not a streak
        {"drafted": 32, "copied": 32, "accepted": 32},  # whole after whole
        {"drafted": 64, "copied": 60, "accepted": 10},  # cut after whole
        {"drafted": 32, "copied": 32, "accepted": 32},  # whole after cut
    ]
    summary = module.summarize([rounds, [{"drafted": 16, "copied": 16, "accepted": 3}]])  # a new prompt: no "after"
    assert summary["rounds"] == 6 and summary["streak_rounds"] == 5
    assert summary["tau"] == round((17 + 2 + 33 + 11 + 33 + 4) / 6, 4)
    assert summary["streak_whole"] == 0.6
    assert (summary["streak_whole_after_whole"], summary["streaks_after_whole"]) == (0.5, 2)
    assert (summary["streak_whole_after_cut"], summary["streaks_after_cut"]) == (1.0, 1)
    assert summary["streak_round_tokens_share"] == round((17 + 33 + 11 + 33 + 4) / 100, 4)

    output = tmp_path / "rounds.json"
    options = ["--target", str(tiny_chat_target), "--per-category", "1", "--limit", "1", "--max-new-tokens", "8"]
    results = module.main([*options, "--draft", f"a={tiny_draft}", "--output", str(output)])
    assert json.loads(output.read_text()) == results
    target = LlamaForCausalLM.from_pretrained(tiny_chat_target)
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_target)
    draft = prism_hf.PrismDraftModel.from_pretrained(tiny_draft)
    new_tokens, verifications = 0, 0
    prompts = load_prompts(("spec_bench", "humaneval"), per_category=1, limit=1)
    for prompt in prompts:
        ids = encode_prompt(tokenizer, prompt).input_ids[None]
        out = target.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=draft, max_new_tokens=8)
        new_tokens += out.shape[1] - ids.shape[1]
        verifications += draft.last_generation_stats.verifications
    recorded = results["drafts"]["a"]
    assert recorded["rounds"] == verifications
    # each prompt's first token comes from the prefill, no verification round
    assert recorded["tau"] == round((new_tokens - len(prompts)) / verifications, 4)
    assert recorded["streak_rounds"] == 0  # this draft has no copy head
