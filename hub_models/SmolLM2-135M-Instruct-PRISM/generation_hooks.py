"""
Routes `generate(assistant_model=...)` to our candidate generators.

transformers has no public argument for a custom candidate generator, but `_assisted_decoding` asks
`self._get_candidate_generator(...)` for one. We wrap that method (and the generation-mode validation) on
`GenerationMixin` once; the wrappers hand over to the original for any assistant that does not implement
`build_candidate_generator`, so plain HF assisted generation is unchanged. The wrappers recognise assistants by
that method rather than by class, so copies of this module loaded through `trust_remote_code` cooperate.

On a CPU, assisted decoding with our assistants also runs under `grouped_query_attention_on_cpu` (see there).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import GenerationMixin
from transformers.generation.configuration_utils import GenerationMode

_HOOK_MARKER = "_prism_hf_hook"
_FORCE_GQA_ENV = "TRANSFORMERS_SDPA_FORCE_GQA"


@contextmanager
def grouped_query_attention_on_cpu(device: torch.device | str) -> Iterator[None]:
    """
    Within the block, transformers' SDPA attention passes grouped key/value heads to torch together with an attention
    mask, on a CPU (elsewhere the block changes nothing).

    With a mask, transformers repeats every key/value head once per query head before calling torch (CUDA's fused
    kernels need that), which copies the whole KV cache in every layer of every forward. Forwards over several new
    tokens always carry a mask (a causal mask offset by the cache), so speculative verification pays that copy and
    one-token decoding does not (docs/cpu-inference.md has measurements). torch's CPU attention takes grouped heads
    with a mask directly and gives bit-identical outputs. The switch is transformers' own
    `TRANSFORMERS_SDPA_FORCE_GQA`, set for the block and restored after it.
    """
    if torch.device(device).type != "cpu":
        yield
        return
    previous = os.environ.get(_FORCE_GQA_ENV)
    os.environ[_FORCE_GQA_ENV] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(_FORCE_GQA_ENV, None)
        else:
            os.environ[_FORCE_GQA_ENV] = previous


def _is_prism_hf_assistant(assistant_model: Any) -> bool:
    return callable(getattr(assistant_model, "build_candidate_generator", None))


def _wrap_get_candidate_generator(original):
    # transformers passes keyword arguments only; anything we do not use is forwarded untouched, so new
    # arguments in later releases reach the original method.
    def _get_candidate_generator(self, *args, **kwargs):
        assistant_model = kwargs.get("assistant_model")
        if args or not _is_prism_hf_assistant(assistant_model):
            return original(self, *args, **kwargs)
        return assistant_model.build_candidate_generator(
            target=self,
            input_ids=kwargs["input_ids"],
            generation_config=kwargs["generation_config"],
            logits_processor=kwargs.get("logits_processor"),
            model_kwargs=kwargs.get("model_kwargs", {}),
        )

    setattr(_get_candidate_generator, _HOOK_MARKER, True)
    return _get_candidate_generator


def _wrap_validate_generation_mode(original):
    def _validate_generation_mode(self, generation_mode, generation_config, generation_mode_kwargs):
        assistant_model = generation_mode_kwargs.get("assistant_model")
        if _is_prism_hf_assistant(assistant_model):
            name = type(assistant_model).__name__
            if generation_mode != GenerationMode.ASSISTED_GENERATION:
                raise ValueError(
                    f"{name} drafts for greedy decoding and sampling only (num_beams=1, no constraints, no "
                    f"contrastive search); this generate call asks for {generation_mode.value}."
                )
            if generation_config.num_return_sequences not in (None, 1):
                raise ValueError(
                    f"{name} supports num_return_sequences=1 only, got {generation_config.num_return_sequences}."
                )
            # transformers picks these drafters before looking at the assistant; ours would silently win instead
            for option in ("prompt_lookup_num_tokens", "assistant_early_exit", "use_mtp"):
                if getattr(generation_config, option, None) not in (None, False):
                    raise ValueError(
                        f"`{option}` and a {name} assistant are two different drafting strategies: pass one of them."
                    )
            if "assistant_tokenizer" in generation_mode_kwargs:
                raise ValueError(
                    f"{name} drafts in the target's own vocabulary; `assistant_tokenizer` (assistants with another "
                    "tokenizer) is not supported."
                )
            # Our assistants check the target themselves, with a clearer message than the vocabulary check below.
            assistant_model.check_target(self)
            generation_mode_kwargs = {k: v for k, v in generation_mode_kwargs.items() if k != "assistant_model"}
        return original(self, generation_mode, generation_config, generation_mode_kwargs)

    setattr(_validate_generation_mode, _HOOK_MARKER, True)
    return _validate_generation_mode


def _wrap_assisted_decoding(original):
    # `functools.wraps` keeps the signature visible: `generate` inspects it for `inputs_tensor`.
    @functools.wraps(original)
    def _assisted_decoding(self, *args, **kwargs):
        if not _is_prism_hf_assistant(kwargs.get("assistant_model")):
            return original(self, *args, **kwargs)
        with grouped_query_attention_on_cpu(self.device):
            return original(self, *args, **kwargs)

    setattr(_assisted_decoding, _HOOK_MARKER, True)
    return _assisted_decoding


def install_generation_hooks() -> None:
    """Installs the routing once per process (idempotent, also across module copies)."""
    for name, wrap in (
        ("_get_candidate_generator", _wrap_get_candidate_generator),
        ("_validate_generation_mode", _wrap_validate_generation_mode),
        ("_assisted_decoding", _wrap_assisted_decoding),
    ):
        current = getattr(GenerationMixin, name)
        if not getattr(current, _HOOK_MARKER, False):
            setattr(GenerationMixin, name, wrap(current))
