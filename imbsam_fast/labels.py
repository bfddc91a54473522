"""Label rules, written once: integer dtype, range ``[0, C)`` or ``ignore_index``.

On the CPU a bad label raises ``ValueError`` at once (reading a CPU flag is no
device sync). On an accelerator the check is a device-side assert, so that no
host sync is made; the error then surfaces at the next synchronization.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "check_label_dtype", "check_targets", "check_label_flag", "class_index", "label_range_message", "weight_rows",
]


_INDEX_DTYPES = (torch.int64, torch.int32)


def check_label_dtype(targets: Tensor) -> None:
    """Raise ``ValueError`` unless ``targets`` holds integer class labels of a dtype that indexes (int64, int32)."""
    dtype = targets.dtype
    if dtype not in _INDEX_DTYPES:
        if dtype.is_floating_point or dtype == torch.bool or dtype.is_complex:
            raise ValueError(f"targets must be integer class labels, got {dtype}")
        raise ValueError(f"targets must be int64 (or int32) class labels, got {dtype}: convert them with .long()")


def check_targets(targets: object) -> Tensor:
    """``targets`` as given if it is a 1-D integer tensor; a clear error for anything else."""
    if not isinstance(targets, Tensor):
        raise TypeError(
            f"targets must be a 1-D tensor of class labels, got {type(targets).__name__}; "
            "wrap it with torch.as_tensor(...) on the device you want"
        )
    if targets.ndim != 1:
        raise ValueError(f"targets must be 1-D (one label per sample), got shape {tuple(targets.shape)}")
    check_label_dtype(targets)
    return targets


def label_range_message(num_classes: int, ignore_index: Optional[int] = None, source: str = "class weights") -> str:
    """The one message for a label outside ``[0, num_classes)``."""
    ignore = "" if ignore_index is None else f" (or equal ignore_index={ignore_index})"
    return (
        f"labels must lie in [0, {num_classes}){ignore} ({source}: {num_classes} entries, one per class; "
        f"a label >= {num_classes} means the {source} is too short for the data)"
    )


def _raise_bad_labels(targets: Tensor, num_classes: int, ignored: Tensor, ignore_index: int, source: str) -> None:
    """CPU only: ``ValueError`` naming how many labels are outside ``[0, num_classes)`` and one of them."""
    bad = targets[~(((targets >= 0) & (targets < num_classes)) | ignored)]
    if bad.numel():
        # An error path on CPU tensors: reading a value back is no device sync.
        raise ValueError(f"{label_range_message(num_classes, ignore_index, source)}; got {bad.numel()} outside, "
                         f"e.g. {bad[0].item()}")


def class_index(targets: Tensor, num_classes: int, ignore_index: int, source: str = "class weights",
                device_check: bool = False) -> Tensor:
    """``targets`` with ``ignore_index`` mapped to ``num_classes`` (a row of zeros in a weight table), every
    other label checked to lie in ``[0, num_classes)``: ``ValueError`` on CPU, a device assert elsewhere
    (and on the CPU too with ``device_check``, which reads no value back in Python)."""
    cpu = targets.device.type == "cpu" and not device_check
    if cpu and not 0 <= ignore_index <= num_classes and targets.numel():
        # CPU tensors: reading the extremes is not a device sync. Labels all in [0, C) hold no ignore_index
        # (it lies outside), so they are the index as they are: one op instead of three.
        extremes = torch.aminmax(targets)
        if 0 <= int(extremes.min) and int(extremes.max) < num_classes:
            return targets
    ignored = targets == ignore_index
    idx = targets.masked_fill(ignored, num_classes)
    if cpu:
        # CPU tensors: reading the extremes is not a device sync, so fail eagerly with a clear message.
        if idx.numel():
            extremes = torch.aminmax(idx)
            low, high = int(extremes.min), int(extremes.max)
            if low < 0 or high > num_classes or (high == num_classes and bool((idx == num_classes).ne(ignored).any())):
                _raise_bad_labels(targets, num_classes, ignored, ignore_index, source)
    else:
        safe = targets.masked_fill(ignored, 0)
        torch._assert_async((safe.clamp(0, num_classes - 1) == safe).all(),
                            label_range_message(num_classes, ignore_index, source))
    return idx


def check_label_flag(flag: Tensor, num_classes: int, ignore_index: Optional[int] = None,
                     source: str = "class weights") -> None:
    """``flag`` (a 0-dim or 1-element tensor) is nonzero when a kernel met a bad label: raise or assert on it."""
    message = label_range_message(num_classes, ignore_index, source)
    if flag.device.type == "cpu":
        # CPU tensors: reading the flag is not a device sync.
        if bool(flag.reshape(-1)[0] != 0):
            raise ValueError(message)
    else:
        torch._assert_async(flag.reshape(-1)[0] == 0, message)


def weight_rows(table: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """``(table[index, 0], table[index, 1])``: each sample's head and tail weight from a ``(C + 1) x 2`` table and
    :func:`class_index`'s index (one gather, two views)."""
    head, tail = table.index_select(0, index).unbind(1)
    return head, tail
