"""Chat data for draft training: conversations rendered with the target's chat template, loss on assistant turns."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


@dataclass
class TrainingExample:
    """
    One rendered conversation: token ids and a mask marking assistant tokens (the ones the draft learns). `mode` is
    how the target wrote the replies of a replies-dataset row ("greedy" or "sampled"), None for conversations
    trained on as written: held-out numbers are also reported per mode, since sampled replies are far harder to draft.
    """

    input_ids: torch.LongTensor
    loss_mask: torch.LongTensor
    mode: str | None = None


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


def cap_reply_loss_mask(loss_mask: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """
    `loss_mask` (`[batch, seq]`, 1 on reply tokens) with only the first `max_tokens` tokens of each reply left in: a
    run of ones is one reply, so every assistant turn of a conversation keeps its own opening. The tokens cut from the
    loss stay in the sequence as context.

    Why: a long greedy reply of a small target drifts into repetition that a draft copies at almost every position,
    so most of a reply's training tokens are easy late ones, while generation of a short reply lives in its opening,
    where the draft is weakest. Scoring openings only also makes an update cheaper (the vocabulary-wide loss is taken
    at fewer positions).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}.")
    mask = loss_mask.to(torch.long)
    counts = mask.cumsum(-1)
    # the running count at the last position outside a reply: subtracting it numbers each reply's tokens from 1
    outside = torch.where(mask == 0, counts, torch.zeros_like(counts))
    position_in_reply = counts - outside.cummax(-1).values
    return (mask.bool() & (position_in_reply <= max_tokens)).to(loss_mask.dtype)


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
