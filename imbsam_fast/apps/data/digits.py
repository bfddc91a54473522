"""Long-tailed digits: scikit-learn's 8x8 digits (ships with the package, no download).

Each class is split into a balanced test part (``test_per_class`` images) and a
training pool; the training set takes the exponential long-tailed profile from
the pool, so train and test never overlap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .long_tail import exponential_profile, long_tail_indices

__all__ = ["LongTailSplit", "long_tailed_digits"]


@dataclass
class LongTailSplit:
    """Train/test tensors plus the per-class training counts."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    class_counts: list[int]

    @property
    def num_classes(self) -> int:
        return len(self.class_counts)


def long_tailed_digits(imbalance: float = 50.0, test_per_class: int = 40, seed: int = 0) -> LongTailSplit:
    """Digits as images ``(N, 1, 8, 8)`` scaled to [0, 1], long-tailed by ``imbalance``.

    With the default ``test_per_class=40``, the head class keeps its whole pool
    (about 138 images) and class ``k`` keeps ``n_0 * imbalance^(-k/9)``.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the digits dataset needs scikit-learn: pip install 'imbsam_fast[data]'") from e
    if test_per_class < 1:
        raise ValueError("test_per_class must be >= 1")
    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test_idx, pool_idx = [], []
    for k in range(10):
        idx = rng.permutation(np.flatnonzero(y == k))
        test_idx.append(idx[:test_per_class])
        pool_idx.append(idx[test_per_class:])
    pool = np.concatenate(pool_idx)
    max_count = min(len(p) for p in pool_idx)
    counts = exponential_profile(max_count, 10, imbalance)
    train = pool[long_tail_indices(y[pool], counts, rng)]
    test = np.concatenate(test_idx)
    return LongTailSplit(
        torch.from_numpy(x[train]).unsqueeze(1),
        torch.from_numpy(y[train]),
        torch.from_numpy(x[test]).unsqueeze(1),
        torch.from_numpy(y[test]),
        counts,
    )
