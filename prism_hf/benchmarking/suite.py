"""The `prism-hf bench` run: load the target, its prompts and strategies, run them interleaved, write the results."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..configuration_prism import DRAFT_LENGTH_SCHEDULES
from ..cpu_linear import enable_fast_cpu_linears, quantize_cpu_linears_int8
from ..generation_ouroboros import PRISM_DRAFT_OPTIONS, SMALL_LM_OPTIONS
from ..reference_models import load_reference_model, resolve_dtype
from .prompts import load_prompt_sets
from .report import machine_metadata, write_results
from .runner import run_benchmark, sampling_kwargs
from .strategies import (
    Strategy,
    check_draft_dir,
    hf_assisted_strategy,
    load_draft,
    load_small_model,
    ouroboros_strategy,
    plain_strategy,
    prism_strategy,
    prompt_lookup_strategy,
)

logger = logging.getLogger(__name__)

# quick: about 10 minutes for SmolLM2-135M with a few strategies on a 2-core CPU; full: every prompt.
MODES: dict[str, dict[str, Any]] = {
    "quick": {"per_category": 2, "limit": 3, "max_new_tokens": 64},
    "full": {"per_category": None, "limit": None, "max_new_tokens": 256},
}
DEFAULT_RESULTS_ROOT = Path("benchmarks") / "results"
TARGET_QUANTIZATIONS = ("8bit", "4bit")
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def default_output_dir(
    target: str | os.PathLike,
    quantization: str | None = None,
    dispatched: bool = False,
    fast_linears: bool = False,
    temperature: float | None = None,
) -> Path:
    """
    `benchmarks/results/<target name>[-<quantization>][-dispatched][-fast-linears][-temperature-<t>]/`, relative to
    the working directory.
    """
    name = Path(target).name.lower()
    suffixes = [quantization] if quantization else []
    if dispatched:
        suffixes.append("dispatched")
    if fast_linears:
        suffixes.append("fast-linears")
    if temperature is not None:
        suffixes.append(f"temperature-{temperature:g}")
    return DEFAULT_RESULTS_ROOT / "-".join([name, *suffixes])


def parse_device_map(device_map: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    """
    `--target-device-map` as `from_pretrained` takes it: a strategy name (`auto`, `balanced`, `balanced_low_0`,
    `sequential`) or a JSON object / JSON file mapping module names to devices (`"cpu"`, `0`, `"disk"`).
    """
    if device_map is None or isinstance(device_map, dict) or device_map in DEVICE_MAP_STRATEGIES:
        return device_map
    text = device_map
    if not device_map.lstrip().startswith("{"):
        path = Path(device_map)
        if not path.is_file():
            raise ValueError(
                f"Unknown target device map {device_map!r}: use one of {DEVICE_MAP_STRATEGIES}, a JSON object or a "
                "JSON file mapping module names to devices."
            )
        text = path.read_text()
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"The target device map is not valid JSON ({error}).") from None
    if not isinstance(parsed, dict) or not parsed:
        raise ValueError("The target device map must be a non-empty JSON object {module name: device}.")
    return parsed


class _OnceFilter(logging.Filter):
    """Lets each distinct message through once (bitsandbytes logs its 8-bit input cast on every matmul)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def target_quantization_config(quantization: str, dtype: torch.dtype):
    """
    The bitsandbytes config of `--target-quantization`: LLM.int8 (`"8bit"`, default outlier threshold) or NF4
    (`"4bit"`, computing in `dtype`). Non-quantized parameters and the draft stay in `dtype`.
    """
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    raise ValueError(f"Unknown target quantization {quantization!r}; choose from {TARGET_QUANTIZATIONS}.")


@dataclass
class BenchmarkConfig:
    """
    What one benchmark run measures. Unset sizes (`per_category`, `limit`, `max_new_tokens`) come from `mode`.

    Args:
        target (`str`): reference-model name (see `prism_hf.reference_models`), local directory or Hub id.
        drafts (`dict[str, str]`): PRISM drafts, `{name: saved draft directory}`.
        assistant (`str`, *optional*): small same-tokenizer model for HF assisted generation.
        prompt_lookup (`bool`): add HF prompt lookup decoding (10 tokens, 2-gram).
        ouroboros (`bool`): add Ouroboros drafting from the phrase pool alone.
        ouroboros_assistant (`str`, *optional*): add Ouroboros drafting with this small same-tokenizer model.
        ouroboros_prism (`bool`): add Ouroboros with each PRISM draft of `drafts` (the pool leads, PRISM fills the
            gaps; named `ouroboros-<draft name>`, and `ouroboros-<draft name>-int8` with `draft_int8`: the drafts'
            LM heads as `draft_int8` and `float_draft` choose).
        ouroboros_warm (`bool`): also run each Ouroboros strategy with one pool kept across all prompts (warm
            start: prompts come grouped by category), next to the cold one (fresh pool per prompt).
        ouroboros_variants (`list[dict]`): more runs of Ouroboros with `ouroboros_assistant` (each copy of it that
            runs, see `small_model_int8`) and, with `ouroboros_prism`, with each PRISM draft (each head that runs),
            each with these `Ouroboros` options (e.g. `{"small_model_vocab": 32768}`, named
            `ouroboros-<small model>-small_model_vocab32768`; a `num_draft_tokens` or `draft_length_schedule` given
            here replaces the run's). Options of small causal LMs only (`SMALL_LM_OPTIONS`) are refused with
            `ouroboros_prism`, options of PRISM drafts only (`PRISM_DRAFT_OPTIONS`, e.g. `{"pool_rounds": 3}`) with
            `ouroboros_assistant`.
        num_draft_tokens (`int`, *optional*): initial draft length of PRISM drafts, the HF assistant and Ouroboros
            (default: the draft config's; HF's own for the assistant; 8 for Ouroboros).
        draft_length_schedule (`str`, *optional*): `"constant"`, `"heuristic"` or `"heuristic_transient"` for all
            of them (default: each one's own). When either is set, HF assisted generation also runs at
            transformers' defaults (`hf-assisted-<name>-hf-defaults`), next to the run's draft length.
        fast_cpu_linears (`bool`): switch the float32 CPU linear layers of the target and of every draft and small
            model to `FastCpuLinear` (see `prism_hf.cpu_linear`), for every strategy including plain `generate`.
        small_model_int8 (`bool`): also run HF assisted generation (at the run's draft length) and Ouroboros with an
            int8 copy of their small model (`prism_hf.quantize_cpu_linears_int8`), named `...-int8`, next to the
            float ones, so both drafting methods get the cheaper small model.
        draft_int8 (`bool`): also run each PRISM draft of `drafts` with an int8 draft-vocabulary LM head
            (`prism_hf.quantize_cpu_linears_int8`), named `<draft name>-int8`, next to the float one.
        draft_own_length (`bool`): PRISM drafts draft as their configs say (length, schedule, confidence stop),
            whatever `num_draft_tokens` and `draft_length_schedule` set for the HF assistant and Ouroboros: each
            drafting method at its own best length in one run (a PRISM layer costs far less per token than a small
            model, so it pays to draft further).
        float_small_model (`bool`): run HF assisted generation and Ouroboros with the float small model (default);
            `False` with `small_model_int8` runs the int8 copies only (HF at transformers' defaults, which runs with
            the float copy, is then left out).
        float_draft (`bool`): run each PRISM draft with its float LM head (default); `False` with `draft_int8` runs
            the int8-head copies only.
        prompt_sets (`list[str]`): any of `spec_bench`, `humaneval`, `sharegpt-heldout`, `sharegpt-copy`.
        categories (`list[str]`, *optional*): Spec-Bench tasks (or MT-Bench categories) to keep.
        mode (`str`): `"quick"` or `"full"`, see `MODES`.
        per_category (`int`, *optional*): Spec-Bench prompts per task.
        limit (`int`, *optional*): HumanEval and held-out ShareGPT prompts, each.
        max_new_tokens (`int`, *optional*): new tokens per call.
        dtype (`str`): target dtype (a quantized target's compute dtype); drafts and assistants are cast to it.
            `"auto"` (default): bfloat16 where the device runs it natively, else float32 (see `resolve_dtype`).
        target_quantization (`str`, *optional*): load the target with bitsandbytes, `"8bit"` or `"4bit"`.
        target_device_map (`str` or `dict`, *optional*): dispatch the target with accelerate: a strategy (`"auto"`,
            ...), or `{module: device}` (a JSON object or file on the command line); `"disk"` entries are
            offloaded to a temporary folder. Default: the whole target on `device`.
        target_max_memory (`dict[str, str]`, *optional*): per-device budgets for a strategy device map, e.g.
            `{"cpu": "200MB"}` (what does not fit is offloaded to disk).
        device (`str`, *optional*): default CUDA when available, else CPU.
        output_dir (`str`, *optional*): default `benchmarks/results/<target name>/`.
        warmup (`bool`): one short call per strategy before measuring.
        spec_bench_path (`str`, *optional*): a Spec-Bench `question.jsonl` other than the default.
        temperature (`float`, *optional*): sample at this temperature (top-k and top-p off) instead of decoding
            greedily; outputs are then not compared with plain `generate`'s (see `run_benchmark`).
        seed (`int`): the sampling seed of the first prompt (prompt `i` uses `seed + i`, for every strategy).
    """

    target: str
    drafts: dict[str, str] = field(default_factory=dict)
    assistant: str | None = None
    prompt_lookup: bool = False
    ouroboros: bool = False
    ouroboros_assistant: str | None = None
    ouroboros_prism: bool = False
    ouroboros_warm: bool = False
    ouroboros_variants: list[dict[str, Any]] = field(default_factory=list)
    num_draft_tokens: int | None = None
    draft_length_schedule: str | None = None
    fast_cpu_linears: bool = False
    small_model_int8: bool = False
    draft_int8: bool = False
    draft_own_length: bool = False
    float_small_model: bool = True
    float_draft: bool = True
    prompt_sets: list[str] = field(default_factory=lambda: ["spec_bench", "humaneval"])
    categories: list[str] | None = None
    mode: str = "quick"
    per_category: int | None = None
    limit: int | None = None
    max_new_tokens: int | None = None
    dtype: str = "auto"
    target_quantization: str | None = None
    target_device_map: str | dict[str, Any] | None = None
    target_max_memory: dict[str, str] | None = None
    device: str | None = None
    output_dir: str | None = None
    warmup: bool = True
    spec_bench_path: str | None = None
    temperature: float | None = None
    seed: int = 0

    def resolved(self) -> BenchmarkConfig:
        """A copy with the mode's sizes, the device and the output directory filled in."""
        if self.mode not in MODES:
            raise ValueError(f"Unknown mode {self.mode!r}; choose from {sorted(MODES)}.")
        if self.draft_length_schedule not in (None, *DRAFT_LENGTH_SCHEDULES):
            raise ValueError(
                f"Unknown draft length schedule {self.draft_length_schedule!r}; choose from {DRAFT_LENGTH_SCHEDULES}."
            )
        if self.target_quantization not in (None, *TARGET_QUANTIZATIONS):
            raise ValueError(
                f"Unknown target quantization {self.target_quantization!r}; choose from {TARGET_QUANTIZATIONS}."
            )
        if self.small_model_int8 and self.assistant is None and self.ouroboros_assistant is None:
            raise ValueError("small_model_int8 quantizes small models: also set assistant or ouroboros_assistant.")
        sampling_kwargs(self.temperature)  # refuses a temperature that is not positive
        if self.ouroboros_variants and self.ouroboros_assistant is None and not self.ouroboros_prism:
            raise ValueError(
                "ouroboros_variants are more runs of Ouroboros with a drafter: also set ouroboros_assistant or "
                "ouroboros_prism (with drafts)."
            )
        for options in self.ouroboros_variants if self.ouroboros_prism else []:
            small_lm_only = sorted(set(options) & SMALL_LM_OPTIONS)
            if small_lm_only:
                raise ValueError(
                    f"The Ouroboros variant {options} sets {', '.join(small_lm_only)}, which concern a small causal "
                    "LM, not a PRISM draft, and would run with each draft of ouroboros_prism too: benchmark such "
                    "variants in a run without ouroboros_prism."
                )
        for options in self.ouroboros_variants if self.ouroboros_assistant is not None else []:
            prism_only = sorted(set(options) & PRISM_DRAFT_OPTIONS)
            if prism_only:
                raise ValueError(
                    f"The Ouroboros variant {options} sets {', '.join(prism_only)}, which concern a PRISM draft, not "
                    "a small causal LM, and would run with ouroboros_assistant too: benchmark such variants in a run "
                    "without ouroboros_assistant."
                )
        if self.draft_int8 and not self.drafts:
            raise ValueError("draft_int8 quantizes PRISM drafts: also give drafts.")
        if self.draft_own_length and not self.drafts:
            raise ValueError("draft_own_length keeps the PRISM drafts' own draft lengths: also give drafts.")
        if not self.float_draft and not self.draft_int8:
            raise ValueError("float_draft=False leaves out the float-head drafts: set draft_int8 for the int8 ones.")
        if not self.float_small_model and not self.small_model_int8:
            raise ValueError(
                "float_small_model=False leaves out the float small model: set small_model_int8 to run the int8 copy."
            )
        values = {k: v for k, v in MODES[self.mode].items() if getattr(self, k) is None}
        values["device"] = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        values["dtype"] = str(resolve_dtype(self.dtype, values["device"])).removeprefix("torch.")
        values["target_device_map"] = parse_device_map(self.target_device_map)
        if self.target_max_memory is not None and not isinstance(values["target_device_map"], str):
            raise ValueError("target_max_memory budgets a device-map strategy: also set target_device_map='auto'.")
        dispatched = self.target_device_map is not None
        values["output_dir"] = self.output_dir or str(
            default_output_dir(
                self.target, self.target_quantization, dispatched, self.fast_cpu_linears, self.temperature
            )
        )
        return dataclasses.replace(self, **values)


def build_strategies(target, config: BenchmarkConfig) -> list[Strategy]:
    """Plain generate, then the HF assistant, prompt lookup, the PRISM drafts and the Ouroboros strategies."""
    strategies = [plain_strategy()]
    small_models = {}  # one copy of a small model shared by HF assisted generation and Ouroboros
    for name in {config.assistant, config.ouroboros_assistant} - {None}:
        small_models[name] = load_small_model(name, target)
    int8_small_models = {}
    if config.small_model_int8:
        for name, small in small_models.items():
            int8_small_models[name] = copy.deepcopy(small)
            if quantize_cpu_linears_int8(int8_small_models[name]) == 0:
                raise ValueError(
                    f"small_model_int8: the small model {name} has no float32 CPU linear layer to quantize (dtype "
                    f"{small.dtype}, device {small.device}); int8 drafting is for float32 models on the CPU."
                )
    schedule = config.draft_length_schedule
    # (suffix, {name: model}) for each precision of the small models that runs
    copies = [("", small_models)] if config.float_small_model else []
    if config.small_model_int8:
        copies.append(("-int8", int8_small_models))
    if config.assistant is not None:
        name = f"hf-assisted-{Path(config.assistant).name.lower()}"
        for suffix, smalls in copies:
            small = smalls[config.assistant]
            strategies.append(hf_assisted_strategy(small, target, config.num_draft_tokens, name + suffix, schedule))
            if not suffix and (config.num_draft_tokens is not None or schedule is not None):
                strategies.append(hf_assisted_strategy(small, target, name=f"{name}-hf-defaults"))
    if config.prompt_lookup:
        strategies.append(prompt_lookup_strategy())
    # the run's draft length for PRISM drafts too, unless they keep their configs'
    prism_length = (None, None) if config.draft_own_length else (config.num_draft_tokens, schedule)
    heads = ([False] if config.float_draft else []) + ([True] if config.draft_int8 else [])  # int8 LM head or not
    for name, path in config.drafts.items():
        for int8 in heads:
            strategies.append(prism_strategy(name + ("-int8" if int8 else ""), path, target, *prism_length, int8=int8))
    ouroboros = [(None, "pool", {})] if config.ouroboros else []
    if config.ouroboros_assistant is not None:
        label = Path(config.ouroboros_assistant).name.lower()
        for suffix, smalls in copies:
            small = smalls[config.ouroboros_assistant]
            ouroboros.append((small, label + suffix, {}))
            for options in config.ouroboros_variants:
                ouroboros.append((small, _variant_label(label + suffix, options), options))
    if config.ouroboros_prism:  # own copies: a draft carries state across calls (e.g. its heuristic length)
        for name, path in config.drafts.items():
            for int8 in heads:
                label = name + ("-int8" if int8 else "")
                for options in [{}, *config.ouroboros_variants]:
                    draft = load_draft(name, path, target, int8=int8)
                    ouroboros.append((draft, _variant_label(label, options), options))
    for model, label, options in ouroboros:
        for warm in (False, True) if config.ouroboros_warm else (False,):
            name = f"ouroboros-{label}{'-warm' if warm else ''}"
            strategies.append(
                ouroboros_strategy(
                    model,
                    target,
                    warm=warm,
                    name=name,
                    # a variant's draft length and schedule replace the run's
                    **{"num_draft_tokens": config.num_draft_tokens, "draft_length_schedule": schedule, **options},
                )
            )
    return strategies


def _variant_label(label: str, options: dict[str, Any]) -> str:
    """`small-small_model_vocab32768`: the drafter's label, then each option's name and value."""
    return "-".join([label, *(f"{k}{v}" for k, v in options.items())])


def switch_to_fast_cpu_linears(target, strategies: list[Strategy]) -> int:
    """`enable_fast_cpu_linears` on the target and on every model a strategy drafts with; returns the layer count."""
    models = [target]
    for strategy in strategies:
        assistant = strategy.generate_kwargs.get("assistant_model")
        models.append(getattr(assistant, "small_model", assistant))  # Ouroboros holds its small model
    seen, switched = set(), 0
    for model in models:
        if isinstance(model, torch.nn.Module) and id(model) not in seen:
            seen.add(id(model))
            switched += enable_fast_cpu_linears(model)
    logger.info("Fast CPU linears: %d layers switched.", switched)
    return switched


def run_suite(config: BenchmarkConfig, progress: bool = True) -> dict[str, Any]:
    """
    Runs the benchmark `config` describes and writes `results.json`, `results.md` and `results.png` into its
    output directory; returns what `results.json` holds. Prompts and draft directories are checked before the
    target is loaded, so a typo fails in a second rather than after a model load.
    """
    config = config.resolved()
    for name, path in config.drafts.items():
        check_draft_dir(name, path)
    prompt_sets = load_prompt_sets(
        config.prompt_sets, config.categories, config.per_category, config.limit, config.spec_bench_path
    )
    prompts = [p for group in prompt_sets.values() for p in group]

    dtype = getattr(torch, config.dtype)
    load_kwargs = {}
    if config.target_device_map is not None:
        load_kwargs["device_map"] = config.target_device_map
        load_kwargs["offload_folder"] = tempfile.mkdtemp(prefix="prism-hf-offload-")
        if config.target_max_memory is not None:
            load_kwargs["max_memory"] = config.target_max_memory
    if config.target_quantization is not None:
        load_kwargs["quantization_config"] = target_quantization_config(config.target_quantization, dtype)
        load_kwargs.setdefault("device_map", config.device)
        bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
        if not any(isinstance(f, _OnceFilter) for f in bnb_logger.filters):
            bnb_logger.addFilter(_OnceFilter())
    try:
        target, tokenizer = load_reference_model(config.target, dtype=dtype, device=config.device, **load_kwargs)
        strategies = build_strategies(target, config)
        if config.fast_cpu_linears:
            switch_to_fast_cpu_linears(target, strategies)
        records = run_benchmark(
            target,
            prompts,
            strategies[1:],
            config.max_new_tokens,
            tokenizer=tokenizer,
            warmup=config.warmup,
            progress=progress,
            temperature=config.temperature,
            seed=config.seed,
        )
    finally:
        if "offload_folder" in load_kwargs:
            shutil.rmtree(load_kwargs["offload_folder"], ignore_errors=True)
    metadata = {
        "target": config.target,
        "target_path": str(target.name_or_path),
        "dtype": config.dtype,
        "fast_cpu_linears": config.fast_cpu_linears,
        # every strategy's calls (`runner._generate`); changes only multi-token forwards, and only on a CPU
        "grouped_query_attention_on_cpu": target.device.type == "cpu",
        "small_model_int8": config.small_model_int8,
        "draft_int8": config.draft_int8,
        "draft_own_length": config.draft_own_length,
        "float_small_model": config.float_small_model,
        "float_draft": config.float_draft,
        "draft_length_schedule": config.draft_length_schedule,
        "num_draft_tokens": config.num_draft_tokens,
        "target_quantization": config.target_quantization,
        "target_device_map": config.target_device_map,
        # how many modules accelerate placed on each device (e.g. {"cpu": 20, "disk": 12})
        "target_placement": dict(Counter(str(d) for d in (getattr(target, "hf_device_map", None) or {}).values())),
        "machine": machine_metadata(target.device),
        "mode": config.mode,
        "max_new_tokens": config.max_new_tokens,
        "decoding": (
            "greedy"
            if config.temperature is None
            else f"sampling at temperature {config.temperature:g} (top-k and top-p off; prompt i: seed "
            f"{config.seed} + i)"
        )
        + ", batch 1, interleaved (each prompt: plain first, then each strategy), after warm-up",
        "temperature": config.temperature,
        "strategies": [s.metadata() for s in strategies],
        "drafts": dict(config.drafts),  # lets `prism-hf push --benchmark` find a draft's strategy by its path
        "prompt_sets": {name: len(group) for name, group in prompt_sets.items()},
        "categories": dict(Counter(p.category for p in prompts)),
        "per_category": config.per_category,
        "limit": config.limit,
    }
    return write_results(config.output_dir, records, metadata)
