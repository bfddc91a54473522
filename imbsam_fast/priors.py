"""Class priors: class counts -> head/tail masks and per-class loss weights.

Every method of the ImbSAM family is described by two per-class weight
vectors (DESIGN.md §1): ``a_k`` weights the loss of class ``k`` taken at the
current weights ``w`` (the *head* part) and ``b_k`` weights the loss taken at
the perturbed weights ``w + e`` (the *tail* part, the one SAM is applied to).

=======================  =====================  =========================
method                   a_k                    b_k
=======================  =====================  =========================
plain training           1                      0
SAM                      0                      1
ImbSAM                   1 on head, 0 on tail   tail_weight on tail
Focal-SAM style          1 - c_k                c_k = lam * (1 - pi_k)^gamma
=======================  =====================  =========================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch

from .labels import check_targets, class_index, weight_rows

__all__ = [
    "ClassWeights",
    "tail_class_mask",
    "split_classes",
    "plain_weights",
    "sam_weights",
    "imbsam_weights",
    "focal_sam_weights",
    "check_tail_mask",
    "check_tail_weight",
    "sample_weights",
]

CountsLike = Union[torch.Tensor, Sequence[int], Sequence[float]]


def _counts_tensor(class_counts: CountsLike) -> torch.Tensor:
    counts = torch.as_tensor(class_counts)
    if counts.ndim != 1 or counts.numel() == 0:
        raise ValueError(f"class_counts must be a non-empty 1-D sequence, got shape {tuple(counts.shape)}")
    if counts.is_floating_point() and not torch.isfinite(counts).all():
        raise ValueError("class_counts must be finite")
    if (counts < 0).any():
        raise ValueError("class_counts must be non-negative")
    return counts


@dataclass(frozen=True)
class ClassWeights:
    """Per-class weights ``head`` (a_k, loss at w) and ``tail`` (b_k, loss at w + e).

    Both are 1-D float tensors of length ``num_classes``.
    """

    head: torch.Tensor
    tail: torch.Tensor

    def __post_init__(self) -> None:
        for name in ("head", "tail"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.ndim != 1:
                raise ValueError(f"ClassWeights.{name} must be a 1-D tensor")
            if not t.is_floating_point():
                raise ValueError(f"ClassWeights.{name} must be a floating-point tensor, got {t.dtype}")
        if self.head.shape != self.tail.shape:
            raise ValueError(
                "ClassWeights.head and .tail must have the same length, "
                f"got {self.head.numel()} and {self.tail.numel()}"
            )
        if self.head.device != self.tail.device:
            raise ValueError("ClassWeights.head and .tail must be on the same device")

    @property
    def num_classes(self) -> int:
        return self.head.numel()

    def table(self) -> torch.Tensor:
        """``(C + 1, 2)``: row ``k`` is ``(a_k, b_k)``; the last row, zeros, serves ignored samples."""
        return torch.nn.functional.pad(torch.stack([self.head, self.tail], 1), (0, 0, 0, 1))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ClassWeights:
        return ClassWeights(self.head.to(device=device, dtype=dtype), self.tail.to(device=device, dtype=dtype))


def tail_class_mask(class_counts: CountsLike, eta: float = 20) -> torch.Tensor:
    """Bool mask of tail classes: ``mask[k] = class_counts[k] < eta``.

    ``eta=20`` is the public ImbSAM code's threshold (classes with fewer than 20
    training images are tail).
    """
    return _counts_tensor(class_counts) < eta


def split_classes(
    class_counts: CountsLike, many: float = 100, few: float = 20
) -> dict[str, torch.Tensor]:
    """Many / Medium / Few class masks: ``n > many``, ``few <= n <= many``, ``n < few``.

    The defaults are the public long-tailed splits (>100, 20..100, <20 images).
    """
    if few > many:
        raise ValueError(f"few ({few}) must not exceed many ({many})")
    counts = _counts_tensor(class_counts)
    return {"many": counts > many, "medium": (counts >= few) & (counts <= many), "few": counts < few}


def plain_weights(num_classes: int) -> ClassWeights:
    """Plain training: ``a = 1, b = 0``."""
    _check_num_classes(num_classes)
    return ClassWeights(torch.ones(num_classes), torch.zeros(num_classes))


def sam_weights(num_classes: int) -> ClassWeights:
    """SAM: ``a = 0, b = 1`` (the whole loss is taken at the perturbed point)."""
    _check_num_classes(num_classes)
    return ClassWeights(torch.zeros(num_classes), torch.ones(num_classes))


def imbsam_weights(tail_mask: torch.Tensor | Sequence[bool], tail_weight: float = 2.0) -> ClassWeights:
    """ImbSAM: ``a = 1`` on head classes, ``b = tail_weight`` on tail classes, 0 elsewhere.

    ``tail_weight=2`` follows the public code's latest revision, which doubles
    the tail loss; pass 1.0 for the paper's unweighted form.
    """
    m = check_tail_mask(tail_mask).to(torch.float32)
    return ClassWeights(1.0 - m, check_tail_weight(tail_weight) * m)


def check_tail_mask(tail_mask: object) -> torch.Tensor:
    """``tail_mask`` as a bool tensor, or ``ValueError``: it must be 1-D, non-empty, one bool per class."""
    if isinstance(tail_mask, ClassWeights):
        raise TypeError("tail_mask takes a bool mask; pass ClassWeights presets as class_weights=")
    mask = torch.as_tensor(tail_mask)
    if mask.dtype != torch.bool or mask.ndim != 1 or mask.numel() == 0:
        raise ValueError(
            f"tail_mask must be a non-empty 1-D bool tensor with one entry per class, got "
            f"{mask.dtype} of shape {tuple(mask.shape)}"
        )
    return mask


def check_tail_weight(tail_weight: object) -> float:
    """``tail_weight`` as a float, or an error: a finite real number ``>= 0``."""
    if isinstance(tail_weight, bool) or not isinstance(tail_weight, (int, float)):
        raise TypeError(f"tail_weight must be a real number, got {type(tail_weight).__name__}")
    if not 0.0 <= tail_weight < float("inf"):
        raise ValueError(f"tail_weight must be finite and >= 0, got {tail_weight}")
    return float(tail_weight)


def focal_sam_weights(class_counts: CountsLike, lam: float = 1.0, gamma: float = 2.0) -> ClassWeights:
    """Focal-SAM style: ``c_k = lam * (1 - pi_k)^gamma``, ``a = 1 - c``, ``b = c``.

    ``pi_k = n_k / sum(n)`` is the training prior of class ``k``; rare classes get
    more of their loss taken at the perturbed point.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must lie in [0, 1], got {lam}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    counts = _counts_tensor(class_counts).to(torch.float64)
    total = counts.sum()
    if total <= 0:
        raise ValueError("class_counts must not all be zero")
    c = (lam * (1.0 - counts / total) ** gamma).to(torch.float32)
    return ClassWeights(1.0 - c, c)


def sample_weights(
    weights: ClassWeights, targets: torch.Tensor, ignore_index: int = -100, source: str = "class weights",
    table: torch.Tensor | None = None, device_check: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample weights ``(a[y_i], b[y_i])``; samples with ``y_i == ignore_index`` get 0.

    Labels outside ``[0, C)`` (other than ``ignore_index``) raise ``ValueError`` on
    CPU; on an accelerator they trip a device-side assert, so no host sync is made.
    ``table`` is :meth:`ClassWeights.table` on the targets' device, when the caller keeps one;
    ``device_check`` asserts on the device on the CPU too (no value read back).
    """
    check_targets(targets)
    idx = class_index(targets, weights.num_classes, ignore_index, source, device_check)
    if table is None:
        table = weights.to(targets.device).table()
    return weight_rows(table, idx)


def _check_num_classes(num_classes: int) -> None:
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
