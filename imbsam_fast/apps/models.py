"""Small reference models used by the command line and the benchmarks."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["digits_cnn", "resnet32"]


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


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(4, channels)
    raise ValueError(f"norm must be 'batch' or 'group', got {kind!r}")


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = _norm(norm, cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = _PadShortcut(cout - cin)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class _PadShortcut(nn.Module):
    """CIFAR ResNet option A: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, extra: int) -> None:
        super().__init__()
        self.extra = extra

    def forward(self, x):
        x = x[:, :, ::2, ::2]
        pad = self.extra // 2
        return nn.functional.pad(x, (0, 0, 0, 0, pad, self.extra - pad))


def resnet32(num_classes: int = 100, width: int = 16, norm: str = "batch") -> nn.Module:
    """CIFAR ResNet-32 (He et al. 2016): 3 stages of 5 basic blocks, widths 16/32/64, 0.47M parameters.

    ``norm="group"`` swaps BatchNorm for GroupNorm (4 groups), a model with no batch coupling.
    """
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1, bias=False), _norm(norm, width), nn.ReLU()]
    cin = width
    for stage, w in enumerate((width, 2 * width, 4 * width)):
        for block in range(5):
            layers.append(_BasicBlock(cin, w, 2 if stage > 0 and block == 0 else 1, norm))
            cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)
