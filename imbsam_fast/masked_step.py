"""The base step of ``capturable=True``: taken always, undone on the device when a flag says so.

With ``found`` a 0-dim tensor (non-zero: an inf or NaN was seen), the step leaves every tensor as
``where(found, before, after)``: the parameters, and the base optimizer's state tensors (state
created by this very step, such as a first momentum buffer, becomes zeros, which is what SGD with
no dampening and Adam start from). No value is read back, so the step can be captured in a CUDA
graph; the cost is one copy of the parameters and of the state before the step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["masked_base_step", "restore_where", "nonfinite_flag", "norms_finite", "state_restore_pairs"]


def norms_finite(total: Tensor, tail: Tensor | None) -> Tensor:
    """Whether the update's norm and the tail gradient's norm are both finite: a 0-dim bool tensor on the device
    (their sum is finite exactly when both are)."""
    return torch.isfinite(total if tail is None else total + tail.to(total.device))


def nonfinite_flag(total: Tensor, tail: Tensor | None) -> Tensor:
    """``1.0`` when the update's norm or the tail gradient's norm is not finite, else ``0.0`` (0-dim, on the device)."""
    return (~norms_finite(total, tail)).to(torch.float32)


def restore_where(tensors: list[Tensor], saved: list[Tensor], found: Tensor) -> None:
    """``t <- saved`` where ``found`` is set, on each tensor's device (the flag moved once per device)."""
    keeps: dict[torch.device, Tensor] = {}
    for t, s in zip(tensors, saved):
        keep = keeps.get(t.device)
        if keep is None:
            keep = keeps[t.device] = found.to(device=t.device) != 0
        t.copy_(torch.where(keep, s, t))


def state_restore_pairs(state: Any, params: list[Tensor], before: list[dict[str, Any]]
                        ) -> tuple[list[Tensor], list[Any]]:
    """Every tensor in the parameters' optimizer state now, and what ``before`` (one dict per parameter) held
    under its key: zeros for state made since, which is how SGD with momentum and Adam start."""
    tensors: list[Tensor] = []
    saved: list[Any] = []
    for p, old in zip(params, before):
        for key, value in state[p].items():
            if isinstance(value, Tensor):
                tensors.append(value)
                saved.append(old[key] if key in old else torch.zeros_like(value))
    return tensors, saved


@torch.no_grad()
def masked_base_step(base: Optimizer, params: list[Tensor], found: Tensor) -> None:
    """``base.step()``, then every parameter and state tensor back to its value before when ``found`` is set."""
    state: Any = base.state
    before_params = [p.detach().clone() for p in params]
    before_state = [{k: v.clone() for k, v in state[p].items() if isinstance(v, Tensor)} if p in state else {}
                    for p in params]
    base.step()
    state_tensors, state_saved = state_restore_pairs(state, params, before_state)
    restore_where([p.detach() for p in params] + state_tensors, before_params + state_saved, found)
