"""Parameter buckets: the unit every backend's parameter ops work on."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Bucket", "EPS", "combine_sq_norms"]

EPS = 1e-16


@dataclass
class Bucket:
    """Same-device, same-dtype, same-``rho`` parameters with their gradients and backup buffers."""

    params: list[Tensor]
    grads: list[Tensor]
    backups: list[Tensor]
    rho: float

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype


def combine_sq_norms(sq_norms: list[Tensor]) -> Tensor:
    """``||g||_2 = sqrt(sum_b s_b)`` from per-bucket sums of squares, on the first one's device.

    Empty input gives a zero norm on the CPU.
    """
    if not sq_norms:
        return torch.zeros(())
    device = sq_norms[0].device
    if len(sq_norms) == 1:
        return sq_norms[0].sqrt()
    return torch.stack([s.to(device, non_blocking=True) for s in sq_norms]).sum().sqrt()
