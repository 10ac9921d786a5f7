"""Loading drafts by Hub repo id, offline, from a Hub cache in the real layout; revisions pin the weights."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from conftest import training_prompts
from hub_testing import folder_files, run_offline_script, write_hub_cache
from transformers import AutoModel

import prism_hf

REPO_ID = "prism-hf/tiny-llama-draft"
COMMIT_V1 = "1" * 40
COMMIT_V2 = "2" * 40


def weights_checksum(model: torch.nn.Module) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, trained_llama_draft) -> Path:
    """The trained draft as revision 1 and a perturbed copy as revision 2 (`main`)."""
    root = tmp_path_factory.mktemp("hub")
    trained_llama_draft.save_pretrained(root / "v1")
    v2 = prism_hf.PrismDraftModel.from_pretrained(root / "v1")
    with torch.no_grad():
        v2.norm.weight.add_(0.5)
    v2.save_pretrained(root / "v2")
    cache = root / "cache"
    write_hub_cache(cache, REPO_ID, folder_files(root / "v1"), COMMIT_V1)
    write_hub_cache(cache, REPO_ID, folder_files(root / "v2"), COMMIT_V2)
    return cache


def test_cache_has_the_hub_layout(hub_cache):
    repo = hub_cache / "models--prism-hf--tiny-llama-draft"
    assert (repo / "refs" / "main").read_text() == COMMIT_V2
    weights = repo / "snapshots" / COMMIT_V1 / "model.safetensors"
    assert weights.is_symlink() and weights.resolve().parent == (repo / "blobs").resolve()


def test_from_pretrained_by_repo_id_and_revision(hub_cache, trained_llama_draft, llama_target):
    main = prism_hf.PrismDraftModel.from_pretrained(REPO_ID, cache_dir=hub_cache)
    pinned = prism_hf.PrismDraftModel.from_pretrained(REPO_ID, cache_dir=hub_cache, revision=COMMIT_V1)
    auto = AutoModel.from_pretrained(REPO_ID, cache_dir=hub_cache, revision=COMMIT_V1)
    assert type(auto) is prism_hf.PrismDraftModel
    for name, value in trained_llama_draft.state_dict().items():
        assert torch.equal(pinned.state_dict()[name], value), name
        assert torch.equal(auto.state_dict()[name], value), name
    assert torch.equal(main.norm.weight, trained_llama_draft.norm.weight + 0.5)
    prompt = training_prompts()[0][None]
    plain = llama_target.generate(prompt, do_sample=False, max_new_tokens=30)
    assisted = llama_target.generate(prompt, assistant_model=pinned, do_sample=False, max_new_tokens=30)
    assert torch.equal(plain, assisted)
    assert pinned.last_generation_stats.accepted_tokens > 0


def test_unknown_revision_is_not_replaced_by_main(hub_cache):
    with pytest.raises(OSError, match="couldn't find them in the cached files"):
        prism_hf.PrismDraftModel.from_pretrained(REPO_ID, cache_dir=hub_cache, revision="3" * 40)


REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["prism_hf"] = None  # any import of prism_hf now fails
    sys.path = [p for p in sys.path if p not in ("", {repo!r})]
    import torch
    from transformers import AutoModel, AutoModelForCausalLM
    target = AutoModelForCausalLM.from_pretrained({target!r}).eval()
    prompt = torch.tensor([{prompt}])
    plain = target.generate(prompt, do_sample=False, max_new_tokens=30)
    report = {{}}
    for revision in (None, {commit_v1!r}):
        draft = AutoModel.from_pretrained({repo_id!r}, trust_remote_code=True, revision=revision)
        assisted = target.generate(prompt, assistant_model=draft, do_sample=False, max_new_tokens=30)
        report[str(revision)] = {{
            "module": type(draft).__module__,
            "checksum": float(sum(p.detach().double().sum() for p in draft.parameters())),
            "equal": bool(torch.equal(plain, assisted)),
            "accepted": draft.last_generation_stats.accepted_tokens,
        }}
    print("REPORT", json.dumps(report))
    """
)


def test_trust_remote_code_from_the_hub_cache_without_prism_hf(hub_cache, llama_target, trained_llama_draft, tmp_path):
    target_dir = tmp_path / "target"
    llama_target.save_pretrained(target_dir)
    script = REMOTE_CODE_SCRIPT.format(
        repo=str(Path(prism_hf.__file__).resolve().parents[1]),
        target=str(target_dir),
        prompt=training_prompts()[0].tolist(),
        commit_v1=COMMIT_V1,
        repo_id=REPO_ID,
    )
    report = run_offline_script(script, hub_cache, tmp_path)
    main, pinned = report["None"], report[COMMIT_V1]
    for loaded in (main, pinned):
        assert loaded["module"].startswith("transformers_modules"), loaded["module"]
        assert loaded["equal"]  # exact, whatever the draft proposes
    assert pinned["checksum"] == pytest.approx(weights_checksum(trained_llama_draft), rel=1e-12)
    assert main["checksum"] != pytest.approx(pinned["checksum"], rel=1e-9)
    assert pinned["accepted"] > 0
