"""CIFAR-10-LT and CIFAR-100-LT from the standard CIFAR "python version" pickles on disk (no download).

Expected layout under ``data_dir``::

    cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch   (labels under b"labels")
    cifar-100-python/train, test                                     (labels under b"fine_labels")

The training set keeps ``n_k = n_max * imbalance^(-k / (C - 1))`` images of
class ``k`` (5000 or 500 at most, the standard LT profile); the test set is
the full balanced one.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from .digits import LongTailSplit
from .long_tail import exponential_profile, long_tail_indices

__all__ = ["cifar_lt", "CIFAR_FILES"]

CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}


def _load(paths: list[Path], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for p in paths:
        with open(p, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[label_key], dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def cifar_lt(name: str, data_dir: str | Path, imbalance: float = 100.0, seed: int = 0) -> LongTailSplit:
    """Long-tailed CIFAR as uint8 image tensors ``(N, 3, 32, 32)`` (scale to [0, 1] per batch)."""
    if name not in CIFAR_FILES:
        raise ValueError(f"unknown CIFAR variant {name!r}; choose one of {', '.join(CIFAR_FILES)}")
    folder, train_files, test_files, key, num_classes = CIFAR_FILES[name]
    root = Path(data_dir) / folder
    wanted = [root / f for f in train_files + test_files]
    missing = [p for p in wanted if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{name}: missing {', '.join(str(p) for p in missing)}; expected the CIFAR python pickles "
            f"{', '.join(train_files + test_files)} in {root} (no download is attempted)"
        )
    x_train, y_train = _load(wanted[: len(train_files)], key)
    x_test, y_test = _load(wanted[len(train_files) :], key)
    per_class = np.bincount(y_train, minlength=num_classes)
    counts = exponential_profile(int(per_class.min()), num_classes, imbalance)
    keep = long_tail_indices(y_train, counts, np.random.default_rng(seed))
    return LongTailSplit(
        torch.from_numpy(x_train[keep]), torch.from_numpy(y_train[keep]),
        torch.from_numpy(x_test), torch.from_numpy(y_test), counts,
    )
