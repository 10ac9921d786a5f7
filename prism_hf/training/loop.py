"""
The training loop: AdamW, linear warm-up then decay, gradient clipping, progress bar, resumable checkpoints.

It runs through `accelerate`, so the same code trains on one CPU, one GPU or many processes (`accelerate launch`):
each process feeds its own batches and `accelerate` averages the gradients. The loss is computed inside the forward of
a small wrapper module, because distributed data parallelism only synchronises gradients of work done in `forward`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable, Iterator
from itertools import count, islice
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..modeling_prism import PrismDraftModel
from .recipe import PhaseConfig, TargetFeatures, prism_loss

_PROGRESS_FILE = "progress.json"


class DraftLossModule(torch.nn.Module):
    """Holds the draft being trained; `forward(batch)` returns the recipe's loss and metrics for that batch."""

    def __init__(self, draft: PrismDraftModel, phase: PhaseConfig):
        super().__init__()
        self.draft = draft
        self.phase = phase

    def forward(self, batch: TargetFeatures) -> tuple[torch.Tensor, dict[str, float]]:
        return prism_loss(self.draft, batch.to(self.draft.device), self.phase)


def train_phase(
    draft: PrismDraftModel,
    batches: Iterable[TargetFeatures],
    phase: PhaseConfig,
    num_updates: int,
    on_step: Callable[[int, dict[str, float]], dict[str, float] | None] | None = None,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
) -> list[dict[str, float]]:
    """
    Trains `draft` in place for `num_updates` optimizer steps, cycling over `batches`; returns per-step metrics.

    With `checkpoint_dir`, the model, optimizer, scheduler and step are saved there every `checkpoint_every` updates
    and at the end of the phase; `resume=True` restores the latest of them and skips the batches already consumed
    (batch order must be deterministic, as `FeatureStore.batches` is), so an interrupted run continues exactly.
    With several processes, `batches` are this process's own and the returned metrics are averaged over processes.
    `on_step(step, metrics)` runs after each update (e.g. a held-out evaluation); numbers it returns are shown in the
    progress bar.
    """
    # a fresh Accelerator per phase (they share the process state) holds exactly this phase's objects in checkpoints
    accelerator = Accelerator(mixed_precision=phase.mixed_precision)
    draft.train()
    # the shared embedding and LM head belong to the target: never train them
    draft.verifier.embed_tokens.requires_grad_(False)
    draft.verifier.lm_head.requires_grad_(False)
    params = [p for p in draft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=phase.learning_rate, betas=phase.betas, weight_decay=phase.weight_decay)
    warmup = max(1, int(phase.warmup_ratio * num_updates))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (num_updates - step) / max(1, num_updates - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    # the scheduler is not prepared: `accelerate` would step it once per process, and `num_updates` already counts
    # this process's updates; it is registered so that checkpoints still carry it
    module, optimizer = accelerator.prepare(DraftLossModule(draft, phase), optimizer)
    accelerator.register_for_checkpointing(scheduler)

    checkpoint = Path(checkpoint_dir) if checkpoint_dir is not None else None
    start = 0
    if resume and checkpoint is not None and (checkpoint / _PROGRESS_FILE).is_file():
        accelerator.load_state(str(checkpoint))
        start = json.loads((checkpoint / _PROGRESS_FILE).read_text())["step"]

    history: list[dict[str, float]] = []
    batch_iter = islice(_repeat(batches), start, num_updates)
    bar = tqdm(
        batch_iter,
        initial=start,
        total=num_updates,
        desc="train",
        disable=not progress or not accelerator.is_local_main_process,
    )
    for step, batch in enumerate(bar, start=start):
        loss, metrics = module(batch)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, phase.grad_clip)
        optimizer.step()
        scheduler.step()
        if accelerator.num_processes > 1:
            names = sorted(metrics)
            averaged = accelerator.reduce(torch.tensor([metrics[n] for n in names], device=loss.device), "mean")
            metrics = dict(zip(names, averaged.tolist(), strict=True))
        history.append(metrics)
        if on_step is not None:
            shown = on_step(step, metrics)
            if shown:
                bar.set_postfix(shown, refresh=False)
        done = step + 1
        if checkpoint is not None and (done == num_updates or (checkpoint_every and done % checkpoint_every == 0)):
            _save_checkpoint(accelerator, checkpoint, done)
    draft.eval()
    return history


def _save_checkpoint(accelerator: Accelerator, directory: Path, step: int) -> None:
    """Writes the state next to the old one, then swaps, so an interruption never leaves a half-written checkpoint."""
    partial = directory.with_name(directory.name + ".partial")
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()  # every process has written its part (e.g. its random state)
    if accelerator.is_main_process:
        (partial / _PROGRESS_FILE).write_text(json.dumps({"step": step}) + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        partial.rename(directory)
    accelerator.wait_for_everyone()


def _repeat(batches: Iterable[TargetFeatures]) -> Iterator[TargetFeatures]:
    """Iterators are consumed as given (they may be endless); re-iterable collections are cycled without copies."""
    if isinstance(batches, Iterator):
        return batches
    return (batch for _ in count() for batch in batches)
