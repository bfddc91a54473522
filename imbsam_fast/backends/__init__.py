"""Backend dispatch: ``"auto" | "torch" | "triton" | "ext"``.

Every backend implements the same parameter ops (per-tensor norms, perturb,
restore) and, optionally, a fused class-masked cross-entropy. ``auto`` picks the
fastest one available for the tensors at hand and reports its choice through
the optimizer's ``backend`` attribute.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .torch_ops import TorchParamOps
from .triton_ops import TritonParamOps, triton_available

__all__ = ["BACKENDS", "resolve_param_backend", "resolve_loss_backend", "TorchParamOps"]

BACKENDS = ("auto", "torch", "triton", "ext")


def _check_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def _unavailable(name: str) -> RuntimeError:
    return RuntimeError(
        f"backend={name!r} is not available in this build of imbsam_fast; use backend='torch' or 'auto'"
    )


def resolve_param_backend(name: str, device_types: set[str]):
    """Parameter-op backend for parameters living on ``device_types``.

    ``auto``: Triton when every parameter is on CUDA and Triton imports, else torch.
    ``triton`` on CPU tensors works only under Triton's interpreter (``TRITON_INTERPRET=1``).
    """
    _check_name(name)
    if name == "torch":
        return TorchParamOps()
    if name == "auto":
        if device_types == {"cuda"} and triton_available():
            return TritonParamOps()
        return TorchParamOps()
    if name == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs Triton: pip install 'imbsam_fast[triton]'")
        _check_triton_devices(device_types)
        return TritonParamOps()
    raise _unavailable(name)


def _check_triton_devices(device_types: set[str]) -> None:
    from imbsam_fast.kernels.multi_tensor import interpreting

    unsupported = device_types - {"cuda", "cpu"}
    if unsupported:
        raise RuntimeError(f"backend='triton' runs on CUDA tensors; got tensors on {sorted(unsupported)}")
    if "cpu" in device_types and not interpreting():
        raise RuntimeError(
            "backend='triton' got CPU tensors: Triton kernels run on CUDA, or on the CPU only under "
            "Triton's interpreter (set TRITON_INTERPRET=1 before importing imbsam_fast)"
        )


def resolve_loss_backend(name: str, logits: torch.Tensor) -> Optional[Callable]:
    """Fused class-masked cross-entropy for ``logits``, or ``None`` for the plain-torch path.

    ``auto`` takes the Triton kernel for fp32/fp16/bf16 CUDA logits when Triton imports.
    """
    _check_name(name)
    if name == "torch":
        return None
    if name == "auto":
        ok = logits.is_cuda and logits.dtype in _CE_DTYPES and triton_available()
        return _triton_cross_entropy if ok else None
    if name == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs Triton: pip install 'imbsam_fast[triton]'")
        _check_triton_devices({logits.device.type})
        if logits.dtype not in _CE_DTYPES:
            raise TypeError(f"the Triton cross-entropy takes fp32, fp16 or bf16 logits, got {logits.dtype}")
        return _triton_cross_entropy
    raise _unavailable(name)


_CE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_cross_entropy(logits, targets, *, weights=None, tail_mask=None, tail_weight=1.0, ignore_index,
                          label_smoothing):
    """The fused kernel; it checks the labels itself (no extra launches)."""
    from imbsam_fast.kernels.cross_entropy import class_masked_cross_entropy

    if weights is not None:
        head, tail, _ = class_masked_cross_entropy(
            logits, targets, weights.head, weights.tail, ignore_index=ignore_index, label_smoothing=label_smoothing
        )
    else:
        head, tail, _ = class_masked_cross_entropy(
            logits, targets, tail_mask=tail_mask, tail_weight=tail_weight, ignore_index=ignore_index,
            label_smoothing=label_smoothing,
        )
    return head, tail
