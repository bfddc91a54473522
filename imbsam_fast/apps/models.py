"""Small reference models used by the command line and the benchmarks."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BACKBONES", "digits_cnn", "make_backbone", "resnet32", "resnet34"]


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


class _TorchvisionBasicBlock(nn.Module):
    """torchvision's BasicBlock: two 3x3 convs, a 1x1 conv + BatchNorm shortcut when the shape changes."""

    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet34(nn.Module):
    """ResNet-34 with torchvision's layout and parameter names (7x7 stem, max-pool, stages of 3/4/6/3
    basic blocks, widths 64..512), 21.3M parameters with 100 classes. The public ImbSAM code trains
    torchvision's ``resnet34`` on 32x32 CIFAR images as is; this is that network without torchvision."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = 64
        for i, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), 1):
            stride = 1 if i == 1 else 2
            layer = []
            for b in range(blocks):
                layer.append(_TorchvisionBasicBlock(cin, width, stride if b == 0 else 1))
                cin = width
            setattr(self, f"layer{i}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet34(num_classes: int = 1000) -> nn.Module:
    """torchvision's ResNet-34 architecture (see :class:`ResNet34`)."""
    return ResNet34(num_classes)


BACKBONES = ("resnet32", "resnet34", "resnet50", "resnext50")


def make_backbone(name: str, num_classes: int) -> nn.Module:
    """A backbone by name; ``resnet50`` and ``resnext50`` (32x4d) come from torchvision, the ``[vision]`` extra."""
    if name == "resnet32":
        return resnet32(num_classes)
    if name == "resnet34":
        return resnet34(num_classes)
    if name in ("resnet50", "resnext50"):
        try:
            import torchvision
        except Exception as err:  # noqa: BLE001 - a broken torchvision install fails in many ways
            raise RuntimeError(
                f"--model {name} comes from torchvision, which does not import here ({type(err).__name__}); "
                "install it with pip install 'imbsam_fast[vision]' (a torchvision matching your torch)"
            ) from None
        fn = torchvision.models.resnet50 if name == "resnet50" else torchvision.models.resnext50_32x4d
        return fn(num_classes=num_classes)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(BACKBONES)}")
