"""Closures that training frameworks wrap before they reach :meth:`ImbSAM.step`.

Lightning's precision plugins call ``optimizer.step(closure=partial(plugin._wrap_closure,
module, optimizer, closure))``: the wrapper runs the user's closure, then the
framework's after-closure work (the ``on_before_optimizer_step`` hooks, gradient
clipping). ImbSAM calls its closure up to three times a step, and as
``closure(index)`` in fast mode, which that wrapper does not accept. So the
wrapper is taken apart: the passes call the user's closure, and the
after-closure work runs once per step, before the base step, when the
gradients are those of the update. Recognized by shape, without importing
the framework.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

from .hooks import StepHooks

__all__ = ["AfterClosure", "split_wrapped_closure"]


def split_wrapped_closure(closure: Callable[..., Any]) -> tuple[Callable[..., Any], Optional[StepHooks]]:
    """``(the user's closure, a hook running the framework's after-closure work)`` for a Lightning-wrapped
    closure; ``(closure, None)`` for any other."""
    if not (isinstance(closure, functools.partial) and len(closure.args) == 3 and not closure.keywords):
        return closure, None
    if getattr(closure.func, "__name__", None) != "_wrap_closure":
        return closure, None
    after = getattr(getattr(closure.func, "__self__", None), "_after_closure", None)
    if not callable(after):
        return closure, None
    module, optimizer, inner = closure.args
    return inner, AfterClosure(functools.partial(after, module, optimizer))


class AfterClosure(StepHooks):
    """Runs a framework's after-closure work once, before the base step."""

    def __init__(self, work: Callable[[], None]) -> None:
        self.work = work

    def before_base_step(self, opt: Any) -> None:
        self.work()
