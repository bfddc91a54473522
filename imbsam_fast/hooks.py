"""Hook points of one :meth:`ImbSAM.step`: where gradient scaling, distributed sync,
clipping and the like attach to the pass schedules.

A step runs up to three backward passes, each tagged with its phase:

    "head"       the head loss at w; its gradient g_h goes into the update as is
    "ascent"     the tail loss at w; its gradient g_t sets the perturbation e
    "perturbed"  the tail loss at w + e; its gradient g_t' accumulates onto g_h

A step with nothing to ascend (no tail sample in fast mode, or class weights
with no tail part) runs only "head". Around them the schedule calls, in order:

    loss = hooks.before_backward(opt, phase, loss)   may return a new loss (e.g. scaled)
    loss.backward()
    hooks.after_backward(opt, phase)                 gradients of this pass are in .grad
    ...
    hooks.before_base_step(opt)                      .grad holds g_h + g_t' (or g_h), weights at w

Only :meth:`ImbSAM.step` with a closure calls hooks; in the three-step API
the caller runs each backward and can act there directly.

A hook with a ``before_base_step`` of its own makes the step take the base
optimizer's own ``step()``: the fused restore + SGD pass (``backend="ext"``
or ``"triton"`` with a plain SGD base) restores the weights and steps in one
pass, with no point between. Hooks on the backwards alone (timing, logging,
gradient edits in ``after_backward``) keep the fused pass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from .optimizer import ImbSAM

__all__ = ["HEAD", "ASCENT", "PERTURBED", "PHASES", "StepHooks", "HookHandle"]

HEAD, ASCENT, PERTURBED = "head", "ascent", "perturbed"
PHASES = (HEAD, ASCENT, PERTURBED)


class StepHooks:
    """Base class for step hooks: override the methods you need; the defaults do nothing."""

    def before_backward(self, opt: ImbSAM, phase: str, loss: Tensor) -> Tensor:
        """Called with the scalar loss of ``phase`` before its backward; returns the loss to differentiate."""
        return loss

    def after_backward(self, opt: ImbSAM, phase: str) -> None:
        """Called after the backward of ``phase``; that pass's gradients are in ``.grad``."""

    def before_base_step(self, opt: ImbSAM) -> None:
        """Called with the weights back at w and the combined gradient in ``.grad``, before the base step."""


class HookHandle:
    """Returned by :meth:`ImbSAM.register_step_hooks`; ``remove()`` unregisters the hooks."""

    def __init__(self, registry: list[Any], hooks: StepHooks) -> None:
        self._registry = registry
        self._hooks = hooks

    def remove(self) -> None:
        if self._hooks in self._registry:
            self._registry.remove(self._hooks)
