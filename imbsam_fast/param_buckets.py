"""The parameters that have a gradient, grouped into buckets for the backends, with a cached layout.

A bucket holds same-device, same-dtype, same-``(rho, adaptive)`` parameters,
their gradients and their backup buffers. Which parameters have a gradient
rarely changes from step to step, so the grouping and the backups are kept,
and rebuilt only when that set, or a group's ``rho`` or ``adaptive``, changes;
each step only collects the gradients. Sharded (DTensor) parameters enter
the buckets as their local shards.
"""

from __future__ import annotations

import operator
from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from .backends import Bucket
from .distributed import local_tensor

__all__ = ["ParamBuckets", "all_params", "grads_in", "params_with_grad", "set_grads", "clear_grads"]


Setting = tuple[float, bool]
"""A parameter's ``(rho, adaptive)``, from its group."""


def params_with_grad(groups: list[dict[str, Any]]) -> tuple[list[Tensor], list[Tensor], list[Setting]]:
    """The parameters whose ``.grad`` is set, those gradients, and their groups' ``(rho, adaptive)``;
    sparse gradients are an error."""
    params: list[Tensor] = []
    grads: list[Tensor] = []
    rhos: list[Setting] = []
    for group in groups:
        rho = (group["rho"], group["adaptive"])
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


def all_params(groups: list[dict[str, Any]]) -> list[Tensor]:
    """Every parameter of every group, in order."""
    return [p for group in groups for p in group["params"]]


def grads_in(groups: list[dict[str, Any]]) -> list[Tensor]:
    """Every ``.grad`` that is set, in group and parameter order."""
    return [p.grad for group in groups for p in group["params"] if p.grad is not None]


def set_grads(params: list[Tensor], grads: Iterable[Optional[Tensor]]) -> None:
    """``p.grad = g`` for each pair."""
    for p, g in zip(params, grads):
        p.grad = g


def clear_grads(params: list[Tensor]) -> None:
    """``p.grad = None`` for each parameter."""
    for p in params:
        p.grad = None


class ParamBuckets:
    """``build(params, grads, settings)`` -> buckets of the parameters (their local shards) with their
    gradients and backups."""

    def __init__(self) -> None:
        self._params: list[Tensor] = []
        self._rhos: list[Setting] = []
        self._layout: list[Bucket] = []
        self._slots: list[list[int]] = []
        self._sharded = False
        self.backup_of: dict[int, tuple[Tensor, int]] = {}
        """``id(parameter) -> (its backup, its bucket's position)`` in the current layout."""
        self.generation = 0
        """Counts the regroupings: a layout kept elsewhere (the extension's ParamBook) is current while it holds."""

    def build(self, params: list[Tensor], grads: list[Tensor], rhos: list[Setting]) -> list[Bucket]:
        self.layout(params, rhos)
        if self._sharded:
            grads = [local_tensor(g) for g in grads]
        return [Bucket(b.params, [grads[i] for i in slots], b.backups, b.rho, b.adaptive)
                for b, slots in zip(self._layout, self._slots)]

    def layout(self, params: list[Tensor], rhos: list[Setting]) -> list[Bucket]:
        """The buckets of ``params`` (their parameters and backups; no gradients), regrouped when ``params``,
        their settings or their devices and dtypes changed."""
        if not self._same(params, rhos):
            local = [local_tensor(p) for p in params]
            self._sharded = any(map(operator.is_not, local, params))
            self._layout, self._slots = self._group(local, rhos, self._old_backups())
            self._params, self._rhos = params, rhos
            self.backup_of = {id(p): (b, k) for k, bucket in enumerate(self._layout)
                              for p, b in zip(bucket.params, bucket.backups)}
            self.generation += 1
        return self._layout

    def _same(self, params: list[Tensor], rhos: list[Setting]) -> bool:
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
    def _group(params: list[Tensor], rhos: list[Setting], old: dict[int, tuple[Tensor, Tensor]]
               ) -> tuple[list[Bucket], list[list[int]]]:
        """The buckets (params and their backups, reused from ``old`` where they still fit) and, per bucket, the
        positions of its params in ``params``. A schedule on ``rho`` thus regroups without reallocating."""
        by_key: dict[tuple[torch.device, torch.dtype, Setting], tuple[Bucket, list[int]]] = {}
        for i, (p, setting) in enumerate(zip(params, rhos)):
            key = (p.device, p.dtype, setting)
            entry = by_key.get(key)
            if entry is None:
                entry = by_key[key] = (Bucket([], [], [], setting[0], setting[1]), [])
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
