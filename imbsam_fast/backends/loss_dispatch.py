"""Which class-masked cross-entropy runs: the fused Triton kernel, the C++ extension's op, or plain torch
(``None``)."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .extension import BUILD_HINT, ext_available, ext_error
from .kernels import load_kernels, triton_available
from .param_dispatch import check_backend_name, check_triton_devices

__all__ = ["resolve_loss_backend", "CE_DTYPES", "ext_ce_covers"]

CE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def ext_ce_covers(logits: torch.Tensor) -> bool:
    """Whether the C++ extension has a class-masked cross-entropy kernel for ``logits``' device."""
    return ext_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "imbsam_fast::masked_ce_forward", logits.device.type.upper())


def resolve_loss_backend(name: str, logits: torch.Tensor) -> Optional[Callable]:
    """Fused class-masked cross-entropy for ``logits``, or ``None`` for the plain-torch path.

    ``auto`` takes the Triton kernel for fp32/fp16/bf16 CUDA logits when Triton imports, else the
    extension's CUDA op when it was built with CUDA; on the CPU it keeps torch (the extension's CPU
    op was measured faster only for small logits, and slower for many classes: ``benchmarks/RESULTS.md``).
    ``ext`` takes the extension's op on any device it has kernels for (fp64 too).
    """
    check_backend_name(name)
    if name == "torch":
        return None
    if name == "auto":
        if not logits.is_cuda or logits.dtype not in CE_DTYPES:
            return None
        if triton_available():
            return _triton_cross_entropy
        return _ext_cross_entropy if ext_ce_covers(logits) else None
    if name == "ext":
        if not ext_ce_covers(logits):
            why = ext_error() or f"it has no kernels for {logits.device.type} tensors"
            raise RuntimeError(f"backend='ext': the C++ extension's cross-entropy is not available ({why}); "
                               f"{BUILD_HINT}")
        return _ext_cross_entropy
    check_triton_devices({logits.device.type})
    if logits.dtype not in CE_DTYPES:
        raise TypeError(f"the Triton cross-entropy takes fp32, fp16 or bf16 logits, got {logits.dtype}")
    return _triton_cross_entropy


def _class_weights(logits, weights) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class ``(a, b)`` of ``weights`` (a ClassWeights) as contiguous fp32 on the logits' device."""
    return (weights.head.to(device=logits.device, dtype=torch.float32).contiguous(),
            weights.tail.to(device=logits.device, dtype=torch.float32).contiguous())


def _triton_cross_entropy(logits, targets, *, weights, ignore_index, label_smoothing):
    """The fused kernel; it checks the labels itself (no extra launches)."""
    ce = load_kernels().cross_entropy.class_masked_cross_entropy
    head, tail, _ = ce(logits, targets, *_class_weights(logits, weights), ignore_index=ignore_index,
                       label_smoothing=label_smoothing)
    return head, tail


def _ext_cross_entropy(logits, targets, *, weights, ignore_index, label_smoothing):
    """``torch.ops.imbsam_fast.masked_ce``: forward, stored gradient and autograd all in C++."""
    head, tail, _ = torch.ops.imbsam_fast.masked_ce(logits, targets, *_class_weights(logits, weights),
                                                    int(ignore_index), float(label_smoothing))
    return head, tail
