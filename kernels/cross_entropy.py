"""Class-masked cross-entropy: per-sample loss, two class-weighted sums, stored gradient.

For a row ``x`` of ``C`` logits with label ``y`` and label smoothing ``s``::

    lse  = log sum_k exp(x_k)                          (online over class blocks)
    l    = lse - (1 - s) x_y - (s / C) sum_k x_k
    G_k  = dl/dx_k = softmax(x)_k - (1 - s) [k = y] - s / C

Rows with ``y = ignore_index`` get ``l = 0`` and ``G = 0``. With per-class
weights ``a``, ``b`` over a batch of ``B`` rows::

    head = sum_i a[y_i] l_i / B,      tail = sum_i b[y_i] l_i / B

Forward: one program per row reads its logits twice (the online max / sum,
then ``G``), writes ``l``, ``G`` and the row's weights; a second one-program
kernel sums ``head`` and ``tail`` in a fixed order. Backward never recomputes
the softmax: with upstream gradients ``g_h``, ``g_t`` (scalars) and ``g_l``
(per row)::

    dx_i = (g_h a[y_i] / B + g_t b[y_i] / B + g_l[i]) G_i

so the head backward and the tail backward of one forward are each one
row-scaling launch. Accumulation is fp32 for fp32, fp16 and bf16 logits; ``G``
is stored in the logits' dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["class_masked_cross_entropy", "ClassMaskedCrossEntropy"]

MAX_BLOCK_C = 4096


@triton.jit
def _forward_kernel(
    logits, stride_row, targets, head_w, tail_w, losses, grad, row_head_w, row_tail_w,
    C, ignore_index, smoothing,
    BLOCK_C: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    y = tl.load(targets + i)
    valid = y != ignore_index
    y_safe = tl.where(valid, y, 0)
    row = logits + i * stride_row
    m = tl.full([], float("-inf"), tl.float32)
    z = tl.zeros([], dtype=tl.float32)
    sum_x = tl.zeros([], dtype=tl.float32)
    for start in range(0, C, BLOCK_C):
        offs = start + tl.arange(0, BLOCK_C)
        mask = offs < C
        x = tl.load(row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        z = z * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
        sum_x += tl.sum(tl.where(mask, x, 0.0), axis=0)
    lse = m + tl.log(z)
    x_y = tl.load(row + y_safe).to(tl.float32)
    loss = lse - (1.0 - smoothing) * x_y - smoothing / C * sum_x
    tl.store(losses + i, tl.where(valid, loss, 0.0))
    keep = tl.where(valid, 1.0, 0.0)
    tl.store(row_head_w + i, tl.load(head_w + y_safe) * keep)
    tl.store(row_tail_w + i, tl.load(tail_w + y_safe) * keep)
    grow = grad + i * C
    for start in range(0, C, BLOCK_C):
        offs = start + tl.arange(0, BLOCK_C)
        mask = offs < C
        x = tl.load(row + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) - smoothing / C - tl.where(offs == y_safe, 1.0 - smoothing, 0.0)
        tl.store(grow + offs, (g * keep).to(grad.dtype.element_ty), mask=mask)


@triton.jit
def _weighted_sums_kernel(losses, row_head_w, row_tail_w, out, B, inv_b, BLOCK: tl.constexpr):
    acc_h = tl.zeros([BLOCK], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, B, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < B
        loss = tl.load(losses + offs, mask=mask, other=0.0)
        acc_h += tl.load(row_head_w + offs, mask=mask, other=0.0) * loss
        acc_t += tl.load(row_tail_w + offs, mask=mask, other=0.0) * loss
    tl.store(out, tl.sum(acc_h, axis=0) * inv_b)
    tl.store(out + 1, tl.sum(acc_t, axis=0) * inv_b)


@triton.jit
def _backward_kernel(
    grad, dlogits, row_head_w, row_tail_w, g_sums, g_losses, C, inv_b,
    BLOCK_C: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1)
    w = (tl.load(g_sums) * tl.load(row_head_w + i) + tl.load(g_sums + 1) * tl.load(row_tail_w + i)) * inv_b
    w += tl.load(g_losses + i).to(tl.float32)
    offs = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = offs < C
    g = tl.load(grad + i * C + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dlogits + i * C + offs, (w * g).to(dlogits.dtype.element_ty), mask=mask)


def _block_c(num_classes: int) -> int:
    return min(triton.next_power_of_2(max(num_classes, 2)), MAX_BLOCK_C)


def _warps(block: int) -> int:
    return 8 if block >= 2048 else 4


class ClassMaskedCrossEntropy(torch.autograd.Function):
    """Autograd wrapper: ``(logits, targets, a, b) -> (head, tail, per-sample losses)``."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, head_w: Tensor, tail_w: Tensor, ignore_index: int,
                smoothing: float):
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        batch, num_classes = logits.shape
        device = logits.device
        losses = torch.empty(batch, dtype=torch.float32, device=device)
        grad = torch.empty((batch, num_classes), dtype=logits.dtype, device=device)
        row_w = torch.empty((2, batch), dtype=torch.float32, device=device)
        sums = torch.zeros(2, dtype=torch.float32, device=device)
        inv_b = 1.0 / max(batch, 1)
        if batch > 0:
            block = _block_c(num_classes)
            _forward_kernel[(batch,)](
                logits, logits.stride(0), targets, head_w, tail_w, losses, grad, row_w[0], row_w[1],
                num_classes, ignore_index, float(smoothing), BLOCK_C=block, num_warps=_warps(block),
            )
            _weighted_sums_kernel[(1,)](losses, row_w[0], row_w[1], sums, batch, inv_b, BLOCK=1024, num_warps=4)
        ctx.save_for_backward(grad, row_w)
        ctx.inv_b = inv_b
        return sums[0], sums[1], losses

    @staticmethod
    def backward(ctx, g_head: Tensor, g_tail: Tensor, g_losses: Tensor):
        grad, row_w = ctx.saved_tensors
        batch, num_classes = grad.shape
        dlogits = torch.empty_like(grad)
        if batch > 0 and num_classes > 0:
            g_sums = torch.stack([g_head.float(), g_tail.float()])
            block = _block_c(num_classes)
            _backward_kernel[(batch, triton.cdiv(num_classes, block))](
                grad, dlogits, row_w[0], row_w[1], g_sums, g_losses.contiguous(), num_classes, ctx.inv_b,
                BLOCK_C=block, num_warps=_warps(block),
            )
        return dlogits, None, None, None, None, None


def class_masked_cross_entropy(
    logits: Tensor, targets: Tensor, head_w: Tensor, tail_w: Tensor, ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(head, tail, per-sample losses)`` of cross-entropy with class weights ``a = head_w``, ``b = tail_w``.

    ``logits``: ``(B, C)`` fp32/fp16/bf16; ``targets``: ``(B,)`` integer labels
    (``ignore_index`` allowed); ``head_w``, ``tail_w``: ``(C,)`` fp32 on the same device.
    Labels are not range-checked here (the caller does it).
    """
    return ClassMaskedCrossEntropy.apply(
        logits, targets, head_w.to(device=logits.device, dtype=torch.float32).contiguous(),
        tail_w.to(device=logits.device, dtype=torch.float32).contiguous(), int(ignore_index), float(label_smoothing),
    )
