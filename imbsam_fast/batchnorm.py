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

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["BatchNormStats", "batchnorm_layers"]


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm layer (any ``_BatchNorm`` subclass) in ``model``."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


class BatchNormStats:
    """Record the batch statistics of one forward; replay them, or freeze running statistics, later."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = batchnorm_layers(model)
        self._stats: dict[_BatchNorm, list[tuple[Tensor, Tensor]]] = {}

    def active(self) -> bool:
        """Whether any BatchNorm layer is in training mode (eval-mode layers need no handling)."""
        return any(m.training for m in self.layers)

    @contextmanager
    def record(self) -> Iterator[None]:
        """Within: each training-mode layer stores the batch mean and biased variance of its input.

        Layers that track running statistics with a momentum give them back
        for free: ``r_new = (1 - m) r_old + m * s`` solves for the batch
        statistic ``s`` (the running variance holds the unbiased one, rescaled
        by ``(n - 1) / n``). Other layers compute them from the input.
        """
        self._stats = {}
        before: dict[_BatchNorm, tuple[Tensor, Tensor]] = {}

        def pre_hook(module: _BatchNorm, args: tuple[Tensor, ...]) -> None:
            if not module.training:
                return
            if _derivable(module):
                before[module] = (module.running_mean.clone(), module.running_var.clone())
                return
            x = args[0]
            with torch.no_grad():
                var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=0)
            self._stats.setdefault(module, []).append((mean, var))

        def post_hook(module: _BatchNorm, args: tuple[Tensor, ...], output: Tensor) -> None:
            old = before.pop(module, None)
            if old is None:
                return
            x = args[0]
            n = x.numel() // x.shape[1]
            m = module.momentum if module.momentum is not None else 1.0 / float(module.num_batches_tracked)
            with torch.no_grad():
                mean = (module.running_mean - (1.0 - m) * old[0]) / m
                var = (module.running_var - (1.0 - m) * old[1]) / m * ((n - 1) / n)
            self._stats.setdefault(module, []).append((mean, var.clamp_min(0.0)))

        handles = [m.register_forward_pre_hook(pre_hook) for m in self.layers]
        handles += [m.register_forward_hook(post_hook) for m in self.layers]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

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
            m.forward = _replaying_forward(m, stats)  # type: ignore[method-assign]
            patched.append(m)
        try:
            yield
        finally:
            for m in patched:
                del m.forward

    @contextmanager
    def freeze_running_stats(self) -> Iterator[None]:
        """Within: training-mode layers use batch statistics but leave running statistics (and their count) alone."""
        frozen = [m for m in self.layers if m.training and m.track_running_stats]
        for m in frozen:
            m.track_running_stats = False
        try:
            yield
        finally:
            for m in frozen:
                m.track_running_stats = True


def _derivable(module: _BatchNorm) -> bool:
    """Whether the batch statistics can be solved from the running-statistics update."""
    if not module.track_running_stats or module.running_mean is None or module.running_var is None:
        return False
    if module.momentum is None:
        return module.num_batches_tracked is not None
    return module.momentum > 0


def _replaying_forward(module: _BatchNorm, stats: list[tuple[Tensor, Tensor]]):
    calls = [0]

    def forward(x: Tensor) -> Tensor:
        module._check_input_dim(x)
        mean, var = stats[calls[0] % len(stats)]
        calls[0] += 1
        return F.batch_norm(x, mean, var, module.weight, module.bias, training=False, momentum=0.0, eps=module.eps)

    return forward
