"""Chat data for draft training: conversations rendered with the target's chat template, loss on assistant turns."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase


@dataclass
class TrainingExample:
    """One rendered conversation: token ids and a mask marking assistant tokens (the ones the draft learns)."""

    input_ids: torch.LongTensor
    loss_mask: torch.LongTensor


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool):
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def render_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], max_length: int
) -> TrainingExample | None:
    """
    Renders `messages` (`{"role", "content"}` dicts) with the chat template and masks in the assistant turns.
    Each assistant span is found by rendering the conversation up to it with and without the turn, which works
    for any template whose rendering of a prefix is a prefix of the full rendering. Returns `None` when no
    assistant token survives truncation to `max_length`.
    """
    if tokenizer.chat_template is None:
        raise ValueError("The target's tokenizer has no chat template; render plain text with `render_text` instead.")
    full = _render(tokenizer, messages, add_generation_prompt=False)[:max_length]
    mask = [0] * len(full)
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:turn], add_generation_prompt=True))
        end = len(_render(tokenizer, messages[: turn + 1], add_generation_prompt=False))
        for position in range(start, min(end, len(full))):
            mask[position] = 1
        if start >= len(full):
            break
    if not any(mask):
        return None
    return TrainingExample(torch.tensor(full), torch.tensor(mask))


def render_text(tokenizer: PreTrainedTokenizerBase, text: str, max_length: int) -> TrainingExample:
    """A plain-text example (for base models without a chat template): every token counts."""
    ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
    return TrainingExample(torch.tensor(ids), torch.ones(len(ids), dtype=torch.long))


def build_examples(
    tokenizer: PreTrainedTokenizerBase,
    conversations: Iterable[list[dict[str, str]]],
    num_examples: int,
    max_length: int,
    min_length: int = 16,
) -> list[TrainingExample]:
    """Renders conversations until `num_examples` usable examples (at least `min_length` tokens) are collected."""
    examples: list[TrainingExample] = []
    for messages in conversations:
        example = render_conversation(tokenizer, messages, max_length)
        if example is not None and len(example.input_ids) >= min_length:
            examples.append(example)
            if len(examples) >= num_examples:
                break
    return examples


def select_draft_vocabulary(
    examples: Iterable[TrainingExample], size: int, vocab_size: int, always_include: Iterable[int] = ()
) -> torch.LongTensor:
    """
    The `size` target tokens the draft may propose: the most frequent in the training targets, plus
    `always_include` (e.g. EOS ids). Returned sorted, as stored in `draft_to_target`.
    """
    if size > vocab_size:
        raise ValueError(f"draft vocabulary size {size} exceeds the target vocabulary ({vocab_size}).")
    counts: Counter[int] = Counter()
    for example in examples:
        counts.update(example.input_ids[example.loss_mask.bool()].tolist())
    chosen = {int(t) for t in always_include if 0 <= int(t) < vocab_size}
    for token, _ in counts.most_common():
        if len(chosen) >= size:
            break
        chosen.add(token)
    filler = iter(range(vocab_size))
    while len(chosen) < size:  # tiny corpora: pad with the lowest unused ids so the size matches the config
        chosen.add(next(filler))
    return torch.tensor(sorted(chosen), dtype=torch.long)


@torch.no_grad()
def regenerate_responses(
    target: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Iterable[list[dict[str, str]]],
    num_conversations: int,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    max_prompt_length: int = 256,
    progress: bool = True,
    cache_path: str | Path | None = None,
    shard: tuple[int, int] = (0, 1),
) -> list[list[dict[str, str]]]:
    """
    Self-distillation data: the target answers the first user turn of each conversation itself (greedy,
    batched with left padding; prompts longer than `max_prompt_length` tokens are skipped). A draft trained on the
    target's own replies learns the text it will actually verify, which matters most for small targets whose
    style differs from the dataset's answers.

    With `cache_path`, finished conversations are appended to that JSONL file batch by batch: an interrupted run, or a
    second run on the same data (e.g. the M = 1 baseline), continues from it instead of generating again.
    `shard=(index, count)` answers only prompts `index::count` of the length-sorted list (one process's share).
    """
    from tqdm.auto import tqdm

    prompts: list[list[dict[str, str]]] = []
    lengths: list[int] = []
    for messages in conversations:
        head = [m for m in messages[:2] if m["role"] == "system"] + [next(m for m in messages if m["role"] == "user")]
        length = len(_render(tokenizer, head, add_generation_prompt=True))
        if length > max_prompt_length:  # long prompts would dominate the batched generation time
            continue
        prompts.append(head)
        lengths.append(length)
        if len(prompts) >= num_conversations:
            break
    # similar lengths in one batch waste less compute on padding
    prompts = [prompts[i] for i in sorted(range(len(prompts)), key=lengths.__getitem__)]
    index, count = shard
    prompts = prompts[index::count]
    results = _load_cached_replies(cache_path, prompts) if cache_path is not None else []
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        starts = range(len(results), len(prompts), batch_size)
        for start in tqdm(starts, desc="target replies", disable=not progress):
            batch = prompts[start : start + batch_size]
            texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in batch]
            inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(target.device)
            output = target.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
            replies = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            finished = [p + [{"role": "assistant", "content": r.strip()}] for p, r in zip(batch, replies, strict=True)]
            results.extend(finished)
            if cache_path is not None:
                with Path(cache_path).open("a", encoding="utf-8") as handle:
                    handle.writelines(json.dumps({"messages": m}) + "\n" for m in finished)
    finally:
        tokenizer.padding_side = padding_side
    return results


def _load_cached_replies(path: str | Path, prompts: list[list[dict[str, str]]]) -> list[list[dict[str, str]]]:
    """The conversations already in `path`, checked against the prompts they must answer, in order."""
    path = Path(path)
    if not path.exists():
        return []
    cached = [json.loads(line)["messages"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(cached) > len(prompts) or any(c[:-1] != p for c, p in zip(cached, prompts[: len(cached)], strict=True)):
        raise ValueError(
            f"Cached replies in {path} were generated for other prompts (different data, --num-examples or "
            "tokenizer): use another --feature-cache-dir."
        )
    return cached
