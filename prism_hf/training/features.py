"""Target features computed once per example, held in memory and optionally cached on disk as safetensors shards."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .data import TrainingExample
from .recipe import TargetFeatures, compute_target_features


class FeatureStore:
    """
    Verifier features of a list of examples. With `cache_dir`, each shard of `shard_size` examples is written as a
    safetensors file as soon as it is computed, so an interrupted run resumes where it stopped.
    """

    def __init__(self, features: list[TargetFeatures], computed_tokens: int | None = None):
        self.features = features
        # how many of the tokens were computed by the target when the store was built (the rest came from the cache)
        self.computed_tokens = self.num_tokens if computed_tokens is None else computed_tokens

    def __len__(self) -> int:
        return len(self.features)

    @classmethod
    def build(
        cls,
        target: torch.nn.Module,
        examples: list[TrainingExample],
        feature_layers: list[int],
        cache_dir: str | Path | None = None,
        shard_size: int = 64,
        storage_dtype: torch.dtype = torch.bfloat16,
        progress: bool = True,
        name: str = "shard",
    ) -> FeatureStore:
        """Features of `examples`, cached (see [`build_sharded`]) in shards of `shard_size` examples."""
        shards = [
            (f"{name}-{start // shard_size:05d}", examples[start : start + shard_size])
            for start in range(0, len(examples), shard_size)
        ]
        return cls.build_sharded(
            target, shards, feature_layers, cache_dir=cache_dir, storage_dtype=storage_dtype, progress=progress
        )

    @classmethod
    @torch.no_grad()
    def build_sharded(
        cls,
        target: torch.nn.Module,
        shards: Sequence[tuple[str, list[TrainingExample]]],
        feature_layers: list[int],
        cache_dir: str | Path | None = None,
        max_batch_tokens: int = 8192,
        storage_dtype: torch.dtype = torch.bfloat16,
        progress: bool = True,
    ) -> FeatureStore:
        """
        Features of named shards of examples (e.g. one per replies-dataset shard and split), computed in batches of
        similar-length sequences. With `cache_dir`, shard `name` is kept as `<name>-<digest>.safetensors`, where the
        digest covers its examples and the feature layers: an existing file is read instead of computed, so a run over
        more shards computes only the new ones, and other data, `max_length` or layers never reuse (or overwrite) a
        file computed from something else. A file is found by its digest whatever its name, so a dataset's features
        are reused whichever place it takes among a run's sources. The target itself is the cache folder's business:
        one folder per target.
        """
        cache = Path(cache_dir) if cache_dir is not None else None
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
        features: list[TargetFeatures] = []
        computed_tokens = 0
        bar = tqdm(
            total=sum(len(e.input_ids) for _, examples in shards for e in examples),
            desc="target features",
            unit="tok",
            unit_scale=True,
            disable=not progress,
        )
        for name, examples in shards:
            digest = _examples_digest(examples, feature_layers)
            path = cache / f"{name}-{digest[:16]}.safetensors" if cache is not None else None
            if path is not None and not path.exists():
                # the same examples under another name (e.g. a replies dataset given as --more-data here, as --data
                # in the run that cached it): the digest, not the name, says what a file holds
                path = next(iter(sorted(cache.glob(f"*-{digest[:16]}.safetensors"))), path)
            if path is not None and path.exists():
                stored = _load_shard(path, len(feature_layers), expected_digest=digest)
                if stored is not None:
                    features.extend(stored)
                    bar.update(sum(len(e.input_ids) for e in examples))
                    continue
            computed = compute_features_batched(
                target, examples, feature_layers, max_batch_tokens, storage_dtype, on_batch=bar.update
            )
            if path is not None:
                _save_shard(path, computed, digest=digest)
            features.extend(computed)
            computed_tokens += sum(len(e.input_ids) for e in examples)
        bar.close()
        return cls(features, computed_tokens)

    @property
    def num_tokens(self) -> int:
        return sum(item.input_ids.shape[1] for item in self.features)

    def batches(self, batch_size: int, seed: int = 0, bucket_batches: int = 64) -> Iterator[TargetFeatures]:
        """
        One epoch of right-padded batches in a seeded random order (pads are masked out of the loss). The shuffled
        examples are taken `bucket_batches` batches at a time and sorted by length inside, so that a batch holds
        sequences of similar lengths: padding costs compute (attention quadratically), and lengths here range from
        tens to thousands of tokens. The batches are then shuffled again.
        """
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.features), generator=generator).tolist()
        chunk = batch_size * max(1, bucket_batches)
        batches = []
        for start in range(0, len(order), chunk):
            bucket = sorted(order[start : start + chunk], key=lambda i: self.features[i].input_ids.shape[1])
            batches += [bucket[i : i + batch_size] for i in range(0, len(bucket), batch_size)]
        for index in torch.randperm(len(batches), generator=generator).tolist():
            yield collate([self.features[i] for i in batches[index]])


@torch.no_grad()
def compute_features_batched(
    target: torch.nn.Module,
    examples: list[TrainingExample],
    feature_layers: list[int],
    max_batch_tokens: int = 8192,
    storage_dtype: torch.dtype = torch.bfloat16,
    on_batch=None,
) -> list[TargetFeatures]:
    """
    The target's features of `examples`, in their order, computed over right-padded batches of similar lengths (at
    most `max_batch_tokens` padded tokens each): a CPU computes a batch of sequences several times faster per token
    than one sequence at a time. Padding sits after each sequence, so causal attention keeps its states exact.
    """
    device = next(target.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids), reverse=True)
    results: dict[int, TargetFeatures] = {}
    start = 0
    while start < len(order):
        longest = len(examples[order[start]].input_ids)
        size = max(1, min(len(order) - start, max_batch_tokens // max(longest, 1)))
        chunk = order[start : start + size]
        input_ids = torch.zeros((len(chunk), longest), dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), longest), dtype=torch.long)
        for row, index in enumerate(chunk):
            ids = examples[index].input_ids
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        item = compute_target_features(
            target, input_ids.to(device), feature_layers, attention_mask=attention_mask.to(device)
        )
        for row, index in enumerate(chunk):
            length = len(examples[index].input_ids)
            last = item.last_hidden_state[row : row + 1, :length].to("cpu", storage_dtype)
            states = tuple(
                last if state is item.last_hidden_state else state[row : row + 1, :length].to("cpu", storage_dtype)
                for state in item.hidden_states
            )
            mask = examples[index].loss_mask[None]
            results[index] = TargetFeatures(examples[index].input_ids[None], states, last, mask)
        if on_batch is not None:
            on_batch(sum(len(examples[i].input_ids) for i in chunk))
        start += size
    return [results[i] for i in range(len(examples))]


def _examples_digest(examples: list[TrainingExample], feature_layers: list[int]) -> str:
    digest = hashlib.sha256(json.dumps(list(feature_layers)).encode())
    for example in examples:
        digest.update(example.input_ids.to(torch.int64).numpy().tobytes())
        digest.update(example.loss_mask.to(torch.int8).numpy().tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def collate(items: list[TargetFeatures]) -> TargetFeatures:
    length = max(item.input_ids.shape[1] for item in items)

    def pad(tensor: torch.Tensor) -> torch.Tensor:
        extra = length - tensor.shape[1]
        if extra == 0:
            return tensor
        shape = (tensor.shape[0], extra, *tensor.shape[2:])
        return torch.cat([tensor, tensor.new_zeros(shape)], dim=1)

    num_states = len(items[0].hidden_states)
    return TargetFeatures(
        input_ids=torch.cat([pad(i.input_ids) for i in items]),
        hidden_states=tuple(torch.cat([pad(i.hidden_states[s]) for i in items]) for s in range(num_states)),
        last_hidden_state=torch.cat([pad(i.last_hidden_state) for i in items]),
        loss_mask=torch.cat([pad(i.loss_mask) for i in items]),
    )


def _save_shard(path: Path, items: list[TargetFeatures], digest: str | None = None) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for n, item in enumerate(items):
        tensors[f"{n}.input_ids"] = item.input_ids.contiguous()
        tensors[f"{n}.loss_mask"] = item.loss_mask.contiguous()
        tensors[f"{n}.last_hidden_state"] = item.last_hidden_state.contiguous()
        for s, state in enumerate(item.hidden_states):
            if state is not item.last_hidden_state:
                tensors[f"{n}.hidden_states.{s}"] = state.contiguous()
    tmp = path.with_suffix(".tmp")
    metadata = {"count": str(len(items))}
    if digest is not None:
        metadata["digest"] = digest
    save_file(tensors, tmp, metadata=metadata)
    tmp.replace(path)


def _load_shard(path: Path, num_states: int, expected_digest: str | None = None) -> list[TargetFeatures] | None:
    """The shard's features; `None` when `expected_digest` is given and the file was computed from other examples."""
    if expected_digest is not None:
        with safe_open(path, framework="pt") as handle:
            if (handle.metadata() or {}).get("digest") != expected_digest:
                return None
    tensors = load_file(path)
    count = len({key.split(".")[0] for key in tensors})
    items = []
    for n in range(count):
        last = tensors[f"{n}.last_hidden_state"]
        states = tuple(tensors.get(f"{n}.hidden_states.{s}", last) for s in range(num_states))
        items.append(TargetFeatures(tensors[f"{n}.input_ids"], states, last, tensors[f"{n}.loss_mask"]))
    return items
