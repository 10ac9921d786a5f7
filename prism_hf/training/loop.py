"""A training loop that fits on a screen: AdamW, linear warm-up then decay, gradient clipping, progress bar."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import count, islice

import torch
from tqdm.auto import tqdm

from ..modeling_prism import PrismDraftModel
from .recipe import PhaseConfig, TargetFeatures, prism_loss


def train_phase(
    draft: PrismDraftModel,
    batches: Iterable[TargetFeatures],
    phase: PhaseConfig,
    num_updates: int,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Trains `draft` in place for `num_updates` optimizer steps, cycling over `batches`; returns per-step metrics."""
    draft.train()
    # the shared embedding and LM head belong to the target: never train them
    draft.verifier.embed_tokens.requires_grad_(False)
    draft.verifier.lm_head.requires_grad_(False)
    params = [p for p in draft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=phase.learning_rate, betas=phase.betas, weight_decay=0.0)
    warmup = max(1, int(phase.warmup_ratio * num_updates))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (num_updates - step) / max(1, num_updates - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    history: list[dict[str, float]] = []
    batch_iter = islice(_repeat(batches), num_updates)
    for step, batch in enumerate(tqdm(batch_iter, total=num_updates, desc="train", disable=not progress)):
        loss, metrics = prism_loss(draft, batch, phase)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, phase.grad_clip)
        optimizer.step()
        scheduler.step()
        history.append(metrics)
        if on_step is not None:
            on_step(step, metrics)
    draft.eval()
    return history


def _repeat(batches: Iterable[TargetFeatures]) -> Iterator[TargetFeatures]:
    """Iterators are consumed as given (they may be endless); re-iterable collections are cycled without copies."""
    if isinstance(batches, Iterator):
        return batches
    return (batch for _ in count() for batch in batches)
