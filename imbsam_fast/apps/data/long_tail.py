"""Long-tailed subsampling profiles."""

from __future__ import annotations

import numpy as np

__all__ = ["exponential_profile", "long_tail_indices"]


def exponential_profile(max_count: int, num_classes: int, imbalance: float) -> list[int]:
    """Per-class counts ``n_k = floor(max_count * imbalance^(-k / (C - 1)))`` (the CIFAR-LT profile).

    ``imbalance = n_0 / n_{C-1}``; 1 gives a balanced set. Every class keeps at least one sample.
    """
    if imbalance < 1:
        raise ValueError(f"the imbalance factor must be >= 1, got {imbalance}")
    if num_classes < 1 or max_count < 1:
        raise ValueError("num_classes and max_count must be positive")
    if num_classes == 1:
        return [max_count]
    return [max(1, int(max_count * imbalance ** (-k / (num_classes - 1)))) for k in range(num_classes)]


def long_tail_indices(labels: np.ndarray, counts: list[int], rng: np.random.Generator) -> np.ndarray:
    """Indices taking ``counts[k]`` samples of class ``k`` at random (sorted)."""
    out = []
    for k, n in enumerate(counts):
        idx = np.flatnonzero(labels == k)
        if n > idx.size:
            raise ValueError(f"class {k} has {idx.size} samples, {n} requested")
        out.append(rng.choice(idx, size=n, replace=False))
    return np.sort(np.concatenate(out)) if out else np.zeros(0, dtype=np.int64)
