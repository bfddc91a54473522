"""Pure-torch parameter ops on buckets of same-device, same-dtype tensors.

These are the fallback on every machine and the oracle the fast backends are
tested against. Each function issues a constant number of ``torch._foreach_*``
calls per bucket and never synchronizes with the host.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["TorchParamOps"]


class TorchParamOps:
    """Norm / perturb / restore through foreach kernels."""

    name = "torch"

    def bucket_norms(self, grads: list[Tensor]) -> Tensor:
        """Per-tensor L2 norms ``n_j = ||g_j||_2`` as a 1-D tensor, accumulated in fp32 (fp64 for fp64)."""
        if not grads:
            return torch.zeros(0)
        acc = torch.float64 if grads[0].dtype == torch.float64 else torch.float32
        norms = torch._foreach_norm(grads, 2, dtype=acc)
        return torch.stack(norms)

    def perturb_(self, params: list[Tensor], grads: list[Tensor], backups: list[Tensor], scale: Tensor) -> None:
        """``backup <- w``; ``w <- w + s * g``.

        ``scale`` is a 0-dim tensor on the bucket's device. ``g`` may be
        overwritten (with ``e = s * g``): the optimizer no longer needs the tail
        gradient at w.
        """
        if not params:
            return
        torch._foreach_copy_(backups, params)
        if scale.device.type == "cpu":
            # Reading a CPU scalar is no device sync; it lets one fused pass (w + s * g)
            # replace two (g * s, then w + e).
            torch._foreach_add_(params, grads, alpha=float(scale))
            return
        torch._foreach_mul_(grads, scale)
        torch._foreach_add_(params, grads)

    def restore_(self, params: list[Tensor], backups: list[Tensor]) -> None:
        """Bit-exact restore: ``w <- backup``."""
        if params:
            torch._foreach_copy_(params, backups)
