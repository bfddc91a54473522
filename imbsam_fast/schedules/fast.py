"""The fast schedule: one full pass for the head, the tail gradient at w and at w + e from tail samples only.

    losses = closure()                          full forward at w (BatchNorm statistics recorded if needed)
    head.backward()                  -> g_h     "head"
    closure(T) at w, backward        -> g_t     "ascent"     T = the batch's tail samples
    w <- w + rho g_t / (||g_t|| + 1e-16)
    closure(T') at w + e, backward   -> g_t'    "perturbed"  T' = T plus ghost samples on BatchNorm models
    restore w; base step on g_h + g_t'

Losses of every pass are divided by the whole batch size, so without
BatchNorm the update equals exact mode's. A batch with no tail sample is one
forward, one backward and a plain step. Across processes (DDP, FSDP2) the
tail count of the whole global batch decides, so every process runs the same
passes: one whose own batch holds no tail sample runs them with zero weight.

BatchNorm layers in training mode cannot normalize a pass over one or two
tail samples with its own statistics, and must not move their running
statistics there (see :mod:`imbsam_fast.batchnorm`). ``fast_bn`` picks:

* ``"replay-ghost"`` (default): the pass at w replays the full forward's
  statistics (it only sets the ascent direction); the pass at w + e, whose
  gradient enters the update, adds ``ghost_batch`` random head samples of
  weight 0 so the layers normalize with, and differentiate through, the
  statistics of a real batch;
* ``"ghost"``: the ghost batch in both tail passes.

Running statistics move only in the full forward. Replaying in both passes
was measured to collapse the tail classes (``benchmarks/RESULTS.md``) and is
not offered.

``tail_capacity=K`` fixes the size of both tail passes: ``K`` samples chosen
on the device (:func:`fixed_tail_index`), so no host sync reads the tail
count and every batch runs the same three passes (the shapes a captured or
compiled step needs). Zero-weight head samples fill the pass and serve as
the BatchNorm ghost batch; more than ``K`` tail samples are subsampled
uniformly and reweighted by ``n_tail / K``.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
from torch import Tensor

from ..batchnorm import BatchNormStats
from ..hooks import ASCENT, HEAD, PERTURBED
from ..losses import weighted_sum
from .base import StepLosses, StepRun

__all__ = ["FastSchedule", "FAST_BN", "fixed_tail_index"]

FAST_BN = ("replay-ghost", "ghost")


class FastSchedule:
    """Tail passes on tail samples only; BatchNorm handled by ``fast_bn`` with ``ghost_batch`` ghost samples."""

    name = "fast"

    def __init__(self, batchnorm: BatchNormStats, fast_bn: str = "replay-ghost", ghost_batch: int = 8,
                 tail_capacity: Optional[int] = None) -> None:
        if fast_bn == "replay":
            raise ValueError(
                "fast_bn='replay' was removed: replaying the full batch's BatchNorm statistics in both tail passes "
                "drops the gradient through them and was measured to collapse the tail classes (digits Few 2.3% vs "
                "46.6% in exact mode); use 'replay-ghost' (default) or 'ghost'"
            )
        if fast_bn not in FAST_BN:
            raise ValueError(f"fast_bn must be one of {', '.join(FAST_BN)}, got {fast_bn!r}")
        if isinstance(ghost_batch, bool) or not isinstance(ghost_batch, int) or ghost_batch < 1:
            raise ValueError(
                f"ghost_batch must be an int >= 1 (head samples added to the BatchNorm ghost batch), got "
                f"{ghost_batch!r}; a tail-only pass would normalize one or two samples by their own statistics"
            )
        if tail_capacity is not None and (isinstance(tail_capacity, bool) or not isinstance(tail_capacity, int)
                                          or tail_capacity < 1):
            raise ValueError(f"tail_capacity must be an int >= 1 (the size of every tail pass), got {tail_capacity!r}")
        self.fast_bn = fast_bn
        self.ghost_batch = ghost_batch
        self.tail_capacity = tail_capacity
        self._bn = batchnorm

    def run(self, run: StepRun, targets: Tensor, head_w: Tensor, tail_w: Tensor, has_head: bool,
            has_tail: bool) -> StepLosses:
        self._bn.pin_plan()
        try:
            return self._run(run, head_w, tail_w, has_head, has_tail)
        finally:
            self._bn.unpin_plan()

    def _run(self, run: StepRun, head_w: Tensor, tail_w: Tensor, has_head: bool, has_tail: bool) -> StepLosses:
        if self.tail_capacity is not None and has_tail:
            return self._run_fixed(run, head_w, tail_w, has_head)
        # The tail passes are sized by the number of tail samples: reading it is one
        # host sync per step when the targets live on an accelerator (none on the CPU).
        index = torch.nonzero(tail_w).squeeze(1) if has_tail else tail_w.new_zeros(0, dtype=torch.long)
        n_local = index.shape[0]
        if not has_tail:
            n_tail = 0
        elif run.sync.kind == "none":
            n_tail = n_local
        else:
            n_tail = self._global_count(run, n_local, tail_w.device)
        bn = n_tail > 0 and self._bn.active()
        replay_at_w = bn and self.fast_bn == "replay-ghost" and run.micro_batches == 1
        losses, head = run.full_pass(head_w, HEAD, sync=n_tail == 0, backward=has_head or n_tail == 0,
                                     forward_context=self._bn.record() if replay_at_w else None)
        tail = weighted_sum(losses, tail_w, 1)
        if n_tail == 0:
            run.plain_step()
            return StepLosses(head, tail, torch.zeros_like(tail), losses)
        opt = run.opt  # its phases called directly (run.stash / ascend / descend, one call less each)
        opt.first_step()
        ghosts = self._with_ghosts(index, tail_w, n_local) if bn else index
        if n_local == 0:
            # Tail samples elsewhere in the global batch: this process runs the same passes with zero weight.
            index = index.new_zeros(1)
            ghosts = ghosts if ghosts.numel() else index
        frozen = self._bn.freeze_running_stats if bn else nullcontext
        if replay_at_w:
            run.tail_pass(index, tail_w, ASCENT, self._bn.replay)
        else:
            run.tail_pass(ghosts, tail_w, ASCENT, frozen)
        opt.second_step()
        tail2 = run.tail_pass(ghosts, tail_w, PERTURBED, frozen, sync=True)
        opt.third_step()
        return StepLosses(head, tail, tail2, losses)

    def _run_fixed(self, run: StepRun, head_w: Tensor, tail_w: Tensor, has_head: bool) -> StepLosses:
        """Tail passes of exactly ``K = tail_capacity`` samples, chosen on the device (see ``fixed_tail_index``)."""
        bn = self._bn.active()
        replay_at_w = bn and self.fast_bn == "replay-ghost" and run.micro_batches == 1
        losses, head = run.full_pass(head_w, HEAD, sync=False, backward=has_head,
                                     forward_context=self._bn.record() if replay_at_w else None)
        tail = run.loss(losses, tail_w)
        index, weights = fixed_tail_index(tail_w, min(self.tail_capacity, tail_w.numel()))
        run.stash()
        frozen = self._bn.freeze_running_stats if bn else nullcontext
        run.tail_pass(index, weights, ASCENT, self._bn.replay if replay_at_w else frozen)
        run.ascend()
        tail2 = run.tail_pass(index, weights, PERTURBED, frozen, sync=True)
        run.descend()
        return StepLosses(head, tail, tail2, losses)

    @staticmethod
    def _global_count(run: StepRun, n_local: int, device: torch.device) -> int:
        """The tail count of the whole batch over processes (``_run`` takes ``n_local`` itself for a single
        process): every process decides the same passes."""
        # One all-reduce and one read per step: the passes (and so the collectives) depend on it.
        return int(run.sync.global_count(torch.tensor(n_local, device=device)))

    def _with_ghosts(self, index: Tensor, tail_w: Tensor, n_tail: int) -> Tensor:
        """``index`` (the ``n_tail`` tail samples) plus up to ``ghost_batch`` head samples drawn at random
        (torch's global RNG), sorted.

        The head samples get random keys in ``[0, 1)`` and the tail samples -1, so the ``n_tail + k``
        smallest keys are the tail samples and ``k`` random head samples: no second host sync (``k``
        follows from the tail count already read).
        """
        batch = tail_w.shape[0]
        k = min(self.ghost_batch, batch - n_tail)
        if k <= 0:
            return index
        keys = torch.rand(batch, device=tail_w.device).index_fill_(0, index, -1.0)
        return torch.topk(keys, n_tail + k, largest=False)[1].sort()[0]


def fixed_tail_index(tail_w: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``k`` sample indices (sorted) and the whole batch's tail weights for them, with no host sync.

    With ``n`` tail samples (``tail_w != 0``): ``n <= k`` takes all of them plus ``k - n`` random
    head samples, whose tail weight is 0; ``n > k`` takes a uniform random subset of ``k`` tail
    samples and scales the weights by ``n / k``, so that the expected loss is the full tail loss.
    Randomness comes from torch's global generator.
    """
    is_tail = tail_w != 0
    keys = torch.rand(tail_w.shape, device=tail_w.device) + (~is_tail).to(tail_w.dtype) * 2.0
    index = torch.topk(keys, k, largest=False).indices.sort().values
    scale = (is_tail.sum().to(tail_w.dtype) / k).clamp(min=1.0)
    return index, tail_w * scale
