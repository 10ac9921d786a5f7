"""Training PRISM drafts: target features, the two-phase recipe and the loop."""

from .loop import train_phase
from .recipe import (
    FINETUNE_PHASE,
    WARMUP_PHASE,
    CopyGateFit,
    PhaseConfig,
    TargetFeatures,
    compute_target_features,
    expand_modules,
    fit_copy_gate,
    prism_loss,
)

__all__ = [
    "FINETUNE_PHASE",
    "WARMUP_PHASE",
    "CopyGateFit",
    "PhaseConfig",
    "TargetFeatures",
    "compute_target_features",
    "expand_modules",
    "fit_copy_gate",
    "prism_loss",
    "train_phase",
]
