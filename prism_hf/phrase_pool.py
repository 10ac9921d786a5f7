"""
The phrase candidate pool of Ouroboros drafting: short token phrases keyed by the n-gram they followed.

The pool is plain data (token ids in Python tuples), bounded in memory, and saved as JSON so that a pool built on
earlier generations warms up later runs, in this process or another one.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

FORMAT_NAME = "prism_hf.phrase_pool"
FORMAT_VERSION = 1

Phrase = tuple[int, ...]


class PhrasePool:
    """
    Phrase candidates keyed by the last 1..n tokens before them, with a hard bound on memory.

    Every key (an n-gram of token ids) holds an ordered collection of phrases that followed it, newest last; adding a
    phrase again moves it to the newest end. A phrase that extends an existing one replaces it, and a phrase that is
    the beginning of an existing one refreshes that longer phrase instead of being stored, so a key keeps the longest
    known continuation. Lookups use the longest key that matches the context and return its newest phrase.

    Bounds: at most `max_phrases_per_key` phrases per key (the oldest is dropped) and at most `capacity` phrases in
    all; beyond that the least recently used key (added to or looked up with a hit) is evicted with all its
    phrases. A phrase holds at most `phrase_length` tokens and a key at most `max(ngram_sizes)`, so the pool never
    stores more than `capacity * (phrase_length + max(ngram_sizes))` token ids (about 400 bytes of Python objects per
    phrase with the defaults, i.e. roughly 25 MB when full).

    Args:
        capacity (`int`, *optional*, defaults to 65536):
            Maximum number of phrases in the whole pool.
        max_phrases_per_key (`int`, *optional*, defaults to 8):
            Maximum number of phrases kept per key.
        phrase_length (`int`, *optional*, defaults to 6):
            Maximum number of tokens in one phrase; drafts chain phrases to go further.
        ngram_sizes (`Sequence[int]`, *optional*, defaults to `(1, 2, 3)`):
            Key lengths stored for every position; lookups try the longest first.
    """

    def __init__(
        self,
        capacity: int = 65536,
        max_phrases_per_key: int = 8,
        phrase_length: int = 6,
        ngram_sizes: Sequence[int] = (1, 2, 3),
    ):
        ngram_sizes = tuple(sorted({int(n) for n in ngram_sizes}, reverse=True))
        for name, value in (
            ("capacity", capacity),
            ("max_phrases_per_key", max_phrases_per_key),
            ("phrase_length", phrase_length),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PhrasePool: {name} must be a positive integer, got {value!r}.")
        if capacity < max_phrases_per_key:
            raise ValueError(
                f"PhrasePool: capacity ({capacity}) must be at least max_phrases_per_key ({max_phrases_per_key}), or "
                "adding to one full key would evict that key itself."
            )
        if not ngram_sizes or ngram_sizes[-1] < 1:
            raise ValueError(f"PhrasePool: ngram_sizes must be positive integers, got {ngram_sizes!r}.")
        self.capacity = capacity
        self.max_phrases_per_key = max_phrases_per_key
        self.phrase_length = phrase_length
        self.ngram_sizes = ngram_sizes
        # The vocabulary size of the first target the pool drafted for; other vocabularies are refused.
        self.vocab_size: int | None = None
        # key -> {phrase: None}: both orders are "oldest first", the outer one is the LRU order used for eviction.
        self._keys: OrderedDict[Phrase, OrderedDict[Phrase, None]] = OrderedDict()
        self._num_phrases = 0

    # ------------------------------------------------------------------------------------------------- contents

    def __len__(self) -> int:
        """Number of phrases stored."""
        return self._num_phrases

    @property
    def num_keys(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return (
            f"PhrasePool({self._num_phrases} phrases under {len(self._keys)} keys, capacity={self.capacity}, "
            f"max_phrases_per_key={self.max_phrases_per_key}, phrase_length={self.phrase_length}, "
            f"ngram_sizes={self.ngram_sizes})"
        )

    def phrases(self, key: Sequence[int]) -> list[Phrase]:
        """The phrases stored under `key`, oldest first (does not count as a use of the key)."""
        return list(self._keys.get(tuple(key), ()))

    def items(self) -> Iterator[tuple[Phrase, list[Phrase]]]:
        """`(key, phrases)` pairs, least recently used key first, phrases oldest first."""
        for key, bucket in self._keys.items():
            yield key, list(bucket)

    def clear(self) -> None:
        self._keys.clear()
        self._num_phrases = 0

    # ------------------------------------------------------------------------------------------------- filling

    def add(self, key: Sequence[int], phrase: Sequence[int]) -> None:
        """Stores `phrase` (cut to `phrase_length`) as the newest continuation of the n-gram `key`."""
        key, phrase = tuple(key), tuple(phrase[: self.phrase_length])
        if not key or not phrase:
            return
        bucket = self._keys.get(key)
        if bucket is None:
            bucket = self._keys[key] = OrderedDict()
        else:
            self._keys.move_to_end(key)
        if phrase in bucket:
            bucket.move_to_end(phrase)
            return
        for existing in bucket:
            if len(existing) > len(phrase) and existing[: len(phrase)] == phrase:
                bucket.move_to_end(existing)  # known longer continuation: keep it, it is now the newest
                return
            if len(existing) < len(phrase) and phrase[: len(existing)] == existing:
                del bucket[existing]  # the new phrase extends it (at most one stored phrase can be its prefix here)
                self._num_phrases -= 1
                break
        bucket[phrase] = None
        self._num_phrases += 1
        if len(bucket) > self.max_phrases_per_key:
            bucket.popitem(last=False)
            self._num_phrases -= 1
        while self._num_phrases > self.capacity:
            _, evicted = self._keys.popitem(last=False)
            self._num_phrases -= len(evicted)

    def add_after(self, context: Sequence[int], phrase: Sequence[int]) -> None:
        """Stores `phrase` under every key length: the n-grams ending the token sequence `context`."""
        for n in self.ngram_sizes:
            if len(context) >= n:
                self.add(context[len(context) - n :], phrase)

    def add_corrections(
        self, context: Sequence[int], draft: Sequence[int], num_accepted: int, predictions: Sequence[int]
    ) -> None:
        """
        Learns from one verification that rejected `draft[num_accepted]`: `predictions[j]` is the target's own token
        after `context + draft[: num_accepted + 1 + j]`. Each of them starts a phrase keyed by that (rejected)
        context, extended with the next predictions while the draft kept agreeing with them, so a draft that drifts
        the same way later is corrected.
        """
        drafted = len(draft)
        for i in range(num_accepted + 1, drafted + 1):
            phrase = [predictions[i - num_accepted - 1]]
            j = i
            while j < drafted and draft[j] == phrase[-1] and len(phrase) < self.phrase_length:
                j += 1
                phrase.append(predictions[j - num_accepted - 1])
            self.add_after((list(context) + list(draft[:i]))[-self.ngram_sizes[0] :], phrase)

    def add_text(self, tokens: Sequence[int], start: int = 0) -> None:
        """
        Adds the phrases of the token sequence `tokens` whose window changed since it was `start` tokens long: call
        it with the whole sequence and the previous length after new tokens arrive (`start=0` for a new text).
        """
        first = max(0, start - self.phrase_length)
        offset = max(0, first + 1 - self.ngram_sizes[0])
        tokens = list(tokens[offset:])  # only the part whose phrases change
        for end in range(first + 1 - offset, len(tokens)):  # key ends before `end`, the phrase starts at `end`
            self.add_after(tokens[max(0, end - self.ngram_sizes[0]) : end], tokens[end : end + self.phrase_length])

    # ------------------------------------------------------------------------------------------------- drafting

    def lookup(self, context: Sequence[int], min_key_length: int = 1) -> Phrase:
        """The newest phrase under the longest key ending `context` (of at least `min_key_length` tokens), or `()`."""
        for n in self.ngram_sizes:
            if len(context) < n or n < min_key_length:
                continue
            key = tuple(context[len(context) - n :])
            bucket = self._keys.get(key)
            if bucket:
                self._keys.move_to_end(key)
                return next(reversed(bucket))
        return ()

    def draft(self, context: Sequence[int], max_tokens: int, min_key_length: int = 1) -> list[int]:
        """Up to `max_tokens` tokens continuing `context`, phrase after phrase (each lookup sees the previous one)."""
        drafted: list[int] = []
        tail = list(context[len(context) - self.ngram_sizes[0] :])
        while len(drafted) < max_tokens:
            phrase = self.lookup(tail, min_key_length)
            if not phrase:
                break
            phrase = phrase[: max_tokens - len(drafted)]
            drafted.extend(phrase)
            tail = (tail + list(phrase))[-self.ngram_sizes[0] :]
        return drafted

    # ------------------------------------------------------------------------------------------------- targets

    def bind_vocab_size(self, vocab_size: int) -> None:
        """Records the target vocabulary the pool drafts for; a pool of another vocabulary is refused."""
        if self.vocab_size is not None and self.vocab_size != vocab_size:
            raise ValueError(
                f"This phrase pool was built for a vocabulary of {self.vocab_size} tokens, but the target has "
                f"{vocab_size}: its token ids mean other words there. Use a fresh PhrasePool for this target."
            )
        self.vocab_size = vocab_size

    # ------------------------------------------------------------------------------------------------- files

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data: settings and entries (least recently used key first, phrases oldest first)."""
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "capacity": self.capacity,
            "max_phrases_per_key": self.max_phrases_per_key,
            "phrase_length": self.phrase_length,
            "ngram_sizes": list(self.ngram_sizes),
            "vocab_size": self.vocab_size,
            "entries": [[list(key), [list(p) for p in bucket]] for key, bucket in self._keys.items()],
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "the data") -> PhrasePool:
        """Rebuilds a pool from `to_dict` output, checking every field (a `ValueError` names the first problem)."""

        def fail(problem: str) -> ValueError:
            return ValueError(f"{source} is not a valid prism_hf phrase pool: {problem}.")

        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise fail(f'expected a JSON object with "format": "{FORMAT_NAME}"')
        if data.get("version") != FORMAT_VERSION:
            version = data.get("version")
            raise fail(f"format version {version!r} is not supported (this version reads {FORMAT_VERSION})")
        try:
            pool = cls(
                capacity=data["capacity"],
                max_phrases_per_key=data["max_phrases_per_key"],
                phrase_length=data["phrase_length"],
                ngram_sizes=data["ngram_sizes"],
            )
        except (KeyError, TypeError, ValueError) as error:
            raise fail(f"bad settings ({type(error).__name__}: {error})") from None
        vocab_size = data.get("vocab_size")
        if vocab_size is not None and (not _is_int(vocab_size) or vocab_size < 1):
            raise fail(f"vocab_size must be a positive integer or null, got {vocab_size!r}")
        pool.vocab_size = vocab_size
        entries = data.get("entries")
        if not isinstance(entries, list):
            raise fail('"entries" must be a list')
        limit = vocab_size if vocab_size is not None else float("inf")
        for index, entry in enumerate(entries):
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], list)):
                raise fail(f"entry {index} is not a [key, [phrases...]] pair")
            key, phrases = entry
            if not _is_token_list(key, limit) or len(key) not in pool.ngram_sizes:
                raise fail(f"entry {index} has a bad key {key!r} (token ids, length in {list(pool.ngram_sizes)})")
            for phrase in phrases:
                if not _is_token_list(phrase, limit) or len(phrase) > pool.phrase_length:
                    raise fail(f"entry {index} has a bad phrase {phrase!r}")
                pool.add(key, phrase)
        return pool

    def save(self, path: str | os.PathLike) -> None:
        """Writes the pool as JSON (plain data, never pickle)."""
        Path(path).write_text(json.dumps(self.to_dict(), separators=(",", ":")))

    @classmethod
    def load(cls, path: str | os.PathLike) -> PhrasePool:
        """Reads a pool written by `save`; a missing, corrupt or foreign file raises an error naming the file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Phrase pool file {path} does not exist.")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not a valid prism_hf phrase pool: not JSON ({error}).") from None
        return cls.from_dict(data, source=str(path))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_token_list(value: Any, limit: float) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(_is_int(t) and 0 <= t < limit for t in value)
