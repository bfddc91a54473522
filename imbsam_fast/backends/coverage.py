"""What a fused backend covers: the shared check of parallel tensor lists, and the record of fallbacks."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["ListCoverage"]

_is_contiguous = torch.Tensor.is_contiguous


class ListCoverage:
    """Base of the fused backends: ``covers(*lists)`` says whether their kernels take these parallel lists.

    A backend says what it refuses of a list's first tensor (``_why_not_first``: a dtype, a device);
    every backend needs the lists on one device and dtype, and every tensor contiguous. Within a
    list, tensors share device and dtype: the optimizer buckets parameters that way, autograd gives
    each gradient its parameter's device and dtype, and backups are made with ``empty_like``. So only
    the first tensor of each list is inspected for those, and every tensor for contiguity. (The C++
    extension's bucket ops check every tensor themselves, so its backend skips that walk for buckets.)
    """

    fallbacks: set[str]

    def _why_not_first(self, first: Tensor) -> Optional[str]:
        raise NotImplementedError

    def _why_not(self, lists: tuple[list[Tensor], ...]) -> Optional[str]:
        """``None`` when the kernels handle these parallel lists, else why the torch ops must."""
        first = lists[0][0]
        why = self._why_not_first(first)
        if why is not None:
            return why
        for ts in lists:
            if ts[0].device != first.device or ts[0].dtype != first.dtype:
                return "mixed devices or dtypes"
            if not all(map(_is_contiguous, ts)):
                return "non-contiguous tensors"
        return None

    def covers(self, *lists: list[Tensor]) -> bool:
        """Whether the kernels handle these parallel lists; records the reason in ``fallbacks`` when not."""
        why = self._why_not(lists)
        if why is not None:
            self.fallbacks.add(why)
        return why is None
