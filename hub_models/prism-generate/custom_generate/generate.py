"""
Speculative decoding for any transformers causal LM through `generate(custom_generate=..., trust_remote_code=True)`.

transformers calls `generate(model, **every_generate_argument)` below. With `prism_draft=` it loads the PRISM draft (a
Hub repo id or a local folder; the draft's own code comes with it through `trust_remote_code`, so only transformers
needs to be installed) and runs the model's usual `generate` with the draft as `assistant_model`: importing the
draft's code routes that to the PRISM candidate generator. Greedy output is exactly plain `generate`'s; sampling keeps
its distribution. `ouroboros_pool=` does the same with prism_hf's Ouroboros phrase-pool drafting, which needs
`pip install prism-hf`.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import AutoModel, AutoModelForCausalLM

# transformers also hands over the arguments that chose this repository's revision and cache. They are not generation
# arguments; the cache and credentials apply to the draft too, the revision only to this repository.
_HUB_LOADING_KWARGS = ("cache_dir", "token", "local_files_only", "force_download", "proxies")
_THIS_REPO_KWARGS = ("revision", "subfolder", "repo_type")
# loaded drafts are kept on the target, so repeated calls do not reload them
_DRAFTS_ATTRIBUTE = "_prism_generate_drafts"


def generate(
    model: Any,
    prism_draft: Any = None,
    prism_draft_revision: str | None = None,
    ouroboros_pool: Any = None,
    ouroboros_small_model: Any = None,
    **kwargs: Any,
):
    """
    Args:
        prism_draft (`str`, `os.PathLike` or a loaded draft):
            A PRISM draft made for `model`: Hub repo id, local folder, or a draft model already loaded.
        prism_draft_revision (`str`, *optional*):
            Branch, tag or commit id of the draft repository (`revision=` pins this `custom_generate` repository).
        ouroboros_pool (`PhrasePool`, `str`, `os.PathLike` or `True`):
            Ouroboros drafting instead: a `prism_hf.PhrasePool`, the path of a saved one, or `True` for an empty
            pool. Needs prism_hf installed.
        ouroboros_small_model (`str` or a model, *optional*):
            The small model Ouroboros drafts with (by default, the pool alone).
        kwargs:
            Every other `generate` argument, used as by `model.generate`.
    """
    loading = {key: kwargs.pop(key) for key in _HUB_LOADING_KWARGS if key in kwargs}
    for key in _THIS_REPO_KWARGS:
        kwargs.pop(key, None)
    if kwargs.get("assistant_model") is not None:
        raise ValueError(
            "This custom_generate sets `assistant_model` itself: pass prism_draft=... or ouroboros_pool=... instead."
        )
    if (prism_draft is None) == (ouroboros_pool is None):
        raise ValueError(
            "Pass exactly one drafting method: prism_draft='org/draft' (a PRISM draft repo, folder or model) or "
            "ouroboros_pool=... (an Ouroboros phrase pool)."
        )
    if prism_draft is not None:
        kwargs["assistant_model"] = _prism_draft(model, prism_draft, prism_draft_revision, loading)
    else:
        kwargs["assistant_model"] = _ouroboros(model, ouroboros_pool, ouroboros_small_model, loading)
    # the class's `generate`: on the instance, `generate` may be this very function (bound by `from_pretrained`)
    return type(model).generate(model, **kwargs)


def _prism_draft(model: Any, draft: Any, revision: str | None, loading: dict[str, Any]) -> Any:
    if not isinstance(draft, (str, os.PathLike)):
        return draft
    key = (os.fspath(draft), revision, str(model.device), str(model.dtype))
    drafts = model.__dict__.setdefault(_DRAFTS_ATTRIBUTE, {})
    if key not in drafts:
        loaded = AutoModel.from_pretrained(os.fspath(draft), trust_remote_code=True, revision=revision, **loading)
        if not callable(getattr(loaded, "build_candidate_generator", None)):
            raise ValueError(f"{os.fspath(draft)!r} is not a PRISM draft: it loads as {type(loaded).__name__}.")
        drafts[key] = loaded.to(device=model.device, dtype=model.dtype).eval()
    return drafts[key]


def _ouroboros(model: Any, pool: Any, small_model: Any, loading: dict[str, Any]) -> Any:
    try:
        import prism_hf
    except ImportError:
        prism_hf = None
    if prism_hf is None or not hasattr(prism_hf, "Ouroboros"):
        raise NotImplementedError(
            "Ouroboros drafting runs prism_hf.Ouroboros, which this environment does not have: install a prism-hf "
            "release with Ouroboros (`pip install -U prism-hf`). PRISM drafting (prism_draft=...) needs only "
            "transformers."
        )
    if pool is True:
        pool = prism_hf.PhrasePool()
    elif isinstance(pool, (str, os.PathLike)):
        pool = prism_hf.PhrasePool.load(pool)
    if isinstance(small_model, (str, os.PathLike)):
        small_model = AutoModelForCausalLM.from_pretrained(os.fspath(small_model), dtype=model.dtype, **loading)
        small_model = small_model.to(model.device).eval()
    return prism_hf.Ouroboros(small_model=small_model, pool=pool)
