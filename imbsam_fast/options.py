"""Checks of the optimizer's options that are not a schedule's own (those live with the schedules)."""

from __future__ import annotations

import math
from typing import Any, Optional

from .priors import ClassWeights, check_tail_mask, check_tail_weight, imbsam_weights

__all__ = ["check_rho", "check_adaptive", "check_max_grad_norm", "check_micro_batches", "class_weights_from"]


def check_rho(rho: object) -> float:
    """``rho`` as a float, or an error: a finite real number ``>= 0``."""
    if isinstance(rho, bool) or not isinstance(rho, (int, float)):
        raise TypeError(f"rho must be a real number, got {type(rho).__name__} {rho!r}")
    if not (rho >= 0.0 and math.isfinite(rho)):
        raise ValueError(f"rho must be finite and >= 0, got {rho}")
    return float(rho)


def check_adaptive(adaptive: object) -> bool:
    """``adaptive`` (ASAM), which must be a bool."""
    if not isinstance(adaptive, bool):
        raise TypeError(f"adaptive must be True or False, got {type(adaptive).__name__} {adaptive!r}")
    return adaptive


def check_max_grad_norm(max_grad_norm: object) -> Optional[float]:
    """``None`` (no clipping) or a finite real number ``> 0``."""
    if max_grad_norm is None:
        return None
    if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)):
        raise TypeError(f"max_grad_norm must be a real number or None, got {type(max_grad_norm).__name__}")
    if not (max_grad_norm > 0.0 and math.isfinite(max_grad_norm)):
        raise ValueError(f"max_grad_norm must be finite and > 0, got {max_grad_norm}")
    return float(max_grad_norm)


def check_micro_batches(micro_batches: object) -> int:
    """``micro_batches``, an int ``>= 1``."""
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"micro_batches must be an int >= 1, got {micro_batches!r}")
    return micro_batches


def class_weights_from(tail_mask: Any, tail_weight: Any, class_weights: Any) -> Optional[ClassWeights]:
    """The class weights from ``tail_mask`` (+ ``tail_weight``) or ``class_weights``; mixing them is an error."""
    if isinstance(tail_mask, ClassWeights):
        raise TypeError("tail_mask takes a bool mask; pass a ClassWeights preset as class_weights=")
    if class_weights is not None:
        if tail_mask is not None:
            raise ValueError("give tail_mask= (with tail_weight=) or class_weights=, not both")
        if tail_weight is not None:
            raise ValueError("tail_weight applies to tail_mask=; fold it into the class_weights instead")
        if not isinstance(class_weights, ClassWeights):
            raise TypeError(f"class_weights must be a ClassWeights, got {type(class_weights).__name__}")
        return class_weights
    if tail_mask is None:
        if tail_weight is not None:
            raise ValueError("tail_weight applies to tail_mask=, which was not given")
        return None
    return imbsam_weights(check_tail_mask(tail_mask), check_tail_weight(2.0 if tail_weight is None else tail_weight))
