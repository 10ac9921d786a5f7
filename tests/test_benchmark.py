"""The benchmark harness on a tiny target: exactness check, tau, files, and a wrong strategy caught."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import training_prompts

from prism_hf.benchmark import BenchPrompt, Strategy, run_benchmark, write_results
from prism_hf.benchmark.suite import BenchArguments, build_strategies


def test_harness_measures_and_checks_every_strategy(llama_target, trained_llama_draft, tmp_path):
    prompts = [BenchPrompt(f"p{i}", "train" if i < 3 else "other", p) for i, p in enumerate(training_prompts()[:5])]
    strategies = [
        Strategy("prism", {"assistant_model": trained_llama_draft}),
        Strategy("prompt-lookup", {"prompt_lookup_num_tokens": 4}),
        # a deliberately wrong "strategy": repetition penalty changes the greedy output
        Strategy("wrong", {"repetition_penalty": 3.0}),
    ]
    records = run_benchmark(llama_target, prompts, strategies, max_new_tokens=30, progress=False)
    assert len(records) == 5 * 4
    by = {(r.strategy, r.prompt_id): r for r in records}
    for prompt in prompts:
        assert by[("plain", prompt.id)].tau == 1.0
        assert by[("prism", prompt.id)].identical and by[("prompt-lookup", prompt.id)].identical
        # tau is counted from the target's forwards, matching the generator's own statistics
        assert by[("prism", prompt.id)].target_forwards < by[("plain", prompt.id)].target_forwards

    summary = write_results(tmp_path, records, {"target": "tiny llama"})
    assert summary["prism"]["all"]["tau_mean"] > 1.5
    assert summary["prism"]["all"]["identical"] == 5
    assert summary["wrong"]["all"]["identical"] < 5
    assert summary["wrong"]["all"]["different_prompt_ids"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved) == {"metadata", "summary", "records"}
    assert set(saved["summary"]["prism"]) == {"train", "other", "all"}
    assert "| prism | all |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_reserved_name_and_missing_draft(llama_target, tmp_path):
    prompt = [BenchPrompt("p", "c", torch.tensor([5, 6, 7]))]
    with pytest.raises(ValueError, match="'plain' is reserved"):
        run_benchmark(llama_target, prompt, [Strategy("plain")], max_new_tokens=4, progress=False)
    args = BenchArguments(target="unused", output_dir=str(tmp_path), drafts={"m2": str(tmp_path / "nope")})
    with pytest.raises(FileNotFoundError, match="Draft 'm2'.*has no config.json"):
        build_strategies(llama_target, args)
