"""Class-masked losses: one per-sample loss, two class-weighted sums.

For per-sample losses ``l_i``, labels ``y_i`` and class weights ``a``, ``b``
(see :mod:`imbsam_fast.priors`), over a batch of ``B`` samples::

    head = sum_i a[y_i] * l_i / B        (taken at w)
    tail = sum_i b[y_i] * l_i / B        (taken at w + e)

``B`` counts every sample of the batch, ignored ones included, as the public
ImbSAM code divides by the batch size.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .backends.loss_dispatch import resolve_loss_backend
from .labels import check_targets
from .priors import ClassWeights, imbsam_weights, sample_weights

__all__ = ["split_head_tail", "class_weighted_cross_entropy", "head_tail_cross_entropy", "weighted_sum"]


def split_head_tail(
    per_sample_losses: torch.Tensor,
    targets: torch.Tensor,
    weights: ClassWeights,
    *,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split any per-sample loss into ``(head, tail)`` by class weights (formula in the module doc)."""
    if per_sample_losses.ndim != 1 or per_sample_losses.shape != targets.shape:
        raise ValueError(
            "per-sample losses must be 1-D with one entry per target: got losses of shape "
            f"{tuple(per_sample_losses.shape)} for targets of shape {tuple(targets.shape)}"
        )
    a, b = sample_weights(weights, targets, ignore_index)
    batch = per_sample_losses.shape[0]
    return weighted_sum(per_sample_losses, a, batch), weighted_sum(per_sample_losses, b, batch)


def weighted_sum(losses: torch.Tensor, weights: torch.Tensor, denom: int) -> torch.Tensor:
    """``sum_i w_i l_i / max(denom, 1)``, the weights moved to the losses' device and dtype (no host sync)."""
    try:
        total = torch.dot(weights, losses)
    except RuntimeError:
        # Weights of another device or dtype (dot checks both before it computes): moved, and dotted again.
        total = torch.dot(weights.to(device=losses.device, dtype=losses.dtype, non_blocking=True), losses)
    return total if denom <= 1 else total / denom


def class_weighted_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: ClassWeights,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy split into ``(head, tail)`` with per-class weights ``a`` and ``b``.

    ``l_i = -(1 - s) * log p_{i, y_i} - s/C * sum_k log p_{i,k}`` (label smoothing ``s``),
    then ``head = sum a[y_i] l_i / B`` and ``tail = sum b[y_i] l_i / B``.
    """
    _check_logits(logits, targets, weights.num_classes, label_smoothing)
    impl = resolve_loss_backend(backend, logits)
    if impl is not None:
        return impl(logits, targets, weights=weights, ignore_index=ignore_index, label_smoothing=label_smoothing)
    return _torch_cross_entropy(logits, targets, weights, ignore_index, label_smoothing)


def head_tail_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    tail_mask: torch.Tensor | Sequence[bool],
    *,
    tail_weight: float,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """ImbSAM's two losses: ``head = sum_{y_i head} l_i / B``, ``tail = tail_weight * sum_{y_i tail} l_i / B``.

    ``tail_weight`` is required: the public code multiplies the tail loss by 2,
    the paper does not; say which one you want.
    """
    weights = imbsam_weights(tail_mask, tail_weight)
    _check_logits(logits, targets, weights.num_classes, label_smoothing)
    impl = resolve_loss_backend(backend, logits)
    if impl is not None:
        return impl(logits, targets, weights=weights, ignore_index=ignore_index, label_smoothing=label_smoothing)
    return _torch_cross_entropy(logits, targets, weights, ignore_index, label_smoothing)


def _torch_cross_entropy(logits, targets, weights, ignore_index, label_smoothing):
    a, b = sample_weights(weights, targets, ignore_index)  # checks the labels before cross_entropy sees them
    batch = targets.shape[0]
    losses = F.cross_entropy(
        logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits,
        targets,
        reduction="none",
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
    )
    return weighted_sum(losses, a, batch), weighted_sum(losses, b, batch)


def _check_logits(logits: torch.Tensor, targets: torch.Tensor, num_classes: int, label_smoothing: float) -> None:
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D (batch, classes), got shape {tuple(logits.shape)}")
    check_targets(targets)
    if targets.shape[0] != logits.shape[0]:
        raise ValueError(
            f"targets must be 1-D with one label per row of logits: logits {tuple(logits.shape)}, "
            f"targets {tuple(targets.shape)}"
        )
    if logits.shape[1] != num_classes:
        raise ValueError(
            f"the class weights / tail mask have {num_classes} entries but logits have {logits.shape[1]} classes"
        )
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
