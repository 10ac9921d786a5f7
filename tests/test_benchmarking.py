"""The benchmark harness on a tiny target: exactness check, tau, result files, failures reported, clear errors."""

from __future__ import annotations

import json
import statistics
import subprocess

import pytest
import torch
from conftest import make_llama, training_prompts

from prism_hf.benchmarking import (
    BenchmarkConfig,
    BenchPrompt,
    RunRecord,
    Strategy,
    assistant_strategy,
    encode_prompt,
    hf_assisted_strategy,
    load_prompts,
    parse_draft_spec,
    prism_strategy,
    prompt_lookup_strategy,
    report,
    run_benchmark,
    run_suite,
    write_results,
)
from prism_hf.benchmarking.report import AGGREGATE_KEYS
from prism_hf.prompt_data import Prompt

pytestmark = pytest.mark.usefixtures("one_thread")


class _NotAnAssistant(torch.nn.Module):
    """Something that is not a model `generate` can draft with."""


def test_harness_measures_checks_and_reports(llama_target, trained_llama_draft, tmp_path):
    prompts = [BenchPrompt(f"p{i}", "seen" if i < 2 else "other", p) for i, p in enumerate(training_prompts()[:4])]
    strategies = [
        assistant_strategy("prism", trained_llama_draft),
        prompt_lookup_strategy(num_tokens=4),
        hf_assisted_strategy(make_llama(seed=1), llama_target, num_assistant_tokens=3, name="hf-assisted"),
        Strategy("short", {"max_new_tokens": 5}),  # wrong on purpose: stops early
        assistant_strategy("broken", _NotAnAssistant()),  # wrong on purpose: generate raises
    ]
    records = run_benchmark(llama_target, prompts, strategies, max_new_tokens=24, progress=False)
    assert len(records) == 4 * 6
    by = {(r.strategy, r.prompt_id): r for r in records}
    for prompt in prompts:
        plain = by[("plain", prompt.id)]
        assert plain.tau == 1.0 and plain.target_forwards == plain.new_tokens == 24
        for name in ("prism", "hf-prompt-lookup", "hf-assisted"):
            assert by[(name, prompt.id)].identical, name
        assert by[("prism", prompt.id)].target_forwards < plain.target_forwards
        assert not by[("short", prompt.id)].identical and by[("short", prompt.id)].first_difference == 5
        broken = by[("broken", prompt.id)]
        assert not broken.identical and broken.error

    payload = write_results(tmp_path, records, {"target": "tiny llama"})
    assert {"metadata", "aggregates", "records"} <= set(json.loads((tmp_path / "results.json").read_text()))
    aggregates = payload["aggregates"]
    assert list(aggregates) == ["plain", "prism", "hf-prompt-lookup", "hf-assisted", "short", "broken"]
    assert set(aggregates["prism"]) == {"seen", "other", "all"}
    assert set(aggregates["prism"]["all"]) == set(AGGREGATE_KEYS)
    assert aggregates["plain"]["all"]["tau_mean"] == 1.0
    assert aggregates["plain"]["all"]["speedup"] == pytest.approx(1.0)
    assert aggregates["prism"]["all"]["tau_mean"] > 1.0
    assert aggregates["prism"]["all"]["identical"] == 4 and not aggregates["prism"]["all"]["failures"]
    assert [f["prompt_id"] for f in aggregates["short"]["all"]["failures"]] == ["p0", "p1", "p2", "p3"]
    assert aggregates["broken"]["all"]["completed"] == 0 and aggregates["broken"]["all"]["speedup"] is None
    assert len(payload["records"]) == 24
    table = (tmp_path / "results.md").read_text()
    assert "| prism | all |" in table and "| broken | all | n/a |" in table and "short / p0" in table
    prism_row = next(line for line in table.splitlines() if line.startswith("| prism | all |"))
    median = statistics.median(by[("plain", p.id)].seconds / by[("prism", p.id)].seconds for p in prompts)
    assert prism_row.split(" | ")[4] == f"{median:.2f}x"  # the per-prompt median speedup column
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_sampling_mode_seeds_each_prompt_and_skips_the_comparison(llama_target, trained_llama_draft, tmp_path):
    """`temperature=`: every strategy samples (same seed per prompt), runs repeat exactly, nothing is compared."""
    prompts = [BenchPrompt(f"p{i}", "seen", p) for i, p in enumerate(training_prompts()[:2])]
    strategies = [assistant_strategy("prism", trained_llama_draft), assistant_strategy("broken", _NotAnAssistant())]

    def run():
        return run_benchmark(
            llama_target, prompts, strategies, max_new_tokens=16, temperature=1.0, seed=3, progress=False
        )

    records, again = run(), run()
    assert [(r.strategy, r.new_tokens, r.target_forwards) for r in records] == [
        (r.strategy, r.new_tokens, r.target_forwards) for r in again
    ]
    assert all(r.sampled and not r.identical and r.first_difference is None for r in records)
    by = {(r.strategy, r.prompt_id): r for r in records}
    assert by[("plain", "p0")].tau == 1.0 and by[("broken", "p0")].error
    # greedy runs still compare every output with plain generate's
    greedy = run_benchmark(llama_target, prompts, [], max_new_tokens=16, warmup=False, progress=False)
    assert not greedy[0].sampled and greedy[0].identical

    payload = write_results(tmp_path, records, {"target": "tiny llama"})
    assert payload["aggregates"]["prism"]["all"]["sampled"] and not payload["aggregates"]["prism"]["all"]["failures"]
    assert [f["prompt_id"] for f in payload["aggregates"]["broken"]["all"]["failures"]] == ["p0", "p1"]
    table = (tmp_path / "results.md").read_text()
    prism_row = next(line for line in table.splitlines() if line.startswith("| prism | all |"))
    assert prism_row.endswith("| sampled |")
    with pytest.raises(ValueError, match="temperature must be positive"):
        run_benchmark(llama_target, prompts, [], max_new_tokens=4, temperature=0.0, progress=False)
    with pytest.raises(ValueError, match="temperature must be positive"):
        BenchmarkConfig(target="t", temperature=-1.0).resolved()
    config = BenchmarkConfig(target="some/SmolLM2", temperature=1.0, output_dir=None).resolved()
    assert config.output_dir.endswith("smollm2-temperature-1")


def test_sampled_speedups_compare_time_per_new_token():
    """Sampled replies differ in length from plain's: a reply that stops early must not count as a faster one."""

    def record(strategy, prompt_id, new_tokens, seconds):
        return RunRecord(
            strategy, prompt_id, "chat", prompt_tokens=8, new_tokens=new_tokens, seconds=seconds, target_forwards=1,
            target_seconds=seconds, peak_memory_mb=1.0, identical=False, sampled=True,
        )  # fmt: skip

    records = [
        record("plain", "p0", 10, 1.0),
        record("plain", "p1", 20, 2.0),
        record("draft", "p0", 5, 1.0),  # stopped early, at the same time: half plain's speed per token
        record("draft", "p1", 40, 2.0),  # twice the tokens in the same time: twice plain's speed
    ]
    draft = report.summarize(records)["draft"]["all"]
    assert draft["speedup"] == pytest.approx((3.0 / 30) / (3.0 / 45))  # 1.5, where the time ratio says 1.0
    assert draft["speedup_median"] == pytest.approx(statistics.median([0.5, 2.0]))


class _FakeTokenizer:
    """Just enough tokenizer for the text-prompt path: characters as token ids."""

    def __init__(self, chat_template: str | None):
        self.chat_template = chat_template

    def __call__(self, text):
        return {"input_ids": [3 + ord(c) % 200 for c in text]}

    def apply_chat_template(self, messages, add_generation_prompt, tokenize, return_dict):
        return self(f"<user>{messages[0]['content']}<assistant>")


def test_text_prompts_need_a_tokenizer(llama_target):
    prompt = Prompt("t", "code", ("def f(x):",))
    assert encode_prompt(_FakeTokenizer(None), prompt).input_ids.numel() == len("def f(x):")
    assert encode_prompt(_FakeTokenizer("chat"), prompt).input_ids.numel() == len("<user>def f(x):<assistant>")
    records = run_benchmark(
        llama_target, [prompt], [], max_new_tokens=4, tokenizer=_FakeTokenizer(None), warmup=False, progress=False
    )
    assert records[0].prompt_tokens == 9 and records[0].new_tokens == 4
    with pytest.raises(ValueError, match="is text: pass the target's tokenizer"):
        run_benchmark(llama_target, [prompt], [], max_new_tokens=4, progress=False)
    with pytest.raises(ValueError, match="'plain' is reserved"):
        run_benchmark(llama_target, [prompt], [Strategy("plain")], max_new_tokens=4, progress=False)


def test_clear_errors(llama_target, tmp_path):
    with pytest.raises(FileNotFoundError, match="Draft 'm2': directory .* does not exist"):
        prism_strategy("m2", tmp_path / "nope", llama_target)
    with pytest.raises(FileNotFoundError, match="Draft 'm2': .* has no config.json"):
        prism_strategy("m2", tmp_path, llama_target)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="model_type 'llama', expected 'prism_draft'"):
        prism_strategy("m2", tmp_path, llama_target)
    with pytest.raises(ValueError, match="NAME=DIR"):
        parse_draft_spec("just-a-dir")
    with pytest.raises(ValueError, match="Unknown Spec-Bench categories"):
        load_prompts(["spec_bench"], categories=["poetry"])
    with pytest.raises(ValueError, match="Unknown or no prompt sets"):
        load_prompts(["mmlu"])
    # draft directories are checked before the target is loaded (the target here does not even exist)
    config = BenchmarkConfig(target="no/such-model", drafts={"m1": str(tmp_path / "missing")})
    with pytest.raises(FileNotFoundError, match="Draft 'm1'"):
        run_suite(config, progress=False)


def test_dtype_auto_picks_the_fast_dtype_of_the_device(monkeypatch):
    from prism_hf import reference_models
    from prism_hf.reference_models import resolve_dtype

    assert resolve_dtype("float16") is torch.float16
    assert resolve_dtype(torch.bfloat16) is torch.bfloat16
    monkeypatch.setattr(reference_models, "_cpu_has_native_bfloat16", lambda: True)
    assert resolve_dtype("auto", "cpu") is torch.bfloat16
    monkeypatch.setattr(reference_models, "_cpu_has_native_bfloat16", lambda: False)  # AVX2-only: emulated bf16
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert BenchmarkConfig(target="t", device="cpu").resolved().dtype == "float32"
    with pytest.raises(ValueError, match="Unknown dtype 'fp33'"):
        resolve_dtype("fp33")
    with pytest.raises(ValueError, match="Unknown dtype 'Tensor'"):
        BenchmarkConfig(target="t", dtype="Tensor").resolved()


def test_hf_assisted_draft_length_reaches_transformers(llama_target):
    """transformers ignores `num_assistant_tokens` given to `generate`; the strategy sets it on the assistant."""
    twin = make_llama()  # the target's weights: every drafted token is accepted
    twin.generation_config.assistant_confidence_threshold = 0.0  # never stop a draft early
    prompt = [BenchPrompt("p", "c", training_prompts()[0])]
    strategies = [
        hf_assisted_strategy(twin, llama_target, 3, "three", num_assistant_tokens_schedule="constant"),
        hf_assisted_strategy(twin, llama_target, name="defaults"),
    ]
    assert twin.generation_config.num_assistant_tokens is None  # the shared model keeps its own (unset: 20)
    records = run_benchmark(llama_target, prompt, strategies, max_new_tokens=24, progress=False)
    by = {r.strategy: r for r in records}
    assert by["three"].identical and by["defaults"].identical
    assert by["three"].target_forwards == 24 // (3 + 1)
    assert by["defaults"].target_forwards == 2  # 20 drafted + 1, then the last 3


def _small_model_config(tmp_path, seed: int, **options) -> BenchmarkConfig:
    """A resolved CPU config for a tiny target with a saved tiny small model (named "small") for HF assisted
    generation and Ouroboros alike, 3 draft tokens and fast linears, plus `options`."""
    small_dir = tmp_path / "small"
    make_llama(seed=seed).save_pretrained(small_dir)
    return BenchmarkConfig(
        target="tiny",
        assistant=str(small_dir),
        ouroboros_assistant=str(small_dir),
        num_draft_tokens=3,
        fast_cpu_linears=True,
        device="cpu",
        **options,
    ).resolved()


def test_bench_config_fast_linears_and_draft_length(llama_target, tmp_path):
    from prism_hf.benchmarking.suite import build_strategies, switch_to_fast_cpu_linears
    from prism_hf.cpu_linear import FastCpuLinear

    config = _small_model_config(tmp_path, seed=1, draft_length_schedule="constant")
    assert config.output_dir.endswith("tiny-fast-linears")
    target = make_llama()
    strategies = build_strategies(target, config)
    names = [s.name for s in strategies]
    assert names == ["plain", "hf-assisted-small", "hf-assisted-small-hf-defaults", "ouroboros-small"]
    tuned, defaults = (strategies[i].generate_kwargs["assistant_model"] for i in (1, 2))
    assert (tuned.generation_config.num_assistant_tokens, tuned.generation_config.num_assistant_tokens_schedule) == (
        3,
        "constant",
    )
    assert defaults.generation_config.num_assistant_tokens is None
    ouroboros = strategies[3].generate_kwargs["assistant_model"]
    assert (ouroboros.num_draft_tokens, ouroboros.draft_length_schedule) == (3, "constant")
    assert switch_to_fast_cpu_linears(target, strategies) == 2 * (2 * 7 + 1)  # target + the one shared small model
    assert isinstance(target.lm_head, FastCpuLinear) and isinstance(ouroboros.small_model.lm_head, FastCpuLinear)
    with pytest.raises(ValueError, match="Unknown draft length schedule 'linear'"):
        BenchmarkConfig(target="t", draft_length_schedule="linear").resolved()


def test_bench_config_int8_small_models(llama_target, tmp_path):
    """`small_model_int8`: HF assisted and Ouroboros also draft with one int8 copy; the float small model is kept."""
    from prism_hf.benchmarking.suite import build_strategies, switch_to_fast_cpu_linears

    config = _small_model_config(tmp_path, seed=0, small_model_int8=True)
    target = make_llama()
    strategies = build_strategies(target, config)
    names = [s.name for s in strategies]
    assert names == [
        "plain",
        "hf-assisted-small",
        "hf-assisted-small-hf-defaults",
        "hf-assisted-small-int8",
        "ouroboros-small",
        "ouroboros-small-int8",
    ]
    by_name = {s.name: s.generate_kwargs.get("assistant_model") for s in strategies}
    hf_int8, ouroboros_int8 = by_name["hf-assisted-small-int8"], by_name["ouroboros-small-int8"]
    quantized = torch.ao.nn.quantized.dynamic.Linear
    assert isinstance(hf_int8.lm_head, quantized) and ouroboros_int8.small_model.lm_head is hf_int8.lm_head
    assert hf_int8.generation_config.num_assistant_tokens == 3 and ouroboros_int8.num_draft_tokens == 3
    assert switch_to_fast_cpu_linears(target, strategies) == 2 * (2 * 7 + 1)  # target + the float small model only
    assert type(by_name["ouroboros-small"].small_model.lm_head).__name__ == "FastCpuLinear"
    prompt = [BenchPrompt("p", "humaneval", torch.tensor([5, 9, 14, 3, 8]))]
    records = run_benchmark(target, prompt, strategies[1:], max_new_tokens=16, progress=False)
    assert all(r.identical and r.error is None for r in records)
    with pytest.raises(ValueError, match="small_model_int8 quantizes small models: also set assistant"):
        BenchmarkConfig(target="tiny", small_model_int8=True, device="cpu").resolved()  # before any model loads


def test_bench_config_int8_copies_only_with_variants(tmp_path):
    """`float_small_model=False` runs the int8 copies only; a variant's draft-length schedule replaces the run's."""
    from prism_hf.benchmarking.suite import build_strategies

    config = _small_model_config(
        tmp_path,
        seed=0,
        small_model_int8=True,
        float_small_model=False,
        draft_length_schedule="constant",
        ouroboros_variants=[{"draft_length_schedule": "heuristic_transient", "small_model_vocab": 64}],
    )
    strategies = build_strategies(make_llama(), config)
    assert [s.name for s in strategies] == [
        "plain",
        "hf-assisted-small-int8",
        "ouroboros-small-int8",
        "ouroboros-small-int8-draft_length_scheduleheuristic_transient-small_model_vocab64",
    ]
    base, variant = (s.generate_kwargs["assistant_model"] for s in strategies[2:])
    assert (base.draft_length_schedule, variant.draft_length_schedule) == ("constant", "heuristic_transient")
    assert variant.small_model is base.small_model and variant.small_model_vocab == 64
    assert isinstance(base.small_model.lm_head, torch.ao.nn.quantized.dynamic.Linear)
    with pytest.raises(ValueError, match="float_small_model=False leaves out the float small model"):
        BenchmarkConfig(target="t", assistant="s", float_small_model=False, device="cpu").resolved()


def test_bench_config_int8_drafts(tmp_path):
    """`draft_int8`: each PRISM draft also runs as a copy with an int8 draft-vocabulary LM head, outputs exact."""
    from prism_hf import PrismDraftModel
    from prism_hf.benchmarking.suite import build_strategies, switch_to_fast_cpu_linears

    target = make_llama()
    torch.manual_seed(0)
    PrismDraftModel.from_target(target, draft_vocab_size=200).save_pretrained(tmp_path / "m2")
    config = BenchmarkConfig(
        target="tiny", drafts={"m2": str(tmp_path / "m2")}, draft_int8=True, fast_cpu_linears=True, device="cpu"
    ).resolved()
    strategies = build_strategies(target, config)
    assert [s.name for s in strategies] == ["plain", "m2", "m2-int8"]
    float_draft, int8_draft = (s.generate_kwargs["assistant_model"] for s in strategies[1:])
    assert float_draft is not int8_draft and strategies[2].description.endswith("(M = 2, int8)")
    assert switch_to_fast_cpu_linears(target, strategies) == (2 * 7 + 1) + 2 * 2 * (1 + 7)  # layers stay float
    prompt = [BenchPrompt("p", "humaneval", torch.tensor([5, 9, 14, 3, 8]))]
    records = run_benchmark(target, prompt, strategies[1:], max_new_tokens=16, progress=False)
    assert all(r.identical and r.error is None for r in records)
    assert isinstance(int8_draft.verifier.draft_lm_int8, torch.ao.nn.quantized.dynamic.Linear)
    assert float_draft.verifier.draft_lm_int8 is None
    with pytest.raises(ValueError, match="draft_int8 quantizes PRISM drafts: also give drafts"):
        BenchmarkConfig(target="tiny", draft_int8=True, device="cpu").resolved()
    config = BenchmarkConfig(
        target="tiny", drafts={"m2": str(tmp_path / "m2")}, draft_int8=True, float_draft=False, device="cpu"
    ).resolved()
    (only,) = build_strategies(target, config)[1:]
    assert only.name == "m2-int8" and only.description.endswith("(M = 2, int8)")
    # Ouroboros with each draft follows the run's heads: the int8 one here, drafting exactly
    config = BenchmarkConfig(
        target="tiny",
        drafts={"m2": str(tmp_path / "m2")},
        draft_int8=True,
        float_draft=False,
        ouroboros_prism=True,
        device="cpu",
    ).resolved()
    strategies = build_strategies(target, config)
    assert [s.name for s in strategies] == ["plain", "m2-int8", "ouroboros-m2-int8"]
    pooled = strategies[2].generate_kwargs["assistant_model"].small_model
    assert pooled is not strategies[1].generate_kwargs["assistant_model"] and pooled._int8_lm_head
    records = run_benchmark(target, prompt, strategies[1:], max_new_tokens=16, progress=False)
    assert all(r.identical and r.error is None for r in records)
    assert isinstance(pooled.verifier.draft_lm_int8, torch.ao.nn.quantized.dynamic.Linear)
    with pytest.raises(ValueError, match="float_draft=False leaves out the float-head drafts: set draft_int8"):
        BenchmarkConfig(target="tiny", drafts={"m2": str(tmp_path / "m2")}, float_draft=False, device="cpu").resolved()


def test_bench_config_draft_own_length(tmp_path):
    """`draft_own_length`: the run's draft length and schedule leave PRISM drafts at their configs' own."""
    from prism_hf import PrismDraftModel
    from prism_hf.benchmarking.suite import build_strategies

    target = make_llama()
    PrismDraftModel.from_target(target, num_draft_tokens=6, num_draft_tokens_schedule="heuristic").save_pretrained(
        tmp_path / "m2"
    )
    run_length = dict(target="tiny", drafts={"m2": str(tmp_path / "m2")}, num_draft_tokens=3, device="cpu")
    run_length["draft_length_schedule"] = "constant"
    for own, kwargs, schedule in ((False, {"num_assistant_tokens": 3}, "constant"), (True, {}, "heuristic")):
        config = BenchmarkConfig(**run_length, draft_own_length=own).resolved()
        strategy = build_strategies(target, config)[1]
        draft = strategy.generate_kwargs.pop("assistant_model")
        assert strategy.generate_kwargs == kwargs and draft.config.num_draft_tokens_schedule == schedule
    with pytest.raises(ValueError, match="draft_own_length keeps the PRISM drafts' own draft lengths: also give"):
        BenchmarkConfig(target="tiny", draft_own_length=True, device="cpu").resolved()


def test_machine_metadata_names_the_source_commit(monkeypatch, tmp_path):
    """Results name the commit that measured them: "+changes" when tracked files differ, None outside a checkout."""

    def git(*args, cwd):
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()

    checkout = tmp_path / "checkout"
    module = checkout / "prism_hf" / "benchmarking" / "report.py"
    module.parent.mkdir(parents=True)
    module.write_text("# measured\n")
    git("init", "-q", cwd=checkout)
    git("add", "-A", cwd=checkout)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c", cwd=checkout)
    commit = git("rev-parse", "HEAD", cwd=checkout)
    monkeypatch.setattr(report, "__file__", str(module))
    assert report.machine_metadata()["prism_hf_commit"] == commit
    module.write_text("# changed since\n")
    assert report.machine_metadata()["prism_hf_commit"] == commit + "+changes"
    # a package inside another repository (say an environment under version control) is not a checkout of its own
    nested = checkout / "site-packages" / "prism_hf" / "benchmarking" / "report.py"
    nested.parent.mkdir(parents=True)
    monkeypatch.setattr(report, "__file__", str(nested))
    assert report.machine_metadata()["prism_hf_commit"] is None
    monkeypatch.setattr(report, "__file__", str(tmp_path / "elsewhere" / "prism_hf" / "benchmarking" / "report.py"))
    assert report.machine_metadata()["prism_hf_commit"] is None
