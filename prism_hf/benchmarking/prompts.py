"""Benchmark prompt sets (Spec-Bench, HumanEval, held-out ShareGPT) and their tokenization for the target."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from ..prompt_data import (
    MT_BENCH_CATEGORIES,
    SHAREGPT_COPY_TASKS,
    SPEC_BENCH_TASKS,
    Prompt,
    iter_sharegpt,
    iter_sharegpt_tasks,
    load_human_eval,
    load_spec_bench,
)

PROMPT_SETS = ("spec_bench", "humaneval", "sharegpt-heldout", "sharegpt-copy")


@dataclass
class BenchPrompt:
    """A prompt ready for `generate`: 1-D `input_ids`; `category` is what results are grouped by."""

    id: str
    category: str
    input_ids: torch.LongTensor


def sharegpt_heldout_prompts(limit: int | None = None, path: str | os.PathLike | None = None) -> list[Prompt]:
    """First user turns of the held-out ShareGPT split, which `prism-hf train` never trains on."""
    prompts = []
    for index, messages in enumerate(iter_sharegpt(path, split="heldout")):
        if limit is not None and len(prompts) >= limit:
            break
        first = next((m["content"] for m in messages if m["role"] == "user"), None)
        if first:
            prompts.append(Prompt(id=f"sharegpt-heldout/{index}", category="sharegpt", turns=(first,)))
    return prompts


def sharegpt_copy_prompts(limit: int | None = None) -> list[Prompt]:
    """
    Copy-heavy prompts (`SHAREGPT_COPY_TASKS`: repeat, correct, reformat or quote a text) over the held-out ShareGPT
    conversations (one per conversation), category `"copy"`: the target copies from its prompt there, as on
    Spec-Bench's translation, summarization and RAG tasks, and a draft has to copy to keep up with prompt lookup.
    """
    prompts: list[Prompt] = []
    seen: set[str] = set()
    for key, row_id, messages in iter_sharegpt_tasks(SHAREGPT_COPY_TASKS, split="heldout"):
        if limit is not None and len(prompts) >= limit:
            break
        if key in seen:  # the pieces of one long conversation share its key and its task: one prompt each
            continue
        seen.add(key)
        task = row_id.rsplit("/", 1)[1]
        prompts.append(
            Prompt(id=f"sharegpt-copy/{key}", category="copy", turns=(messages[0]["content"],), subcategory=task)
        )
    return prompts


def load_prompt_sets(
    prompt_sets: Iterable[str] = ("spec_bench", "humaneval"),
    categories: Iterable[str] | None = None,
    per_category: int | None = None,
    limit: int | None = None,
    spec_bench_path: str | os.PathLike | None = None,
) -> dict[str, list[Prompt]]:
    """
    Text prompts of each chosen set, in a fixed order.

    Args:
        prompt_sets (`Iterable[str]`): any of `PROMPT_SETS`.
        categories (`Iterable[str]`, *optional*): Spec-Bench tasks or MT-Bench categories to keep (default: all).
        per_category (`int`, *optional*): Spec-Bench prompts per task (default: all 80).
        limit (`int`, *optional*): HumanEval, held-out ShareGPT and copy prompts, each (default: all).
        spec_bench_path (`str`, *optional*): a Spec-Bench `question.jsonl` (default: see `load_spec_bench`).
    """
    prompt_sets = list(dict.fromkeys(prompt_sets))
    unknown = sorted(set(prompt_sets) - set(PROMPT_SETS))
    if unknown or not prompt_sets:
        raise ValueError(f"Unknown or no prompt sets {unknown or prompt_sets}; choose from {list(PROMPT_SETS)}.")
    if categories is not None:
        categories = list(categories)
        known = SPEC_BENCH_TASKS + MT_BENCH_CATEGORIES
        if bad := sorted(set(categories) - set(known)):
            raise ValueError(f"Unknown Spec-Bench categories {bad}; known: {list(known)}.")
        if "spec_bench" not in prompt_sets:
            raise ValueError("Categories select Spec-Bench tasks, but the prompt sets do not include spec_bench.")
    loaded: dict[str, list[Prompt]] = {}
    for name in prompt_sets:
        if name == "spec_bench":
            loaded[name] = [
                Prompt(f"spec_bench/{p.id}", p.category, p.turns, p.subcategory)
                for p in load_spec_bench(spec_bench_path, categories=categories, limit_per_category=per_category)
            ]
        elif name == "humaneval":
            loaded[name] = load_human_eval(limit=limit)
        elif name == "sharegpt-heldout":
            loaded[name] = sharegpt_heldout_prompts(limit)
        else:
            loaded[name] = sharegpt_copy_prompts(limit)
    if not any(loaded.values()):
        raise ValueError(f"The selection (sets {prompt_sets}, categories {categories}) holds no prompt.")
    return loaded


def load_prompts(*args, **kwargs) -> list[Prompt]:
    """`load_prompt_sets`, flattened into one list."""
    return [p for prompts in load_prompt_sets(*args, **kwargs).values() for p in prompts]


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> BenchPrompt:
    """
    The first user turn through the tokenizer's chat template when it has one, else the raw text.

    Instruct models see every prompt, HumanEval's code prompts included, as a chat turn, the way they are used; a base
    model without a template continues the raw text, which is HumanEval's own completion setting.
    """
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt.text}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    else:
        ids = tokenizer(prompt.text)["input_ids"]
    ids = torch.as_tensor(ids, dtype=torch.long)
    return BenchPrompt(prompt.id, prompt.category, ids.reshape(-1))


def encode_prompts(
    prompts: Sequence[Prompt | BenchPrompt], tokenizer: PreTrainedTokenizerBase | None
) -> list[BenchPrompt]:
    """Accepts already tokenized prompts as they are; text prompts need the target's tokenizer."""
    encoded = []
    for prompt in prompts:
        if isinstance(prompt, BenchPrompt):
            encoded.append(prompt)
        elif tokenizer is None:
            raise ValueError(f"Prompt {prompt.id!r} is text: pass the target's tokenizer, or BenchPrompt token ids.")
        else:
            encoded.append(encode_prompt(tokenizer, prompt))
    ids = [p.id for p in encoded]
    if len(set(ids)) != len(ids):
        raise ValueError("Prompt ids must be unique: results are matched to the plain run by id.")
    return encoded
