"""
Generation strategies compared by the benchmark: each is one way of calling the target's `generate`.

A strategy is only a name plus the keyword arguments it adds to a greedy `generate` call, so any drafting method that
plugs into `generate` (HF assisted generation, prompt lookup, PRISM, later Ouroboros) is benchmarked the same way.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, PreTrainedModel

from ..configuration_prism import PrismConfig
from ..modeling_prism import PrismDraftModel
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


def hf_assisted_strategy(
    assistant: str | os.PathLike | PreTrainedModel,
    target: PreTrainedModel,
    num_assistant_tokens: int | None = None,
    name: str | None = None,
) -> Strategy:
    """
    HF assisted generation with a small model sharing the target's tokenizer, loaded (by reference-model name,
    directory or Hub id) in the target's dtype and on its device.
    """
    label = assistant if isinstance(assistant, (str, os.PathLike)) else assistant.name_or_path
    if not isinstance(assistant, PreTrainedModel):
        assistant = AutoModelForCausalLM.from_pretrained(resolve_model(assistant), dtype=target.dtype)
        assistant = assistant.to(target.device).eval()
    kwargs = {} if num_assistant_tokens is None else {"num_assistant_tokens": num_assistant_tokens}
    return assistant_strategy(
        name or f"hf-assisted-{Path(os.fspath(label)).name.lower()}",
        assistant,
        f"HF assisted generation ({label})",
        **kwargs,
    )


def prompt_lookup_strategy(num_tokens: int = 10, max_ngram_size: int = 2, name: str = "hf-prompt-lookup") -> Strategy:
    """HF prompt lookup decoding: drafts by copying the continuation of an n-gram match in the context."""
    return Strategy(
        name,
        {"prompt_lookup_num_tokens": num_tokens, "max_matching_ngram_size": max_ngram_size},
        f"HF prompt lookup ({num_tokens} tokens, {max_ngram_size}-gram)",
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
    name: str, draft_dir: str | os.PathLike, target: PreTrainedModel, num_draft_tokens: int | None = None
) -> Strategy:
    """A saved PRISM draft, cast to the target's dtype and device (`num_draft_tokens`: else the draft config's)."""
    path = check_draft_dir(name, draft_dir)
    draft = PrismDraftModel.from_pretrained(path).to(dtype=target.dtype, device=target.device).eval()
    kwargs = {} if num_draft_tokens is None else {"num_assistant_tokens": num_draft_tokens}
    return assistant_strategy(name, draft, f"PRISM draft {path} (M = {draft.config.num_modules})", **kwargs)


def parse_draft_spec(spec: str) -> tuple[str, str]:
    """`NAME=DIR` as given on the command line."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"A draft is given as NAME=DIR (e.g. prism-m2=hub_models/...), got {spec!r}.")
    if name == PLAIN:
        raise ValueError(f"'{PLAIN}' names the reference run; choose another draft name.")
    return name, path
