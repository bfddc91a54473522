"""Checks of the optimizer's options that are not a schedule's own (those live with the schedules)."""

from __future__ import annotations

import math
from typing import Any, Optional

from .priors import ClassWeights, check_tail_mask, check_tail_weight, imbsam_weights

__all__ = ["check_rho", "class_weights_from"]


def check_rho(rho: object) -> float:
    """``rho`` as a float, or an error: a finite real number ``>= 0``."""
    if isinstance(rho, bool) or not isinstance(rho, (int, float)):
        raise TypeError(f"rho must be a real number, got {type(rho).__name__} {rho!r}")
    if not (rho >= 0.0 and math.isfinite(rho)):
        raise ValueError(f"rho must be finite and >= 0, got {rho}")
    return float(rho)


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
