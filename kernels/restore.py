"""Bit-exact restore of perturbed weights from their backup.

For every element of every tensor of a bucket::

    w[i] = backup[i]        (a bit copy: no ``w + e - e`` rounding)

One launch per bucket. The pointer table of ``(params, backups)`` does not
change between steps, so it is built once and reused.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .multi_tensor import DEFAULT_LAUNCH, LaunchConfig, PointerTables, chunk_base, chunk_of, launch

__all__ = ["restore_"]


@triton.jit
def _restore_kernel(
    ptrs, num_tensors, sizes, chunk_tensor, chunk_start,
    DTYPE: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    t, start, n = chunk_of(chunk_tensor, chunk_start, sizes, CHUNK)
    w_ptr = chunk_base(ptrs, 0, num_tensors, t, start, DTYPE, ALIGNED)
    b_ptr = chunk_base(ptrs, 1, num_tensors, t, start, DTYPE, ALIGNED)
    full = n // BLOCK * BLOCK
    for k in range(0, full, BLOCK):
        offs = k + tl.arange(0, BLOCK)
        tl.store(w_ptr + offs, tl.load(b_ptr + offs))
    offs = full + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(w_ptr + offs, tl.load(b_ptr + offs, mask=mask), mask=mask)


def restore_(params: list[Tensor], backups: list[Tensor], tables: PointerTables,
             cfg: LaunchConfig = DEFAULT_LAUNCH) -> None:
    """``w <- backup`` over one bucket (contiguous tensors of one dtype on one device)."""
    launch(_restore_kernel, [params, backups], tables, cfg)
