"""Checkpoints: safetensors round trip, `auto_map`, `trust_remote_code` without prism_hf, corrupt and missing files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import training_prompts
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel

import prism_hf


@pytest.fixture(scope="module")
def saved_draft(tmp_path_factory, trained_llama_draft) -> Path:
    path = tmp_path_factory.mktemp("draft")
    trained_llama_draft.save_pretrained(path)
    return path


def test_checkpoint_layout(saved_draft, trained_llama_draft):
    files = sorted(p.name for p in saved_draft.iterdir())
    assert files == [
        "config.json",
        "configuration_prism.py",
        "generation_hooks.py",
        "generation_prism.py",
        "model.safetensors",
        "modeling_prism.py",
    ]
    config = json.loads((saved_draft / "config.json").read_text())
    assert config["model_type"] == "prism_draft"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_prism.PrismConfig",
        "AutoModel": "modeling_prism.PrismDraftModel",
    }
    assert config["verifier_model_type"] == "llama" and config["verifier_vocab_size"] == 256
    weights = load_file(saved_draft / "model.safetensors")
    # the target's embedding and LM head are shared, never stored
    assert not any("embed" in name or "lm_head" in name for name in weights)
    assert set(weights) == set(trained_llama_draft.state_dict())


def test_round_trip_is_identical(saved_draft, trained_llama_draft, llama_target):
    for loaded in (prism_hf.PrismDraftModel.from_pretrained(saved_draft), AutoModel.from_pretrained(saved_draft)):
        assert type(loaded) is prism_hf.PrismDraftModel
        for name, value in trained_llama_draft.state_dict().items():
            assert torch.equal(value, loaded.state_dict()[name]), name
        # the loaded draft drafts exactly as the original (greedy output alone would hide a broken draft)
        for prompt in training_prompts()[:3]:
            original_stats = draft_candidates(llama_target, trained_llama_draft, prompt[None])
            assert draft_candidates(llama_target, loaded, prompt[None]) == original_stats
    assert isinstance(AutoConfig.from_pretrained(saved_draft), prism_hf.PrismConfig)


def draft_candidates(target, draft, prompt) -> list[list[int]]:
    """Every candidate list the draft proposes during one greedy generation."""
    proposals: list[list[int]] = []
    original = draft.build_candidate_generator

    def recording_builder(**kwargs):
        generator = original(**kwargs)
        get_candidates = generator.get_candidates

        def recording_get_candidates(input_ids, **kw):
            candidates, logits = get_candidates(input_ids, **kw)
            proposals.append(candidates[0, input_ids.shape[1] :].tolist())
            return candidates, logits

        generator.get_candidates = recording_get_candidates
        return generator

    draft.build_candidate_generator = recording_builder
    try:
        target.generate(prompt, assistant_model=draft, max_new_tokens=30, do_sample=False)
    finally:
        del draft.build_candidate_generator
    return proposals


REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["prism_hf"] = None  # any import of prism_hf now fails
    sys.path = [p for p in sys.path if p not in ("", {repo!r})]
    import torch
    from transformers import AutoModel, AutoModelForCausalLM
    target = AutoModelForCausalLM.from_pretrained({target!r}).eval()
    draft = AutoModel.from_pretrained({draft!r}, trust_remote_code=True)
    assert "prism_hf" not in type(draft).__module__, type(draft).__module__
    prompt = torch.tensor([{prompt}])
    plain = target.generate(prompt, do_sample=False, max_new_tokens=30)
    assisted = target.generate(prompt, assistant_model=draft, do_sample=False, max_new_tokens=30)
    stats = draft.last_generation_stats
    print("MODULE", type(draft).__module__)
    print("EQUAL", bool(torch.equal(plain, assisted)), "ACCEPTED", stats.accepted_tokens)
    """
)


def test_trust_remote_code_without_prism_hf(saved_draft, llama_target, tmp_path):
    target_dir = tmp_path / "target"
    llama_target.save_pretrained(target_dir)
    repo = str(Path(prism_hf.__file__).resolve().parents[1])
    script = REMOTE_CODE_SCRIPT.format(
        repo=repo, target=str(target_dir), draft=str(saved_draft), prompt=training_prompts()[0].tolist()
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MODULE transformers_modules" in result.stdout
    line = next(line for line in result.stdout.splitlines() if line.startswith("EQUAL"))
    _, equal, _, accepted = line.split()
    assert equal == "True" and int(accepted) > 0


def config_only_copy(saved_draft: Path, path: Path) -> Path:
    """A checkpoint folder holding only the draft's config; each test writes its own (broken) weights."""
    path.mkdir()
    (path / "config.json").write_text((saved_draft / "config.json").read_text())
    return path


def with_edited_weights(saved_draft: Path, path: Path, edit) -> Path:
    broken = config_only_copy(saved_draft, path)
    weights = load_file(saved_draft / "model.safetensors")
    edit(weights)
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    return broken


def test_truncated_weights_are_reported(saved_draft, tmp_path):
    broken = config_only_copy(saved_draft, tmp_path / "broken")
    data = (saved_draft / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match="corrupt or truncated"):
        prism_hf.PrismDraftModel.from_pretrained(broken)


def test_missing_tensor_is_reported(saved_draft, tmp_path):
    broken = with_edited_weights(
        saved_draft, tmp_path / "missing", lambda weights: weights.pop("layers.1.mlp.down_proj.weight")
    )
    with pytest.raises(ValueError, match=r"does not match its config \(missing_keys: layers.1.mlp.down_proj.weight"):
        prism_hf.PrismDraftModel.from_pretrained(broken)


def test_wrong_shape_is_reported(saved_draft, tmp_path):
    broken = with_edited_weights(
        saved_draft, tmp_path / "shape", lambda weights: weights.update({"fc.0.weight": torch.zeros(3, 3)})
    )
    with pytest.raises(ValueError, match=r"mismatched_keys: fc.0.weight \(checkpoint \[3, 3\], model \[64, 128\]\)"):
        prism_hf.PrismDraftModel.from_pretrained(broken)


def test_missing_weights_file(saved_draft, tmp_path):
    empty = config_only_copy(saved_draft, tmp_path / "noweights")
    with pytest.raises(OSError, match="model.safetensors"):
        prism_hf.PrismDraftModel.from_pretrained(empty)


def test_reduced_vocabulary_survives_round_trip(llama_target, tmp_path):
    draft = prism_hf.PrismDraftModel.from_target(llama_target, draft_vocab_size=32)
    draft.draft_to_target.copy_(torch.arange(100, 132))
    draft.save_pretrained(tmp_path / "reduced")
    loaded = prism_hf.PrismDraftModel.from_pretrained(tmp_path / "reduced")
    assert torch.equal(loaded.draft_to_target, torch.arange(100, 132))
