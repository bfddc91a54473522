"""Global L2 norm of many tensors: two stages, deterministic, no host sync.

Stage 1 (one program per chunk ``c`` of tensor ``t``)::

    partial[c] = sum_{i in chunk c} g_t[i]^2        (fp32 accumulation)

Stage 2 (one program)::

    s = sum_c partial[c]                             (fixed order)

so ``||g||_2 = sqrt(s)``. Chunks and the reduction order depend only on the
tensors' sizes, so the result is bit-identical from run to run. NaN and inf
propagate as in ``torch.linalg.vector_norm``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .multi_tensor import DEFAULT_LAUNCH, LaunchConfig, PointerTables, chunk_base, chunk_of, chunk_table, launch, numels

__all__ = ["sq_norm_partials", "sum_partials", "sq_norm"]


@triton.jit
def _sq_norm_partials_kernel(
    ptrs, num_tensors, sizes, chunk_tensor, chunk_start, partials,
    DTYPE: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    t, start, n = chunk_of(chunk_tensor, chunk_start, sizes, CHUNK)
    g = chunk_base(ptrs, 0, num_tensors, t, start, DTYPE, ALIGNED)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    full = n // BLOCK * BLOCK
    for k in range(0, full, BLOCK):
        x = tl.load(g + k + tl.arange(0, BLOCK)).to(tl.float32)
        acc += x * x
    offs = full + tl.arange(0, BLOCK)
    x = tl.load(g + offs, mask=offs < n, other=0.0).to(tl.float32)
    acc += x * x
    tl.store(partials + tl.program_id(0), tl.sum(acc, axis=0))


@triton.jit
def _sum_kernel(x, n, out, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, n, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        acc += tl.load(x + offs, mask=offs < n, other=0.0)
    tl.store(out, tl.sum(acc, axis=0))


def sq_norm_partials(grads: list[Tensor], partials: Tensor, tables: PointerTables,
                     cfg: LaunchConfig = DEFAULT_LAUNCH) -> None:
    """Stage 1: write one partial sum of squares per chunk into ``partials`` (fp32, one slot per chunk)."""
    launch(_sq_norm_partials_kernel, [grads], tables, cfg, partials)


def num_chunks(tensors: list[Tensor], cfg: LaunchConfig = DEFAULT_LAUNCH) -> int:
    """Number of stage-1 partials ``tensors`` produce."""
    return chunk_table(numels(tensors), tensors[0].device, cfg.chunk).num_chunks


def sum_partials(partials: Tensor, out: Tensor) -> Tensor:
    """Stage 2: ``out = sum(partials)`` in a fixed order (``out`` a 0-dim fp32 tensor)."""
    _sum_kernel[(1,)](partials, partials.numel(), out, BLOCK=1024, num_warps=4)
    return out


def sq_norm(grad_lists: list[list[Tensor]], tables: PointerTables, cfg: LaunchConfig = DEFAULT_LAUNCH) -> Tensor:
    """``s = sum over all lists and tensors of ||g||_2^2``: stage 1 per list, one stage 2; all on one device."""
    grad_lists = [gs for gs in grad_lists if gs]
    device = grad_lists[0][0].device
    counts = [num_chunks(gs, cfg) for gs in grad_lists]
    partials = torch.empty(max(sum(counts), 1), dtype=torch.float32, device=device)
    if sum(counts) == 0:
        partials.zero_()
    offset = 0
    for gs, n in zip(grad_lists, counts):
        sq_norm_partials(gs, partials[offset : offset + n], tables, cfg)
        offset += n
    return sum_partials(partials, torch.empty((), dtype=torch.float32, device=device))
