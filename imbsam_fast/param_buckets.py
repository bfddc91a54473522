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


def params_with_grad(groups: list[dict[str, Any]]) -> tuple[list[Tensor], list[float]]:
    """The parameters whose ``.grad`` is set, and their group's ``rho``; sparse gradients are an error."""
    params: list[Tensor] = []
    rhos: list[float] = []
    for group in groups:
        rho = group["rho"]
        for p in group["params"]:
            if p.grad is not None:
                params.append(p)
                rhos.append(rho)
    if any(p.grad.is_sparse for p in params):
        raise RuntimeError(
            "ImbSAM does not support sparse gradients (e.g. nn.Embedding(sparse=True)); use dense gradients"
        )
    return params, rhos


class ParamBuckets:
    """``build(params, rhos)`` -> buckets whose ``grads`` are the parameters' current ``.grad``."""

    def __init__(self) -> None:
        self._params: list[Tensor] = []
        self._rhos: list[float] = []
        self._layout: list[Bucket] = []

    def build(self, params: list[Tensor], rhos: list[float]) -> list[Bucket]:
        if not self._same(params, rhos):
            self._layout = self._group(params, rhos)
            self._params, self._rhos = params, rhos
        return [Bucket(b.params, [p.grad for p in b.params], b.backups, b.rho) for b in self._layout]

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

    @staticmethod
    def _group(params: list[Tensor], rhos: list[float]) -> list[Bucket]:
        by_key: dict[tuple[torch.device, torch.dtype, float], Bucket] = {}
        for p, rho in zip(params, rhos):
            key = (p.device, p.dtype, rho)
            b = by_key.get(key)
            if b is None:
                b = by_key[key] = Bucket([], [], [], rho)
            b.params.append(p)
            b.backups.append(torch.empty_like(p, memory_format=torch.preserve_format))
        return list(by_key.values())
