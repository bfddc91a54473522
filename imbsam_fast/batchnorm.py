"""BatchNorm handling for ImbSAM's extra passes.

Fast mode runs the tail passes on the batch's tail samples only, often one or
two of them. Batch statistics of so few samples are meaningless, and the
running statistics must not move. :class:`BatchNormStats` records, during the
first full-batch forward, the batch statistics every BatchNorm layer used::

    mu = mean_{n, spatial}(x),   var = mean_{n, spatial}((x - mu)^2)   (biased, as in training)

and replays them in the tail passes: each layer computes
``y = (x - mu) / sqrt(var + eps) * gamma + beta`` with the recorded ``mu`` and
``var`` (constants for autograd) and leaves its running statistics alone.
Gradients reach ``x``, ``gamma`` and ``beta``; they do not flow through the
batch statistics, which is where fast mode differs from exact mode on
BatchNorm models (measured in ``benchmarks/RESULTS.md``).

The optimizer's default treatment (``fast_bn="replay-ghost"``) replays only
in the pass at w; the pass at w + e runs a ghost batch (tail samples plus a
few zero-weight head samples) under :meth:`BatchNormStats.freeze_running_stats`,
so that its gradient flows through real batch statistics.

One mechanism covers BatchNorm1d/2d/3d, SyncBatchNorm and every other
subclass of ``torch.nn.modules.batchnorm._BatchNorm``. Layers in eval mode
use their running statistics as usual and are left alone. A layer called
several times in one forward gets its recorded statistics back in call order
(cycling, so that activation checkpointing's recomputation in the backward
sees them again).
"""

from __future__ import annotations

import operator
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["BatchNormStats", "BatchNormSnapshot", "batchnorm_layers"]


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm layer (any ``_BatchNorm`` subclass) in ``model``."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


class BatchNormStats:
    """Record the batch statistics of one forward; replay them, or freeze running statistics, later;
    snapshot and restore the buffers."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = batchnorm_layers(model)
        self._stats: dict[_BatchNorm, list[tuple[Tensor, Tensor]]] = {}
        self._per_call: set[_BatchNorm] = set()
        self._running_copy = _ReusedCopy()
        self._snapshot_copy = _ReusedCopy()

    def active(self) -> bool:
        """Whether any BatchNorm layer is in training mode (eval-mode layers need no handling)."""
        return any(m.training for m in self.layers)

    def buffers(self) -> list[Tensor]:
        """The running statistics and batch counters of every layer (the tensors a forward may update)."""
        # A module's _buffers dict outlives model.to() (which replaces its values), and reading it directly
        # skips nn.Module.__getattr__.
        return [t for m in self.layers for t in m._buffers.values() if t is not None]

    @torch.no_grad()
    def snapshot(self) -> Optional[BatchNormSnapshot]:
        """A copy of :meth:`buffers` (one foreach copy into storage reused across calls), or ``None`` when
        there are none. A snapshot is good until the next call."""
        buffers = self.buffers()
        if not buffers:
            return None
        return BatchNormSnapshot(buffers, self._snapshot_copy.of(buffers))

    @contextmanager
    def record(self) -> Iterator[None]:
        """Within: each training-mode layer stores the batch mean and biased variance of its input.

        Layers that track running statistics with a momentum ``m > 0`` give them
        back for free: ``r_new = (1 - m) r_old + m s`` solves for the batch
        statistic ``s = r_old + (r_new - r_old) / m`` (the running variance holds
        the unbiased one, rescaled by ``(n - 1) / n``). All such layers are
        solved together after the forward, a few foreach ops in all; their old
        running statistics are copied aside before it in one foreach copy.
        Other layers (no running statistics, cumulative averaging, or called
        more than once per forward) compute ``var_mean`` of their input.
        """
        self._stats = {}
        training = [m for m in self.layers if m.training]
        solved = {m for m in training if _derivable(m) and m not in self._per_call}
        order = [m for m in training if m in solved]
        old = self._copy_running_stats(order)
        old_of = {m: (old[2 * i], old[2 * i + 1]) for i, m in enumerate(order)}
        calls: dict[_BatchNorm, int] = {}
        sizes: dict[_BatchNorm, int] = {}

        def pre_hook(module: _BatchNorm, args: tuple[Tensor, ...]) -> None:
            if not module.training:
                return
            count = calls[module] = calls.get(module, 0) + 1
            if module in solved:
                if count == 1:
                    x = args[0]
                    sizes[module] = x.numel() // x.shape[1]
                    return
                # A second call of the same layer: solve its first call now, and go per call from here on.
                solved.discard(module)
                self._per_call.add(module)
                self._stats[module] = [_solve(module, *old_of[module], sizes[module])]
            x = args[0]
            with torch.no_grad():
                var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=0)
            self._stats.setdefault(module, []).append((mean, var))

        handles = [m.register_forward_pre_hook(pre_hook) for m in training]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        done = [m for m in order if m in solved and m in sizes]
        if done:
            for m, stats in zip(done, _solve_all(done, [old_of[m] for m in done], [sizes[m] for m in done])):
                self._stats[m] = [stats]

    def _copy_running_stats(self, modules: list[_BatchNorm]) -> list[Tensor]:
        """``[mean_0, var_0, mean_1, ...]`` of ``modules`` copied into buffers reused across steps."""
        if not modules:
            return []
        return self._running_copy.of([t for m in modules for t in _running(m)])

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Within: training-mode layers normalize with the recorded statistics and update nothing."""
        patched = []
        for m in self.layers:
            if not m.training:
                continue
            stats = self._stats.get(m)
            if not stats:
                raise RuntimeError(
                    f"{type(m).__name__} ran in training mode in a tail pass but not in the full-batch forward; "
                    "fast mode needs the same layers to run in both"
                )
            # Plain attributes live in the module's __dict__: writing there skips nn.Module.__setattr__'s checks.
            m.__dict__["forward"] = _replaying_forward(m, stats)
            patched.append(m)
        try:
            yield
        finally:
            for m in patched:
                m.__dict__.pop("forward", None)

    @contextmanager
    def freeze_running_stats(self) -> Iterator[None]:
        """Within: training-mode layers use batch statistics but leave running statistics (and their count) alone."""
        frozen = [m for m in self.layers if m.training and m.track_running_stats]
        for m in frozen:
            m.__dict__["track_running_stats"] = False
        try:
            yield
        finally:
            for m in frozen:
                m.__dict__["track_running_stats"] = True


class _ReusedCopy:
    """``of(tensors)``: a copy of ``tensors`` (one foreach copy) into storage kept across calls, reallocated
    only when the tensors are not the same objects as last time. A copy is good until the next call."""

    def __init__(self) -> None:
        self._src: list[Tensor] = []
        self._copies: list[Tensor] = []

    @torch.no_grad()
    def of(self, tensors: list[Tensor]) -> list[Tensor]:
        if len(self._src) != len(tensors) or not all(map(operator.is_, self._src, tensors)):
            self._copies = [torch.empty_like(t) for t in tensors]
            self._src = tensors
        torch._foreach_copy_(self._copies, tensors)
        return self._copies


class BatchNormSnapshot:
    """BatchNorm buffers and a copy of them; :meth:`restore` puts the copy back (one foreach copy)."""

    def __init__(self, buffers: list[Tensor], saved: list[Tensor]) -> None:
        self.buffers = buffers
        self.saved = saved

    @torch.no_grad()
    def restore(self) -> None:
        torch._foreach_copy_(self.buffers, self.saved)


def _derivable(module: _BatchNorm) -> bool:
    """Whether the batch statistics can be solved from the running-statistics update with no host read.

    Cumulative averaging (``momentum=None``) would need the batch count on the host: not solved.
    """
    mean, var = _running(module)
    if not module.track_running_stats or mean is None or var is None:
        return False
    return module.momentum is not None and module.momentum > 0


def _running(module: _BatchNorm) -> tuple[Tensor, Tensor]:
    """``(running_mean, running_var)`` read from the buffer dict (no ``nn.Module.__getattr__``)."""
    buffers = module._buffers
    return buffers.get("running_mean"), buffers.get("running_var")  # type: ignore[return-value]


@torch.no_grad()
def _solve(module: _BatchNorm, old_mean: Tensor, old_var: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Batch ``(mean, biased var)`` of one layer from its running statistics before and after one update."""
    return _solve_all([module], [(old_mean, old_var)], [n])[0]


@torch.no_grad()
def _solve_all(modules: list[_BatchNorm], old: list[tuple[Tensor, Tensor]],
               sizes: list[int]) -> list[tuple[Tensor, Tensor]]:
    """``s = r_old + (r_new - r_old) / m`` for every layer at once (one ``lerp`` per distinct momentum, in place
    of the old values); variances rescaled by ``(n - 1) / n``."""
    by_momentum: dict[float, tuple[list[Tensor], list[Tensor]]] = {}
    for m, (mean, var) in zip(modules, old):
        prev, new = by_momentum.setdefault(float(m.momentum), ([], []))
        prev += (mean, var)
        new += _running(m)
    for momentum, (prev, new) in by_momentum.items():
        torch._foreach_lerp_(prev, new, 1.0 / momentum)
    variances = [var for _, var in old]
    torch._foreach_mul_(variances, [(n - 1) / n for n in sizes])
    torch._foreach_clamp_min_(variances, 0.0)
    return old


def _replaying_forward(module: _BatchNorm, stats: list[tuple[Tensor, Tensor]]):
    calls = [0]

    def forward(x: Tensor) -> Tensor:
        module._check_input_dim(x)
        mean, var = stats[calls[0] % len(stats)]
        calls[0] += 1
        return F.batch_norm(x, mean, var, module.weight, module.bias, training=False, momentum=0.0, eps=module.eps)

    return forward
