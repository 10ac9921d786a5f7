"""The drafts committed under hub_models/ load, carry today's code, and name the target they were made for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import prism_hf

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "prism_hf"
DRAFT_DIRS = sorted(p.parent for p in (REPO / "hub_models").glob("*/config.json"))
CODE_FILES = ("configuration_prism.py", "modeling_prism.py", "generation_hooks.py", "generation_prism.py")


@pytest.mark.parametrize("draft_dir", DRAFT_DIRS, ids=[p.name for p in DRAFT_DIRS])
def test_committed_draft_is_complete_and_current(draft_dir):
    config = json.loads((draft_dir / "config.json").read_text())
    assert config["model_type"] == "prism_draft"
    assert config["verifier_model_type"] and config["verifier_vocab_size"]
    for name in CODE_FILES:
        # trust_remote_code users run these copies: they must be the package's current code
        assert (draft_dir / name).read_text() == (PACKAGE / name).read_text(), f"{draft_dir.name}/{name} is stale"
    assert (draft_dir / "model.safetensors").stat().st_size <= 100 * 2**20
    assert (draft_dir / "README.md").is_file()
    training = json.loads((draft_dir / "training_record.json").read_text())
    assert training["command"].startswith("prism-hf train ")
    draft = prism_hf.PrismDraftModel.from_pretrained(draft_dir)
    assert draft.config.num_modules == config["num_modules"]


def test_there_is_a_committed_draft():
    assert DRAFT_DIRS, "hub_models/ should hold at least the demo's draft"
