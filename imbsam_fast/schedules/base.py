"""What a pass schedule works with: one step's closure, hooks and optimizer phases.

A schedule decides which forward and backward passes a step runs and on
which samples; :class:`StepRun` carries them out, calling the hooks of
:mod:`imbsam_fast.hooks` around every backward. The optimizer undoes a step
that fails half-way (weights restored, gradients cleared) before the error
propagates.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Callable, ContextManager, NamedTuple, Optional

import torch
from torch import Tensor

from ..losses import weighted_sum

if TYPE_CHECKING:
    from ..optimizer import ImbSAM

__all__ = ["StepLosses", "StepRun", "check_index_closure"]


class StepLosses(NamedTuple):
    """Losses seen by :meth:`ImbSAM.step`, detached, on the device they were computed on."""

    head: Tensor
    tail: Tensor
    perturbed_tail: Tensor
    per_sample: Tensor


class StepRun:
    """One step's passes for a schedule: ``forward``, ``backward`` and the optimizer phases.

    Losses are normalized by the whole batch ``B``: a pass over a subset
    ``index`` with per-sample weights ``w`` contributes ``sum_i w_i l_i / B``.
    """

    __slots__ = ("opt", "closure", "batch", "hooks")

    def __init__(self, opt: ImbSAM, closure: Callable[..., Tensor], batch: int, hooks: list[Any]) -> None:
        self.opt = opt
        self.closure = closure
        self.batch = batch
        self.hooks = hooks

    def forward(self, index: Optional[Tensor] = None) -> Tensor:
        """Per-sample losses of the closure: ``closure()`` for the batch, ``closure(index)`` for a subset."""
        with torch.enable_grad():
            losses = self.closure() if index is None else self.closure(index)
        expected = self.batch if index is None else index.shape[0]
        if not isinstance(losses, Tensor) or losses.shape != (expected,):
            shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise ValueError(
                f"the closure must return per-sample losses of shape ({expected},) (reduction='none'), got {shape}"
            )
        if not losses.requires_grad:
            raise ValueError("the closure's losses do not require grad; run the forward inside the closure")
        return losses

    def loss(self, losses: Tensor, weights: Tensor) -> Tensor:
        """``sum_i w_i l_i / B``."""
        return weighted_sum(losses, weights, self.batch)

    def backward(self, loss: Tensor, phase: str, retain_graph: bool = False) -> None:
        """``loss.backward()`` with the hooks of ``phase`` around it."""
        for h in self.hooks:
            loss = h.before_backward(self.opt, phase, loss)
        loss.backward(retain_graph=retain_graph)
        for h in self.hooks:
            h.after_backward(self.opt, phase)

    def tail_pass(self, index: Optional[Tensor], weights: Tensor, phase: str,
                  context: Callable[[], ContextManager[Any]] = nullcontext) -> Tensor:
        """Forward ``closure(index)`` and backward ``sum_i w_i l_i / B`` within ``context()``; returns the loss."""
        with context():
            loss = self.loss(self.forward(index), weights)
            self.backward(loss, phase)
        return loss.detach()

    def stash(self) -> None:
        """:meth:`ImbSAM.first_step`: move g_h aside."""
        self.opt.first_step()

    def ascend(self) -> None:
        """:meth:`ImbSAM.second_step`: ``w <- w + e``, g_h put back as ``.grad``."""
        self.opt.second_step()

    def descend(self) -> None:
        """:meth:`ImbSAM.third_step`: restore w, base step on ``g_h + g_t'``."""
        self.opt.third_step()

    def plain_step(self) -> None:
        """The base step on the gradients at hand (no ascent)."""
        self.opt._base_step()


_INDEX_OK: set[Any] = set()


def check_index_closure(closure: Callable[..., Any]) -> None:
    """Raise ``TypeError`` unless ``closure`` can be called with one positional argument (the index)."""
    code = getattr(closure, "__code__", None)
    if code is not None and code in _INDEX_OK:
        return
    try:
        inspect.signature(closure).bind(None)
    except TypeError:
        raise TypeError(
            "mode='fast' calls the closure as closure(index) with a LongTensor of sample indices (and as "
            "closure() for the whole batch); define it as `def closure(index=None): ...`"
        ) from None
    except ValueError:
        return  # no signature to inspect (a builtin): the call itself will tell
    if code is not None:
        _INDEX_OK.add(code)
