"""
The PRISM training recipe (../design/prism.md): losses, the two phases and the module expansion between them.

Phase 1 warms up one module with feature regression + soft cross-entropy against the target over several aligned
draft steps that feed back the draft's own features (earlier steps detached). Phase 2 copies that module into
`num_modules` modules and fine-tunes the unrolled steps with cross-entropy only, gradients through all steps.
With `num_modules=1` the same code trains the EAGLE-style single-module baseline.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..configuration_prism import PrismConfig
from ..modeling_prism import PrismDraftModel, copy_candidates


@dataclass
class PhaseConfig:
    """Loss weights and optimisation settings of one training phase."""

    num_steps: int = 3
    regression_weight: float = 1.0
    ce_weight: float = 0.1
    detach_step_inputs: bool = True
    learning_rate: float = 3e-5
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 0.5
    warmup_ratio: float = 0.01
    weight_decay: float = 0.0
    feature_noise: float = 0.0  # std of the uniform noise added to the target's features (EAGLE's regulariser)
    mixed_precision: str = "no"  # "bf16": autocast matmuls to bfloat16 (CPUs with AMX / AVX-512 BF16, GPUs)
    compile_loss: bool = False  # torch.compile the vocabulary-wide cross-entropy (see `soft_cross_entropy`)


WARMUP_PHASE = PhaseConfig()
FINETUNE_PHASE = PhaseConfig(regression_weight=0.0, ce_weight=0.1, detach_step_inputs=False, learning_rate=1e-5)


@dataclass
class TargetFeatures:
    """
    What the draft learns from, for a batch of sequences: `hidden_states` holds the verifier states named by the
    draft's `feature_layers` (in that order), `last_hidden_state` the post-norm last state (regression target and
    source of the target's soft labels), `loss_mask` which tokens count (e.g. assistant turns only).
    """

    input_ids: torch.LongTensor
    hidden_states: tuple[torch.Tensor, ...]
    last_hidden_state: torch.Tensor
    loss_mask: torch.Tensor

    def to(self, device: torch.device | str) -> TargetFeatures:
        return TargetFeatures(
            self.input_ids.to(device),
            tuple(state.to(device) for state in self.hidden_states),
            self.last_hidden_state.to(device),
            self.loss_mask.to(device),
        )


@torch.no_grad()
def compute_target_features(
    target: torch.nn.Module,
    input_ids: torch.LongTensor,
    feature_layers: list[int],
    attention_mask: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
) -> TargetFeatures:
    """
    Runs the verifier's decoder once over `input_ids` and keeps the states the draft needs. The LM head is left out:
    over every position it holds 15% of a Qwen2.5-Coder-1.5B forward's weight multiplies and 21% of SmolLM2-135M's,
    while the loss applies it later to the positions it scores only.
    """
    decoder = getattr(target, "base_model", target)
    outputs = decoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    hidden_states = tuple(outputs.hidden_states[i] for i in feature_layers)
    if loss_mask is None:
        loss_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    return TargetFeatures(input_ids, hidden_states, outputs.hidden_states[-1], loss_mask)


def _soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    log_probs = logits.float().log_softmax(-1)
    return -(target_probs * log_probs).sum(-1), logits.argmax(-1)


_compiled_soft_cross_entropy = None


def soft_cross_entropy(
    logits: torch.Tensor, target_probs: torch.Tensor, compile: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Per-row cross-entropy of `logits` against the distributions `target_probs`, and the rows' argmax.

    Over a 32K-token draft vocabulary the element-wise passes (log-softmax, product, sum and their backward) cost
    as much as the LM-head matmuls on a CPU, because each walks a `[positions, vocabulary]` float32 tensor through
    memory. `compile=True` lets `torch.compile` fuse them into a few loops that each read the tensor once (a one-off
    compile of 30-60 s on a CPU; shapes are dynamic, so it compiles once per run). Training tokens/s with and
    without it are in each draft's `training_record.json`.
    """
    if not compile:
        return _soft_cross_entropy(logits, target_probs)
    global _compiled_soft_cross_entropy
    if _compiled_soft_cross_entropy is None:
        _compiled_soft_cross_entropy = torch.compile(_soft_cross_entropy, dynamic=True)
    return _compiled_soft_cross_entropy(logits, target_probs)


def _scored_positions(
    draft: PrismDraftModel, batch: TargetFeatures
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    The target's last states where a loss is taken (pair `p` predicts token `p + 2`, in the loss mask), that mask
    `[batch, seq - 2]`, and each scored row's pair index.
    """
    last = batch.last_hidden_state.to(draft.dtype)[:, 1:-1]
    token_mask = batch.loss_mask[:, 2:].to(draft.device).bool()
    pair_index = torch.arange(last.shape[1], device=draft.device).expand_as(token_mask)[token_mask]
    return last[token_mask], token_mask, pair_index


@torch.no_grad()
def _target_distribution(draft: PrismDraftModel, scored: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's distribution over the draft vocabulary (renormalised when that is reduced) and its argmax."""
    if draft.verifier.draft_lm_weight is not None:
        target_logits = F.linear(scored, draft.verifier.draft_lm_weight).float()
    else:
        lm_head = draft.verifier.lm_head
        target_logits = lm_head(scored.to(lm_head.weight.dtype)).float()
    return target_logits.softmax(-1), target_logits.argmax(-1)


def copy_proposals(
    draft: PrismDraftModel, batch: TargetFeatures, token_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The copy head's proposals (draft-vocabulary ids) and match lengths of the scored rows; None without one."""
    if draft.copy_gate is None:
        return None
    proposals, lengths = copy_candidates(batch.input_ids, draft.config.copy_max_ngram)
    proposals = draft.to_draft_ids(proposals)[:, : token_mask.shape[1]][token_mask]
    return proposals, lengths.to(draft.device)[:, : token_mask.shape[1]][token_mask]


def prism_loss(
    draft: PrismDraftModel, batch: TargetFeatures, phase: PhaseConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """
    Loss of the unrolled draft steps. Step k at pair `p` predicts token `p + 2` from context up to `p - k + 1`;
    it is scored where that context exists (`p >= k - 1`) and token `p + 2` is in the loss mask. A draft with a copy
    head is scored on the distribution it drafts from, the copy proposal mixed in (`PrismDraftModel.mix_copy`).
    """
    features = draft.fuse_selected_features(batch.hidden_states)
    if phase.feature_noise and draft.training:
        # uniform on [-a, a] has std a / sqrt(3)
        features = features + (torch.rand_like(features) * 2 - 1) * (phase.feature_noise * 3**0.5)
    output = draft(
        batch.input_ids,
        features,
        num_steps=phase.num_steps,
        detach_step_inputs=phase.detach_step_inputs,
        output_logits=False,
    )
    scored, token_mask, pair_index = _scored_positions(draft, batch)
    target_probs, target_top1 = _target_distribution(draft, scored)
    proposals = copy_proposals(draft, batch, token_mask)

    total = torch.zeros((), device=draft.device)
    metrics: dict[str, float] = {}
    for k, hidden in enumerate(output.step_hidden_states, start=1):
        # step k needs context up to p - k + 1: the first k - 1 pairs of a sequence weigh 0 (cheaper than gathering
        # [positions, vocabulary] rows without them)
        keep = (pair_index >= k - 1).to(torch.float32)
        count = keep.sum().clamp(min=1)
        step_hidden = hidden[:, : token_mask.shape[1]][token_mask]
        logits = draft.drafting_logits(step_hidden, proposals)
        per_position, predicted = soft_cross_entropy(logits, target_probs, compile=phase.compile_loss)
        hits = (predicted == target_top1).to(torch.float32)
        ce = (per_position * keep).sum() / count
        step_loss = phase.ce_weight * ce
        if phase.regression_weight:
            reg = F.smooth_l1_loss(step_hidden.float(), scored.float(), reduction="none").mean(-1)
            step_loss = step_loss + phase.regression_weight * (reg * keep).sum() / count
        total = total + step_loss
        metrics[f"acc_step{k}"] = float((hits * keep).sum() / count)
        metrics[f"ce_step{k}"] = float(ce.detach())
    metrics["loss"] = float(total.detach())
    return total, metrics


def expand_modules(draft: PrismDraftModel, num_modules: int, step_module_map: list[int] | None = None):
    """Phase 1 -> phase 2: a draft with `num_modules` modules, each a copy of the warmed-up module 0."""
    if draft.config.num_modules != 1:
        raise ValueError(f"expand_modules starts from a single-module draft, got {draft.config.num_modules} modules.")
    config_dict = draft.config.to_dict()
    config_dict.update(num_modules=num_modules, step_module_map=step_module_map or [0, min(1, num_modules - 1)])
    for key in ("architectures", "auto_map", "transformers_version", "model_type"):
        config_dict.pop(key, None)
    expanded = type(draft)(PrismConfig(**config_dict)).to(dtype=draft.dtype, device=draft.device)
    expanded_state = expanded.state_dict()
    for name, value in draft.state_dict().items():
        if name.startswith(("fc.0.", "layers.0.")):
            for m in range(num_modules):
                expanded_state[name.replace(".0.", f".{m}.", 1)].copy_(value)
        else:
            expanded_state[name].copy_(value)
    expanded._verifier = copy.copy(draft._verifier)
    return expanded


@torch.no_grad()
def initialise_from_target_layer(draft: PrismDraftModel, target: torch.nn.Module) -> list[str]:
    """
    Copies the target's last decoder layer into every draft layer where names and shapes agree (attention
    projections, MLP, post-attention norm): the draft starts from what the target computes last instead of noise.
    Returns the copied parameter names; raises a `ValueError` when nothing fits.
    """
    decoder = getattr(target, "model", target)
    layers = getattr(decoder, "layers", None)
    if layers is None or len(layers) == 0:
        raise ValueError(f"{type(target).__name__} has no `model.layers` to initialise the draft from.")
    source = layers[-1].state_dict()
    copied = []
    for module in draft.layers:
        for name, param in module.state_dict().items():
            value = source.get(name)
            if value is not None and value.shape == param.shape:
                param.copy_(value.to(param.dtype))
                copied.append(name)
    if not copied:
        raise ValueError("No parameter of the target's last decoder layer fits the draft layer.")
    return sorted(set(copied))


@dataclass
class CopyGateFit:
    """What fitting the copy gate changed: the mixture cross-entropy on rows with a proposal, before and after."""

    rows: int
    rows_with_proposal: int
    cross_entropy_before: float
    cross_entropy_after: float

    def to_dict(self) -> dict[str, float]:
        return dict(vars(self))


def fit_copy_gate(
    draft: PrismDraftModel, batches: Iterable[TargetFeatures], num_steps: int = 3, progress: bool = False
) -> CopyGateFit:
    """
    Fits the copy gate of `draft` (`PrismConfig.copy_max_ngram`) to `batches` with the rest of the draft fixed: the
    same soft cross-entropy as `prism_loss` over `num_steps` unrolled steps, which for the gate depends only on a few
    numbers per scored row (match length, the draft's log-probabilities of the proposal and of its best token, the
    target's probability of the proposal). Those are collected in one pass without gradients, then the gate's
    `copy_max_ngram + 3` parameters are fitted by L-BFGS on all rows at once: minutes for a few hundred thousand
    tokens on a CPU, against the hours a draft layer needs to learn copying from data.
    """
    gate = draft.copy_gate
    if gate is None:
        raise ValueError("This draft has no copy head to fit: build it with copy_max_ngram >= 1.")
    was_training = draft.training
    draft.eval()
    columns: list[list[torch.Tensor]] = [[], [], [], []]
    rows = 0
    with torch.no_grad():
        for batch in tqdm(batches, desc="copy gate", unit="batch", disable=not progress):
            batch = batch.to(draft.device)
            output = draft(
                batch.input_ids, draft.fuse_selected_features(batch.hidden_states), num_steps, output_logits=False
            )
            scored, token_mask, pair_index = _scored_positions(draft, batch)
            target_probs, _ = _target_distribution(draft, scored)
            proposals, lengths = copy_proposals(draft, batch, token_mask)
            for k, hidden in enumerate(output.step_hidden_states, start=1):
                valid = pair_index >= k - 1
                rows += int(valid.sum())
                keep = valid & (proposals >= 0)
                logp = draft.compute_logits(hidden[:, : token_mask.shape[1]][token_mask][keep]).float()
                logp = logp.log_softmax(-1)
                index = proposals[keep].unsqueeze(-1)
                columns[0].append(lengths[keep])
                columns[1].append(logp.gather(-1, index).squeeze(-1))
                columns[2].append(logp.amax(-1))
                columns[3].append(target_probs[keep].gather(-1, index).squeeze(-1))
    draft.train(was_training)
    lengths, proposal_logprob, top_logprob, target_prob = (torch.cat(column) for column in columns)
    if lengths.numel() == 0:
        raise ValueError("No scored token has a copy proposal in these batches: nothing to fit the copy gate on.")

    def mixture_cross_entropy() -> torch.Tensor:
        # -sum_y P(y) log q(y) minus the draft's own cross-entropy, for q = (1 - g) p + g onehot(c)
        log_gate, log_keep = gate(lengths, proposal_logprob, top_logprob)
        at_proposal = torch.logaddexp(log_keep + proposal_logprob, log_gate) - log_keep - proposal_logprob
        return (-log_keep - target_prob * at_proposal).mean()

    with torch.no_grad():
        before = float(mixture_cross_entropy())
    optimizer = torch.optim.LBFGS(gate.parameters(), lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = mixture_cross_entropy()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        after = float(mixture_cross_entropy())
    return CopyGateFit(rows, int(lengths.numel()), round(before, 5), round(after, 5))
