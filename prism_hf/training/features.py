"""Target features computed once per example, held in memory and optionally cached on disk as safetensors shards."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .data import TrainingExample
from .recipe import TargetFeatures, compute_target_features


class FeatureStore:
    """
    Verifier features of a list of examples. With `cache_dir`, each shard of `shard_size` examples is written as a
    safetensors file as soon as it is computed, so an interrupted run resumes where it stopped.
    """

    def __init__(self, features: list[TargetFeatures]):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        target: torch.nn.Module,
        examples: list[TrainingExample],
        feature_layers: list[int],
        cache_dir: str | Path | None = None,
        shard_size: int = 64,
        storage_dtype: torch.dtype = torch.bfloat16,
        progress: bool = True,
    ) -> FeatureStore:
        features: list[TargetFeatures] = []
        cache = Path(cache_dir) if cache_dir is not None else None
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
            _check_cache_manifest(cache, len(examples), feature_layers, shard_size)
        device = next(target.parameters()).device
        bar = tqdm(total=len(examples), desc="target features", disable=not progress)
        for shard_start in range(0, len(examples), shard_size):
            shard = examples[shard_start : shard_start + shard_size]
            path = cache / f"shard-{shard_start // shard_size:05d}.safetensors" if cache is not None else None
            if path is not None and path.exists():
                features.extend(_load_shard(path, len(feature_layers)))
                bar.update(len(shard))
                continue
            computed = []
            for example in shard:
                item = compute_target_features(
                    target, example.input_ids[None].to(device), feature_layers, loss_mask=example.loss_mask[None]
                )
                last = item.last_hidden_state.to("cpu", storage_dtype)
                states = tuple(
                    last if h is item.last_hidden_state else h.to("cpu", storage_dtype) for h in item.hidden_states
                )
                computed.append(TargetFeatures(item.input_ids.cpu(), states, last, item.loss_mask.cpu()))
                bar.update(1)
            if path is not None:
                _save_shard(path, computed)
            features.extend(computed)
        bar.close()
        return cls(features)

    def batches(self, batch_size: int, seed: int = 0) -> Iterator[TargetFeatures]:
        """One epoch of right-padded batches in a seeded random order (pads are masked out of the loss)."""
        order = torch.randperm(len(self.features), generator=torch.Generator().manual_seed(seed)).tolist()
        for start in range(0, len(order), batch_size):
            yield collate([self.features[i] for i in order[start : start + batch_size]])


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


def _check_cache_manifest(cache: Path, num_examples: int, feature_layers: list[int], shard_size: int) -> None:
    manifest = {"num_examples": num_examples, "feature_layers": list(feature_layers), "shard_size": shard_size}
    path = cache / "manifest.json"
    if path.exists():
        found = json.loads(path.read_text())
        if found != manifest:
            raise ValueError(f"Feature cache {cache} was built for {found}, not {manifest}: use another directory.")
    else:
        path.write_text(json.dumps(manifest))


def _save_shard(path: Path, items: list[TargetFeatures]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for n, item in enumerate(items):
        tensors[f"{n}.input_ids"] = item.input_ids.contiguous()
        tensors[f"{n}.loss_mask"] = item.loss_mask.contiguous()
        tensors[f"{n}.last_hidden_state"] = item.last_hidden_state.contiguous()
        for s, state in enumerate(item.hidden_states):
            if state is not item.last_hidden_state:
                tensors[f"{n}.hidden_states.{s}"] = state.contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, tmp, metadata={"count": str(len(items))})
    tmp.replace(path)


def _load_shard(path: Path, num_states: int) -> list[TargetFeatures]:
    tensors = load_file(path)
    count = len({key.split(".")[0] for key in tensors})
    items = []
    for n in range(count):
        last = tensors[f"{n}.last_hidden_state"]
        states = tuple(tensors.get(f"{n}.hidden_states.{s}", last) for s in range(num_states))
        items.append(TargetFeatures(tensors[f"{n}.input_ids"], states, last, tensors[f"{n}.loss_mask"]))
    return items
