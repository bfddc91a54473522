"""Which class-masked cross-entropy runs: the fused Triton kernel or plain torch (``None``)."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .kernels import load_kernels, triton_available
from .param_dispatch import check_backend_name, check_triton_devices

__all__ = ["resolve_loss_backend", "CE_DTYPES"]

CE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def resolve_loss_backend(name: str, logits: torch.Tensor) -> Optional[Callable]:
    """Fused class-masked cross-entropy for ``logits``, or ``None`` for the plain-torch path.

    ``auto`` takes the Triton kernel for fp32/fp16/bf16 CUDA logits when Triton imports.
    """
    check_backend_name(name)
    if name == "torch":
        return None
    if name == "auto":
        ok = logits.is_cuda and logits.dtype in CE_DTYPES and triton_available()
        return _triton_cross_entropy if ok else None
    check_triton_devices({logits.device.type})
    if logits.dtype not in CE_DTYPES:
        raise TypeError(f"the Triton cross-entropy takes fp32, fp16 or bf16 logits, got {logits.dtype}")
    return _triton_cross_entropy


def _triton_cross_entropy(logits, targets, *, weights=None, tail_mask=None, tail_weight=1.0, ignore_index,
                          label_smoothing):
    """The fused kernel; it checks the labels itself (no extra launches)."""
    ce = load_kernels().cross_entropy.class_masked_cross_entropy
    if weights is not None:
        head, tail, _ = ce(logits, targets, weights.head, weights.tail, ignore_index=ignore_index,
                           label_smoothing=label_smoothing)
    else:
        head, tail, _ = ce(logits, targets, tail_mask=tail_mask, tail_weight=tail_weight, ignore_index=ignore_index,
                           label_smoothing=label_smoothing)
    return head, tail
