"""Datasets that a ``DataLoader`` with workers streams: images decoded from disk per item, or in-memory
uint8 images, with the training augmentation applied per image in the workers.

``ListImages`` reads the list-file format (``relative/path.jpg label`` per line,
as ImageNet-LT, iNaturalist 2018 and Places-LT ship) and keeps only the paths
in memory, so sets of any size fit. Training images get a random-resized crop
(area 8-100%, aspect 3/4-4/3) and a horizontal flip; test images are resized
(shorter side ``size * 8 / 7``) and center-cropped. Items are uint8 ``(3, S, S)``
tensors; scale and normalize them on the device.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import Dataset

from .list_file import read_list_file

__all__ = ["ListImages", "TensorImages", "class_counts"]


def _pil():
    from PIL import Image

    return Image


def _random_resized_box(width: int, height: int, gen: Optional[torch.Generator]) -> tuple[int, int, int, int]:
    """A box covering a random 8-100% of the area with an aspect ratio in [3/4, 4/3] (log-uniform); the
    center square when ten draws do not fit."""
    area = width * height
    for _ in range(10):
        target = area * float(torch.empty(()).uniform_(0.08, 1.0, generator=gen))
        log_ratio = float(torch.empty(()).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen))
        ratio = math.exp(log_ratio)
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            x = int(torch.randint(0, width - w + 1, (), generator=gen))
            y = int(torch.randint(0, height - h + 1, (), generator=gen))
            return x, y, x + w, y + h
    side = min(width, height)
    x, y = (width - side) // 2, (height - side) // 2
    return x, y, x + side, y + side


def _to_tensor(image) -> torch.Tensor:
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(image.height, image.width, 3).permute(2, 0, 1).contiguous()


class ListImages(Dataset):
    """Images named by a list file under ``root``, decoded per item (see the module doc for the transforms)."""

    def __init__(self, root: str | Path, list_file: str | Path, size: int, train: bool) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image root {self.root} does not exist")
        if not Path(list_file).is_file():
            raise FileNotFoundError(f"list file {list_file} does not exist")
        self.entries = read_list_file(list_file)
        self.labels = torch.tensor([label for _, label in self.entries], dtype=torch.int64)
        self.size = size
        self.train = train

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        Image = _pil()
        rel, label = self.entries[i]
        path = self.root / rel
        if not path.is_file():
            raise FileNotFoundError(f"image listed but not found: {path}")
        with Image.open(path) as im:
            im = im.convert("RGB")
            if self.train:
                box = _random_resized_box(im.width, im.height, None)
                im = im.resize((self.size, self.size), Image.BILINEAR, box=box)
                if torch.rand(()) < 0.5:
                    im = im.transpose(Image.FLIP_LEFT_RIGHT)
            else:
                short = round(self.size * 8 / 7)
                scale = short / min(im.width, im.height)
                im = im.resize((max(self.size, round(im.width * scale)), max(self.size, round(im.height * scale))),
                               Image.BILINEAR)
                x, y = (im.width - self.size) // 2, (im.height - self.size) // 2
                im = im.crop((x, y, x + self.size, y + self.size))
            return _to_tensor(im), label


class TensorImages(Dataset):
    """In-memory uint8 images ``(N, C, H, W)``; training items get a zero-padded random crop (``pad``) and a flip."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, train: bool, pad: int = 4) -> None:
        self.x, self.labels, self.train, self.pad = x, y, train, pad

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.x[i]
        if self.train and self.pad > 0:
            _, h, w = x.shape
            padded = torch.nn.functional.pad(x, (self.pad,) * 4)
            dy, dx = (int(v) for v in torch.randint(0, 2 * self.pad + 1, (2,)))
            x = padded[:, dy:dy + h, dx:dx + w]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        return x, int(self.labels[i])


def class_counts(labels: torch.Tensor, num_classes: Optional[int] = None) -> list[int]:
    """Training samples per class."""
    return torch.bincount(labels, minlength=num_classes or 0).tolist()
