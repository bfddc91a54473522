"""imbsam_fast: fast, faithful ImbSAM (class-imbalanced sharpness-aware minimization) for PyTorch.

The core (this package: optimizer, schedules, hooks, priors, losses, BatchNorm
handling, backends) needs torch only. The applications (command line, training
loop, datasets, models) live in :mod:`imbsam_fast.apps` and need the ``[cli]`` extra.
"""

from .capture import CapturedStep
from .hooks import StepHooks
from .losses import class_weighted_cross_entropy, head_tail_cross_entropy, split_head_tail
from .optimizer import ImbSAM, StepLosses
from .priors import (
    ClassWeights,
    focal_sam_weights,
    imbsam_weights,
    plain_weights,
    sam_weights,
    split_classes,
    tail_class_mask,
)

__version__ = "0.1.0"

__all__ = [
    "ImbSAM",
    "StepLosses",
    "CapturedStep",
    "StepHooks",
    "ClassWeights",
    "tail_class_mask",
    "split_classes",
    "plain_weights",
    "sam_weights",
    "imbsam_weights",
    "focal_sam_weights",
    "head_tail_cross_entropy",
    "class_weighted_cross_entropy",
    "split_head_tail",
]
