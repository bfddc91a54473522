"""torch.optim's step hooks and profiler range around :meth:`ImbSAM.step`, entered only when something uses them.

``torch.optim.Optimizer`` wraps the ``step`` of every subclass in ``profile_hook_step``: a profiler range
named ``Optimizer.step#<Class>.step`` and the step pre- and post-hooks (the optimizer's own and the global
ones), entered on every call whether or not a profiler runs or a hook is registered. Entering and leaving
the range is two profiler-op calls and a formatted name: 0.12 ms of Python and about 0.17 ms of host time
in all a fast step on ResNet-32, paired in one process on a 2-core CPU (``benchmarks/RESULTS.md``, tenth
session).

ImbSAM marks its ``step`` as already wrapped (:func:`keep_unwrapped`), so torch leaves it alone, and goes
through torch's own wrapper (:func:`with_torch_step_hooks`) whenever :func:`torch_step_hooks_active`: then
hooks, their argument rewriting and the profiler range behave as torch's, because they are torch's. Where
this torch lacks the hook registries the check needs, nothing is marked and torch wraps every step as usual.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch
from torch.optim import Optimizer

try:
    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks
except ImportError:  # pragma: no cover - a torch without them: its wrapper stays on every step
    _global_optimizer_pre_hooks = _global_optimizer_post_hooks = None

__all__ = ["CAN_SKIP_WRAPPER", "keep_unwrapped", "step_hooks_registered", "torch_step_hooks_active",
           "with_torch_step_hooks"]

CAN_SKIP_WRAPPER = _global_optimizer_pre_hooks is not None and _global_optimizer_post_hooks is not None
"""Whether the wrapper can be left out: the global hook registries are readable in this torch."""

F = TypeVar("F", bound=Callable[..., Any])


def keep_unwrapped(step: F) -> F:
    """Mark ``step`` so that ``Optimizer.__init__`` does not wrap it (``hooked``, as torch marks its own
    wrappers), when :data:`CAN_SKIP_WRAPPER`."""
    if CAN_SKIP_WRAPPER:
        step.hooked = True  # type: ignore[attr-defined]
    return step


def step_hooks_registered(opt: Optimizer) -> bool:
    """Whether a step pre- or post-hook is registered on ``opt`` or globally (for every optimizer)."""
    return bool(opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks or _global_optimizer_pre_hooks
                or _global_optimizer_post_hooks)


def torch_step_hooks_active(opt: Optimizer) -> bool:
    """Whether torch's step wrapper has work: :func:`step_hooks_registered`, or a running profiler
    (``torch.profiler``, ``torch.autograd.profiler``, ``emit_nvtx``/``emit_itt``)."""
    return step_hooks_registered(opt) or torch._C._autograd._profiler_enabled()


def with_torch_step_hooks(step: F) -> F:
    """``step`` inside torch's own ``Optimizer.profile_hook_step``."""
    return Optimizer.profile_hook_step(step)  # type: ignore[return-value]
