"""The one contract every parameter-op backend implements.

A backend works on whole phases over parameter buckets (same device, dtype and
``rho``), so that a fused backend can fuse across tensors and buckets::

    grad_norm(lists)  ||g||_2 over every tensor of every list        (0-dim tensor, no host sync)
    perturb_(buckets) n = ||g||_2; per bucket backup <- w, w <- w + rho / (n + 1e-16) * g; returns n
    restore_(buckets) w <- backup, a bit copy

``fallbacks`` names what a backend handed to the torch ops instead (e.g.
``"torch.float64"``), so that the optimizer can say which backend really ran.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

from .buckets import Bucket

__all__ = ["ParamOps"]


@runtime_checkable
class ParamOps(Protocol):
    """Norm / perturb / restore over buckets: see the module docstring for the math."""

    name: str
    fallbacks: set[str]

    def grad_norm(self, grad_lists: list[list[Tensor]]) -> Tensor: ...

    def perturb_(self, buckets: list[Bucket]) -> Tensor: ...

    def restore_(self, buckets: list[Bucket]) -> None: ...
