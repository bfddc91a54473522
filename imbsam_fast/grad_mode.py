"""Autograd off for a call, at a small fraction of ``@torch.no_grad()``'s cost.

``torch.no_grad()`` as a decorator builds a context-manager object and runs
its Python ``__enter__``/``__exit__`` on every call (about 4 us hot on a
2-core Xeon, more once a forward and backward have evicted the interpreter's
caches). The optimizer's phases run every step, so they switch the mode
directly: ``prev = is_grad_enabled(); set(False); try: f() finally: set(prev)``,
which is what ``no_grad`` does, and which ``torch.compile`` traces as well.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import torch

__all__ = ["without_grad"]

F = TypeVar("F", bound=Callable[..., Any])

_set_grad_enabled = torch._C._set_grad_enabled
_is_grad_enabled = torch.is_grad_enabled


def without_grad(fn: F) -> F:
    """``fn`` run with autograd disabled (the previous mode restored after it, also on an error)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        previous = _is_grad_enabled()
        _set_grad_enabled(False)
        try:
            return fn(*args, **kwargs)
        finally:
            _set_grad_enabled(previous)

    return wrapper  # type: ignore[return-value]
