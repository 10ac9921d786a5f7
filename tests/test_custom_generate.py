"""
hub_models/prism-generate: `target.generate(custom_generate=..., trust_remote_code=True, prism_draft=...)` with only
transformers importable (prism_hf blocked), from the local folder and from a Hub cache, drafting from a Hub repo id.
"""

from __future__ import annotations

import importlib.metadata
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import training_prompts
from hub_testing import folder_files, run_offline_script, write_hub_cache
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
GENERATE_DIR = REPO / "hub_models" / "prism-generate"
DRAFT_REPO = "prism-hf/tiny-llama-draft"
GENERATE_REPO = "prism-hf/prism-generate"
COMMIT = "a" * 40

SCRIPT = textwrap.dedent(
    """
    import json, sys, traceback
    sys.modules["prism_hf"] = None  # any import of prism_hf now fails
    sys.path = [p for p in sys.path if p not in ("", {repo!r})]
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained({target!r}).eval()
    forwards = [0]
    target.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    prompt = torch.tensor([{prompt}])
    common = dict(do_sample=False, max_new_tokens=30)
    report = {{}}

    def run(name, **kwargs):
        forwards[0] = 0
        try:
            out = target.generate(prompt, **common, **kwargs)
            report[name] = {{"tokens": out[0].tolist(), "forwards": forwards[0]}}
        except Exception as error:
            report[name] = {{"error": type(error).__name__, "message": str(error)}}

    run("plain")
    run("local_dir", custom_generate={generate_dir!r}, trust_remote_code=True, prism_draft={draft_repo!r})
    run("local_dir_again", custom_generate={generate_dir!r}, trust_remote_code=True, prism_draft={draft_repo!r})
    report["drafts_kept"] = len(target.__dict__.get("_prism_generate_drafts", {{}}))
    run(
        "hub_repo",
        custom_generate={generate_repo!r},
        trust_remote_code=True,
        prism_draft={draft_repo!r},
        prism_draft_revision={commit!r},
    )
    draft = AutoModel.from_pretrained({draft_repo!r}, trust_remote_code=True)
    run("loaded_draft", custom_generate={generate_dir!r}, trust_remote_code=True, prism_draft=draft)
    report["loaded_draft_accepted"] = draft.last_generation_stats.accepted_tokens
    run("no_draft", custom_generate={generate_dir!r}, trust_remote_code=True)
    run("two_assistants", custom_generate={generate_dir!r}, trust_remote_code=True, prism_draft=draft,
        assistant_model=draft)
    run("ouroboros", custom_generate={generate_dir!r}, trust_remote_code=True, ouroboros_pool=True)
    run("not_a_draft", custom_generate={generate_dir!r}, trust_remote_code=True, prism_draft={target!r})
    print("REPORT", json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def report(tmp_path_factory, llama_target, trained_llama_draft) -> dict:
    root = tmp_path_factory.mktemp("custom_generate")
    llama_target.save_pretrained(root / "target")
    trained_llama_draft.save_pretrained(root / "draft")
    cache = root / "cache"
    write_hub_cache(cache, DRAFT_REPO, folder_files(root / "draft"), COMMIT)
    write_hub_cache(cache, GENERATE_REPO, folder_files(GENERATE_DIR), COMMIT)
    script = SCRIPT.format(
        repo=str(REPO),
        target=str(root / "target"),
        prompt=training_prompts()[0].tolist(),
        generate_dir=str(GENERATE_DIR),
        generate_repo=GENERATE_REPO,
        draft_repo=DRAFT_REPO,
        commit=COMMIT,
    )
    return run_offline_script(script, cache, root)


@pytest.mark.parametrize("call", ["local_dir", "local_dir_again", "hub_repo", "loaded_draft"])
def test_output_is_plain_greedy_output_with_fewer_target_forwards(report, call):
    assert "error" not in report[call], report[call]
    assert report[call]["tokens"] == report["plain"]["tokens"]
    # the draft really drafted: fewer verification forwards than tokens generated
    assert report[call]["forwards"] < report["plain"]["forwards"]


def test_loaded_draft_is_reused_and_reports_stats(report):
    assert report["drafts_kept"] == 1
    assert report["loaded_draft_accepted"] > 0


@pytest.mark.parametrize(
    "call, error, message",
    [
        ("no_draft", "ValueError", "Pass exactly one drafting method"),
        ("two_assistants", "ValueError", "sets `assistant_model` itself"),
        ("ouroboros", "NotImplementedError", "Ouroboros drafting runs prism_hf.Ouroboros"),
        ("not_a_draft", "ValueError", "is not a PRISM draft"),
    ],
)
def test_misuse_is_reported(report, call, error, message):
    assert report[call]["error"] == error, report[call]
    assert message in report[call]["message"]


def test_repository_layout_and_card_metadata():
    files = sorted(folder_files(GENERATE_DIR))
    assert files == ["README.md", "custom_generate/generate.py", "custom_generate/requirements.txt"]
    card = (GENERATE_DIR / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---\n")[1])
    assert metadata["library_name"] == "transformers" and "custom_generate" in metadata["tags"]
    for argument in ("prism_draft", "prism_draft_revision", "ouroboros_pool", "ouroboros_small_model"):
        assert f"`{argument}`" in card


def test_requirements_match_the_package():
    """The Hub repository declares the same transformers and torch ranges as prism_hf, whose behaviour it ships."""
    lines = (GENERATE_DIR / "custom_generate" / "requirements.txt").read_text().split()
    declared = {requirement.name: requirement.specifier for requirement in map(Requirement, lines)}
    package = {r.name: r.specifier for r in map(Requirement, importlib.metadata.requires("prism-hf")) if not r.marker}
    assert declared == {name: package[name] for name in ("transformers", "torch")}
