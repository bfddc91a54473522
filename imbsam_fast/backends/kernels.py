"""The one place the Triton kernels are imported from (lazily: Triton is optional)."""

from __future__ import annotations

import os
from functools import cache
from types import SimpleNamespace

__all__ = ["triton_available", "interpreting", "load_kernels"]


@cache
def triton_available() -> bool:
    """True when Triton imports."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def interpreting() -> bool:
    """True when Triton's interpreter runs the kernels (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@cache
def load_kernels() -> SimpleNamespace:
    """The kernel modules of ``imbsam_fast.kernels``: ``cross_entropy``, ``grad_norm``, ``perturb``, ``restore``
    and their shared host side ``multi_tensor``. Raises ``RuntimeError`` without Triton."""
    if not triton_available():
        raise RuntimeError("the Triton kernels need Triton: pip install 'imbsam_fast[triton]'")
    from imbsam_fast.kernels import cross_entropy, grad_norm, multi_tensor, perturb, restore

    return SimpleNamespace(cross_entropy=cross_entropy, grad_norm=grad_norm, multi_tensor=multi_tensor,
                           perturb=perturb, restore=restore)
