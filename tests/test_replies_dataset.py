"""`prism-hf data`: the target's own replies, written in shards that resume, grow and load with `datasets`."""

from __future__ import annotations

import gzip
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from tiny_chat import save_tiny_chat_target
from transformers import AutoTokenizer, LlamaForCausalLM

from prism_hf.benchmarking.report import describe_machine
from prism_hf.cli import main as cli_main
from prism_hf.model_card import write_dataset_card
from prism_hf.prompt_data import BenchmarkFilter, load_spec_bench
from prism_hf.training import replies as replies_module
from prism_hf.training.replies import (
    ReplyDatasetArguments,
    _render_ids,
    check_reply_tokenizer,
    generate_replies,
    load_reply_examples,
    read_reply_shard,
    write_reply_dataset,
)


@pytest.fixture
def target(tiny_chat_target):
    return LlamaForCausalLM.from_pretrained(tiny_chat_target).eval(), AutoTokenizer.from_pretrained(tiny_chat_target)


def _args(tiny_chat_target, chat_data, out, **overrides) -> ReplyDatasetArguments:
    options = dict(
        target=str(tiny_chat_target),
        output_dir=str(out),
        source=str(chat_data),
        num_prompts=8,
        shard_size=3,
        max_new_tokens=12,
        sampled_fraction=0.5,
        heldout_fraction=0.3,
        batch_size=2,
        dtype="float32",
    )
    return ReplyDatasetArguments(**(options | overrides))


def test_greedy_replies_are_the_targets_own(target, one_thread):
    model, tokenizer = target
    prompts = [
        _render_ids(tokenizer, [{"role": "user", "content": text}]) for text in ("hello", "tell me about owls, please")
    ]
    stop = {tokenizer.eos_token_id}
    answers = generate_replies(model, prompts, 16, stop, tokenizer.pad_token_id)
    for prompt, (reply, finished) in zip(prompts, answers, strict=True):
        plain = model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=16, eos_token_id=tokenizer.eos_token_id
        )
        expected = plain[0, len(prompt) :].tolist()
        assert reply == expected
        assert finished == (expected[-1] in stop)


def test_continuous_batches_give_the_same_greedy_replies(target, monkeypatch, one_thread):
    """Rows leave as their replies end and waiting prompts join (batch_size 2 of 5): replies stay the target's own."""
    model, tokenizer = target
    texts = ["hi", "owls?", "tell me about bread and tea", "chess", "why do bees buzz so much"]
    prompts = [_render_ids(tokenizer, [{"role": "user", "content": text}]) for text in texts]
    # the random target rarely ends a reply: a token of its own first reply serves as the stop token
    first = model.generate(torch.tensor([prompts[0]]), do_sample=False, max_new_tokens=20, eos_token_id=None)
    stop_token = int(first[0, len(prompts[0]) + 4])
    order, joins = [], []
    join = replies_module._join
    monkeypatch.setattr(replies_module, "_join", lambda *args: joins.append(1) or join(*args))
    answers = generate_replies(model, prompts, 20, {stop_token}, 0, batch_size=2, on_reply=order.append)
    assert sorted(order) == list(range(5))
    for prompt, (reply, finished) in zip(prompts, answers, strict=True):
        plain = model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=20, eos_token_id=stop_token, pad_token_id=0
        )
        expected = plain[0, len(prompt) :].tolist()
        expected = expected[: expected.index(stop_token) + 1] if stop_token in expected else expected
        assert reply == expected
        assert finished == (reply[-1] == stop_token)
    # replies of different lengths ended at different steps, and waiting prompts joined rows still decoding
    assert len({len(reply) for reply, _ in answers}) > 1 and joins


def test_sampled_replies_follow_the_seed(target, one_thread):
    model, tokenizer = target
    prompt = [_render_ids(tokenizer, [{"role": "user", "content": "hi"}])]
    draw = [
        generate_replies(model, prompt * 2, 10, {tokenizer.eos_token_id}, 0, 1.0, torch.Generator().manual_seed(s))
        for s in (1, 1, 2)
    ]
    assert draw[0] == draw[1] and draw[0] != draw[2]


def test_interrupted_run_resumes_to_the_same_shards(tiny_chat_target, chat_data, tmp_path, monkeypatch, one_thread):
    whole = write_reply_dataset(_args(tiny_chat_target, chat_data, tmp_path / "whole"), progress=False)
    assert [p.name for p in whole] == ["shard-00000.jsonl.gz", "shard-00001.jsonl.gz", "shard-00002.jsonl.gz"]

    original, calls = replies_module.generate_replies, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # inside the second shard
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(replies_module, "generate_replies", interrupted)
    args = _args(tiny_chat_target, chat_data, tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        write_reply_dataset(args, progress=False)
    assert [p.name for p in (tmp_path / "resumed" / "data").iterdir()] == ["shard-00000.jsonl.gz"]
    monkeypatch.setattr(replies_module, "generate_replies", original)
    resumed = write_reply_dataset(args, progress=False)
    assert [p.read_bytes() for p in resumed] == [p.read_bytes() for p in whole]


def test_larger_budget_adds_only_missing_shards(tiny_chat_target, chat_data, tmp_path, monkeypatch, one_thread):
    out = tmp_path / "grow"
    small = write_reply_dataset(_args(tiny_chat_target, chat_data, out, num_prompts=6), progress=False)
    before = [p.read_bytes() for p in small]
    written = []
    original = replies_module._write_shard
    monkeypatch.setattr(
        replies_module, "_write_shard", lambda path, rows: (written.append(path.name), original(path, rows))
    )
    grown = write_reply_dataset(_args(tiny_chat_target, chat_data, out, num_prompts=9), progress=False)
    assert written == ["shard-00002.jsonl.gz"]
    assert [p.read_bytes() for p in grown[:2]] == before
    log = [json.loads(line) for line in (out / "shards.jsonl").read_text().splitlines()]
    assert [entry["shard"] for entry in log] == [0, 1, 2] and all(entry["reply_tokens"] > 0 for entry in log)


def test_rows_masks_splits_and_datasets_loading(tiny_chat_target, chat_data, tmp_path, one_thread):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "rows"
    paths = write_reply_dataset(_args(tiny_chat_target, chat_data, out), progress=False)
    rows = [row for path in paths for row in read_reply_shard(path)]
    assert len(rows) == 8 and len({row["id"] for row in rows}) == 8
    assert {row["mode"] for row in rows} == {"greedy", "sampled"}
    assert {row["split"] for row in rows} == {"train", "heldout"}
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_target)
    for row in rows:
        mask = row["loss_mask"]
        assert len(mask) == len(row["input_ids"]) and 0 < sum(mask) <= 12
        start = mask.index(1)
        assert mask == [0] * start + [1] * (len(mask) - start)  # the reply follows the prompt
        assert tokenizer.decode(row["input_ids"][:start]).endswith("<assistant>")
        assert row["finished"] == (row["input_ids"][-1] == tokenizer.eos_token_id)

    loaded = datasets.load_dataset("json", data_files=str(out / "data" / "*.jsonl.gz"), split="train")
    assert loaded.num_rows == 8 and loaded[0]["input_ids"] == rows[0]["input_ids"]

    train, heldout = load_reply_examples(out, max_length=4096)
    assert sum(len(e) for _, e in train) == sum(r["split"] == "train" for r in rows)
    assert sum(len(e) for _, e in heldout) == sum(r["split"] == "heldout" for r in rows)
    assert all(name.startswith("train-") for name, _ in train)


def test_other_settings_are_refused(tiny_chat_target, chat_data, tmp_path, one_thread):
    out = tmp_path / "refuse"
    write_reply_dataset(_args(tiny_chat_target, chat_data, out, num_prompts=3), progress=False)
    with pytest.raises(ValueError, match=r"other settings \(differing: max_new_tokens, temperature\)"):
        write_reply_dataset(
            _args(tiny_chat_target, chat_data, out, num_prompts=3, max_new_tokens=20, temperature=0.5), progress=False
        )


def test_replies_train_only_targets_with_their_tokenizer(tiny_chat_target, chat_data, tmp_path, one_thread):
    from tiny_chat import CHAT_TEMPLATE, tiny_chat_llama

    from prism_hf.training.pipeline import DraftTrainingArguments, train_draft

    out = tmp_path / "replies"
    write_reply_dataset(_args(tiny_chat_target, chat_data, out, num_prompts=3), progress=False)
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_target)
    check_reply_tokenizer(out, tokenizer)  # the writer's tokenizer, whichever model of its family trains on them
    sibling = tiny_chat_llama(tokenizer, seed=1)

    other = AutoTokenizer.from_pretrained(tiny_chat_target)
    other.chat_template = CHAT_TEMPLATE.replace("<assistant>", "<bot>")
    args = DraftTrainingArguments(target=str(tiny_chat_target), output_dir=str(tmp_path / "draft"), data=str(out))
    with pytest.raises(ValueError, match="with another tokenizer or chat template"):
        train_draft(args, target=sibling, tokenizer=other, progress=False)
    assert not (tmp_path / "draft").exists()

    # a manifest written before tokenizers were recorded: refused until the data stage records it
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["tokenizer_fingerprint"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="does not record the tokenizer"):
        check_reply_tokenizer(out, tokenizer)
    write_reply_dataset(_args(tiny_chat_target, chat_data, out, num_prompts=3), progress=False)
    check_reply_tokenizer(out, tokenizer)
    with pytest.raises(ValueError, match="with another tokenizer or chat template"):
        check_reply_tokenizer(out, other)


def test_too_few_prompts_is_an_error_before_any_reply(tiny_chat_target, chat_data, tmp_path, one_thread):
    """A source shorter than --num-prompts is refused at once, not after the shards it can fill."""
    out = tmp_path / "few"
    with pytest.raises(ValueError, match=r"has only 10 usable prompts, fewer than num_prompts=12: ask for at most 10"):
        write_reply_dataset(_args(tiny_chat_target, chat_data, out, num_prompts=12), progress=False)
    assert list((out / "data").iterdir()) == [] and not (out / "shards.jsonl").exists()
    paths = write_reply_dataset(_args(tiny_chat_target, chat_data, out, num_prompts=10), progress=False)
    assert sum(len(read_reply_shard(path)) for path in paths) == 10


def test_skip_prompts_continues_a_source_in_another_folder(tiny_chat_target, chat_data, tmp_path, one_thread):
    """A second folder with skip_prompts answers the source's next prompts: no prompt twice, none left out."""
    first = write_reply_dataset(_args(tiny_chat_target, chat_data, tmp_path / "a", num_prompts=4), progress=False)
    second = write_reply_dataset(
        _args(tiny_chat_target, chat_data, tmp_path / "b", num_prompts=4, skip_prompts=4), progress=False
    )
    whole = write_reply_dataset(_args(tiny_chat_target, chat_data, tmp_path / "all", num_prompts=8), progress=False)
    ids = [[row["id"] for path in paths for row in read_reply_shard(path)] for paths in (first, second, whole)]
    assert ids[0] + ids[1] == ids[2] and len(set(ids[2])) == 8
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["skip_prompts"] == 4
    assert "skip_prompts" not in json.loads((tmp_path / "a" / "manifest.json").read_text())
    card = write_dataset_card(tmp_path / "b", base_model="org/tiny").read_text()
    assert "--num-prompts 4 --source " in card and "--skip-prompts 4 --max-prompt-length" in card
    with pytest.raises(ValueError, match=r"has only 2 usable prompts after the 8 skipped, fewer than num_prompts=4"):
        write_reply_dataset(
            _args(tiny_chat_target, chat_data, tmp_path / "c", num_prompts=4, skip_prompts=8), progress=False
        )
    with pytest.raises(ValueError, match="skip_prompts must be 0 or more, got -1"):
        write_reply_dataset(_args(tiny_chat_target, chat_data, tmp_path / "d", skip_prompts=-1), progress=False)


def test_benchmark_prompts_never_become_training_prompts(tiny_chat_target, tmp_path, one_thread):
    question = load_spec_bench(limit_per_category=1)[0].text
    benchmark = BenchmarkFilter.default()
    assert benchmark.overlaps([question])
    assert benchmark.overlaps(["Please help: " + question.upper() + " Thanks!"])  # a run of its words, any case
    assert not benchmark.overlaps(["Tell me one fact about owls."])

    source = tmp_path / "mixed.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}]}
        for text in ("Tell me about owls.", question, "Tell me about bees.")
    ]
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "filtered"
    args = _args(tiny_chat_target, source, out, num_prompts=2, shard_size=2)
    (path,) = write_reply_dataset(args, progress=False)
    assert [row["id"] for row in read_reply_shard(path)] == ["mixed#1", "mixed#3"]


def test_cli_data(tiny_chat_target, chat_data, tmp_path, capsys, one_thread):
    out = tmp_path / "cli"
    cli_main(
        ["data", "--target", str(tiny_chat_target), "--output-dir", str(out), "--source", str(chat_data)]
        + ["--num-prompts", "4", "--shard-size", "2", "--max-new-tokens", "8", "--dtype", "float32"]
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"saved": str(out), "shards": 2}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["max_new_tokens"] == 8 and manifest["resolved_dtype"] == "torch.float32"
    with gzip.open(out / "data" / "shard-00001.jsonl.gz", "rt") as handle:
        assert len(handle.read().splitlines()) == 2


def test_push_publishes_a_dataset_repo(tiny_chat_target, chat_data, tmp_path, monkeypatch, capsys, one_thread):
    import huggingface_hub.constants
    from hub_testing import FakeHub

    from prism_hf.hub import push_reply_dataset

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    out = tmp_path / "tiny-replies"
    write_reply_dataset(_args(tiny_chat_target, chat_data, out, num_prompts=4), progress=False)
    dry = push_reply_dataset(out, "org/tiny-replies", dry_run=True, base_model="org/tiny-chat")
    assert [f.path for f in dry.files] == [
        "README.md",
        "manifest.json",
        "shards.jsonl",
        "data/shard-00000.jsonl.gz",
        "data/shard-00001.jsonl.gz",
    ]
    card = (out / "README.md").read_text()
    assert "data_files: data/*.jsonl.gz" in card and "prism-hf data --target" in card
    with FakeHub() as hub:
        cli_main(
            ["push", str(out), "--repo-id", "org/tiny-replies", "--base-model", "org/tiny-chat"]
            + ["--token", "hf_test", "--endpoint", hub.url]
        )
    repo = hub.repos["org/tiny-replies"]
    assert repo.repo_type == "dataset" and hub.unhandled == []
    assert repo.files == {f.path: (out / f.path).read_bytes() for f in dry.files}
    assert "uploaded:" in capsys.readouterr().out

    with pytest.raises(SystemExit, match="--refresh-code apply to drafts"):
        cli_main(["push", str(out), "--repo-id", "org/x", "--refresh-code", "--dry-run"])
    (out / "data" / "shard-00002.jsonl.gz.partial").write_bytes(b"")
    with pytest.raises(ValueError, match="still being written or interrupted"):
        push_reply_dataset(out, "org/tiny-replies", dry_run=True, base_model="org/tiny-chat")


def _draft_training_module():
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "draft_training.py"
    spec = importlib.util.spec_from_file_location("draft_training", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scaling_experiment_trains_m2_and_m1_per_budget(tiny_chat_target, chat_data, tmp_path, one_thread):
    """benchmarks/draft_training.py scaling: entries keyed by training tokens and num_modules, with a chart."""
    module = _draft_training_module()
    data = tmp_path / "replies"
    write_reply_dataset(_args(tiny_chat_target, chat_data, data, num_prompts=10, heldout_fraction=0.2), progress=False)
    out = tmp_path / "scaling"
    argv = ["scaling", "--data", str(data), "--target", str(tiny_chat_target), "--budgets", "60", "400"]
    argv += ["--output-dir", str(out), "--drafts-dir", str(tmp_path / "drafts")]
    argv += ["--override", "draft_vocab_size=null", "warmup_epochs=2", "finetune_epochs=1", "batch_size=2"]
    runs = module.main(argv)
    assert [(r["variant"], r["num_modules"]) for r in runs] == [
        ("60-m2", 2),
        ("60-m1", 1),
        ("400-m2", 2),
        ("400-m1", 1),
    ]
    assert runs[0]["train_tokens"] < runs[2]["train_tokens"] and runs[0]["updates"] == runs[1]["updates"]
    # the M = 1 baseline fine-tunes the M = 2 run's phase 1 instead of training its own
    assert runs[1]["warmup_from"] == "60-m2" and runs[3]["warmup_from"] == "400-m2"
    m1_log = (tmp_path / "drafts" / "60-m1" / "training_log.jsonl").read_text().splitlines()
    assert {json.loads(line)["phase"] for line in m1_log} == {"finetune"}
    assert {p.name for p in out.iterdir()} == {"results.json", "results.md", "results.png"}
    # each run names the processor its timings come from (an experiment may span sessions on different CPUs)
    assert {run["machine"] for run in runs} == {describe_machine()}
    timings = f"Each run's timings (train tok/s, minutes) are its own machine's: {describe_machine()}: 60-m2, 60-m1, "
    assert timings in (out / "results.md").read_text()
    assert module.main(argv) == runs  # finished runs are not trained again

    # results lost, drafts kept: drafts trained with the same arguments are read back, not retrained
    (out / "results.json").unlink()

    def no_training(*args, **kwargs):
        raise AssertionError("retrained")

    module.train_draft = no_training
    again = module.main(argv)
    keys = ("variant", "train_tokens", "updates", "heldout_predicted_tau", "warmup_from")
    assert [{k: r.get(k) for k in keys} for r in again] == [{k: r.get(k) for k in keys} for r in runs]

    # benchmark tau and speedup from a `prism-hf bench` results file naming the drafts by run
    overall = {"tau_mean": 1.5, "speedup": 0.9, "prompts": 3, "identical": 3}
    bench = {
        "metadata": {"max_new_tokens": 96, "prompt_sets": ["spec_bench"]},
        "aggregates": {"plain": {"all": overall}, "400-m2": {"all": overall}},
    }
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    benched = module.main(argv + ["--bench-results", str(tmp_path / "bench.json")])
    assert [r.get("benchmark", {}).get("tau") for r in benched] == [None, None, 1.5, None]
    assert "| benchmark tau | speedup |" in (out / "results.md").read_text()
    (tmp_path / "other.json").write_text(json.dumps(bench | {"aggregates": {"plain": {"all": overall}}}))
    with pytest.raises(ValueError, match="measured none of these runs"):
        module.main(argv + ["--bench-results", str(tmp_path / "other.json")])


def test_interrupted_experiment_run_continues_from_its_checkpoints(tiny_chat_target, chat_data, tmp_path):
    """A run stopped mid-training resumes from its checkpoints when run again with the same arguments only."""
    module = _draft_training_module()
    data = tmp_path / "replies"
    write_reply_dataset(_args(tiny_chat_target, chat_data, data, num_prompts=6, heldout_fraction=0.4), progress=False)
    argv = ["scaling", "--data", str(data), "--target", str(tiny_chat_target), "--budgets", "60"]
    argv += ["--output-dir", str(tmp_path / "out"), "--drafts-dir", str(tmp_path / "drafts"), "--override"]
    resumed = []

    def interrupted(training, resume=False):
        checkpoints = Path(training.output_dir) / "checkpoints"
        resumed.append((resume, checkpoints.is_dir()))
        checkpoints.mkdir(parents=True, exist_ok=True)  # as after some updates
        raise KeyboardInterrupt

    module.train_draft = interrupted
    for overrides in (["batch_size=2"], ["batch_size=2"], ["batch_size=1"], ["batch_size=1"]):
        with pytest.raises(KeyboardInterrupt):
            module.main(argv + overrides)
    # the second call continues the first; other arguments start afresh (the first run's checkpoints removed), and
    # their rerun continues them
    assert resumed == [(False, False), (True, True), (False, False), (True, True)]


def test_scaling_runs_after_the_dataset_grew_are_scored_on_the_earlier_heldout_set(
    tiny_chat_target, chat_data, tmp_path, one_thread
):
    """
    A replies dataset grown by more shards brings new held-out conversations: a budget added to the curve afterwards
    is scored on the held-out conversations of the earlier runs only, so that its point is on their curve.
    """
    module = _draft_training_module()
    data = tmp_path / "replies"
    write_reply_dataset(_args(tiny_chat_target, chat_data, data, num_prompts=6, heldout_fraction=0.4), progress=False)
    argv = ["scaling", "--data", str(data), "--target", str(tiny_chat_target), "--output-dir", str(tmp_path / "out")]
    argv += ["--drafts-dir", str(tmp_path / "drafts"), "--override", "draft_vocab_size=null", "batch_size=2"]
    argv += ["warmup_epochs=1", "finetune_epochs=1"]
    (first,) = [run for run in module.main(argv + ["--budgets", "60"]) if run["num_modules"] == 2]
    write_reply_dataset(_args(tiny_chat_target, chat_data, data, num_prompts=10, heldout_fraction=0.4), progress=False)
    _, heldout = load_reply_examples(data, 2048)
    grown_heldout = sum(int(example.loss_mask.sum()) for _, examples in heldout for example in examples)
    assert grown_heldout > first["heldout_tokens"]  # the growth brought held-out conversations

    runs = module.main(argv + ["--budgets", "60", "200"])
    assert [run["variant"] for run in runs] == ["60-m2", "60-m1", "200-m2", "200-m1"]
    assert {run["heldout_tokens"] for run in runs} == {first["heldout_tokens"]}
    assert "max_heldout_tokens" not in runs[0]["overrides"] and "max_heldout_tokens" in runs[2]["overrides"]
    # a results folder whose runs saw held-out conversations the dataset no longer starts with is refused
    with pytest.raises(ValueError, match="changed in other ways than by growing"):
        module.heldout_token_limit(data, 2048, first["heldout_tokens"] + 1)


def test_epochs_experiment_shares_phase_1_and_differs_in_phase_2_updates(
    tiny_chat_target, chat_data, tmp_path, one_thread
):
    """benchmarks/draft_training.py epochs: one phase 1, then phase 2 of each length from its warmed-up module."""
    module = _draft_training_module()
    data = tmp_path / "replies"
    write_reply_dataset(_args(tiny_chat_target, chat_data, data, num_prompts=10, heldout_fraction=0.2), progress=False)
    out = tmp_path / "epochs"
    argv = ["epochs", "--data", str(data), "--target", str(tiny_chat_target), "--max-train-tokens", "400"]
    argv += ["--finetune-epochs", "3", "1", "--output-dir", str(out), "--drafts-dir", str(tmp_path / "drafts")]
    argv += ["--override", "draft_vocab_size=null", "warmup_epochs=2", "batch_size=2"]
    runs = module.main(argv)
    assert [run["variant"] for run in runs] == ["400-ft1", "400-ft3"]
    short, long = runs
    assert short["train_tokens"] == long["train_tokens"] and long["warmup_from"] == "400-ft1"
    assert long["updates"]["warmup"] == short["updates"]["warmup"]
    assert long["updates"]["finetune"] == 3 * short["updates"]["finetune"]
    long_log = (tmp_path / "drafts" / "400-ft3" / "training_log.jsonl").read_text().splitlines()
    assert {json.loads(line)["phase"] for line in long_log} == {"finetune"}
    assert json.loads((out / "results.json").read_text())["experiment"] == "epochs"
    with pytest.raises(SystemExit):
        module.main(argv[:5])  # no --finetune-epochs


def test_scaling_trend_is_fitted_on_log_tokens_and_projected():
    """The scaling report's trend: tau per doubling of data and the tokens a tau needs, from 100K tokens on."""
    module = _draft_training_module()

    def run(tokens, tau, modules):
        return {"num_modules": modules, "train_tokens": tokens, "heldout_predicted_tau": [1.0, tau]}

    # M = 2: +0.1 per doubling through 1.5 at 1M tokens (the 35K point lies below the fitted range and is off-trend)
    runs = [run(35_000, 1.1, 2)] + [run(2**k * 125_000, 1.2 + 0.1 * k, 2) for k in range(4)]
    runs += [run(250_000, 1.3, 1), run(1_000_000, 1.3, 1)]  # M = 1: flat
    fits = module.fit_scaling({"runs": runs})
    m2, m1 = fits["m2"], fits["m1"]
    assert m2["runs"] == 4 and m2["tau_per_doubling"] == pytest.approx(0.1)
    assert m2["tau_at_1m_tokens"] == pytest.approx(1.5)
    assert m2["tokens_for_tau"] == {"2.0": 32_000_000, "2.5": 1_024_000_000, "3.0": 32_768_000_000}
    assert m1["tau_per_doubling"] == 0 and set(m1["tokens_for_tau"].values()) == {None}
    assert module.fit_scaling({"runs": runs[:2]}) == {}  # one point in the fitted range: no line
    text = module.render({"runs": [], "fit": fits})
    assert "| M = 2 | 4 | +0.100 | 1.50 | 32.0M | 1,024.0M | 32,768.0M |" in text
    assert "| M = 1 | 2 | +0.000 | 1.30 | never | never | never |" in text


DOCUMENT = " ".join(f"word{i}" for i in range(80))


def _fake_sharegpt(tmp_path, monkeypatch, keys, pieces: int = 1):
    """A ShareGPT file of one document-sized exchange per key (`pieces` rows each), installed as the package's."""
    from prism_hf import prompt_data

    rows = []
    for key in keys:
        for piece in range(pieces):
            rows.append(
                {
                    "id": f"{key}_{piece}",
                    "conversations": [
                        {"from": "human", "value": "hi"},
                        {"from": "gpt", "value": "Hello!"},  # too short to be a document: skipped
                        {"from": "human", "value": f"What is item {key}?"},
                        {"from": "gpt", "value": f"{DOCUMENT} {key}"},
                    ],
                }
            )
    rows.append({"id": "short_0", "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]})
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(rows))
    monkeypatch.setattr(prompt_data, "default_sharegpt_path", lambda: path)


@pytest.mark.parametrize(
    ("source", "tasks_name", "question_task", "fallback"),
    [
        ("sharegpt-tasks", "SHAREGPT_TASKS", "passage-qa", "summarize"),
        ("sharegpt-copy", "SHAREGPT_COPY_TASKS", "quote-answer", "repeat"),
    ],
)
def test_sharegpt_tasks_shape_replies_into_benchmark_like_prompts(
    tmp_path, monkeypatch, source, tasks_name, question_task, fallback
):
    """
    `--source sharegpt-tasks` / `sharegpt-copy`: a task-shaped prompt per conversation, keyed (and so split) like its
    conversation; a task that asks the conversation's question gives way when that question is long.
    """
    from prism_hf import prompt_data

    tasks_table = getattr(prompt_data, tasks_name)
    _fake_sharegpt(tmp_path, monkeypatch, [f"conv{i}" for i in range(40)])
    records = list(prompt_data.iter_conversation_records(source))
    plain = list(prompt_data.iter_conversation_records("sharegpt"))
    assert [key for key, _, _ in records] == [key for key, _, _ in plain if key != "short"]
    tasks = {row_id.rsplit("/", 1)[1] for _, row_id, _ in records}
    assert tasks == set(tasks_table)  # 40 conversations draw every task
    for key, row_id, messages in records:
        assert len(messages) == 1 and messages[0]["role"] == "user"
        content = messages[0]["content"]
        assert f"{DOCUMENT} {key}" in content  # the reply is the task's text
        assert (f"What is item {key}?" in content) == row_id.endswith(f"/{question_task}")
    assert records == list(prompt_data.iter_conversation_records(source))  # deterministic

    long_question = [{"role": "user", "content": "why? " * 100}, {"role": "assistant", "content": DOCUMENT}]
    made = [prompt_data.sharegpt_task_prompt(f"k{i}", long_question, tasks_table) for i in range(30)]
    assert question_task not in {task for task, _ in made} and fallback in {task for task, _ in made}
    assert prompt_data.sharegpt_task_prompt("k", [{"role": "user", "content": "q"}], tasks_table) is None
    with pytest.raises(
        FileNotFoundError,
        match="neither 'sharegpt', 'sharegpt-tasks', 'sharegpt-copy', 'python-functions', 'math-word",
    ):
        list(prompt_data.iter_conversation_records("sharegpt-task"))


def _benchmark_heldout_keys(count: int, heldout: bool) -> list[str]:
    from prism_hf.prompt_data import SHAREGPT_HELDOUT_FRACTION, is_heldout

    keys = (f"conv{i}" for i in range(100_000))
    return [key for key in keys if is_heldout(key, SHAREGPT_HELDOUT_FRACTION) == heldout][:count]


def test_copy_prompt_set_is_the_benchmarks_heldout_conversations_once_each(tmp_path, monkeypatch):
    """`prism-hf bench --prompt-sets sharegpt-copy`: one copy task per held-out conversation, none from training."""
    from prism_hf import prompt_data
    from prism_hf.benchmarking import load_prompt_sets

    heldout = _benchmark_heldout_keys(3, heldout=True)
    _fake_sharegpt(tmp_path, monkeypatch, _benchmark_heldout_keys(20, heldout=False) + heldout, pieces=2)
    prompts = load_prompt_sets(["sharegpt-copy"])["sharegpt-copy"]
    assert [p.id for p in prompts] == [f"sharegpt-copy/{key}" for key in heldout]  # one per conversation, not piece
    for key, prompt in zip(heldout, prompts, strict=True):
        assert prompt.category == "copy" and prompt.subcategory in prompt_data.SHAREGPT_COPY_TASKS
        assert f"{DOCUMENT} {key}" in prompt.text
    assert [p.id for p in load_prompt_sets(["sharegpt-copy"], limit=2)["sharegpt-copy"]] == [p.id for p in prompts[:2]]


def test_benchmark_heldout_conversations_stay_out_of_a_replies_datasets_training_split(
    tiny_chat_target, tmp_path, monkeypatch
):
    """Whatever `--heldout-fraction`, a ShareGPT conversation the benchmark holds out is never a training row."""
    from prism_hf.training.replies import iter_prompts

    heldout = _benchmark_heldout_keys(2, heldout=True)
    _fake_sharegpt(tmp_path, monkeypatch, _benchmark_heldout_keys(4, heldout=False) + heldout)
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_target)
    for source in ("sharegpt", "sharegpt-copy"):
        args = _args(tiny_chat_target, source, tmp_path / "unused", source=source, heldout_fraction=0.0)
        splits = {record.id.split("_")[0]: record.split for record in iter_prompts(args, tokenizer)}
        splits.pop("short", None)  # a conversation, though no document
        assert splits == {key: "heldout" if key in heldout else "train" for key in splits} and len(splits) == 6


def test_math_word_problems_are_fixed_whole_number_stories():
    """`math-word-problems`: the same problems everywhere, every template drawn, prompts only, no repeats."""
    from prism_hf import prompt_data

    records = list(prompt_data.iter_conversation_records("math-word-problems"))
    assert len(records) > 10000
    assert len({key for key, _, _ in records}) == len(records)
    prompts = [messages[0]["content"] for _, _, messages in records]
    assert len(set(prompts)) == len(prompts)
    assert all(len(messages) == 1 and messages[0]["role"] == "user" for _, _, messages in records)
    # pinned: a problem is a function of its index alone (string seeds hash the same on every Python)
    assert prompt_data.math_word_problem(6) == [
        {
            "role": "user",
            "content": "Farid goes to the market and buys 5 apples for $8 each and 4 notebooks for $5 each. They pay "
            "with a $100 bill. How much change do they get back? Let's think step by step.",
        }
    ]
    # the first 300 problems draw every template
    drawn = {
        prompt_data.random.Random(f"math-word-problems/{i}").choice(prompt_data.MATH_WORD_PROBLEMS) for i in range(300)
    }
    assert drawn == set(prompt_data.MATH_WORD_PROBLEMS)
    # numbers are drawn so that each story's arithmetic comes out whole
    for prompt in prompts[:2000]:
        numbers = [int(n) for n in re.findall(r"\d+", prompt.replace("1/", ""))]
        if "water tank holds" in prompt:
            size, fill, leak = numbers
            assert size % (fill - leak) == 0
        elif "% of them are boys" in prompt:
            students, percent, _ = numbers
            assert students * percent % 100 == 0
        elif "wants a" in prompt and "saves $" in prompt:
            cost, have, weekly = numbers
            assert cost > have and (cost - have) % weekly == 0
        elif "gives 1/" in prompt:
            start = numbers[0]
            denominator = int(re.search(r"gives 1/(\d)", prompt).group(1))
            assert start % denominator == 0


def test_python_functions_are_code_completion_exchanges(tmp_path):
    """`python-functions`: each documented function of the standard library, its signature and docstring asked for."""
    from prism_hf import prompt_data

    library = tmp_path / "lib"
    (library / "pkg").mkdir(parents=True)
    (library / "test").mkdir()
    (library / "pkg" / "shapes.py").write_text(
        "import math\n\n\n"
        "@staticmethod\n"
        "def area(r):\n"
        '    """Area of a circle."""\n'
        "    pi = math.pi\n"
        "    return pi * r * r\n\n\n"
        "def undocumented(x):\n"
        "    y = x + 1\n"
        "    z = y * 2\n"
        "    return z\n\n\n"
        "def tiny():\n"
        '    """Too short to draft."""\n\n\n'
        "class Box:\n"
        "    def size(self):\n"
        '        """Its size."""\n'
        "        width = self.w\n"
        "        return width * self.h\n"
    )
    (library / "test" / "test_shapes.py").write_text('def test_area():\n    """A test."""\n    x = 1\n    assert x\n')
    (library / "broken.py").write_text("def (:\n")  # not this Python's syntax: skipped
    records = list(prompt_data._iter_python_functions(library))
    assert sorted(key for key, _, _ in records) == ["pkg.shapes:Box.size", "pkg.shapes:area"]
    messages = dict((key, m) for key, _, m in records)
    assert messages["pkg.shapes:area"] == [
        {"role": "user", "content": '@staticmethod\ndef area(r):\n    """Area of a circle."""\n'},
        {
            "role": "assistant",
            "content": '```python\n@staticmethod\ndef area(r):\n    """Area of a circle."""\n    pi = math.pi\n'
            "    return pi * r * r\n```",
        },
    ]
    assert messages["pkg.shapes:Box.size"][0]["content"] == 'def size(self):\n    """Its size."""\n'  # dedented
    # the installed standard library, in an order fixed by key hashes (a prefix mixes modules)
    stdlib = [key for key, _, _ in prompt_data.iter_conversation_records("python-functions")]
    assert "json.__init__:dumps" in stdlib and "json.decoder:JSONDecoder.decode" in stdlib and len(stdlib) > 1000
    assert len({key.split(":")[0] for key in stdlib[:50]}) > 20
    # a prefix is held out at the split's rate, not first (the order is not the split's hash)
    assert 4 <= sum(prompt_data.is_heldout(key, 0.05) for key in stdlib[:400]) <= 40
    assert not any(key.startswith(("test.", "idlelib.", "site-packages.")) for key in stdlib)


@pytest.fixture
def two_reply_datasets(tiny_chat_target, chat_data, tmp_path):
    """Two replies datasets of 6 prompts (other seeds), and the arguments of a quick training run on them."""
    chat, other = tmp_path / "chat", tmp_path / "other"
    write_reply_dataset(_args(tiny_chat_target, chat_data, chat, num_prompts=6), progress=False)
    write_reply_dataset(_args(tiny_chat_target, chat_data, other, num_prompts=6, seed=1), progress=False)
    common = dict(target=str(tiny_chat_target), warmup_epochs=1, finetune_epochs=0, target_dtype="float32")
    common |= dict(eval_every=0, draft_vocab_size=None)
    return chat, other, common


def _split_counts(dataset, max_examples=None) -> tuple[int, int]:
    """Training and held-out rows a training run reads from a replies dataset."""
    train, heldout = load_reply_examples(dataset, 2048, max_examples)
    return sum(len(s) for _, s in train), sum(len(s) for _, s in heldout)


def test_more_data_trains_on_several_replies_datasets(two_reply_datasets, tmp_path, one_thread):
    """`--more-data`: several replies datasets in one run, each with its own held-out part, all checked."""
    from prism_hf.training.pipeline import DraftTrainingArguments, train_draft

    chat, other, common = two_reply_datasets
    both = tmp_path / "both"
    train_draft(DraftTrainingArguments(output_dir=str(both), data=str(chat), more_data=[str(other)], **common))
    record = json.loads((both / "training_record.json").read_text())
    (train_a, heldout_a), (train_b, heldout_b) = _split_counts(chat), _split_counts(other)
    assert record["num_examples"] == train_a + train_b and record["heldout_examples"] == heldout_a + heldout_b
    assert f"--more-data {other}" in record["command"]


def test_more_data_examples_caps_only_the_more_data_sources(two_reply_datasets, tmp_path, one_thread):
    """`--more-data-examples`: all of --data (a new kind of replies) beside the first rows of each other source."""
    from prism_hf.training.pipeline import DraftTrainingArguments, train_draft

    chat, other, common = two_reply_datasets
    out = tmp_path / "capped"
    train_draft(
        DraftTrainingArguments(
            output_dir=str(out), data=str(chat), more_data=[str(other)], more_data_examples=4, **common
        )
    )
    record = json.loads((out / "training_record.json").read_text())
    (train_a, heldout_a), (train_b, heldout_b) = _split_counts(chat), _split_counts(other, 4)
    assert train_b + heldout_b == 4 < sum(_split_counts(other))
    assert record["num_examples"] == train_a + train_b and record["heldout_examples"] == heldout_a + heldout_b
    with pytest.raises(ValueError, match="more_data_examples caps each --more-data source: it needs more_data"):
        train_draft(
            DraftTrainingArguments(output_dir=str(tmp_path / "x"), data=str(chat), more_data_examples=4, **common)
        )
    with pytest.raises(ValueError, match="more_data_examples must be at least 1, got 0"):
        train_draft(
            DraftTrainingArguments(
                output_dir=str(tmp_path / "y"), data=str(chat), more_data=[str(other)], more_data_examples=0, **common
            )
        )


def test_more_data_mixes_replies_datasets_and_conversations(tiny_chat_target, chat_data, tmp_path, one_thread):
    """
    A replies dataset beside a conversation source (the JSONL the replies answer, with its own replies): the
    conversations the replies dataset holds out are not trained on from the JSONL either, whichever comes first.
    """
    from prism_hf import prompt_data
    from prism_hf.training.pipeline import DraftTrainingArguments, train_draft

    chat = tmp_path / "chat"
    write_reply_dataset(_args(tiny_chat_target, chat_data, chat, num_prompts=6), progress=False)  # held out: 0.3
    common = dict(target=str(tiny_chat_target), warmup_epochs=1, finetune_epochs=0, target_dtype="float32")
    common |= dict(eval_every=0, draft_vocab_size=None, heldout_fraction=0.05)
    train, heldout = load_reply_examples(chat, 2048)
    replies_train, replies_heldout = sum(len(s) for _, s in train), sum(len(s) for _, s in heldout)
    keys = [key for key, _, _ in prompt_data.iter_conversation_records(str(chat_data))]
    kept = [key for key in keys if not prompt_data.is_heldout(key, 0.3)]
    assert 0 < len(kept) < len(keys)
    jsonl_heldout = math.ceil(0.05 * len(kept))  # the JSONL's own held-out part, out of what is left
    for name, sources in (("replies-first", [chat, chat_data]), ("jsonl-first", [chat_data, chat])):
        out = tmp_path / name
        train_draft(
            DraftTrainingArguments(output_dir=str(out), data=str(sources[0]), more_data=[str(sources[1])], **common)
        )
        record = json.loads((out / "training_record.json").read_text())
        assert record["data_kind"] == "mixed"
        assert record["num_examples"] == replies_train + len(kept) - jsonl_heldout
        assert record["heldout_examples"] == replies_heldout + jsonl_heldout


def test_prompt_request_replies_are_parsed_into_prompts():
    """Questions and German sentences one per line (numbering gone, repeats and strays dropped); whole articles."""
    from prism_hf import prompt_data

    questions = (
        "1. What is the tallest tree?\n2) What is the tallest tree?\n- Where do owls sleep at night?\nNot one.\n"
    )
    assert prompt_data.prompts_from_request_reply("prompt-requests:questions/zoo/x", questions) == [
        "What is the tallest tree?",
        "Where do owls sleep at night?",
    ]
    german = (
        '"Der Zug kommt heute später in Berlin an."\nThe train is late in Berlin today and it is cold.\n'
        "Mehrere Fragen für die Union: appointment of a new government from Kenya and Mali.\n"  # mixed: dropped
    )
    (prompt,) = prompt_data.prompts_from_request_reply("prompt-requests:german-sentences/railways/y", german)
    assert prompt in {
        t.format(text="Der Zug kommt heute später in Berlin an.")
        for t in prompt_data.WRITTEN_PROMPT_TEMPLATES["german-sentences"]
    }
    article = " ".join(["news"] * 100)
    (prompt,) = prompt_data.prompts_from_request_reply("prompt-requests:news-articles/zoo/z", f"\n{article}\n")
    assert prompt in {t.format(text=article) for t in prompt_data.WRITTEN_PROMPT_TEMPLATES["news-articles"]}
    assert prompt_data.prompts_from_request_reply("prompt-requests:news-articles/zoo/z", "Too short.") == []
    with pytest.raises(ValueError, match="'sharegpt:abc' is not a prompt request"):
        prompt_data.prompts_from_request_reply("sharegpt:abc", questions)

    requests = list(prompt_data.iter_conversation_records("prompt-requests"))
    assert len({key for key, _, _ in requests}) == len(requests) == 3 * 60 * 10
    assert {key.split(":")[1].split("/")[0] for key, _, _ in requests[:12]} == set(prompt_data.PROMPT_REQUESTS)


def test_instruction_requests_are_a_source_of_their_own():
    """
    `instruction-requests`: MT-Bench-like instructions, parsed one per line (headings dropped) and asked as written;
    a source of its own, so the committed `prompt-requests` dataset is still the start of that source's order.
    """
    from prism_hf import prompt_data
    from prism_hf.training.replies import read_reply_shard, reply_shards

    requests = list(prompt_data.iter_conversation_records("instruction-requests"))
    assert len({key for key, _, _ in requests}) == len(requests) == 4 * 60 * 10
    assert {key.split(":")[1].split("/")[0] for key, _, _ in requests[:12]} == set(prompt_data.INSTRUCTION_REQUESTS)
    key, _, messages = requests[0]
    kind, topic, aspect = key.removeprefix("instruction-requests:").split("/")
    assert messages == [
        {"role": "user", "content": prompt_data.INSTRUCTION_REQUESTS[kind].format(topic=topic, aspect=aspect)}
    ]
    assert "instruction-requests" in prompt_data.PROMPT_ONLY_SOURCES
    reply = (
        "Here are 8 requests about the zoo:\n1. Write a short poem about a lion who misses the savanna.\n"
        "2. Pretend you are the zookeeper and welcome a class of children.\nToo short.\n"
    )
    assert prompt_data.prompts_from_request_reply("instruction-requests:writing/a zoo/x", reply) == [
        "Write a short poem about a lion who misses the savanna.",
        "Pretend you are the zookeeper and welcome a class of children.",
    ]
    run_together = "Pretend you are a zookeeper. Greet the children. Act as a lion and tell them about your day."
    assert prompt_data.prompts_from_request_reply("instruction-requests:roleplay/a zoo/x", run_together) == [
        "Pretend you are a zookeeper. Greet the children.",
        "Act as a lion and tell them about your day.",
    ]
    with pytest.raises(ValueError, match="'instruction-requests:questions/a zoo/x' is not a prompt request"):
        prompt_data.prompts_from_request_reply("instruction-requests:questions/a zoo/x", reply)  # another source's

    committed = Path(__file__).resolve().parents[1] / "hub_models" / "Qwen2.5-Coder-1.5B-Instruct-prompt-requests"
    ids = [row["id"] for path in reply_shards(committed) for row in read_reply_shard(path)]
    keys = [key for key, _, _ in prompt_data.iter_conversation_records("prompt-requests")]
    assert len(ids) == 512 and ids == keys[: len(ids)]


def test_passage_question_prompts_put_a_topics_articles_before_its_questions():
    """RAG-shaped prompts: the articles written on a question's topic, joined and cut at a word count, then it."""
    from prism_hf import prompt_data

    def article(word):
        return " ".join([word] * 90)

    questions = "What do lions eat?\nWhere do owls sleep at night?\nHow old is the zoo today?\nWho feeds them?\n"
    written = [
        ("prompt-requests:news-articles/zoo/a", article("lion")),
        ("prompt-requests:questions/zoo/b", questions),
        ("prompt-requests:news-articles/zoo/c", article("owl")),
        ("prompt-requests:questions/railways/d", "When was the first railway built?\n"),  # no article on railways
        ("prompt-requests:german-sentences/zoo/e", "Der Zug kommt heute später in Berlin an.\n"),
        ("prompt-requests:news-articles/zoo/f", "Too short."),  # not an article: left out
    ]
    rows = list(prompt_data.passage_question_prompts(written))
    assert [row_id for _, row_id, _ in rows] == [f"prompt-requests:questions/zoo/b#passage{i}" for i in range(3)]
    assert {key for key, _, _ in rows} == {"prompt-requests:questions/zoo/b"}  # one request, one split
    asked = ["What do lions eat?", "Where do owls sleep at night?", "How old is the zoo today?"]
    for (_, _, messages), question in zip(rows, asked, strict=True):
        passages, last_line = messages[0]["content"].rsplit("\n", 1)
        assert last_line == question
        assert sorted(passages.split("\n")) == [article("lion"), article("owl")]
    ((_, _, messages),) = prompt_data.passage_question_prompts(written, questions_per_request=1, max_passage_words=100)
    passages, last_line = messages[0]["content"].rsplit("\n", 1)
    assert last_line == "What do lions eat?" and len(passages.split()) == 100  # cut mid-passage, as retrieval cuts
    with pytest.raises(ValueError, match=r"questions_per_request \(0\) and max_passage_words \(500\) must be"):
        list(prompt_data.passage_question_prompts(written, questions_per_request=0))


def test_instructions_a_model_wrote_are_a_source(tiny_chat_target, chat_data, tmp_path, one_thread):
    """A replies dataset of `instruction-requests` is the `--source` of a second one (not of passage questions)."""
    from prism_hf import prompt_data

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_target)
    requests = tmp_path / "requests"
    write_reply_dataset(
        _args(tiny_chat_target, chat_data, requests, source="instruction-requests", num_prompts=4, shard_size=4),
        progress=False,
    )
    written = "Write a short poem about a lion who misses the savanna.\nAct as a zookeeper and greet a school class.\n"
    (shard,) = sorted((requests / "data").glob("*.jsonl.gz"))
    rows = read_reply_shard(shard)
    for row in rows:  # the random target writes noise: stand in for what a real one writes
        prompt = [t for t, m in zip(row["input_ids"], row["loss_mask"], strict=True) if not m]
        reply = tokenizer.encode(written) + [tokenizer.eos_token_id]
        row["input_ids"], row["loss_mask"] = prompt + reply, [0] * len(prompt) + [1] * len(reply)
    replies_module._write_shard(shard, rows)

    answers = tmp_path / "answers"
    args = _args(tiny_chat_target, chat_data, answers, source=str(requests), num_prompts=8)
    write_reply_dataset(args, progress=False)
    answered = [row for path in sorted((answers / "data").glob("*.jsonl.gz")) for row in read_reply_shard(path)]
    assert sorted(row["id"] for row in answered) == sorted(f"{row['id']}#{i}" for row in rows for i in range(2))
    for row in answered:
        text = tokenizer.decode([t for t, m in zip(row["input_ids"], row["loss_mask"], strict=True) if not m])
        assert written.splitlines()[int(row["id"].split("#")[1])] in text
    card = write_dataset_card(answers, base_model="tiny/chat").read_text()
    assert "its writing and roleplay requests, reasoning puzzles and questions, as asked" in card
    card = write_dataset_card(requests, base_model="tiny/chat").read_text()
    assert "(`prism_hf.prompt_data.INSTRUCTION_REQUESTS`)" in card
    source = f"{prompt_data.PASSAGE_QUESTIONS_PREFIX}{requests}"
    with pytest.raises(ValueError, match="a replies dataset must answer 'prompt-requests' \\(prism-hf data"):
        write_reply_dataset(_args(tiny_chat_target, chat_data, tmp_path / "x", source=source), progress=False)


@pytest.mark.parametrize("writer", ["the target", "another model"])
def test_prompts_a_model_wrote_are_a_source(writer, tiny_chat_target, chat_data, tmp_path, one_thread):
    """
    A replies dataset of prompt requests is the `--source` of a second: its parsed prompts, in its splits, whether
    the target wrote them or a model with another tokenizer did (its replies are decoded with the writer's).
    """
    from prism_hf import prompt_data

    writer_path = tiny_chat_target
    if writer == "another model":
        writer_path = save_tiny_chat_target(tmp_path / "writer", reversed_vocabulary=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_target)
    writer_tokenizer = AutoTokenizer.from_pretrained(writer_path)
    kinds = [key.split(":")[1].split("/")[0] for key, _, _ in prompt_data.iter_conversation_records("prompt-requests")]
    count = next(n for n in range(1, 50) if len(set(kinds[:n])) == 3)  # the first requests of all three kinds
    requests = tmp_path / "requests"
    write_reply_dataset(
        _args(writer_path, chat_data, requests, source="prompt-requests", num_prompts=count, shard_size=count),
        progress=False,
    )
    # the random target writes noise: stand in for what a real one writes, re-encoded with its tokenizer
    written = {
        "questions": "1. What is the tallest tree?\n2. Where do owls sleep at night?\n",
        "german-sentences": "Der Zug kommt heute später in Berlin an.\n",
        "news-articles": " ".join(["news"] * 90),
    }
    (shard,) = sorted((requests / "data").glob("*.jsonl.gz"))
    rows = read_reply_shard(shard)
    for row in rows:
        prompt = [t for t, m in zip(row["input_ids"], row["loss_mask"], strict=True) if not m]
        kind = row["id"].split(":")[1].split("/")[0]
        reply = writer_tokenizer.encode(written[kind]) + [writer_tokenizer.eos_token_id]
        row["input_ids"], row["loss_mask"] = prompt + reply, [0] * len(prompt) + [1] * len(reply)
    replies_module._write_shard(shard, rows)
    kind_of = {row["id"]: row["id"].split(":")[1].split("/")[0] for row in rows}
    expected = {key: len(prompt_data.prompts_from_request_reply(key, written[kind])) for key, kind in kind_of.items()}

    answers = tmp_path / "answers"
    args = _args(tiny_chat_target, chat_data, answers, source=str(requests), num_prompts=sum(expected.values()))
    write_reply_dataset(args, progress=False)
    answered = [row for path in sorted((answers / "data").glob("*.jsonl.gz")) for row in read_reply_shard(path)]
    split = {row["id"]: row["split"] for row in rows}
    assert sorted(row["id"] for row in answered) == sorted(
        f"{key}#{i}" for key, n in expected.items() for i in range(n)
    )
    for row in answered:
        request = row["id"].split("#")[0]
        assert row["split"] == split[request]  # a held-out request's prompts are held out
        text = tokenizer.decode([t for t, m in zip(row["input_ids"], row["loss_mask"], strict=True) if not m])
        kind = request.split(":")[1].split("/")[0]
        parsed = prompt_data.prompts_from_request_reply(request, written[kind])
        assert parsed[int(row["id"].split("#")[1])] in text

    # the card names who wrote the prompts
    card = write_dataset_card(answers, base_model="tiny/chat").read_text()
    named = "the target itself" if writer == "the target" else f"`{writer_path}`"
    assert f"prompts {named} wrote, parsed from the replies in `{requests}`" in card

    # the same writing as RAG-shaped prompts: the articles on a question's topic, then the question
    questions_request = next(key for key, kind in kind_of.items() if kind == "questions")
    for row in rows:  # the article is about the questions' topic
        if kind_of[row["id"]] == "news-articles":
            row["id"] = "prompt-requests:news-articles/{}/any".format(questions_request.split("/")[1])
    replies_module._write_shard(shard, rows)
    source = f"{prompt_data.PASSAGE_QUESTIONS_PREFIX}{requests}"
    passages = tmp_path / "passages"
    args = _args(tiny_chat_target, chat_data, passages, source=source, num_prompts=2, max_prompt_length=4096)
    write_reply_dataset(args, progress=False)
    answered = [row for path in sorted((passages / "data").glob("*.jsonl.gz")) for row in read_reply_shard(path)]
    assert [row["id"] for row in answered] == [f"{questions_request}#passage{i}" for i in range(2)]
    for row, question in zip(answered, ["What is the tallest tree?", "Where do owls sleep at night?"], strict=True):
        assert row["split"] == split[questions_request]
        text = tokenizer.decode([t for t, m in zip(row["input_ids"], row["loss_mask"], strict=True) if not m])
        assert f"{written['news-articles']}\n{question}" in text
    card = write_dataset_card(passages, base_model="tiny/chat").read_text()
    assert f"retrieval-style prompts made from what `{writer_path}` wrote in `{requests}`" in card

    with pytest.raises(ValueError, match="must answer 'prompt-requests' or 'instruction-requests'"):
        write_reply_dataset(_args(tiny_chat_target, chat_data, tmp_path / "x", source=str(answers)), progress=False)
    if writer == "another model":
        # the writer's tokenizer is read from the model the dataset records: gone, its ids cannot be read
        shutil.rmtree(writer_path)
        with pytest.raises(ValueError, match="whose tokenizer is not the target's: reading its text needs"):
            write_reply_dataset(
                _args(tiny_chat_target, chat_data, tmp_path / "y", source=str(requests)), progress=False
            )
