"""Small reference models used by the demo, the CLI and the benchmarks."""

from __future__ import annotations

from torch import nn

__all__ = ["digits_cnn"]


def digits_cnn(num_classes: int = 10, width: int = 16, in_channels: int = 1) -> nn.Module:
    """A small BatchNorm CNN for 8x8 images: two conv blocks, global pooling, a linear head."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.Conv2d(width, 2 * width, 3, padding=1, stride=2, bias=False),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )
