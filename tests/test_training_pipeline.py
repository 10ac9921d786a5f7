"""`prism-hf train` end to end on a tiny target with a tokenizer and chat template built in code."""

from __future__ import annotations

import json
import shlex
import string

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import prism_hf
from prism_hf.cli import build_parser
from prism_hf.cli import main as cli_main
from prism_hf.training import WARMUP_PHASE, prism_loss
from prism_hf.training.data import (
    build_examples,
    regenerate_responses,
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
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    target = LlamaForCausalLM(config).eval()
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


def test_feature_cache_resumes_and_refuses_other_settings(tiny_chat_model, tmp_path):
    target_dir, data, _ = tiny_chat_model
    from prism_hf.training.pipeline import load_conversations

    target = LlamaForCausalLM.from_pretrained(target_dir).eval()
    examples = build_examples(make_tokenizer(), load_conversations(str(data)), 6, 128)
    first = FeatureStore.build(target, examples, [-1], cache_dir=tmp_path, shard_size=4, progress=False)
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    (tmp_path / "shard-00001.safetensors").unlink()  # as if interrupted after the first shard
    resumed = FeatureStore.build(target, examples, [-1], cache_dir=tmp_path, shard_size=4, progress=False)
    a, b = collate(first.features), collate(resumed.features)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.last_hidden_state, b.last_hidden_state)
    with pytest.raises(ValueError, match="was built for"):
        FeatureStore.build(target, examples, [1, -1], cache_dir=tmp_path, shard_size=4, progress=False)


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
    assert record["num_examples"] == 6 and record["num_tokens"] > 6 * 40
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

    # and acceptance rose over a random draft, with output identical to plain greedy decoding
    taus = {"trained": [], "random": []}
    for question in questions:
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        plain = target.generate(**inputs, do_sample=False, max_new_tokens=40, eos_token_id=None)
        for name, draft in (("trained", trained), ("random", random_draft)):
            out_ids = target.generate(
                **inputs, do_sample=False, max_new_tokens=40, eos_token_id=None, assistant_model=draft
            )
            assert torch.equal(plain, out_ids)
            taus[name].append(draft.last_generation_stats.mean_accepted_tokens)
    mean = {name: sum(v) / len(v) for name, v in taus.items()}
    assert mean["trained"] > mean["random"] + 0.5, mean


def test_regenerated_replies_are_the_targets_own_greedy_answers(tiny_chat_model):
    target_dir, _, questions = tiny_chat_model
    target = LlamaForCausalLM.from_pretrained(target_dir).eval()
    tokenizer = make_tokenizer()
    conversations = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": "dataset answer"}] for q in questions[:4]
    ]
    regenerated = regenerate_responses(
        target, tokenizer, conversations, num_conversations=3, max_new_tokens=12, batch_size=2, progress=False
    )
    assert len(regenerated) == 3
    for conversation in regenerated:
        prompt = tokenizer.apply_chat_template(
            conversation[:1], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        alone = target.generate(**prompt, do_sample=False, max_new_tokens=12)
        expected = tokenizer.decode(alone[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        assert conversation[1] == {"role": "assistant", "content": expected}
