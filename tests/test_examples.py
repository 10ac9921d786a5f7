"""The example scripts run end to end on a tiny chat model (the README demo, examples/demo.py, has its own test)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import prism_hf
from prism_hf.model_card import record_benchmark

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart(tiny_chat_target, tiny_draft, capsys):
    argv = ["--target", str(tiny_chat_target), "--draft", str(tiny_draft), "--max-new-tokens", "24"]
    result = load_example("quickstart").main(argv)
    assert result["identical"] is True
    out = capsys.readouterr().out
    assert "identical outputs:    True" in out and "--- generate with the PRISM draft ---" in out


def test_train_draft(tiny_chat_target, chat_data, tmp_path, capsys):
    output_dir = tmp_path / "my-draft"
    argv = [
        *("--target", str(tiny_chat_target), "--data", str(chat_data), "--output-dir", str(output_dir)),
        *("--num-examples", "8", "--max-length", "128", "--warmup-epochs", "4", "--finetune-epochs", "2"),
        *("--eval-prompts", "2", "--max-new-tokens", "16"),
    ]
    result = load_example("train_draft").main(argv)
    assert result == {"identical": 2, "prompts": 2, "tau": result["tau"]} and result["tau"] >= 1.0
    record = json.loads((output_dir / "training_record.json").read_text())
    # one of the 8 conversations is held out, never trained on, and scored
    assert record["num_examples"] == 7 and record["heldout_examples"] == 1
    assert record["command"].startswith("prism-hf train ")
    out = capsys.readouterr().out
    assert "held out (1 conversations never trained on): predicted tau" in out
    assert prism_hf.PrismDraftModel.from_pretrained(output_dir).config.num_modules == 2
    assert f"prism-hf push {output_dir} --repo-id YOUR_NAME/my-draft --dry-run" in out


def test_benchmark_results_feed_the_model_card(tiny_chat_target, tiny_draft, tmp_path):
    output_dir = tmp_path / "bench"
    argv = [
        *("--target", str(tiny_chat_target), "--draft", f"prism={tiny_draft}", "--prompt-lookup"),
        *("--prompt", "Tell me about owls.", "--prompt", "Tell me about tea."),
        *("--max-new-tokens", "16", "--dtype", "float32", "--output-dir", str(output_dir)),
    ]
    results = load_example("benchmark").main(argv)
    assert set(results["aggregates"]) == {"plain", "prism", "hf-prompt-lookup"}
    assert results["aggregates"]["prism"]["all"]["identical"] == 2  # float32: exact
    assert {p.name for p in output_dir.iterdir()} >= {"results.json", "results.md", "results.png"}
    # the draft's strategy is found by its path, as `prism-hf push --benchmark` does
    record = json.loads(record_benchmark(tiny_draft, output_dir / "results.json").read_text())
    assert record["strategy"] == "prism"
    assert record["overall"]["prism"]["prompts"] == 2


@pytest.mark.parametrize("name", ["quickstart", "train_draft", "benchmark"])
def test_example_documents_its_command(name):
    assert f"python examples/{name}.py" in (EXAMPLES / f"{name}.py").read_text()
