"""Pass schedules: which forwards and backwards one ImbSAM step runs (exact, fast), built from the options."""

from __future__ import annotations

from typing import Optional, Union

from torch import nn

from ..batchnorm import BatchNormStats
from .base import StepLosses, StepRun, check_index_closure
from .exact import BN_STATS, ExactSchedule
from .fast import FAST_BN, FastSchedule

__all__ = [
    "MODES", "BN_STATS", "FAST_BN", "ExactSchedule", "FastSchedule", "Schedule", "StepLosses", "StepRun",
    "check_index_closure", "make_schedule",
]

MODES = ("exact", "fast")
Schedule = Union[ExactSchedule, FastSchedule]
_FAST_ONLY = ("fast_bn", "ghost_batch", "tail_capacity")
_EXACT_ONLY = ("bn_stats",)


def make_schedule(mode: str, model: Optional[nn.Module], batchnorm: Optional[BatchNormStats], *,
                  bn_stats: Optional[str] = None, fast_bn: Optional[str] = None,
                  ghost_batch: Optional[int] = None, tail_capacity: Optional[int] = None) -> Schedule:
    """The schedule of ``mode``; an option that belongs to the other mode is a ``ValueError``."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    given = {k for k, v in (("bn_stats", bn_stats), ("fast_bn", fast_bn), ("ghost_batch", ghost_batch),
                            ("tail_capacity", tail_capacity)) if v is not None}
    wrong = sorted(given & set(_EXACT_ONLY if mode == "fast" else _FAST_ONLY))
    if wrong:
        other = "exact" if mode == "fast" else "fast"
        raise ValueError(f"{', '.join(wrong)} applies to mode='{other}' only, not to mode='{mode}'")
    if mode == "exact":
        return ExactSchedule("reference" if bn_stats is None else bn_stats, batchnorm)
    if model is None or batchnorm is None:
        raise ValueError(
            "mode='fast' needs model=<the module the closure runs>, to handle its BatchNorm layers in the "
            "tail-only passes"
        )
    return FastSchedule(batchnorm, "replay-ghost" if fast_bn is None else fast_bn,
                        8 if ghost_batch is None else ghost_batch, tail_capacity)
