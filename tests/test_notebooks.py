"""
Every notebook in examples/ runs top to bottom, with its settings cell overridden to use a tiny chat model (a
byte-level tokenizer with a chat template and a small random Llama) and a few training updates, so they cannot rot.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import prism_hf

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))


def execute(name: str, settings: dict, workdir: Path, monkeypatch) -> nbformat.NotebookNode:
    """Runs `examples/<name>` in a fresh kernel, with `settings` assigned right after its settings cell."""
    notebook = nbformat.read(EXAMPLES / name, as_version=4)
    index = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    overrides = "\n".join(f"{key} = {value!r}" for key, value in settings.items())
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(overrides))
    # the kernel inherits this environment: offline, one thread, this checkout's prism_hf, a private modules cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_MODULES_CACHE", str(workdir / "modules"))
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    client = NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    )
    client.execute()
    return notebook


def printed(notebook: nbformat.NotebookNode) -> str:
    return "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.output_type == "stream"
    )


def images(notebook: nbformat.NotebookNode) -> int:
    return sum(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_committed_clean_with_badge_and_settings(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code_cells), "strip the outputs"
    assert f"colab.research.google.com/github/prism-hf/prism-hf/blob/main/examples/{path.name}" in (
        notebook.cells[0].source
    )
    settings = [cell for cell in code_cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(settings) == 1 and "INSTALL = True" in settings[0].source
    assert any('"cuda" if torch.cuda.is_available() else "cpu"' in cell.source for cell in code_cells)


def test_quickstart(tiny_chat_target, tiny_draft, tmp_path, monkeypatch):
    settings = {
        "TARGET": str(tiny_chat_target),
        "DRAFT": str(tiny_draft),
        "GENERATE_REPO": str(REPO / "hub_models" / "prism-generate"),
        "MAX_NEW_TOKENS": 24,
        "INSTALL": False,
    }
    text = printed(execute("quickstart.ipynb", settings, tmp_path, monkeypatch))
    assert "device: cpu, dtype: torch.float32" in text
    assert "identical: True" in text
    assert "identical (trust_remote_code draft): True" in text
    assert "identical (custom_generate): True" in text
    assert "speedup: " in text and "mean accepted tokens per target pass: " in text


def test_train_your_own_draft(tiny_chat_target, chat_data, tmp_path, monkeypatch):
    settings = {
        "TARGET": str(tiny_chat_target),
        "DATA": str(chat_data),
        "NUM_EXAMPLES": 8,
        "NUM_EVAL_PROMPTS": 2,
        "MAX_LENGTH": 128,
        "WARMUP_UPDATES": 12,
        "FINETUNE_UPDATES": 6,
        "MAX_NEW_TOKENS": 16,
        "DTYPE": "float32",
        "OUTPUT_DIR": str(tmp_path / "my-draft"),
        "INSTALL": False,
    }
    notebook = execute("train_your_own_draft.ipynb", settings, tmp_path, monkeypatch)
    text = printed(notebook)
    assert "8 training conversations" in text
    assert "identical to plain generate: 2/2" in text
    assert images(notebook) == 2  # loss and accuracy curves, acceptance per prompt
    draft = prism_hf.PrismDraftModel.from_pretrained(tmp_path / "my-draft")
    assert draft.config.num_modules == 2


@pytest.mark.parametrize("with_small_model", [False, True])
def test_ouroboros(tiny_chat_target, tmp_path, monkeypatch, with_small_model):
    """Pool only, and with a small model (the target's own weights; int8 with the notebook's CPU tuning)."""
    if not hasattr(prism_hf, "Ouroboros"):
        pytest.skip("prism_hf has no Ouroboros yet: ouroboros.ipynb is written against its planned API")
    settings = {"TARGET": str(tiny_chat_target), "MAX_NEW_TOKENS": 24, "INSTALL": False}
    settings["SMALL_MODEL"] = str(tiny_chat_target) if with_small_model else None
    settings["POOL_PATH"] = str(tmp_path / "pool")
    text = printed(execute("ouroboros.ipynb", settings, tmp_path, monkeypatch))
    layers = 2 * 7 + 1  # the tiny chat model: q, k, v, o, gate, up, down per layer + LM head
    assert (
        f"CPU tuning: {layers} target layers on fast kernels, {layers if with_small_model else 0} small-model" in text
    )
    assert "identical: True" in text
    assert "warm start: identical: True" in text
