"""Parameter buckets: the unit every backend's parameter ops work on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = ["Bucket", "EPS", "SqNormReduce", "sum_sq_norms"]

EPS = 1e-16

SqNormReduce = Optional[Callable[[Tensor], Tensor]]
"""Applied to a sum of squares before its square root: sums it over the shards of sharded parameters."""


@dataclass
class Bucket:
    """Same-device, same-dtype, same-``rho`` parameters with their gradients and backup buffers.

    ``adaptive`` buckets take the ASAM perturbation (``|w|``-scaled, see :mod:`.contract`).
    """

    params: list[Tensor]
    grads: list[Tensor]
    backups: list[Tensor]
    rho: float
    adaptive: bool = False

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype


def sum_sq_norms(sq_norms: list[Tensor]) -> Tensor:
    """``sum_b s_b`` of per-bucket sums of squares, on the first one's device (a CPU zero when empty)."""
    if not sq_norms:
        return torch.zeros(())
    if len(sq_norms) == 1:
        return sq_norms[0]
    device = sq_norms[0].device
    return torch.stack([s.to(device, non_blocking=True) for s in sq_norms]).sum()
