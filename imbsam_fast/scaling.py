"""fp16 loss scaling of one ImbSAM step with a ``torch.amp.GradScaler``.

With scale ``S`` every backward differentiates ``S * loss``. The gradients
are then unscaled exactly once each:

* the tail gradient at w after the "ascent" pass (``g_t = (S g_t) / S``),
  before the perturbation is taken from it;
* the update's ``g_h + g_t'`` after the last pass, by ``scaler.unscale_(opt)``,
  which records its inf/NaN flag the way ``scaler.step`` would.

An inf or NaN in either sets the scaler's found-inf flag for this optimizer,
so ``scaler.update()`` backs off; the step is then skipped with the weights
and BatchNorm buffers restored. Everything stays on the device up to the one
read of the flag that decides the base step, as in ``GradScaler.step``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .distributed import GradSync, local_tensor
from .hooks import ASCENT, StepHooks

if TYPE_CHECKING:
    from .optimizer import ImbSAM

__all__ = ["ScaledStep", "check_scaler"]


def check_scaler(scaler: Any) -> None:
    """Raise ``TypeError`` unless ``scaler`` is a ``torch.amp.GradScaler``."""
    if not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")


class ScaledStep(StepHooks):
    """The scaler's part of one step: scale each loss, unscale each pass once, collect the found-inf flags."""

    def __init__(self, scaler: torch.amp.GradScaler, sync: GradSync) -> None:
        self.scaler = scaler
        self.sync = sync
        self._ascent_found: dict[torch.device, Tensor] = {}

    def before_backward(self, opt: ImbSAM, phase: str, loss: Tensor) -> Tensor:
        return self.scaler.scale(loss)

    def after_backward(self, opt: ImbSAM, phase: str) -> None:
        if phase != ASCENT:
            return
        # GradScaler keeps its scale on the device as ``_scale``; reading it through get_scale() would sync.
        inv_scale = self.scaler._scale.double().reciprocal().float()
        by_device: dict[torch.device, list[Tensor]] = {}
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    g = local_tensor(p.grad)
                    by_device.setdefault(g.device, []).append(g)
        for device, grads in by_device.items():
            found = torch.zeros((), device=device)
            for same in _by_dtype(grads):
                torch._amp_foreach_non_finite_check_and_unscale_(same, found, inv_scale.to(device))
            self._ascent_found[device] = found

    def before_base_step(self, opt: ImbSAM) -> None:
        self.scaler.unscale_(opt)
        found = self._found_per_device(opt)
        for device, flag in self._ascent_found.items():
            if device in found:
                found[device].add_(flag)
            else:
                found[device] = flag
        for device, flag in found.items():
            found[device] = self.sync.any_flag(flag)

    def found_flag(self, opt: ImbSAM) -> Tensor:
        """Non-zero when any pass of this step saw an inf or NaN: a 0-dim tensor, no host read."""
        flags = list(self._found_per_device(opt).values())
        total = flags[0].clone()
        for f in flags[1:]:
            total += f.to(total.device)
        return total

    def found_inf(self, opt: ImbSAM) -> bool:
        """Whether any pass of this step saw an inf or NaN (one host read, as ``GradScaler.step`` does)."""
        # The one host read of a scaled step, the same one GradScaler.step makes to decide whether to step;
        # capturable=True takes found_flag() instead and decides on the device.
        return bool(sum(v.item() for v in self._found_per_device(opt).values()))

    def _found_per_device(self, opt: ImbSAM) -> dict[torch.device, Tensor]:
        # unscale_() records the flags where GradScaler.update() reads them: the per-optimizer state.
        return self.scaler._per_optimizer_states[id(opt)]["found_inf_per_device"]


def _by_dtype(grads: list[Tensor]) -> list[list[Tensor]]:
    kinds: dict[torch.dtype, list[Tensor]] = {}
    for g in grads:
        kinds.setdefault(g.dtype, []).append(g)
    return list(kinds.values())
