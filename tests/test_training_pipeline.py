"""`prism-hf train` end to end on a tiny target with a tokenizer and chat template built in code."""

from __future__ import annotations

import json
import os
import shlex
import string
import subprocess

import pytest
import torch
from tiny_chat import tiny_chat_llama
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

import prism_hf
from prism_hf.benchmarking.report import describe_machine
from prism_hf.cli import build_parser
from prism_hf.cli import main as cli_main
from prism_hf.training import WARMUP_PHASE, compute_target_features, prism_loss
from prism_hf.training import features as features_module
from prism_hf.training.data import (
    build_examples,
    cap_reply_loss_mask,
    render_conversation,
    select_draft_vocabulary,
)
from prism_hf.training.features import FeatureStore, collate

SPECIALS = ["<pad>", "<s>", "<|end|>", "<|user|>", "<|assistant|>"]
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIALS + list(string.ascii_lowercase + " .,?!"))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()  # characters are joined back without spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="<|end|>",
        additional_special_tokens=SPECIALS[3:],
    )
    tokenizer.chat_template = TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
    """A tiny target saved with its tokenizer, and chat data whose answers are the target's own greedy replies."""
    tokenizer = make_tokenizer()
    target = tiny_chat_llama(tokenizer)
    path = tmp_path_factory.mktemp("tiny-chat")
    target.save_pretrained(path / "target")
    tokenizer.save_pretrained(path / "target")
    questions = ["how are you?", "what is a cat?", "say hi.", "count to ten.", "why is the sky blue?", "hello there."]
    rows = []
    for question in questions:
        messages = [{"role": "user", "content": question}]
        prompt = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        reply = target.generate(prompt, do_sample=False, max_new_tokens=40, eos_token_id=None)
        content = tokenizer.decode(reply[0, prompt.shape[1] :], skip_special_tokens=True)
        rows.append({"messages": messages + [{"role": "assistant", "content": content}]})
    data = path / "chat.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path / "target", data, questions


def test_render_conversation_masks_assistant_turns_only():
    tokenizer = make_tokenizer()
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": "bye"},
    ]
    example = render_conversation(tokenizer, messages, max_length=100)
    masked = tokenizer.decode(example.input_ids[example.loss_mask.bool()])
    assert masked == "yo<|end|>bye<|end|>"
    truncated = render_conversation(tokenizer, messages, max_length=len(example.input_ids) - 5)
    assert truncated.loss_mask.sum() < example.loss_mask.sum()
    assert render_conversation(tokenizer, messages[:1], max_length=100) is None


def test_draft_vocabulary_takes_most_frequent_assistant_tokens():
    tokenizer = make_tokenizer()
    conversations = [[{"role": "user", "content": "zzz"}, {"role": "assistant", "content": "aab"}]] * 3
    examples = build_examples(tokenizer, conversations, num_examples=3, max_length=64, min_length=1)
    vocab = select_draft_vocabulary(examples, size=3, vocab_size=len(tokenizer), always_include=[2])
    assert vocab.tolist() == sorted([2, tokenizer.convert_tokens_to_ids("a"), tokenizer.convert_tokens_to_ids("b")])


def test_feature_cache_resumes_and_never_reuses_other_settings(tiny_chat_model, tmp_path):
    target_dir, data, _ = tiny_chat_model
    from prism_hf.training.pipeline import load_conversations

    target = LlamaForCausalLM.from_pretrained(target_dir).eval()
    examples = build_examples(make_tokenizer(), load_conversations(str(data)), 6, 128)
    first = FeatureStore.build(target, examples, [-1], cache_dir=tmp_path, shard_size=4, progress=False)
    files = sorted(tmp_path.glob("shard-*"))
    assert [p.name.split("-")[1] for p in files] == ["00000", "00001"]
    files[1].unlink()  # as if interrupted after the first shard
    calls = []
    original = features_module.compute_features_batched

    def spy(target, examples, *args, **kwargs):
        calls.append(len(examples))
        return original(target, examples, *args, **kwargs)

    features_module.compute_features_batched = spy
    try:
        resumed = FeatureStore.build(target, examples, [-1], cache_dir=tmp_path, shard_size=4, progress=False)
        assert calls == [2]  # only the missing shard was computed
        assert first.computed_tokens == first.num_tokens > resumed.computed_tokens > 0
        assert resumed.computed_tokens == sum(len(e.input_ids) for e in examples[4:])
        a, b = collate(first.features), collate(resumed.features)
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.last_hidden_state, b.last_hidden_state)
        # other layers (or other examples) get files of their own: nothing computed from other settings is reused
        other = FeatureStore.build(target, examples, [1, -1], cache_dir=tmp_path, shard_size=4, progress=False)
        assert calls == [2, 4, 2] and len(list(tmp_path.glob("shard-*"))) == 4
        assert len(other.features[0].hidden_states) == 2
        # the same examples under another shard name (the dataset in another place among the sources) are read back
        renamed = FeatureStore.build(
            target, examples, [-1], cache_dir=tmp_path, shard_size=4, name="data2-train", progress=False
        )
        assert calls == [2, 4, 2] and renamed.computed_tokens == 0 and len(list(tmp_path.glob("*"))) == 4
        c = collate(renamed.features)
        assert torch.equal(a.input_ids, c.input_ids) and torch.equal(a.last_hidden_state, c.last_hidden_state)
    finally:
        features_module.compute_features_batched = original


def test_batched_features_equal_one_sequence_at_a_time(tiny_chat_model):
    target_dir, data, _ = tiny_chat_model
    from prism_hf.training.pipeline import load_conversations

    target = LlamaForCausalLM.from_pretrained(target_dir).eval()
    examples = build_examples(make_tokenizer(), load_conversations(str(data)), 6, 128)
    batched = features_module.compute_features_batched(target, examples, [1, -1], storage_dtype=torch.float32)
    for example, item in zip(examples, batched, strict=True):
        alone = compute_target_features(target, example.input_ids[None], [1, -1])
        assert torch.equal(item.input_ids, example.input_ids[None]) and torch.equal(
            item.loss_mask[0], example.loss_mask
        )
        torch.testing.assert_close(item.hidden_states[0], alone.hidden_states[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(item.last_hidden_state, alone.last_hidden_state, rtol=1e-5, atol=1e-5)


def test_target_features_skip_the_lm_head_and_equal_the_causal_lm_states(llama_target, monkeypatch):
    """Features come from the decoder alone: the same states as the CausalLM's forward, with no LM head run."""
    sequences = torch.randint(0, llama_target.config.vocab_size, (2, 24))
    reference = llama_target(sequences, output_hidden_states=True, use_cache=False).hidden_states

    def refuse(*args, **kwargs):
        raise AssertionError("the LM head ran during feature extraction")

    monkeypatch.setattr(llama_target.lm_head, "forward", refuse)
    features = compute_target_features(llama_target, sequences, [1, -1])
    assert torch.equal(features.hidden_states[0], reference[1])
    assert torch.equal(features.hidden_states[1], reference[-1])
    assert torch.equal(features.last_hidden_state, reference[-1])


def test_cli_train_end_to_end(tiny_chat_model, tmp_path):
    target_dir, data, questions = tiny_chat_model
    out = tmp_path / "draft"
    cli_main(
        [
            "train",
            "--target",
            str(target_dir),
            "--data",
            str(data),
            "--output-dir",
            str(out),
            "--num-examples",
            "6",
            "--max-length",
            "128",
            "--warmup-epochs",
            "60",
            "--finetune-epochs",
            "30",
            "--batch-size",
            "2",
            "--warmup-learning-rate",
            "3e-3",
            "--finetune-learning-rate",
            "1e-3",
            "--target-dtype",
            "float32",
            "--draft-vocab-size",
            "24",
        ]
    )
    files = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "modeling_prism.py",
        "training_args.json",
        "training_record.json",
    } <= files
    record = json.loads((out / "training_record.json").read_text())
    # one of the six conversations is held out, never trained on, and scored
    assert record["num_examples"] == 5 and record["num_tokens"] > 5 * 40 and record["heldout_examples"] == 1
    assert record["heldout_tokens"] > 20
    assert len(record["heldout_step_accuracy"]) == len(record["heldout_predicted_tau"]) == 5
    assert record["heldout_predicted_tau"][0] == pytest.approx(1 + record["heldout_step_accuracy"][0], abs=1e-3)
    assert 0 <= record["heldout_vocab_coverage"] <= 1
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert [(entry["phase"], entry["update"]) for entry in log] == [("warmup", 150), ("finetune", 75)]
    best = record["heldout_by_phase"]["finetune"]
    assert best["metrics"]["predicted_tau"] == record["heldout_predicted_tau"]
    assert set(record["train_tokens_per_second"]) == {"warmup", "finetune"}
    assert record["data_kind"] == "conversations" and 0 <= record["feature_seconds"] <= record["total_seconds"]
    assert record["machine"] == describe_machine()  # the timings' processor
    # no feature cache: every training and held-out token went through the target
    assert record["feature_tokens_computed"] > record["num_tokens"] and record["feature_tokens_per_second"] > 0
    # the recorded command reproduces the saved arguments
    saved_args = json.loads((out / "training_args.json").read_text())
    command = shlex.split(record["command"])
    assert command[:2] == ["prism-hf", "train"]
    reparsed = vars(build_parser().parse_args(command[1:]))
    assert {key: reparsed[key] for key in saved_args} == saved_args

    target = LlamaForCausalLM.from_pretrained(target_dir).eval()
    tokenizer = make_tokenizer()
    trained = prism_hf.PrismDraftModel.from_pretrained(out)
    assert trained.config.num_modules == 2 and trained.config.draft_vocab_size == 24
    random_draft = prism_hf.PrismDraftModel.from_target(target, draft_vocab_size=24)
    random_draft.draft_to_target.copy_(trained.draft_to_target)
    random_draft.bind_target(target)

    # the loss went down
    from prism_hf.training.pipeline import load_conversations

    examples = build_examples(tokenizer, load_conversations(str(data)), 6, 128)
    batch = collate(FeatureStore.build(target, examples, [-1], progress=False).features)
    trained.bind_target(target)
    with torch.no_grad():
        assert prism_loss(trained, batch, WARMUP_PHASE)[0] < prism_loss(random_draft, batch, WARMUP_PHASE)[0]

    # and acceptance rose over a random draft on the conversations trained on, with output identical to plain greedy
    from prism_hf.training.pipeline import split_heldout

    _, (heldout,) = split_heldout(examples, 0.05)
    trained_questions = [
        q for q, e in zip(questions, examples, strict=True) if not torch.equal(e.input_ids, heldout.input_ids)
    ]
    assert len(trained_questions) == 5
    taus = {"trained": [], "random": []}
    for question in trained_questions:
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        plain = target.generate(**inputs, do_sample=False, max_new_tokens=40, eos_token_id=None)
        for name, draft in (("trained", trained), ("random", random_draft)):
            # full-length rounds (no confidence stop): the comparison is of what the drafts predict
            out_ids = target.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=40,
                eos_token_id=None,
                assistant_model=draft,
                assistant_confidence_threshold=0.0,
            )
            assert torch.equal(plain, out_ids)
            taus[name].append(draft.last_generation_stats.mean_accepted_tokens)
    mean = {name: sum(v) / len(v) for name, v in taus.items()}
    assert mean["trained"] > mean["random"] + 0.5, mean


def test_interrupted_phase_resumes_exactly_from_its_checkpoint(llama_target, tmp_path):
    """Model, optimizer and scheduler state come back and consumed batches are skipped: same weights at the end."""
    from conftest import training_prompts

    from prism_hf.training import PhaseConfig, compute_target_features, train_phase

    sequences = llama_target.generate(
        training_prompts(), do_sample=False, max_new_tokens=12, pad_token_id=0, eos_token_id=None
    )
    batches = [compute_target_features(llama_target, sequences[i : i + 4], [-1]) for i in range(0, 8, 4)]
    phase = PhaseConfig(learning_rate=3e-3)

    def fresh_draft() -> prism_hf.PrismDraftModel:
        torch.manual_seed(0)
        return prism_hf.PrismDraftModel.from_target(llama_target, num_modules=1, step_module_map=[0])

    uninterrupted = fresh_draft()
    train_phase(uninterrupted, batches, phase, num_updates=7, progress=False)

    class Interrupted(Exception):
        pass

    def interrupt_after_step_4(step, metrics):
        if step == 4:
            raise Interrupted

    checkpoint = tmp_path / "warmup"
    with pytest.raises(Interrupted):
        train_phase(
            fresh_draft(),
            batches,
            phase,
            7,
            interrupt_after_step_4,
            False,
            checkpoint_dir=checkpoint,
            checkpoint_every=3,
        )
    assert json.loads((checkpoint / "progress.json").read_text()) == {"step": 3}
    steps_run = []
    resumed = fresh_draft()
    train_phase(
        resumed,
        batches,
        phase,
        7,
        lambda step, metrics: steps_run.append(step),
        False,
        checkpoint_dir=checkpoint,
        checkpoint_every=3,
        resume=True,
    )
    assert steps_run == [3, 4, 5, 6]
    for (name, expected), actual in zip(
        uninterrupted.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(expected, actual), name


def test_cli_train_runs_on_two_processes_with_accelerate_launch(tiny_chat_model, tmp_path):
    """
    `accelerate launch` with 2 CPU processes on a replies dataset: features split between them, gradients averaged,
    one saved draft.
    """
    from prism_hf.training.replies import ReplyDatasetArguments, read_reply_shard, reply_shards, write_reply_dataset

    target_dir, data, _ = tiny_chat_model
    replies = tmp_path / "replies"
    options = dict(num_prompts=6, shard_size=3, max_new_tokens=16, heldout_fraction=0.3, dtype="float32")
    write_reply_dataset(
        ReplyDatasetArguments(target=str(target_dir), output_dir=str(replies), source=str(data), **options),
        progress=False,
    )
    out = tmp_path / "draft"
    command = [
        *("accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"),
        *("--mixed_precision", "no", "--dynamo_backend", "no", "-m", "prism_hf.cli", "train"),
        *("--target", str(target_dir), "--data", str(replies), "--output-dir", str(out)),
        *("--max-length", "128", "--warmup-epochs", "4", "--finetune-epochs", "2", "--batch-size", "1"),
        *("--target-dtype", "float32", "--feature-cache-dir", str(tmp_path / "features"), "--checkpoint-every", "2"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # without ACCELERATE_USE_CPU, accelerate would leave each CPU process training alone: refused, not raced
    del env["ACCELERATE_USE_CPU"]
    refused = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode != 0 and "set ACCELERATE_USE_CPU=true" in refused.stderr
    record = json.loads((out / "training_record.json").read_text())
    assert record["num_processes"] == 2 and record["data_kind"] == "replies dataset"
    assert record["num_examples"] + record["heldout_examples"] == 6 and record["heldout_examples"] >= 1
    # the held-out numbers also come per reply mode, over exactly the modes of the dataset's held-out rows
    rows = [row for path in reply_shards(replies) for row in read_reply_shard(path)]
    heldout_rows = [row for row in rows if row["split"] == "heldout"]
    assert list(record["heldout_by_mode"]) == sorted({row["mode"] for row in heldout_rows})
    assert sum(m["num_tokens"] for m in record["heldout_by_mode"].values()) == record["heldout_num_tokens"]
    first, second = record["parameter_checksums"]
    assert first == second  # gradients were synchronised: both processes hold the same weights
    # each process computed the features of its own share of each training shard (and all held-out ones)
    assert sorted(p.name for p in (tmp_path / "features").iterdir()) == ["rank0-of-2", "rank1-of-2"]
    for rank in range(2):
        names = sorted(p.name for p in (tmp_path / "features" / f"rank{rank}-of-2").iterdir())
        assert any(name.startswith(f"train-00000-rank{rank}-of-2-") for name in names), names
        assert any(name.startswith("heldout-") for name in names), names
    assert not (out / "checkpoints").exists()
    draft = prism_hf.PrismDraftModel.from_pretrained(out)
    assert draft.config.num_modules == 2
    checksum = sum(float(p.detach().double().sum()) for p in draft.parameters())
    assert checksum == pytest.approx(first, rel=1e-6)


def test_compiled_loss_matches_eager_loss_and_gradients(llama_target):
    """`compile_loss` fuses the vocabulary-wide cross-entropy; losses, accuracies and gradients stay those of eager."""
    from conftest import training_prompts

    from prism_hf.training import PhaseConfig, compute_target_features, prism_loss

    sequences = llama_target.generate(
        training_prompts(), do_sample=False, max_new_tokens=12, pad_token_id=0, eos_token_id=None
    )
    batch = compute_target_features(llama_target, sequences, [-1])
    torch.manual_seed(0)
    draft = prism_hf.PrismDraftModel.from_target(llama_target, num_modules=1, step_module_map=[0])
    results = {}
    for compile_loss in (False, True):
        draft.zero_grad()
        loss, metrics = prism_loss(draft, batch, PhaseConfig(compile_loss=compile_loss))
        loss.backward()
        results[compile_loss] = (loss.detach(), metrics, [p.grad.clone() for p in draft.parameters()])
    (eager_loss, eager_metrics, eager_grads), (loss, metrics, grads) = results[False], results[True]
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert metrics.keys() == eager_metrics.keys()
    for key in metrics:
        assert metrics[key] == pytest.approx(eager_metrics[key], rel=1e-5, abs=1e-6), key
    for grad, eager_grad in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(grad, eager_grad, rtol=1e-4, atol=1e-6)


def test_reply_loss_tokens_score_each_replys_opening_with_the_same_loss(llama_target):
    """
    `--reply-loss-tokens N` keeps each reply's first N tokens in the loss (every assistant turn its own), and the
    training batch is cut after its last scored token: the loss is the one the whole sequences give with that mask.
    """
    from conftest import training_prompts

    from prism_hf.training import PhaseConfig
    from prism_hf.training.pipeline import _reply_openings

    mask = torch.tensor([[0, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1]])
    assert cap_reply_loss_mask(mask, 2).tolist() == [
        [0, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1],
    ]
    assert torch.equal(cap_reply_loss_mask(mask, 5), mask)
    with pytest.raises(ValueError, match="max_tokens must be at least 1, got 0"):
        cap_reply_loss_mask(mask, 0)

    sequences = llama_target.generate(
        training_prompts(), do_sample=False, max_new_tokens=20, pad_token_id=0, eos_token_id=None
    )
    batch = compute_target_features(llama_target, sequences, [-1])
    # two replies per row: tokens 5-12 and 16-24 (the rest is prompt and the user's turn)
    batch.loss_mask = torch.zeros_like(sequences)
    batch.loss_mask[:, 5:13] = 1
    batch.loss_mask[:, 16:25] = 1
    openings = _reply_openings(batch, 4)
    assert openings.input_ids.shape[1] == 20  # the second reply's fourth token is token 19
    assert openings.loss_mask.sum(1).tolist() == [8] * len(sequences)
    assert torch.equal(openings.input_ids, sequences[:, :20])
    whole = compute_target_features(llama_target, sequences, [-1])
    whole.loss_mask = torch.cat([openings.loss_mask, torch.zeros_like(sequences[:, 20:])], dim=1)
    torch.manual_seed(0)
    draft = prism_hf.PrismDraftModel.from_target(llama_target, num_modules=1, step_module_map=[0])
    cut_loss, cut_metrics = prism_loss(draft, openings, PhaseConfig())
    whole_loss, whole_metrics = prism_loss(draft, whole, PhaseConfig())
    torch.testing.assert_close(cut_loss, whole_loss, rtol=1e-5, atol=1e-6)
    assert cut_metrics == pytest.approx(whole_metrics, rel=1e-5, abs=1e-6)


def _tiny_training(tiny_chat_model, **settings) -> dict:
    """`DraftTrainingArguments` fields for a few-second run on the tiny chat model, with `settings` on top."""
    target_dir, data, _ = tiny_chat_model
    common = dict(
        target=str(target_dir),
        data=str(data),
        num_examples=6,
        max_length=128,
        batch_size=2,
        target_dtype="float32",
        draft_vocab_size=24,
        eval_every=0,
    )
    return common | settings


def test_m1_baseline_from_a_shared_warmup_equals_training_it_whole(tiny_chat_model, tmp_path):
    """`--save-warmup`, then `--init-draft .../warmup --warmup-epochs 0`: the M = 1 draft of a run of both phases."""
    from prism_hf.training.pipeline import DraftTrainingArguments, train_draft

    common = _tiny_training(tiny_chat_model, warmup_epochs=4, finetune_epochs=2, feature_noise=0.1)
    m2 = tmp_path / "m2"
    train_draft(DraftTrainingArguments(output_dir=str(m2), num_modules=2, save_warmup=True, **common), progress=False)
    warmup = prism_hf.PrismDraftModel.from_pretrained(m2 / "warmup")
    assert warmup.config.num_modules == 1 and warmup.config.draft_vocab_size == 24
    whole = tmp_path / "m1-whole"
    train_draft(DraftTrainingArguments(output_dir=str(whole), num_modules=1, **common), progress=False)
    shared = tmp_path / "m1-shared"
    shared_args = DraftTrainingArguments(
        output_dir=str(shared), num_modules=1, **(common | {"warmup_epochs": 0}), init_draft=str(m2 / "warmup")
    )
    train_draft(shared_args, progress=False)
    expected = prism_hf.PrismDraftModel.from_pretrained(whole).state_dict()
    actual = prism_hf.PrismDraftModel.from_pretrained(shared).state_dict()
    assert list(expected) == list(actual)
    for name, value in expected.items():
        assert torch.equal(value, actual[name]), name
    record = json.loads((shared / "training_record.json").read_text())
    assert set(record["heldout_by_phase"]) == {"finetune"} and "--init-draft" in record["command"]
    # the draft it started from, scored on the same held-out conversations
    warmup_record = json.loads((m2 / "training_record.json").read_text())["heldout_by_phase"]["warmup"]["metrics"]
    assert record["heldout_init_draft"]["metrics"] == warmup_record

    # a trained M = 2 draft goes on with phase 2 (here at learning rate 0: the weights it starts from are m2's)
    more = tmp_path / "m2-more"
    more_args = common | {"warmup_epochs": 0, "finetune_learning_rate": 0.0}
    train_draft(DraftTrainingArguments(output_dir=str(more), init_draft=str(m2), **more_args), progress=False)
    expected = prism_hf.PrismDraftModel.from_pretrained(m2).state_dict()
    actual = prism_hf.PrismDraftModel.from_pretrained(more).state_dict()
    assert list(expected) == list(actual) and any(name.startswith("layers.1.") for name in actual)
    for name, value in expected.items():
        assert torch.equal(value, actual[name]), name

    # --recount-vocabulary: the draft vocabulary of a fresh run over the new data, the same weights otherwise
    other = tmp_path / "digits.jsonl"
    replies = [
        [{"role": "user", "content": f"count {i}"}, {"role": "assistant", "content": "0123 " * 20}] for i in range(6)
    ]
    other.write_text("".join(json.dumps({"messages": messages}) + "\n" for messages in replies))
    recounted = tmp_path / "m2-recounted"
    train_draft(
        DraftTrainingArguments(
            output_dir=str(recounted), init_draft=str(m2), recount_vocabulary=True, more_data=[str(other)], **more_args
        ),
        progress=False,
    )
    fresh = tmp_path / "fresh"
    fresh_args = common | {"warmup_epochs": 1, "finetune_epochs": 0}
    train_draft(DraftTrainingArguments(output_dir=str(fresh), more_data=[str(other)], **fresh_args), progress=False)
    actual = prism_hf.PrismDraftModel.from_pretrained(recounted).state_dict()
    fresh_vocab = prism_hf.PrismDraftModel.from_pretrained(fresh).draft_to_target
    assert torch.equal(actual["draft_to_target"], fresh_vocab)
    assert not torch.equal(actual["draft_to_target"], expected["draft_to_target"])
    for name, value in expected.items():
        assert name == "draft_to_target" or torch.equal(value, actual[name]), name
    assert "--recount-vocabulary" in json.loads((recounted / "training_record.json").read_text())["command"]
    with pytest.raises(ValueError, match="recount_vocabulary re-chooses the reduced vocabulary of an --init-draft"):
        train_draft(DraftTrainingArguments(output_dir=str(tmp_path / "x"), recount_vocabulary=True, **common))

    # --extend-vocabulary: m2's vocabulary kept, the new data's tokens added up to the larger size, weights as m2's
    extended = tmp_path / "m2-extended"
    extend_args = more_args | {"draft_vocab_size": 32}
    train_draft(
        DraftTrainingArguments(
            output_dir=str(extended), init_draft=str(m2), extend_vocabulary=True, more_data=[str(other)], **extend_args
        ),
        progress=False,
    )
    draft = prism_hf.PrismDraftModel.from_pretrained(extended)
    vocab = set(draft.draft_to_target.tolist())
    assert draft.config.draft_vocab_size == 32 and len(vocab) == 32
    assert set(expected["draft_to_target"].tolist()) < vocab
    digits = set(fresh_vocab.tolist()) - set(expected["draft_to_target"].tolist())
    assert digits and digits <= vocab  # the new data's tokens the chat vocabulary lacked
    for name, value in draft.state_dict().items():
        assert name == "draft_to_target" or torch.equal(value, expected[name]), name
    assert "--extend-vocabulary" in json.loads((extended / "training_record.json").read_text())["command"]
    for bad, message in [
        ({"draft_vocab_size": 24}, "a draft_vocab_size above the init draft's \\(got 24, init draft 24\\)"),
        ({"recount_vocabulary": True}, "recount_vocabulary and extend_vocabulary both re-choose the vocabulary"),
    ]:
        with pytest.raises(ValueError, match=message):
            train_draft(
                DraftTrainingArguments(
                    output_dir=str(tmp_path / "x"), init_draft=str(m2), extend_vocabulary=True, **(more_args | bad)
                ),
                progress=False,
            )

    # --feature-layers adding a layer: the fusion starts as m2's single layer (identity, zeros on the new one), so the
    # widened draft scores exactly as m2 before training and keeps m2's weights at learning rate 0
    widened = tmp_path / "m2-widened"
    train_draft(
        DraftTrainingArguments(output_dir=str(widened), init_draft=str(m2), feature_layers=[1, -1], **more_args),
        progress=False,
    )
    draft = prism_hf.PrismDraftModel.from_pretrained(widened)
    hidden = draft.config.hidden_size
    assert draft.config.feature_layers == [1, -1]
    fusion = draft.feature_fusion.weight
    assert torch.equal(fusion, torch.cat([torch.zeros(hidden, hidden), torch.eye(hidden)], dim=1))
    assert list(draft.feature_norms) == ["0"] and torch.equal(draft.feature_norms["0"].weight, torch.ones(hidden))
    for name, value in expected.items():
        assert torch.equal(value, draft.state_dict()[name]), name
    m2_final = json.loads((m2 / "training_record.json").read_text())["heldout_by_phase"]["finetune"]["metrics"]
    assert json.loads((widened / "training_record.json").read_text())["heldout_init_draft"]["metrics"] == m2_final
    with pytest.raises(ValueError, match=r"feature_layers: \[-1\] vs \[1\]\); a run may add feature layers"):
        train_draft(
            DraftTrainingArguments(output_dir=str(tmp_path / "x"), init_draft=str(m2), feature_layers=[1], **more_args)
        )

    # --previous-token-input from a draft without it: the new fc block starts at zero, so the widened draft scores
    # exactly as m2 and keeps its weights at learning rate 0; the way back (dropping the input) is refused
    with_previous = tmp_path / "m2-previous-token"
    train_draft(
        DraftTrainingArguments(
            output_dir=str(with_previous), init_draft=str(m2), previous_token_input=True, **more_args
        ),
        progress=False,
    )
    draft = prism_hf.PrismDraftModel.from_pretrained(with_previous)
    assert draft.config.previous_token_input
    for name, value in expected.items():
        if name.startswith("fc."):
            zeros = torch.zeros(hidden, hidden)
            assert torch.equal(draft.state_dict()[name], torch.cat([value[:, :hidden], zeros, value[:, hidden:]], 1))
        else:
            assert torch.equal(value, draft.state_dict()[name]), name
    record = json.loads((with_previous / "training_record.json").read_text())
    assert record["heldout_init_draft"]["metrics"] == m2_final
    with pytest.raises(
        ValueError, match=r"\(previous_token_input: True vs False\); a run may add feature layers, the"
    ):
        train_draft(DraftTrainingArguments(output_dir=str(tmp_path / "x"), init_draft=str(with_previous), **more_args))

    # --intermediate-size wider than m2's: m2's units kept, the new units' output columns zero, so the widened draft
    # scores exactly as m2 and keeps its weights at learning rate 0; a narrower MLP is refused, and a run from the
    # widened draft keeps its width by default
    width = draft.config.intermediate_size
    wider = tmp_path / "m2-wider-mlp"
    train_draft(
        DraftTrainingArguments(output_dir=str(wider), init_draft=str(m2), intermediate_size=2 * width, **more_args),
        progress=False,
    )
    draft = prism_hf.PrismDraftModel.from_pretrained(wider)
    assert draft.config.intermediate_size == 2 * width
    for name, value in expected.items():
        actual = draft.state_dict()[name]
        if name.endswith("mlp.down_proj.weight"):
            assert torch.equal(actual, torch.cat([value, torch.zeros(hidden, width)], dim=1)), name
        elif ".mlp." in name:
            assert torch.equal(actual[:width], value) and actual[width:].abs().min() > 0, name
        else:
            assert torch.equal(value, actual), name
    record = json.loads((wider / "training_record.json").read_text())
    assert record["heldout_init_draft"]["metrics"] == m2_final
    assert record["heldout_by_phase"]["finetune"]["metrics"] == m2_final
    with pytest.raises(ValueError, match=rf"\(intermediate_size: {2 * width} vs {width}\); a run may add feature"):
        train_draft(
            DraftTrainingArguments(
                output_dir=str(tmp_path / "x"), init_draft=str(wider), intermediate_size=width, **more_args
            )
        )
    again = tmp_path / "m2-wider-mlp-again"
    train_draft(DraftTrainingArguments(output_dir=str(again), init_draft=str(wider), **more_args), progress=False)
    assert prism_hf.PrismConfig.from_pretrained(again).intermediate_size == 2 * width
    assert json.loads((again / "training_args.json").read_text())["intermediate_size"] == 2 * width

    # --copy-max-ngram from a draft without a copy head and no epochs: only the gate is fitted, on the training
    # features, every other weight stays m2's and the init score is m2's own; the way back is refused
    with_copy = tmp_path / "m2-copy"
    train_draft(
        DraftTrainingArguments(
            output_dir=str(with_copy), init_draft=str(m2), copy_max_ngram=3, **(more_args | {"finetune_epochs": 0})
        ),
        progress=False,
    )
    draft = prism_hf.PrismDraftModel.from_pretrained(with_copy)
    assert draft.config.copy_max_ngram == 3
    for name, value in expected.items():
        assert torch.equal(value, draft.state_dict()[name]), name
    assert float(draft.copy_gate.bias) != -2.0  # moved from its initial value
    record = json.loads((with_copy / "training_record.json").read_text())
    assert record["heldout_init_draft"]["metrics"] == m2_final
    fit = record["copy_gate_fit"]
    assert 0 < fit["rows_with_proposal"] <= fit["rows"]
    assert fit["cross_entropy_after"] < fit["cross_entropy_before"]
    assert "--copy-max-ngram 3" in record["command"] and set(record["heldout_by_phase"]) == set()
    # a run from a draft continues its copy head and its drafting settings (tuned for it: training must not reset
    # them to the defaults), unless given; another copy head size is refused before any target forward
    tuned = prism_hf.PrismDraftModel.from_pretrained(with_copy)
    tuned.config.update(
        dict(
            num_draft_tokens=9,
            draft_confidence_rule="path",
            draft_confidence_threshold=0.3,
            copy_streak_tokens=5,
            num_draft_tokens_schedule="heuristic",
        )
    )
    tuned.save_pretrained(with_copy)
    drafting = ("num_draft_tokens", "draft_confidence_rule", "draft_confidence_threshold", "copy_streak_tokens")
    drafting += ("num_draft_tokens_schedule", "copy_max_ngram")
    for given, expected_length in ({}, 9), ({"num_draft_tokens": 4}, 4):
        continued = tmp_path / f"m2-copy-continued-{expected_length}"
        train_draft(
            DraftTrainingArguments(output_dir=str(continued), init_draft=str(with_copy), **more_args, **given),
            progress=False,
        )
        config = prism_hf.PrismDraftModel.from_pretrained(continued).config
        assert [getattr(config, name) for name in drafting] == [expected_length, "path", 0.3, 5, "heuristic", 3]
        command = json.loads((continued / "training_record.json").read_text())["command"]
        assert "--copy-max-ngram 3 " in command and f"--num-draft-tokens {expected_length} " in command  # as used
    with pytest.raises(ValueError, match="has a copy head matching up to 3 tokens, not --copy-max-ngram 2: a run"):
        train_draft(
            DraftTrainingArguments(
                output_dir=str(tmp_path / "x"), init_draft=str(with_copy), copy_max_ngram=2, **more_args
            ),
            target=object(),  # refused before the target is used
            tokenizer=object(),
        )

    with pytest.raises(ValueError, match="has 2 modules and phase 1 trains one: go on with phase 2 only"):
        train_draft(DraftTrainingArguments(output_dir=str(tmp_path / "x"), init_draft=str(m2), **common))
    with pytest.raises(ValueError, match="has 2 modules but --num-modules is 1: phase 2 keeps the draft's modules"):
        train_draft(
            DraftTrainingArguments(output_dir=str(tmp_path / "x"), init_draft=str(m2), num_modules=1, **more_args)
        )
    with pytest.raises(ValueError, match=r"does not fit this run \(draft_vocab_size: 24 vs 20\)"):
        train_draft(
            DraftTrainingArguments(
                output_dir=str(tmp_path / "y"), init_draft=str(m2 / "warmup"), **(common | {"draft_vocab_size": 20})
            )
        )
    with pytest.raises(ValueError, match="both 0: there is nothing to train \\(without epochs, a run can only fit"):
        train_draft(
            DraftTrainingArguments(
                output_dir=str(tmp_path / "z"), **(common | {"warmup_epochs": 0, "finetune_epochs": 0})
            )
        )


def test_resumed_run_reads_the_init_drafts_score_instead_of_scoring_it_again(tiny_chat_model, tmp_path, monkeypatch):
    """
    The held-out score of the --init-draft is saved beside the checkpoints when a run starts; a resumed run reads it
    back (one held-out evaluation less: minutes for a real target) and the record carries it.
    """
    from prism_hf.training import pipeline
    from prism_hf.training.pipeline import DraftTrainingArguments, train_draft

    common = _tiny_training(tiny_chat_model)
    init = tmp_path / "init"
    train_draft(DraftTrainingArguments(output_dir=str(init), warmup_epochs=2, finetune_epochs=1, **common), False)
    more = tmp_path / "more"
    args = DraftTrainingArguments(
        output_dir=str(more), init_draft=str(init), warmup_epochs=0, finetune_epochs=1, **common
    )

    class Interrupted(Exception):
        pass

    def interrupted_phase(*args, **kwargs):
        raise Interrupted

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "train_phase", interrupted_phase)
        with pytest.raises(Interrupted):
            train_draft(args, progress=False)
    saved = json.loads((more / "checkpoints" / "init-draft-heldout.json").read_text())
    # the init draft's final weights, scored on the same held-out conversations as when it was trained
    init_final = json.loads((init / "training_record.json").read_text())["heldout_by_phase"]["finetune"]["metrics"]
    assert saved == {"metrics": init_final}

    evaluations = []

    def counted_evaluate_draft(*args, **kwargs):
        evaluations.append(1)
        return evaluate_draft(*args, **kwargs)

    evaluate_draft = pipeline.evaluate_draft
    monkeypatch.setattr(pipeline, "evaluate_draft", counted_evaluate_draft)
    train_draft(args, progress=False, resume=True)
    assert len(evaluations) == 1  # the end of phase 2 only
    assert json.loads((more / "training_record.json").read_text())["heldout_init_draft"] == saved
    assert not (more / "checkpoints").exists()


def test_train_with_reply_loss_tokens(tiny_chat_model, tmp_path):
    """
    A cap longer than every reply trains exactly the draft the run without one trains; a short cap trains another,
    and the run's recorded command carries it.
    """
    from prism_hf.training.pipeline import DraftTrainingArguments, train_draft

    common = _tiny_training(tiny_chat_model, warmup_epochs=2, finetune_epochs=1)
    weights = {}
    for name, cap in (("whole", None), ("long-cap", 128), ("short-cap", 3)):
        args = DraftTrainingArguments(output_dir=str(tmp_path / name), reply_loss_tokens=cap, **common)
        train_draft(args, progress=False)
        weights[name] = prism_hf.PrismDraftModel.from_pretrained(tmp_path / name).state_dict()
    for key, value in weights["whole"].items():
        assert torch.equal(value, weights["long-cap"][key]), key
    assert not all(torch.equal(value, weights["short-cap"][key]) for key, value in weights["whole"].items())
    record = json.loads((tmp_path / "short-cap" / "training_record.json").read_text())
    assert "--reply-loss-tokens 3" in record["command"]
    # refused before any target forward, not after hours of features
    with pytest.raises(ValueError, match="reply_loss_tokens must be at least 1, got 0"):
        train_draft(DraftTrainingArguments(output_dir=str(tmp_path / "zero"), reply_loss_tokens=0, **common))
    assert not (tmp_path / "zero").exists()


def test_default_draft_vocabulary_is_clipped_to_the_targets(tiny_chat_model, tmp_path):
    """The default 32768-token draft vocabulary keeps a smaller target's whole vocabulary (no reduced head)."""
    from prism_hf.training.pipeline import DraftTrainingArguments, train_draft

    target_dir, data, _ = tiny_chat_model
    args = DraftTrainingArguments(
        target=str(target_dir),
        data=str(data),
        output_dir=str(tmp_path / "draft"),
        num_examples=4,
        max_length=64,
        warmup_epochs=1,
        finetune_epochs=0,
        target_dtype="float32",
        eval_every=0,
    )
    assert args.draft_vocab_size == 32768
    train_draft(args, progress=False)
    draft = prism_hf.PrismDraftModel.from_pretrained(tmp_path / "draft")
    assert draft.config.draft_vocab_size is None and draft.draft_to_target is None
    assert draft.config.verifier_vocab_size < 32768


@pytest.mark.parametrize("command", ["train", "data", "bench", "push"])
def test_cli_help_renders(command, capsys):
    """Every subcommand's --help renders (argparse formats help texts with %: a stray one breaks it)."""
    from prism_hf.cli import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0 and "usage: prism-hf " + command in capsys.readouterr().out


def test_cli_train_takes_several_replies_datasets():
    from prism_hf.cli import build_parser

    namespace = build_parser().parse_args(["train", "--target", "t", "--output-dir", "o", "--more-data", "a", "b"])
    assert namespace.more_data == ["a", "b"] and namespace.data == "sharegpt"


def test_training_conversations_skip_benchmark_prompts(tmp_path):
    from prism_hf.prompt_data import BenchmarkFilter, load_human_eval
    from prism_hf.training.pipeline import load_conversations

    benchmark_prompt = "Write a persuasive essay about the benefits of cycling to work every single day of the week."
    human_eval_prompt = load_human_eval(limit=1)[0].text
    reply = {"role": "assistant", "content": "."}
    rows = [
        {"messages": [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi!"}]},
        {"messages": [{"role": "user", "content": f"Please: {benchmark_prompt}"}, reply]},
        {"conversations": [{"from": "human", "value": "What is 2 + 2?"}, {"from": "gpt", "value": "4"}]},
        {"messages": [{"role": "user", "content": human_eval_prompt}, {"role": "assistant", "content": "pass"}]},
    ]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))

    kept = list(load_conversations(str(data), benchmark=BenchmarkFilter([benchmark_prompt])))
    assert [chat[0]["content"] for chat in kept] == ["Hello there", "What is 2 + 2?", human_eval_prompt]
    # by default every prompt `prism-hf bench` can run is left out, HumanEval's among them
    assert human_eval_prompt not in [chat[0]["content"] for chat in load_conversations(str(data))]
    with pytest.raises(
        FileNotFoundError, match="neither 'sharegpt', 'sharegpt-tasks', 'sharegpt-copy', 'python-functions'"
    ):
        load_conversations(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="'math-word-problems' holds prompts only, no replies to train on"):
        load_conversations("math-word-problems")


def test_more_data_adds_conversation_sources_each_split_on_its_own(tiny_chat_model, tmp_path):
    """`--data A.jsonl --more-data B.jsonl`: both trained on; adding B leaves the held-out part of A as it was."""
    from prism_hf.training.pipeline import DraftTrainingArguments, train_draft

    target_dir, data, _ = tiny_chat_model
    other = tmp_path / "more.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    other.write_text(
        "".join(
            json.dumps({"messages": r["messages"][:1] + [{"role": "assistant", "content": "ok " * (i + 8)}]}) + "\n"
            for i, r in enumerate(rows)
        )
    )
    common = dict(
        target=str(target_dir),
        num_examples=6,
        max_length=128,
        warmup_epochs=1,
        finetune_epochs=0,
        batch_size=2,
        target_dtype="float32",
        draft_vocab_size=24,
        eval_every=0,
        feature_cache_dir=str(tmp_path / "features"),
    )
    train_draft(DraftTrainingArguments(output_dir=str(tmp_path / "one"), data=str(data), **common), progress=False)
    train_draft(
        DraftTrainingArguments(output_dir=str(tmp_path / "two"), data=str(data), more_data=[str(other)], **common),
        progress=False,
    )
    one = json.loads((tmp_path / "one" / "training_record.json").read_text())
    two = json.loads((tmp_path / "two" / "training_record.json").read_text())
    assert (one["num_examples"], one["heldout_examples"]) == (5, 1)
    assert (two["num_examples"], two["heldout_examples"]) == (10, 2)
    assert f"--more-data {other}" in two["command"]
    by_source = two["heldout_by_source"]
    assert list(by_source) == [str(data), str(other)] and "heldout_by_source" not in one
    assert [m["num_tokens"] for m in by_source.values()] != [0, 0]
    pooled_tokens = sum(m["num_tokens"] for m in by_source.values())
    assert pooled_tokens == two["heldout_num_tokens"]
    # counted in the pass that scored the pooled numbers: every logged evaluation carries them
    logged = [json.loads(line) for line in (tmp_path / "two" / "training_log.jsonl").read_text().splitlines()]
    evaluations = [entry for entry in logged if "heldout_predicted_tau" in entry]
    assert evaluations and all(list(entry["heldout_by_source"]) == list(by_source) for entry in evaluations)
    assert evaluations[-1]["heldout_by_source"] == by_source
    # --data's shards keep their names (and cached features); the added source's get a prefix of their own
    # (one file per shard name: the second run found --data's shards, held-out included, unchanged in the cache)
    cached = sorted(path.name.split(".")[0].rsplit("-", 1)[0] for path in (tmp_path / "features").iterdir())
    assert cached == ["data1-heldout-00000", "data1-train-00000", "heldout-00000", "train-00000"], cached
