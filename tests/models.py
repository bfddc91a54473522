"""Small deterministic models and data for the tests."""

from __future__ import annotations

import torch
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
