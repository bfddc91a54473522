"""The exact schedule: the public reference's passes, 2 full forwards and 3 full backwards.

    losses = closure()                      full forward at w
    head.backward(retain_graph)  -> g_h     "head"
    tail.backward()              -> g_t     "ascent"    then w <- w + rho g_t / (||g_t|| + 1e-16)
    closure() at w + e, tail.backward()     "perturbed" (accumulates onto g_h)
    restore w; base step on g_h + g_t'

Class weights with no tail part (plain training) run only the head pass and
a plain step; with no head part (SAM) the head backward is skipped.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
from torch import Tensor

from ..batchnorm import BatchNormStats
from ..hooks import HEAD, PERTURBED
from .base import StepLosses, StepRun

__all__ = ["ExactSchedule", "BN_STATS"]

BN_STATS = ("reference", "first")


class ExactSchedule:
    """The reference's passes. ``bn_stats="first"`` lets only the first forward move BatchNorm running stats."""

    name = "exact"

    def __init__(self, bn_stats: str = "reference", batchnorm: Optional[BatchNormStats] = None) -> None:
        if bn_stats not in BN_STATS:
            raise ValueError(f"bn_stats must be one of {', '.join(BN_STATS)}, got {bn_stats!r}")
        if bn_stats == "first" and batchnorm is None:
            raise ValueError("bn_stats='first' needs model=<the module the closure runs>")
        self.bn_stats = bn_stats
        self._bn = batchnorm

    def run(self, run: StepRun, targets: Tensor, head_w: Tensor, tail_w: Tensor, has_head: bool,
            has_tail: bool) -> StepLosses:
        if not has_tail:
            losses, head = run.full_pass(head_w, HEAD, sync=True)
            run.plain_step()
            tail = run.loss(losses, tail_w)
            return StepLosses(head, tail, torch.zeros_like(tail), losses)
        losses, head, tail = run.head_and_ascent(head_w, tail_w, has_head)
        run.ascend()
        context = self._bn.freeze_running_stats if self.bn_stats == "first" and self._bn else nullcontext
        tail2 = run.tail_pass(None, tail_w, PERTURBED, context, sync=True)
        run.descend()
        return StepLosses(head, tail, tail2, losses)
