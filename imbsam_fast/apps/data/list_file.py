"""Image folder plus list files, the format ImageNet-LT and iNaturalist ship.

Each list file has one line per image, ``relative/path.jpg label``, paths
relative to the image root. Images are loaded once, resized to
``image_size`` x ``image_size`` RGB, and kept as uint8 tensors (about 3 KB an
image at 32 px, 12 KB at 64 px).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .digits import LongTailSplit

__all__ = ["read_list_file", "list_file_split"]


def read_list_file(path: str | Path) -> list[tuple[str, int]]:
    """``[(relative path, label), ...]``; raises ``ValueError`` naming the line on a malformed entry."""
    out = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or int(parts[1]) < 0:
            raise ValueError(f"{path}:{lineno}: expected 'path label' with a non-negative integer label, got {line!r}")
        out.append((parts[0], int(parts[1])))
    if not out:
        raise ValueError(f"{path}: no entries")
    return out


def _load_images(root: Path, entries: list[tuple[str, int]], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    xs = np.empty((len(entries), 3, size, size), dtype=np.uint8)
    for i, (rel, _) in enumerate(entries):
        p = root / rel
        if not p.is_file():
            raise FileNotFoundError(f"image listed but not found: {p}")
        with Image.open(p) as im:
            xs[i] = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR)).transpose(2, 0, 1)
    return torch.from_numpy(xs), torch.tensor([label for _, label in entries], dtype=torch.int64)


def list_file_split(root: str | Path, train_list: str | Path, test_list: str | Path, image_size: int = 32
                    ) -> LongTailSplit:
    """Train/test split from two list files; class counts are those of the training list."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image root {root} does not exist")
    for p in (train_list, test_list):
        if not Path(p).is_file():
            raise FileNotFoundError(f"list file {p} does not exist")
    train, test = read_list_file(train_list), read_list_file(test_list)
    num_classes = max(label for _, label in train + test) + 1
    x_train, y_train = _load_images(root, train, image_size)
    x_test, y_test = _load_images(root, test, image_size)
    counts = torch.bincount(y_train, minlength=num_classes).tolist()
    return LongTailSplit(x_train, y_train, x_test, y_test, counts)
