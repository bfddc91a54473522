"""The one contract every parameter-op backend implements.

A backend works on whole phases over parameter buckets (same device, dtype and
``rho``), so that a fused backend can fuse across tensors and buckets::

    grad_norm(lists)  ||g||_2 over every tensor of every list        (0-dim tensor, no host sync)
    perturb_(buckets) t = |w| * g on adaptive buckets, t = g on the others; n = ||t||_2;
                      per bucket backup <- w, w <- w + rho / (n + 1e-16) * e
                      with e = |w| * t (ASAM: w^2 * g) or e = t (SAM); returns n
    restore_(buckets) w <- backup, a bit copy

Both norms take ``reduce``: a function applied to the sum of squares before
its square root, which sums it over the shards of sharded (FSDP2) parameters.
``fallbacks`` names what a backend handed to the torch ops instead (e.g.
``"torch.float64"``), so that the optimizer can say which backend really ran.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

from .buckets import Bucket, SqNormReduce

__all__ = ["ParamOps"]


@runtime_checkable
class ParamOps(Protocol):
    """Norm / perturb / restore over buckets: see the module docstring for the math."""

    name: str
    fallbacks: set[str]

    def grad_norm(self, grad_lists: list[list[Tensor]], reduce: SqNormReduce = None) -> Tensor: ...

    def perturb_(self, buckets: list[Bucket], reduce: SqNormReduce = None) -> Tensor: ...

    def restore_(self, buckets: list[Bucket]) -> None: ...
