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

__all__ = ["BACKENDS", "resolve_param_backend", "resolve_loss_backend", "TorchParamOps"]

BACKENDS = ("auto", "torch", "triton", "ext")


def _check_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def _unavailable(name: str) -> RuntimeError:
    return RuntimeError(
        f"backend={name!r} is not available in this build of imbsam_fast; use backend='torch' or 'auto'"
    )


def resolve_param_backend(name: str, device_types: set[str]) -> TorchParamOps:
    """Parameter-op backend for parameters living on ``device_types``."""
    _check_name(name)
    if name in ("auto", "torch"):
        return TorchParamOps()
    raise _unavailable(name)


def resolve_loss_backend(name: str, logits: torch.Tensor) -> Optional[Callable]:
    """Fused loss for ``logits``, or ``None`` for the plain-torch path."""
    _check_name(name)
    if name in ("auto", "torch"):
        return None
    raise _unavailable(name)
