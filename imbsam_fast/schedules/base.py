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

from ..distributed import GradSync
from ..hooks import ASCENT, HEAD
from ..losses import weighted_sum
from ..param_buckets import all_params, grads_in, set_grads

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
    """One step's passes for a schedule: forwards and backwards with their hooks, and the optimizer phases.

    Losses are normalized by the whole batch ``B``: a pass over a subset
    ``index`` with per-sample weights ``w`` contributes ``sum_i w_i l_i / B``.
    The schedules get the weights already divided by ``B`` (``w_i / B``, from
    the optimizer's table), so each loss is one dot product: no division node
    in the graph, and for a power-of-two ``B`` the same bits as dividing after.
    With ``micro_batches = k > 1`` every pass runs over chunks of at most
    ``ceil(B / k)`` samples through ``closure(chunk)``, each chunk's graph freed
    before the next: gradients accumulate, activation memory is one chunk's.
    The ``before_backward`` hooks see every chunk's loss, ``after_backward`` runs
    once per pass. ``sync`` (:mod:`imbsam_fast.distributed`) decides which
    passes synchronize gradients across processes: only the last chunk of the
    pass marked ``sync=True``.

    A run with one micro-batch, no hooks and no synchronization (``plain``)
    takes each pass in three calls (forward, dot, backward) and skips the
    chunks, the sync contexts and the hook loops, with the same result: the
    step's own Python is what the user pays between the passes
    (``benchmarks/RESULTS.md``, thirteenth session).
    """

    __slots__ = ("opt", "closure", "batch", "hooks", "sync", "micro_batches", "plain")

    def __init__(self, opt: ImbSAM, closure: Callable[..., Tensor], batch: int, hooks: list[Any],
                 sync: GradSync, micro_batches: int = 1) -> None:
        self.opt = opt
        self.closure = closure
        self.batch = batch
        self.hooks = hooks
        self.sync = sync
        self.micro_batches = micro_batches
        self.plain = micro_batches == 1 and not hooks and sync.kind == "none"

    def forward(self, index: Optional[Tensor] = None) -> Tensor:
        """Per-sample losses of the closure: ``closure()`` for the batch, ``closure(index)`` for a subset."""
        if torch.is_grad_enabled():
            losses = self.closure() if index is None else self.closure(index)
        else:
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
        """``sum_i w_i l_i / B`` for the step's weights, which come divided by ``B`` (one dot product)."""
        return weighted_sum(losses, weights, 1)

    def chunks(self, index: Optional[Tensor], device: torch.device) -> list[Optional[Tensor]]:
        """The sample indices of each micro-batch of a pass over ``index`` (``None``: the whole batch)."""
        if self.micro_batches == 1:
            return [index]
        if index is None:
            index = torch.arange(self.batch, device=device)
        size = -(-self.batch // self.micro_batches)
        return list(index.split(size))

    def backward(self, loss: Tensor, phase: str, retain_graph: bool = False) -> None:
        """``loss.backward()`` after the ``before_backward`` hooks of ``phase``."""
        for h in self.hooks:
            loss = h.before_backward(self.opt, phase, loss)
        loss.backward(retain_graph=retain_graph)

    def finish(self, phase: str) -> None:
        """A pass is complete: the tail gradient at w is synchronized, then the ``after_backward`` hooks run."""
        if phase == ASCENT and self.sync.kind == "ddp":
            self.sync.reduce_ascent(grads_in(self.opt.param_groups))
        for h in self.hooks:
            h.after_backward(self.opt, phase)

    def full_pass(self, weights: Tensor, phase: str, *, sync: bool, backward: bool = True,
                  forward_context: Optional[ContextManager[Any]] = None) -> tuple[Tensor, Tensor]:
        """Forward the batch and backward ``sum_i w_i l_i / B``; returns the per-sample losses and that loss,
        detached. ``forward_context`` (one micro-batch only) is entered around the forward alone: it is left
        before the backward."""
        if self.plain:
            if forward_context is None:
                losses = self.forward(None)
            else:
                with forward_context:
                    losses = self.forward(None)
            loss = weighted_sum(losses, weights, 1)
            if backward:
                loss.backward()
            return losses.detach(), loss.detach()
        chunks = self.chunks(None, weights.device)
        if forward_context is not None and len(chunks) > 1:
            raise ValueError("a forward context applies to a pass of one micro-batch")
        losses, total = [], []
        for i, chunk in enumerate(chunks):
            with self.sync.forward_context(sync and i == len(chunks) - 1):
                with nullcontext() if forward_context is None else forward_context:
                    part = self.forward(chunk)
                loss = self.loss(part, weights if chunk is None else weights[chunk])
                if backward:
                    self.backward(loss, phase)
            losses.append(part.detach())
            total.append(loss.detach())
        if backward:
            self.finish(phase)
        return _joined(losses), _summed(total)

    def head_and_ascent(self, head_w: Tensor, tail_w: Tensor, has_head: bool) -> tuple[Tensor, Tensor, Tensor]:
        """Exact mode's first forward: g_h from the head loss (stashed), then g_t from the tail loss of the same
        forward in ``.grad``. Returns the per-sample losses, the head and the tail loss, detached."""
        chunks = self.chunks(None, head_w.device)
        params = all_params(self.opt.param_groups)
        tail_grads: list[Optional[Tensor]] = [None] * len(params)
        losses, heads, tails = [], [], []
        for chunk in chunks:
            with self.sync.forward_context(False):
                part = self.forward(chunk)
                head = self.loss(part, head_w if chunk is None else head_w[chunk])
                tail = self.loss(part, tail_w if chunk is None else tail_w[chunk])
                if has_head:
                    self.backward(head, HEAD, retain_graph=True)
                if len(chunks) == 1:
                    if has_head:
                        self.finish(HEAD)
                    self.stash()
                    self.backward(tail, ASCENT)
                else:
                    # g_h and g_t accumulate over chunks in two sets: swap the tail set into .grad for its backward.
                    head_grads = [p.grad for p in params]
                    set_grads(params, tail_grads)
                    self.backward(tail, ASCENT)
                    tail_grads = [p.grad for p in params]
                    set_grads(params, head_grads)
            losses.append(part.detach())
            heads.append(head.detach())
            tails.append(tail.detach())
        if len(chunks) > 1:
            if has_head:
                self.finish(HEAD)
            self.stash()
            set_grads(params, tail_grads)
        self.finish(ASCENT)
        return _joined(losses), _summed(heads), _summed(tails)

    def tail_pass(self, index: Optional[Tensor], weights: Tensor, phase: str,
                  context: Callable[[], ContextManager[Any]] = nullcontext, *, sync: bool = False) -> Tensor:
        """Forward ``closure(index)`` and backward ``sum_i w_i l_i / B`` (``weights`` of the whole batch)
        within ``context()``; returns the loss, detached."""
        if self.plain:
            if index is not None:
                weights = weights.index_select(0, index)
            if context is nullcontext:
                loss = weighted_sum(self.forward(index), weights, 1)
                loss.backward()
            else:
                with context():
                    loss = weighted_sum(self.forward(index), weights, 1)
                    loss.backward()
            return loss.detach()
        chunks = self.chunks(index, weights.device)
        total = []
        for i, chunk in enumerate(chunks):
            with context(), self.sync.forward_context(sync and i == len(chunks) - 1):
                loss = self.loss(self.forward(chunk), weights if chunk is None else weights[chunk])
                self.backward(loss, phase)
            total.append(loss.detach())
        self.finish(phase)
        return _summed(total)

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


def _joined(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _summed(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum()


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
