"""The C++ extension's ops (``torch.ops.imbsam_fast.*``, sources in ``csrc/``): where they come from.

``load_extension()`` registers them from the extension built at install
(``imbsam_fast._C``, which ``pip install --no-build-isolation -e .`` compiles
with ninja when a C++ compiler is present), or, with ``jit=True``, builds the
sources of a source checkout with ``torch.utils.cpp_extension.load`` into a
cache folder (``$IMBSAM_FAST_EXT_CACHE``, default ``~/.cache/imbsam_fast``) and
loads that. It also registers the fake kernels that let ``torch.compile``
trace the ops.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional

import torch

__all__ = ["ext_available", "ext_error", "load_extension", "BUILD_HINT", "masked_ce_outputs_like"]

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` in a source checkout (needs a C++ compiler and "
    "ninja), or call imbsam_fast.backends.extension.load_extension(jit=True) to compile csrc/ now"
)

_loaded = False
_error: Optional[str] = None
_SOURCES = Path(__file__).resolve().parents[2] / "csrc"


def masked_ce_outputs_like(logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Empty outputs of a class-masked CE forward for ``(B, C)`` logits, the fake kernel of both ops that have
    one (the extension's and the Triton one): head and tail sums (fp32 scalars), per-sample losses (fp32),
    the stored gradient ``G`` (the logits' dtype) and the row weights ``(2, B)`` (fp32)."""
    batch, classes = logits.shape
    scalar = logits.new_empty((), dtype=torch.float32)
    return (scalar, scalar.clone(), logits.new_empty(batch, dtype=torch.float32),
            logits.new_empty((batch, classes)), logits.new_empty((2, batch), dtype=torch.float32))


def _register_fakes() -> None:
    @torch.library.register_fake("imbsam_fast::sq_norm")
    def _(tensors):
        dtype = torch.float64 if tensors and tensors[0].dtype == torch.float64 else torch.float32
        return torch.empty((), dtype=dtype, device=tensors[0].device if tensors else "cpu")

    for name in ("perturb_", "restore_", "restore_sgd_"):
        torch.library.register_fake(f"imbsam_fast::{name}")(lambda *args, **kwargs: None)

    @torch.library.register_fake("imbsam_fast::masked_ce_forward")
    def _(logits, targets, head_w, tail_w, ignore_index, smoothing):
        return masked_ce_outputs_like(logits)

    @torch.library.register_fake("imbsam_fast::masked_ce_backward")
    def _(grad, row_w, g_head, g_tail, g_losses):
        return torch.empty_like(grad)

    @torch.library.register_fake("imbsam_fast::masked_ce")
    def _(logits, targets, head_w, tail_w, ignore_index, smoothing):
        return masked_ce_outputs_like(logits)[:3]


def _load_built() -> bool:
    spec = importlib.util.find_spec("imbsam_fast._C")
    if spec is None or spec.origin is None:
        return False
    torch.ops.load_library(spec.origin)
    return True


def _load_jit() -> bool:
    from torch.utils.cpp_extension import load

    sources = sorted(str(p) for p in _SOURCES.glob("*.cpp"))
    if not sources:
        raise RuntimeError(f"no C++ sources under {_SOURCES} (the JIT build needs a source checkout)")
    cache = Path(os.environ.get("IMBSAM_FAST_EXT_CACHE", Path.home() / ".cache" / "imbsam_fast"))
    cache.mkdir(parents=True, exist_ok=True)
    flags = ["-O3", "-ffp-contract=off", "-fopenmp", "-march=native"]
    load("imbsam_fast_C", sources, extra_cflags=flags, extra_ldflags=["-fopenmp"], build_directory=str(cache),
         is_python_module=False, verbose=False)
    return True


def load_extension(jit: bool = False) -> bool:
    """Register the extension's ops; True when they are available. Failures are kept for :func:`ext_error`."""
    global _loaded, _error
    if _loaded:
        return True
    try:
        _loaded = _load_built() or (jit and _load_jit())
    except Exception as err:  # noqa: BLE001 - a broken build or a missing compiler: report, fall back
        _error = f"{type(err).__name__}: {err}"
        return False
    if _loaded:
        _register_fakes()
    else:
        _error = "the extension imbsam_fast._C was not built"
    return _loaded


def ext_available() -> bool:
    """True when the extension's ops are registered (loading the built extension on first call)."""
    return load_extension()


def ext_error() -> Optional[str]:
    """Why the extension is unavailable, or ``None``."""
    return None if _loaded else _error
