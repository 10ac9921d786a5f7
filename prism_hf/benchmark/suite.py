"""The `prism-hf bench` suite: reference prompts, the peer strategies, and the results folder."""

from __future__ import annotations

import datetime
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from ..modeling_prism import PrismDraftModel
from ..prompt_data import Prompt, iter_sharegpt, load_human_eval, load_spec_bench
from ..reference_models import load_reference_model, resolve_model
from .report import write_results
from .runner import BenchPrompt, Strategy, run_benchmark


@dataclass
class BenchArguments:
    """What one benchmark run measures. Quick mode: a few prompts per category, 64 new tokens."""

    target: str
    output_dir: str
    drafts: dict[str, str] = field(default_factory=dict)
    assistant: str | None = None
    prompt_lookup: bool = False
    categories: list[str] | None = None
    per_category: int = 2
    humaneval: int = 3
    sharegpt: int = 0
    max_new_tokens: int = 64
    dtype: str = "bfloat16"


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> torch.LongTensor:
    """First user turn through the chat template when the tokenizer has one, else the raw text."""
    if tokenizer.chat_template is not None:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt.turns[0]}],
                                            add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        return torch.tensor(ids)
    return tokenizer(prompt.turns[0], return_tensors="pt")["input_ids"][0]


def heldout_sharegpt_prompts(limit: int) -> list[Prompt]:
    """First user turns of ShareGPT conversations in the held-out split (never used by `prism-hf train`)."""
    prompts = []
    for index, messages in enumerate(iter_sharegpt(split="heldout")):
        first = next((m["content"] for m in messages if m["role"] == "user"), None)
        if first:
            prompts.append(Prompt(id=f"sharegpt-heldout-{index}", category="sharegpt", turns=(first,)))
        if len(prompts) >= limit:
            break
    return prompts


def build_prompts(tokenizer: PreTrainedTokenizerBase, args: BenchArguments) -> list[BenchPrompt]:
    prompts = load_spec_bench(categories=args.categories, limit_per_category=args.per_category)
    if args.humaneval:
        prompts += load_human_eval(limit=args.humaneval)
    if args.sharegpt:
        prompts += heldout_sharegpt_prompts(args.sharegpt)
    return [BenchPrompt(p.id, p.category, render_prompt(tokenizer, p)) for p in prompts]


def build_strategies(target, args: BenchArguments) -> list[Strategy]:
    strategies = []
    if args.assistant is not None:
        assistant = AutoModelForCausalLM.from_pretrained(resolve_model(args.assistant), dtype=target.dtype).eval()
        strategies.append(Strategy(f"hf-assisted ({args.assistant})", {"assistant_model": assistant}))
    if args.prompt_lookup:
        strategies.append(Strategy("hf-prompt-lookup", {"prompt_lookup_num_tokens": 10, "max_matching_ngram_size": 2}))
    for name, path in args.drafts.items():
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"Draft {name!r}: {path} has no config.json (is it a saved PRISM draft?).")
        draft = PrismDraftModel.from_pretrained(path).to(dtype=target.dtype, device=target.device)
        strategies.append(Strategy(name, {"assistant_model": draft}))
    return strategies


def run_suite(args: BenchArguments, progress: bool = True) -> dict[str, Any]:
    target, tokenizer = load_reference_model(args.target, dtype=getattr(torch, args.dtype))
    prompts = build_prompts(tokenizer, args)
    strategies = build_strategies(target, args)
    records = run_benchmark(target, prompts, strategies, args.max_new_tokens, progress=progress)
    metadata = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "target": args.target,
        "dtype": args.dtype,
        "device": str(target.device),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.processor() or ''}",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "prompts": f"{len(prompts)} (Spec-Bench {args.per_category}/category, HumanEval {args.humaneval}, "
        f"held-out ShareGPT {args.sharegpt})",
        "max_new_tokens": args.max_new_tokens,
        "strategies": ["plain"] + [s.name for s in strategies],
        "drafts": args.drafts,
    }
    return write_results(args.output_dir, records, metadata)
