"""
Generation strategies compared by the benchmark: each is one way of calling the target's `generate`.

A strategy is only a name plus the keyword arguments it adds to a greedy `generate` call, so any drafting method that
plugs into `generate` (HF assisted generation, prompt lookup, PRISM, Ouroboros) is benchmarked the same way.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, PreTrainedModel

from ..configuration_prism import PrismConfig
from ..cpu_linear import quantize_cpu_linears_int8
from ..generation_ouroboros import Ouroboros, _is_prism_draft
from ..modeling_prism import PrismDraftModel
from ..phrase_pool import PhrasePool
from ..reference_models import resolve_model

PLAIN = "plain"


@dataclass
class Strategy:
    """
    A named way of calling `generate`.

    Args:
        name (`str`):
            Label in the results (unique within a run; `"plain"` is the reference run).
        generate_kwargs (`dict[str, Any]`):
            Extra keyword arguments of `generate`, e.g. `{"assistant_model": draft}`. They override the runner's own
            (`do_sample=False`, `max_new_tokens`), so a strategy that changes those is caught as non-identical.
        description (`str`):
            One line for the results metadata.
    """

    name: str
    generate_kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def metadata(self) -> dict[str, Any]:
        """JSON-safe summary: models are named by class and `name_or_path`, never serialized."""
        kwargs = {}
        for key, value in self.generate_kwargs.items():
            if isinstance(value, (str, int, float, bool)) or value is None:
                kwargs[key] = value
            else:
                source = getattr(value, "name_or_path", "")
                kwargs[key] = f"{type(value).__name__}({source})" if source else type(value).__name__
        return {"name": self.name, "description": self.description, "generate_kwargs": kwargs}


def plain_strategy() -> Strategy:
    """Plain greedy `generate`: the speed and output reference of every run."""
    return Strategy(PLAIN, {}, "plain generate (reference)")


def assistant_strategy(name: str, assistant: Any, description: str = "", **generate_kwargs: Any) -> Strategy:
    """
    Any object `generate` accepts as `assistant_model`: an HF model, a PRISM draft, or a future assistant such as an
    Ouroboros phrase-pool drafter (anything implementing `build_candidate_generator`, see `generation_hooks`).
    """
    return Strategy(name, {"assistant_model": assistant, **generate_kwargs}, description or type(assistant).__name__)


def load_small_model(name: str | os.PathLike, target: PreTrainedModel) -> PreTrainedModel:
    """A same-tokenizer causal LM (reference-model name, directory or Hub id) in the target's dtype and device."""
    model = AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=target.dtype)
    return model.to(target.device).eval()


def hf_assisted_strategy(
    assistant: str | os.PathLike | PreTrainedModel,
    target: PreTrainedModel,
    num_assistant_tokens: int | None = None,
    name: str | None = None,
    num_assistant_tokens_schedule: str | None = None,
) -> Strategy:
    """
    HF assisted generation with a small model sharing the target's tokenizer, loaded (by reference-model name,
    directory or Hub id) in the target's dtype and on its device.

    transformers reads the draft length from the assistant's own `generation_config` (a `num_assistant_tokens`
    passed to `generate` is ignored), so a draft length given here goes to a shallow copy of the assistant that
    shares its weights; unset values keep transformers' defaults (20 tokens, constant, adaptive confidence stop).
    """
    label = assistant if isinstance(assistant, (str, os.PathLike)) else assistant.name_or_path
    if not isinstance(assistant, PreTrainedModel):
        assistant = load_small_model(assistant, target)
    if num_assistant_tokens is not None or num_assistant_tokens_schedule is not None:
        assistant = copy.copy(assistant)  # own generation_config, shared modules and weights
        assistant.generation_config = copy.deepcopy(assistant.generation_config)
        if num_assistant_tokens is not None:
            assistant.generation_config.num_assistant_tokens = num_assistant_tokens
        if num_assistant_tokens_schedule is not None:
            assistant.generation_config.num_assistant_tokens_schedule = num_assistant_tokens_schedule
    length = assistant.generation_config.num_assistant_tokens or "default"
    schedule = assistant.generation_config.num_assistant_tokens_schedule or "default"
    return assistant_strategy(
        name or f"hf-assisted-{Path(os.fspath(label)).name.lower()}",
        assistant,
        f"HF assisted generation ({label}, {length} draft tokens, {schedule} schedule)",
    )


def prompt_lookup_strategy(num_tokens: int = 10, max_ngram_size: int = 2, name: str = "hf-prompt-lookup") -> Strategy:
    """HF prompt lookup decoding: drafts by copying the continuation of an n-gram match in the context."""
    return Strategy(
        name,
        {"prompt_lookup_num_tokens": num_tokens, "max_matching_ngram_size": max_ngram_size},
        f"HF prompt lookup ({num_tokens} tokens, {max_ngram_size}-gram)",
    )


class _ColdOuroboros(Ouroboros):
    """Ouroboros that forgets its pool at every call: it drafts from the prompt and the call's own text only."""

    def build_candidate_generator(self, **kwargs: Any):
        self.pool.clear()
        return super().build_candidate_generator(**kwargs)


def ouroboros_strategy(
    small_model: str | os.PathLike | PreTrainedModel | None = None,
    target: PreTrainedModel | None = None,
    warm: bool = False,
    pool: PhrasePool | None = None,
    num_draft_tokens: int | None = None,
    name: str | None = None,
    draft_length_schedule: str | None = None,
    **options: Any,
) -> Strategy:
    """
    Ouroboros phrase-pool drafting, with a small same-tokenizer model (name, directory, Hub id or model; names are
    loaded in the target's dtype and device) or from the pool alone (`small_model=None`).

    Cold (default), the pool is emptied before every call. `warm=True` keeps one pool across all calls of the run
    (starting from `pool` when given): prompts come grouped by category, so each prompt drafts from the earlier
    prompts of its category too, the paper's warm-start ("second pass") setting. `num_draft_tokens` and
    `draft_length_schedule` default to `Ouroboros`'s;
    `options` are more `Ouroboros` arguments (e.g. `small_model_vocab=32768`).
    """
    label = "pool"
    if small_model is not None:
        if not isinstance(small_model, PreTrainedModel):
            if target is None:
                raise ValueError("ouroboros_strategy needs the target to load a small model by name.")
            label = Path(os.fspath(small_model)).name.lower()
            small_model = load_small_model(small_model, target)
        else:
            label = Path(small_model.name_or_path or "small").name.lower()
            if _is_prism_draft(small_model):
                label = f"prism-{label}"
    kwargs = dict(options)
    if num_draft_tokens is not None:
        kwargs["num_draft_tokens"] = num_draft_tokens
    if draft_length_schedule is not None:
        kwargs["draft_length_schedule"] = draft_length_schedule
    assistant = (Ouroboros if warm else _ColdOuroboros)(small_model, pool=pool, **kwargs)
    temperature = "warm pool across calls" if warm else "fresh pool per call"
    drafter = "pool only" if small_model is None else f"small model {label} + pool"
    if options:
        drafter += ", " + ", ".join(f"{k}={v!r}" for k, v in options.items())
    return assistant_strategy(
        name or f"ouroboros-{label}{'-warm' if warm else ''}", assistant, f"Ouroboros ({drafter}, {temperature})"
    )


def check_draft_dir(name: str, path: str | os.PathLike) -> Path:
    """Fails early, before any model is loaded, on a draft directory that cannot hold a saved PRISM draft."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"Draft {name!r}: directory {path} does not exist.")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"Draft {name!r}: {path} has no config.json (is it a saved PRISM draft?).")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type != PrismConfig.model_type:
        raise ValueError(
            f"Draft {name!r}: {config_file} has model_type {model_type!r}, expected {PrismConfig.model_type!r}. "
            "Pass small standalone models with --assistant instead."
        )
    return path


def prism_strategy(
    name: str,
    draft_dir: str | os.PathLike,
    target: PreTrainedModel,
    num_draft_tokens: int | None = None,
    draft_length_schedule: str | None = None,
    int8: bool = False,
) -> Strategy:
    """
    A saved PRISM draft, cast to the target's dtype and device (`num_draft_tokens`, `draft_length_schedule`: else
    the draft config's); `int8` drafts with an int8 draft-vocabulary LM head (`quantize_cpu_linears_int8`).
    """
    draft = load_draft(name, draft_dir, target, int8=int8)
    if draft_length_schedule is not None:
        draft.config.num_draft_tokens_schedule = draft_length_schedule
    kwargs = {} if num_draft_tokens is None else {"num_assistant_tokens": num_draft_tokens}
    description = f"PRISM draft {draft_dir} (M = {draft.config.num_modules}{', int8' if int8 else ''})"
    return assistant_strategy(name, draft, description, **kwargs)


def load_draft(
    name: str, draft_dir: str | os.PathLike, target: PreTrainedModel, int8: bool = False
) -> PrismDraftModel:
    """
    A saved PRISM draft (checked like `check_draft_dir`), cast to the target's dtype and device; `int8` drafts with
    an int8 draft-vocabulary LM head (`quantize_cpu_linears_int8`).
    """
    path = check_draft_dir(name, draft_dir)
    draft = PrismDraftModel.from_pretrained(path).to(dtype=target.dtype, device=target.device).eval()
    if int8 and quantize_cpu_linears_int8(draft) == 0:
        raise ValueError(
            f"The int8 copy of draft {name!r} has no LM head to quantize: int8 drafting is for float32 drafts on "
            f"the CPU with a reduced draft vocabulary (this one: {draft.dtype} on {draft.device}, draft_vocab_size "
            f"{draft.config.draft_vocab_size})."
        )
    return draft


def parse_draft_spec(spec: str) -> tuple[str, str]:
    """`NAME=DIR` as given on the command line."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"A draft is given as NAME=DIR (e.g. prism-m2=hub_models/...), got {spec!r}.")
    if name == PLAIN:
        raise ValueError(f"'{PLAIN}' names the reference run; choose another draft name.")
    return name, path
