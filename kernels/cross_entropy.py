"""Class-masked cross-entropy: per-sample loss, two class-weighted sums, stored gradient.

For a row ``x`` of ``C`` logits with label ``y`` and label smoothing ``s``::

    lse  = log sum_k exp(x_k)                          (online over class blocks)
    l    = lse - (1 - s) x_y - (s / C) sum_k x_k
    G_k  = dl/dx_k = softmax(x)_k - (1 - s) [k = y] - s / C

Rows with ``y = ignore_index`` get ``l = 0`` and ``G = 0``. With per-class
weights ``a``, ``b`` over a batch of ``B`` rows::

    head = sum_i a[y_i] l_i / B,      tail = sum_i b[y_i] l_i / B

Both passes are torch ops (``torch.ops.imbsam_fast.class_masked_ce`` and its
backward, with fake kernels and an autograd formula), so ``torch.compile`` and
CUDA-graph capture see each as one op.

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

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from imbsam_fast.backends.extension import masked_ce_outputs_like
from imbsam_fast.labels import check_label_flag

__all__ = ["class_masked_cross_entropy", "class_masked_ce_op", "class_masked_ce_backward_op"]

MAX_BLOCK_C = 4096


@triton.jit
def _forward_kernel(
    logits, stride_row, targets, head_w, tail_w, bad_labels,
    losses, grad, row_head_w, row_tail_w, C, ignore_index, smoothing,
    BLOCK_C: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    y = tl.load(targets + i)
    in_range = (y >= 0) & (y < C)
    tl.atomic_max(bad_labels, ((y != ignore_index) & ~in_range).to(tl.int32))
    valid = in_range & (y != ignore_index)
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
    a = tl.load(head_w + y_safe)
    b = tl.load(tail_w + y_safe)
    tl.store(row_head_w + i, a * keep)
    tl.store(row_tail_w + i, b * keep)
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
    grad, dlogits, row_head_w, row_tail_w, g_head, g_tail, g_losses, C, inv_b,
    HAS_HEAD: tl.constexpr, HAS_TAIL: tl.constexpr, HAS_LOSSES: tl.constexpr, BLOCK_C: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1)
    w = tl.zeros([], dtype=tl.float32)
    if HAS_HEAD:
        w += tl.load(g_head).to(tl.float32) * tl.load(row_head_w + i) * inv_b
    if HAS_TAIL:
        w += tl.load(g_tail).to(tl.float32) * tl.load(row_tail_w + i) * inv_b
    if HAS_LOSSES:
        w += tl.load(g_losses + i).to(tl.float32)
    offs = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = offs < C
    g = tl.load(grad + i * C + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dlogits + i * C + offs, (w * g).to(dlogits.dtype.element_ty), mask=mask)


def _block_c(num_classes: int) -> int:
    return min(triton.next_power_of_2(max(num_classes, 2)), MAX_BLOCK_C)


def _warps(block: int) -> int:
    return 8 if block >= 2048 else 4


@torch.library.custom_op("imbsam_fast::class_masked_ce", mutates_args=())
def class_masked_ce_op(logits: Tensor, targets: Tensor, head_w: Tensor, tail_w: Tensor, ignore_index: int,
                       smoothing: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(head, tail, per-sample losses, G, row weights)``: the forward kernels as one op for
    ``torch.compile`` and CUDA-graph capture (``G`` and the row weights are what the backward scales)."""
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    batch, num_classes = logits.shape
    device = logits.device
    losses = torch.empty(batch, dtype=torch.float32, device=device)
    grad = torch.empty((batch, num_classes), dtype=logits.dtype, device=device)
    row_w = torch.empty((2, batch), dtype=torch.float32, device=device)
    sums = torch.zeros(3, dtype=torch.float32, device=device)  # head, tail, bad-label flag (as int32 bits)
    if batch > 0:
        block = _block_c(num_classes)
        _forward_kernel[(batch,)](
            logits, logits.stride(0), targets, head_w, tail_w, sums[2:].view(torch.int32),
            losses, grad, row_w[0], row_w[1], num_classes, ignore_index, float(smoothing),
            BLOCK_C=block, num_warps=_warps(block),
        )
        _weighted_sums_kernel[(1,)](losses, row_w[0], row_w[1], sums, batch, 1.0 / batch, BLOCK=1024, num_warps=4)
        check_label_flag(sums[2:].view(torch.int32), num_classes, ignore_index)
    return sums[0].clone(), sums[1].clone(), losses, grad, row_w


@class_masked_ce_op.register_fake
def _(logits, targets, head_w, tail_w, ignore_index, smoothing):
    return masked_ce_outputs_like(logits)


@torch.library.custom_op("imbsam_fast::class_masked_ce_backward", mutates_args=())
def class_masked_ce_backward_op(grad: Tensor, row_w: Tensor, g_head: Optional[Tensor], g_tail: Optional[Tensor],
                                g_losses: Optional[Tensor]) -> Tensor:
    """``dx_i = (g_h a[y_i] / B + g_t b[y_i] / B + g_l[i]) G_i``: one row-scaling launch."""
    batch, num_classes = grad.shape
    dlogits = torch.empty_like(grad)
    if batch > 0 and num_classes > 0:
        block = _block_c(num_classes)
        _backward_kernel[(batch, triton.cdiv(num_classes, block))](
            grad, dlogits, row_w[0], row_w[1],
            g_head if g_head is not None else row_w, g_tail if g_tail is not None else row_w,
            g_losses.contiguous() if g_losses is not None else row_w, num_classes, 1.0 / batch,
            HAS_HEAD=g_head is not None, HAS_TAIL=g_tail is not None, HAS_LOSSES=g_losses is not None,
            BLOCK_C=block, num_warps=_warps(block),
        )
    return dlogits


@class_masked_ce_backward_op.register_fake
def _(grad, row_w, g_head, g_tail, g_losses):
    return torch.empty_like(grad)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[3], output[4])
    ctx.mark_non_differentiable(output[3], output[4])
    ctx.set_materialize_grads(False)


def _backward(ctx, g_head, g_tail, g_losses, _g_grad, _g_row_w):
    grad, row_w = ctx.saved_tensors
    if g_head is None and g_tail is None and g_losses is None:
        return None, None, None, None, None, None
    return class_masked_ce_backward_op(grad, row_w, g_head, g_tail, g_losses), None, None, None, None, None


class_masked_ce_op.register_autograd(_backward, setup_context=_setup_context)


def class_masked_cross_entropy(
    logits: Tensor, targets: Tensor, head_w: Optional[Tensor] = None, tail_w: Optional[Tensor] = None, *,
    tail_mask: Optional[Tensor] = None, tail_weight: float = 1.0, ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(head, tail, per-sample losses)`` of cross-entropy with class weights.

    Give either ``head_w`` and ``tail_w`` (``(C,)`` per-class ``a``, ``b``) or
    ``tail_mask`` (``(C,)`` bool) with ``tail_weight``. ``logits``: ``(B, C)``
    fp32/fp16/bf16; ``targets``: ``(B,)`` integer labels (``ignore_index`` allowed;
    any other label outside ``[0, C)`` raises on CPU and asserts on the device).
    """
    if tail_mask is not None:
        if head_w is not None or tail_w is not None:
            raise ValueError("give either head_w and tail_w, or tail_mask, not both")
        mask = tail_mask.to(logits.device)
        head_w, tail_w = (~mask).to(torch.float32), mask.to(torch.float32) * float(tail_weight)
    elif head_w is None or tail_w is None:
        raise ValueError("give head_w and tail_w, or tail_mask")
    head, tail, losses, _, _ = class_masked_ce_op(
        logits, targets, head_w.to(device=logits.device, dtype=torch.float32).contiguous(),
        tail_w.to(device=logits.device, dtype=torch.float32).contiguous(), int(ignore_index), float(label_smoothing))
    return head, tail, losses
