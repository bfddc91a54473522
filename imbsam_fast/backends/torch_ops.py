"""Pure-torch parameter ops on buckets of same-device, same-dtype tensors.

These are the fallback on every machine and the oracle the fast backends are
tested against. Each function issues a constant number of ``torch._foreach_*``
calls per bucket and never synchronizes with an accelerator.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .buckets import EPS, Bucket, SqNormReduce, sum_sq_norms

__all__ = ["TorchParamOps"]


class TorchParamOps:
    """Norm / perturb / restore through foreach kernels."""

    name = "torch"

    def __init__(self, capturable: bool = False) -> None:
        self.fallbacks: set[str] = set()
        self.capturable = capturable
        """No value read back, even of a CPU scalar (the optimizer's ``capturable=True``)."""

    def sq_norm(self, grads: list[Tensor]) -> Tensor:
        """``s = sum_j ||g_j||_2^2`` as a 0-dim tensor, accumulated in fp32 (fp64 for fp64 tensors)."""
        if not grads:
            return torch.zeros(())
        acc = torch.float64 if grads[0].dtype == torch.float64 else torch.float32
        norms = torch._foreach_norm(grads, 2, dtype=acc)
        return torch.stack(norms).square().sum()

    def grad_norm(self, grad_lists: list[list[Tensor]], reduce: SqNormReduce = None) -> Tensor:
        """Global ``||g||_2 = sqrt(reduce(sum_j ||g_j||^2))`` over every tensor of every list."""
        total = sum_sq_norms([self.sq_norm(gs) for gs in grad_lists if gs])
        return (total if reduce is None else reduce(total)).sqrt()

    def perturb_(self, buckets: list[Bucket], reduce: SqNormReduce = None) -> Tensor:
        """One global norm ``n = ||t||_2``, then per bucket ``backup <- w``, ``w <- w + rho / (n + 1e-16) * e``.

        ``t = g`` and ``e = t`` (SAM), or on adaptive buckets ``t = |w| * g`` and
        ``e = |w| * t`` (ASAM). Returns ``n``. The gradients are overwritten
        (with ``t``, then ``e``): the optimizer no longer needs the tail gradient at w.
        """
        magnitudes = [_scale_adaptive_(b) for b in buckets]
        norm = self.grad_norm([b.grads for b in buckets], reduce)
        scales: dict[tuple[torch.device, float], Tensor] = {}
        for b, mag in zip(buckets, magnitudes):
            key = (b.device, b.rho)
            if key not in scales:
                scales[key] = (b.rho / (norm + EPS)).to(b.device, non_blocking=True)
            if mag is not None:
                torch._foreach_mul_(b.grads, mag)
            perturb_bucket_(b, scales[key], self.capturable)
        return norm

    def restore_(self, buckets: list[Bucket]) -> None:
        """Bit-exact restore: ``w <- backup``."""
        for b in buckets:
            torch._foreach_copy_(b.params, b.backups)


def _scale_adaptive_(b: Bucket) -> list[Tensor] | None:
    """``g <- |w| * g`` on an adaptive bucket; returns ``|w|`` (``None`` for other buckets)."""
    if not b.adaptive:
        return None
    magnitude = torch._foreach_abs(b.params)
    torch._foreach_mul_(b.grads, magnitude)
    return magnitude


def perturb_bucket_(b: Bucket, scale: Tensor, capturable: bool = False) -> None:
    """``backup <- w``; ``w <- w + s * g`` for one bucket, ``s`` a 0-dim tensor on its device."""
    torch._foreach_copy_(b.backups, b.params)
    if scale.device.type == "cpu" and b.dtype in (torch.float32, torch.float64) and not capturable:
        # Reading a CPU scalar is no device sync; it lets one fused pass (w + s * g)
        # replace two (g * s, then w + e). Half types keep the two passes: their
        # alpha must fit the dtype, and s = rho / 1e-16 for a zero gradient does not.
        torch._foreach_add_(b.params, b.grads, alpha=float(scale))
        return
    torch._foreach_mul_(b.grads, scale)
    torch._foreach_add_(b.params, b.grads)
