"""`prism-hf push`: validation, model card, and the exact upload, against a local server standing in for the Hub."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
from hub_testing import FakeHub
from safetensors.torch import load_file, save_file

import prism_hf.hub
from prism_hf.cli import main as cli_main
from prism_hf.hub import push_draft
from prism_hf.reference_models import REFERENCE_MODELS

REPO = Path(__file__).resolve().parents[1]
DRAFT_DIRS = sorted(p.parent for p in (REPO / "hub_models").glob("*/config.json"))
# Published drafts live under this namespace (hub_models/README.md).
NAMESPACE = "prism-hf"


@pytest.fixture(autouse=True)
def _local_hub_settings(monkeypatch):
    # hf_xet uploads large files to a separate storage service that the local stand-in does not implement; without
    # it huggingface_hub uses the Hub's LFS batch API, which FakeHub does. The tests run with HF_HUB_OFFLINE=1,
    # which would block requests to the stand-in too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def draft_copy(tmp_path) -> Path:
    """A copy of the committed SmolLM2 draft (tests may break it)."""
    source = REPO / "hub_models" / "SmolLM2-135M-Instruct-PRISM"
    return Path(shutil.copytree(source, tmp_path / source.name))


@pytest.mark.parametrize("draft_dir", DRAFT_DIRS, ids=[p.name for p in DRAFT_DIRS])
def test_dry_run_of_committed_draft_is_complete_and_sends_nothing(draft_dir, tmp_path):
    copy = Path(shutil.copytree(draft_dir, tmp_path / draft_dir.name))
    with FakeHub() as hub:
        plan = push_draft(copy, f"{NAMESPACE}/{draft_dir.name}", dry_run=True, endpoint=hub.url)
    assert hub.requests == []
    # the committed card is exactly what the code writes from the folder's records (regenerate it, never edit it)
    assert (copy / "README.md").read_text() == (draft_dir / "README.md").read_text(), (
        f"hub_models/{draft_dir.name}/README.md is stale: regenerate it with the `prism-hf push ... --dry-run` "
        "command in hub_models/README.md"
    )
    committed = sorted(p.name for p in draft_dir.iterdir() if p.is_file())
    assert [f.path for f in plan.files] == committed
    for name in ("config.json", "model.safetensors", "README.md", "modeling_prism.py", "configuration_prism.py"):
        assert name in committed
    verifier = json.loads((draft_dir / "config.json").read_text())["verifier_name_or_path"]
    assert plan.card_metadata["base_model"] == REFERENCE_MODELS[verifier].hub_id  # e.g. HuggingFaceTB/SmolLM2-...
    assert plan.card_metadata["library_name"] == "transformers"
    assert {"license", "pipeline_tag", "tags", "datasets"} <= set(plan.card_metadata)
    listing = plan.describe()
    for entry in plan.files:
        assert f"{entry.path}" in listing and entry.sha256 in listing


def test_push_uploads_exactly_the_dry_run(draft_copy):
    dry = push_draft(draft_copy, "org/smol-draft", dry_run=True)
    with FakeHub() as hub:
        pushed = push_draft(draft_copy, "org/smol-draft", token="hf_test_token", endpoint=hub.url)
        again = push_draft(draft_copy, "org/smol-draft", token="hf_test_token", endpoint=hub.url)
    assert pushed.files == dry.files
    assert hub.unhandled == []
    assert hub.tokens == {"hf_test_token"}
    repo = hub.repos["org/smol-draft"]
    assert repo.private is False
    assert repo.files == {f.path: (draft_copy / f.path).read_bytes() for f in dry.files}
    assert repo.commits[0]["lfs"] == {"model.safetensors"}
    assert repo.commits[0]["summary"] == dry.commit_message
    assert hub.card_metadata[0] == dry.card_metadata
    assert pushed.commit_url.startswith(f"{hub.url}/org/smol-draft/commit/")
    # a second push re-commits, but the weights already stored are not sent again
    assert len(repo.commits) == 2 and again.files == dry.files
    assert sum(method == "PUT" for method, _ in hub.requests) == 1


def test_push_to_a_private_repo_and_branch(draft_copy):
    with FakeHub() as hub:
        push_draft(draft_copy, "org/smol-draft", token="hf_test_token", endpoint=hub.url, private=True, revision="v1")
        push_draft(draft_copy, "org/smol-draft", token="hf_test_token", endpoint=hub.url, revision="v1")
    repo = hub.repos["org/smol-draft"]
    assert repo.private is True and repo.branches == {"main", "v1"}
    assert [commit["revision"] for commit in repo.commits] == ["v1", "v1"]
    assert hub.unhandled == []


def test_cli_push_takes_token_and_endpoint_from_the_environment(draft_copy):
    with FakeHub() as hub:
        env = {
            **os.environ,
            "HF_TOKEN": "hf_env_token",
            "HF_ENDPOINT": hub.url,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_OFFLINE": "0",
            "PYTHONPATH": str(REPO),
        }
        command = [sys.executable, "-m", "prism_hf.cli", "push", str(draft_copy), "--repo-id", "org/cli-draft"]
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"uploaded: {hub.url}/org/cli-draft/commit/" in result.stdout
    assert hub.tokens == {"hf_env_token"}, hub.request_tokens
    assert set(hub.repos["org/cli-draft"].files) == {p.name for p in draft_copy.iterdir()}


def test_cli_dry_run_prints_every_file(draft_copy, capsys):
    cli_main(["push", str(draft_copy), "--repo-id", "org/name", "--dry-run"])
    out = capsys.readouterr().out
    assert out.startswith("dry run: nothing was sent.")
    for path in draft_copy.iterdir():
        assert f"  {path.name} " in out
    assert "https://huggingface.co/org/name" in out and "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in out


def test_card_records_benchmark_and_uses_repo_id(draft_copy):
    (draft_copy / "benchmark_record.json").unlink()
    results = REPO / "benchmarks" / "results" / "smollm2-135m-instruct" / "results.json"
    with pytest.raises(ValueError, match="Cannot tell which strategy"):
        push_draft(draft_copy, "org/name", dry_run=True, benchmark_results=results)
    push_draft(draft_copy, "org/name", dry_run=True, benchmark_results=results, benchmark_strategy="prism-m2")
    record = json.loads((draft_copy / "benchmark_record.json").read_text())
    aggregates = json.loads(results.read_text())
    aggregates = aggregates.get("aggregates") or aggregates["summary"]
    assert record["overall"]["prism-m2"]["speedup"] == aggregates["prism-m2"]["all"]["speedup"]
    card = (draft_copy / "README.md").read_text()
    assert 'AutoModel.from_pretrained("org/name", trust_remote_code=True)' in card
    assert f"| **prism-m2** (this draft) | {aggregates['prism-m2']['all']['tokens_per_second_median']:.1f} |" in card
    metadata = json.loads(results.read_text())["metadata"]
    if isinstance(metadata.get("prompt_sets"), dict):  # the benchmarking package's nested run facts, flattened
        prompts = sum(metadata["prompt_sets"].values())
        assert f"prompts: {prompts} (Spec-Bench {metadata['prompt_sets']['spec_bench']}" in card
        assert f"{metadata['machine']['torch_threads']} torch threads" in card


def _stale_code(path: Path) -> None:
    with (path / "modeling_prism.py").open("a") as handle:
        handle.write("# an older copy\n")


def _missing_code(path: Path) -> None:
    (path / "generation_prism.py").unlink()


def _pickle_weights(path: Path) -> None:
    (path / "pytorch_model.bin").write_bytes(b"not uploaded")


def _missing_tensor(path: Path) -> None:
    weights = load_file(path / "model.safetensors")
    del weights[sorted(weights)[0]]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


def _wrong_model_type(path: Path) -> None:
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "breakage, message",
    [
        (_stale_code, "modeling_prism.py differs from the installed prism_hf's"),
        (_missing_code, "generation_prism.py is missing"),
        (_pickle_weights, "pickle files are not published.*pytorch_model.bin"),
        (_missing_tensor, "does not match its config"),
        (_wrong_model_type, "model_type 'llama', expected 'prism_draft'"),
    ],
    ids=lambda value: value.__name__.strip("_") if callable(value) else "",
)
def test_broken_draft_is_refused_before_any_request(draft_copy, breakage, message):
    breakage(draft_copy)
    with FakeHub() as hub, pytest.raises(ValueError, match=message):
        push_draft(draft_copy, "org/name", token="hf_test_token", endpoint=hub.url)
    assert hub.requests == []


def test_refresh_code_replaces_stale_copies(draft_copy):
    _stale_code(draft_copy)
    _missing_code(draft_copy)
    push_draft(draft_copy, "org/name", dry_run=True, refresh_code=True)
    for name in ("modeling_prism.py", "generation_prism.py"):
        assert (draft_copy / name).read_bytes() == (REPO / "prism_hf" / name).read_bytes()


def test_keep_card_checks_the_metadata(draft_copy):
    (draft_copy / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a hand-written card\n")
    with pytest.raises(ValueError, match="lacks Hub metadata: base_model, library_name, pipeline_tag, tags"):
        push_draft(draft_copy, "org/name", dry_run=True, refresh_card=False)
    (draft_copy / "README.md").unlink()
    with pytest.raises(ValueError, match="README.md is missing"):
        push_draft(draft_copy, "org/name", dry_run=True, refresh_card=False)


def test_draft_without_training_records_needs_its_own_card(trained_llama_draft, tmp_path):
    trained_llama_draft.save_pretrained(tmp_path / "draft")
    with pytest.raises(ValueError, match="no training_args.json or training_record.json.*--keep-card"):
        push_draft(tmp_path / "draft", "org/name", dry_run=True)
    card = "---\nbase_model: me/tiny\nlibrary_name: transformers\nlicense: mit\npipeline_tag: text-generation\n"
    (tmp_path / "draft" / "README.md").write_text(card + "tags:\n- prism\n---\n# My draft\n")
    plan = push_draft(tmp_path / "draft", "org/name", dry_run=True, refresh_card=False)
    assert plan.card_metadata["base_model"] == "me/tiny"
    assert [f.path for f in plan.files] == sorted(p.name for p in (tmp_path / "draft").iterdir())


def test_unknown_base_model_must_be_named(draft_copy):
    config = json.loads((draft_copy / "config.json").read_text())
    config["verifier_name_or_path"] = "my-local-target"
    (draft_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="pass base_model='org/name'"):
        push_draft(draft_copy, "org/name", dry_run=True)
    plan = push_draft(draft_copy, "org/name", dry_run=True, base_model="me/my-target")
    assert plan.card_metadata["base_model"] == "me/my-target"


@pytest.mark.parametrize("repo_id", ["just-a-name", "org/bad name", "a/b/c"])
def test_repo_id_must_be_org_and_name(draft_copy, repo_id):
    with pytest.raises(ValueError, match="repo id"):
        push_draft(draft_copy, repo_id, dry_run=True)


def test_push_without_token_says_how_to_log_in(draft_copy, monkeypatch):
    monkeypatch.setattr(prism_hf.hub, "get_token", lambda: None)
    with FakeHub() as hub, pytest.raises(ValueError, match="hf auth login"):
        push_draft(draft_copy, "org/name", endpoint=hub.url)
    assert hub.requests == []


def test_card_states_the_time_spent_regenerating_replies(draft_copy):
    from prism_hf.model_card import write_model_card

    record_path = draft_copy / "training_record.json"
    record = json.loads(record_path.read_text())
    record.update(total_seconds=3195.1, feature_seconds=290.0, train_tokens_per_second={})
    record.update(feature_tokens_computed=None, feature_tokens_per_second=None)
    record.pop("machine", None)  # a record from before training records named their machine
    record_path.write_text(json.dumps(record))
    assert "- Time: 3195.1 s on cpu (target features: 290.0 s)." in write_model_card(draft_copy).read_text()
    record_path.write_text(json.dumps({**record, "regenerate_seconds": 1520.4}))
    card = write_model_card(draft_copy).read_text()
    assert "- Time: 3195.1 s on cpu (regenerating replies: 1520.4 s; target features: 290.0 s)." in card
    # the processor that trained it, as the training record names it
    machine = "AMD EPYC (AVX512; avx512_bf16), 2 torch threads"
    record_path.write_text(json.dumps({**record, "machine": machine}))
    card = write_model_card(draft_copy).read_text()
    assert f"- Time: 3195.1 s on cpu, {machine} (target features: 290.0 s)." in card


def test_card_states_the_drafting_defaults_of_the_config(draft_copy):
    from prism_hf.model_card import write_model_card

    config_path = draft_copy / "config.json"
    config = json.loads(config_path.read_text())
    config.update(num_draft_tokens=6, draft_confidence_threshold=0.5, draft_confidence_rule="token")
    config.update(copy_streak_tokens=0)
    config_path.write_text(json.dumps(config))
    card = write_model_card(draft_copy).read_text()
    assert "By default a round drafts up to 6 tokens, ending after a token of draft probability below 0.5." in card
    config.update(num_draft_tokens=10, draft_confidence_threshold=0.25, draft_confidence_rule="path")
    config.update(copy_max_ngram=8, copy_streak_tokens=16, copy_streak_max_tokens=0)
    config_path.write_text(json.dumps(config))
    card = write_model_card(draft_copy).read_text()
    assert (
        "By default a round drafts up to 10 tokens, ending once the product of its tokens' draft probabilities falls "
        "below 0.25; once the copy lookup matches a full 8 tokens it copies the continuation without draft steps, up "
        "to 16 tokens."
    ) in card.replace("\n", " ")
    config.update(copy_streak_max_tokens=64)
    config_path.write_text(json.dumps(config))
    card = write_model_card(draft_copy).read_text()
    assert (
        "without draft steps, up to 16 tokens, a length that doubles after a streak accepted whole (up to 64) and "
        "halves after one cut short."
    ) in card.replace("\n", " ")


def test_card_names_every_dataset_trained_on(draft_copy):
    from prism_hf.model_card import card_metadata, write_model_card

    args_path = draft_copy / "training_args.json"
    args = json.loads(args_path.read_text())
    args_path.write_text(json.dumps({**args, "data": "chat-replies", "more_data": ["task-replies", "code-replies"]}))
    assert "conversations (chat-replies, task-replies, code-replies" in write_model_card(draft_copy).read_text()
    args_path.write_text(json.dumps({**args, "data": "sharegpt", "more_data": None}))
    assert "conversations (sharegpt" in write_model_card(draft_copy).read_text()
    assert card_metadata(draft_copy).datasets == ["anon8231489123/ShareGPT_Vicuna_unfiltered"]
    # replies datasets committed under hub_models/ are published as prism-hf/<folder>; a local file is on no Hub
    args_path.write_text(json.dumps({**args, "data": "hub_models/A-replies", "more_data": ["x/B.jsonl"]}))
    assert card_metadata(draft_copy).datasets == ["prism-hf/A-replies"]


def test_card_of_a_continued_run_names_its_start_and_each_sources_numbers(draft_copy):
    from prism_hf.model_card import write_model_card

    record_path, args_path = draft_copy / "training_record.json", draft_copy / "training_args.json"
    args, record = json.loads(args_path.read_text()), json.loads(record_path.read_text())
    # first as a draft trained from scratch on one source: both phases, no per-source numbers
    args.update(init_draft=None, warmup_epochs=1.5, more_data=[])
    for key in ("heldout_by_source", "heldout_init_draft"):
        record.pop(key, None)
    args_path.write_text(json.dumps(args))
    record_path.write_text(json.dumps(record))
    card = write_model_card(draft_copy).read_text()
    assert "- Recipe: phase 1 warm-up of one module for" in card and "By source" not in card

    def metrics(tau: float, step1: float, tokens: int) -> dict:
        return {"predicted_tau": [1.1, tau], "step_accuracy": [step1, 0.1], "num_tokens": tokens}

    args.update(init_draft="chat-draft", warmup_epochs=0.0, finetune_epochs=1.0, recount_vocabulary=True)
    args.update(finetune_learning_rate=2e-4)
    args_path.write_text(json.dumps(args))
    record["heldout_by_source"] = {
        "python-functions": metrics(1.5884, 0.3704, 9268),
        "sharegpt": metrics(1.28, 0.23, 10),
    }
    record["heldout_by_mode"] = {"greedy": metrics(1.7, 0.45, 6000), "sampled": metrics(1.3, 0.25, 3278)}
    record["heldout_init_draft"] = {
        "metrics": {**metrics(1.2562, 0.21, 9278), "by_source": {"sharegpt": metrics(1.3, 0.2, 10)}}
    }
    record_path.write_text(json.dumps(record))
    card = write_model_card(draft_copy).read_text()
    assert (
        "- Recipe: phase 2 continued from the 2-module draft `chat-draft` (its own phases in its own record): CE "
        f"only, {args['finetune_epochs']} epochs, lr 0.0002, draft vocabulary recounted from this data."
    ) in card
    assert (
        "By source: python-functions tau 1.588 (step 1 0.370, 9268 tokens); sharegpt tau 1.280 (step 1 0.230, "
        "10 tokens). By how the target wrote the reply: greedy tau 1.700 (step 1 0.450, 6000 tokens); sampled tau "
        "1.300 (step 1 0.250, 3278 tokens) (greedy `generate` meets the greedy kind). The draft this run started "
        "from, on the same conversations: tau 1.256 (step 1 0.210, 9278 "
        "tokens) (sharegpt tau 1.300 (step 1 0.200, 10 tokens))."
    ) in " ".join(card.split())
    # a record that walked greedy generation's own rounds (`rounds_tau`) says so beside the predicted tau
    record["heldout_rounds_tau"] = 1.234
    record["heldout_by_mode"]["greedy"]["rounds_tau"] = 1.5
    record_path.write_text(json.dumps(record))
    card = " ".join(write_model_card(draft_copy).read_text().split())
    assert (
        "(an average over rounds from every position; over the rounds greedy generation itself takes, each after the "
        "last one's bonus token: 1.23); the draft vocabulary covers"
    ) in card
    assert "greedy tau 1.700 (step 1 0.450, generation's rounds 1.500, 6000 tokens); sampled tau 1.300 (step" in card
    del record["heldout_rounds_tau"], record["heldout_by_mode"]["greedy"]["rounds_tau"]
    record_path.write_text(json.dumps(record))

    # a copy head added to the draft and its gate fitted, no epochs: the card says the rest is the init draft's
    args.update(finetune_epochs=0.0, copy_max_ngram=8, recount_vocabulary=False)
    args_path.write_text(json.dumps(args))
    config_path = draft_copy / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "copy_max_ngram": 8}))
    card = " ".join(write_model_card(draft_copy).read_text().split())
    assert (
        "- Recipe: the 2-module draft `chat-draft` (its training in its own record), unchanged, with a copy head "
        "added: its gate (matches of up to 8 tokens) fitted on this data."
    ) in card
    assert "A copy head proposes what followed the longest earlier match (up to 8 tokens) of the text so far" in card


DATASET_DIRS = sorted(p.parent for p in (REPO / "hub_models").glob("*/manifest.json"))


@pytest.mark.parametrize("dataset_dir", DATASET_DIRS, ids=[p.name for p in DATASET_DIRS])
def test_committed_replies_dataset_is_complete_and_its_card_current(dataset_dir, tmp_path):
    copy = Path(shutil.copytree(dataset_dir, tmp_path / dataset_dir.name))
    plan = prism_hf.hub.push_reply_dataset(copy, f"{NAMESPACE}/{dataset_dir.name}", dry_run=True)
    # the committed card is what the code writes from the folder (regenerate it with the dry run, never edit it)
    assert (copy / "README.md").read_text() == (dataset_dir / "README.md").read_text(), (
        f"hub_models/{dataset_dir.name}/README.md is stale: regenerate it with `prism-hf push hub_models/"
        f"{dataset_dir.name} --repo-id {NAMESPACE}/{dataset_dir.name} --dry-run`"
    )
    shards = [f.path for f in plan.files if f.path.startswith("data/")]
    log = [json.loads(line) for line in (dataset_dir / "shards.jsonl").read_text().splitlines()]
    assert sorted({entry["shard"] for entry in log}) == list(range(len(shards)))
