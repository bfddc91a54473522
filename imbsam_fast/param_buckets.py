"""The parameters that have a gradient, grouped into buckets for the backends, with a cached layout.

A bucket holds same-device, same-dtype, same-``rho`` parameters, their gradients
and their backup buffers. Which parameters have a gradient rarely changes from
step to step, so the grouping and the backups are kept, and rebuilt only when
that set, or a group's ``rho``, changes; each step only collects the gradients.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import Tensor

from .backends import Bucket

__all__ = ["ParamBuckets", "params_with_grad"]


def params_with_grad(groups: list[dict[str, Any]]) -> tuple[list[Tensor], list[Tensor], list[float]]:
    """The parameters whose ``.grad`` is set, those gradients, and the groups' ``rho``; sparse gradients
    are an error."""
    params: list[Tensor] = []
    grads: list[Tensor] = []
    rhos: list[float] = []
    for group in groups:
        rho = group["rho"]
        for p in group["params"]:
            g = p.grad
            if g is not None:
                if g.is_sparse:
                    raise RuntimeError(
                        "ImbSAM does not support sparse gradients (e.g. nn.Embedding(sparse=True)); "
                        "use dense gradients"
                    )
                params.append(p)
                grads.append(g)
                rhos.append(rho)
    return params, grads, rhos


class ParamBuckets:
    """``build(params, grads, rhos)`` -> buckets of the parameters with their gradients and backups."""

    def __init__(self) -> None:
        self._params: list[Tensor] = []
        self._rhos: list[float] = []
        self._layout: list[Bucket] = []
        self._slots: list[list[int]] = []

    def build(self, params: list[Tensor], grads: list[Tensor], rhos: list[float]) -> list[Bucket]:
        if not self._same(params, rhos):
            self._layout, self._slots = self._group(params, rhos, self._old_backups())
            self._params, self._rhos = params, rhos
        return [Bucket(b.params, [grads[i] for i in slots], b.backups, b.rho)
                for b, slots in zip(self._layout, self._slots)]

    def _same(self, params: list[Tensor], rhos: list[float]) -> bool:
        if len(params) != len(self._params) or rhos != self._rhos:
            return False
        if not all(map(operator.is_, params, self._params)):
            return False
        # A parameter moved or re-typed in place (model.to() assigns .data): its backup must follow.
        for b in self._layout:
            device, dtype = b.backups[0].device, b.backups[0].dtype
            if not all(p.device == device and p.dtype == dtype for p in b.params):
                return False
        return True

    def _old_backups(self) -> dict[int, tuple[Tensor, Tensor]]:
        return {id(p): (p, b) for bucket in self._layout for p, b in zip(bucket.params, bucket.backups)}

    @staticmethod
    def _group(params: list[Tensor], rhos: list[float], old: dict[int, tuple[Tensor, Tensor]]
               ) -> tuple[list[Bucket], list[list[int]]]:
        """The buckets (params and their backups, reused from ``old`` where they still fit) and, per bucket, the
        positions of its params in ``params``. A schedule on ``rho`` thus regroups without reallocating."""
        by_key: dict[tuple[torch.device, torch.dtype, float], tuple[Bucket, list[int]]] = {}
        for i, (p, rho) in enumerate(zip(params, rhos)):
            key = (p.device, p.dtype, rho)
            entry = by_key.get(key)
            if entry is None:
                entry = by_key[key] = (Bucket([], [], [], rho), [])
            prev = old.get(id(p))
            backup = prev[1] if prev is not None and prev[0] is p and _fits(prev[1], p) else None
            entry[0].params.append(p)
            entry[0].backups.append(backup if backup is not None else
                                    torch.empty_like(p, memory_format=torch.preserve_format))
            entry[1].append(i)
        return [b for b, _ in by_key.values()], [slots for _, slots in by_key.values()]


def _fits(backup: Tensor, p: Tensor) -> bool:
    return backup.shape == p.shape and backup.dtype == p.dtype and backup.device == p.device and (
        backup.stride() == p.stride())
