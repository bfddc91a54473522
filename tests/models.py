"""Small deterministic models and data for the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def small_cnn(num_classes: int = 10, batchnorm: bool = True) -> nn.Module:
    norm = (lambda c: nn.BatchNorm2d(c)) if batchnorm else (lambda c: nn.GroupNorm(2, c))
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        norm(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2),
        norm(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    )


def mlp(in_dim: int = 16, num_classes: int = 10, hidden: int = 32) -> nn.Module:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, num_classes))


def image_batches(steps: int, batch: int = 16, num_classes: int = 10, seed: int = 0, size: int = 8):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.randn(batch, 3, size, size, generator=g)
        y = torch.randint(0, num_classes, (batch,), generator=g)
        out.append((x, y))
    return out


def vector_batches(steps: int, batch: int = 16, in_dim: int = 16, num_classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, in_dim, generator=g), torch.randint(0, num_classes, (batch,), generator=g))
        for _ in range(steps)
    ]


def seeded_mlp(seed: int = 0, **kwargs) -> nn.Module:
    """:func:`mlp` with its weights drawn after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return mlp(**kwargs)


def per_sample_closure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, calls: list | None = None):
    """The closure ImbSAM calls: per-sample cross-entropy of the batch, or of the samples ``index`` picks;
    each call's index (``None`` for the whole batch) is appended to ``calls`` when given."""

    def closure(index=None):
        if calls is not None:
            calls.append(None if index is None else index.clone())
        xs, ys = (x, y) if index is None else (x[index], y[index])
        return F.cross_entropy(model(xs), ys, reduction="none")

    return closure


def tail_batches(tail_counts: list[int], batch: int = 16, seed: int = 0):
    """:func:`vector_batches` whose labels hold ``tail_counts[i]`` tail samples (classes 7-9) in batch ``i``."""
    out = vector_batches(len(tail_counts), batch=batch, seed=seed)
    for (_, y), n in zip(out, tail_counts):
        y.clamp_(max=6)
        y[:n] = 7 + torch.arange(n) % 3
    return out
