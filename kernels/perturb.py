"""Perturb in place with a backup, the scale computed on the device.

For every element of every tensor of a bucket, with ``s`` the global sum of
squares of the gradients (from :mod:`grad_norm`)::

    scale     = rho / (sqrt(s) + eps)
    backup[i] = w[i]                       (bit copy)
    w[i]      = w[i] + scale * g[i]        (fp32 arithmetic, one rounding to w's dtype)

One launch per bucket; nothing is read back to the host.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .multi_tensor import DEFAULT_LAUNCH, LaunchConfig, PointerTables, chunk_base, chunk_of, launch

__all__ = ["perturb_"]


@triton.jit
def _perturb_kernel(
    ptrs, num_tensors, sizes, chunk_tensor, chunk_start, sq_norm, rho, eps,
    DTYPE: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    t, start, n = chunk_of(chunk_tensor, chunk_start, sizes, CHUNK)
    scale = rho / (tl.sqrt_rn(tl.load(sq_norm)) + eps)
    w_ptr = chunk_base(ptrs, 0, num_tensors, t, start, DTYPE, ALIGNED)
    g_ptr = chunk_base(ptrs, 1, num_tensors, t, start, DTYPE, ALIGNED)
    b_ptr = chunk_base(ptrs, 2, num_tensors, t, start, DTYPE, ALIGNED)
    full = n // BLOCK * BLOCK
    for k in range(0, full, BLOCK):
        offs = k + tl.arange(0, BLOCK)
        w = tl.load(w_ptr + offs)
        g = tl.load(g_ptr + offs).to(tl.float32)
        tl.store(b_ptr + offs, w)
        tl.store(w_ptr + offs, (w.to(tl.float32) + scale * g).to(DTYPE))
    offs = full + tl.arange(0, BLOCK)
    mask = offs < n
    w = tl.load(w_ptr + offs, mask=mask)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    tl.store(b_ptr + offs, w, mask=mask)
    tl.store(w_ptr + offs, (w.to(tl.float32) + scale * g).to(DTYPE), mask=mask)


def perturb_(params: list[Tensor], grads: list[Tensor], backups: list[Tensor], sq_norm: Tensor, rho: float,
             eps: float, tables: PointerTables, cfg: LaunchConfig = DEFAULT_LAUNCH) -> None:
    """``backup <- w; w <- w + rho / (sqrt(sq_norm) + eps) * g`` over one bucket (contiguous, one dtype/device)."""
    launch(_perturb_kernel, [params, grads, backups], tables, cfg, sq_norm, float(rho), float(eps))
