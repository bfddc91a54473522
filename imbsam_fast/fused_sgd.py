"""The last phase of a step in one pass when the base optimizer is a plain ``torch.optim.SGD``:
``w <- backup`` and SGD's update of ``w`` fused, per param group, by a backend that offers
``restore_sgd_(params, backups, grads, momentum_buffers, lr, momentum, dampening, weight_decay,
nesterov, maximize)`` (the C++ extension).

The fused pass writes each weight once (from its backup) instead of restoring it and then reading and
writing it again in SGD's step. It runs only where it changes nothing but the time: a plain SGD (not a
subclass) with a float learning rate, no step hooks on it or on ImbSAM, no scaler and no clipping,
momentum buffers that exist already (SGD's first step creates them), every perturbed parameter with a
gradient, and tensors the backend covers. Anything else takes the unfused path.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor

from .backends import Bucket
from .hooks import StepHooks
from .torch_step_hooks import step_hooks_registered

if TYPE_CHECKING:
    from .optimizer import ImbSAM

__all__ = ["FusedSGDPlan", "plan_fused_sgd", "fused_sgd_applies", "kept_plan"]

_momentum_buffer = operator.itemgetter("momentum_buffer")
_PARAMS = operator.itemgetter("params")

FusedSGDPlan = list[tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], dict[str, Any]]]
"""Per param group with gradients: (params, backups, grads, momentum buffers, the group)."""


def plan_fused_sgd(opt: ImbSAM, buckets: list[Bucket], backup_of: dict[int, tuple[Tensor, int]]
                   ) -> Optional[FusedSGDPlan]:
    """The fused restore + SGD step of ``opt``'s groups, or ``None`` where it does not apply.

    The per-parameter part of a plan (parameters, backups, momentum buffers) is kept across steps
    in ``opt._fused_plan`` and reused, with the step's gradients, while it still holds.
    """
    if not fused_sgd_applies(opt):
        return None
    kept: Optional[_KeptPlan] = opt._fused_plan
    if kept is not None and kept.backup_of is backup_of:
        plan = kept.refresh(opt)
        if plan is not None:
            return plan
    plan = _plan(opt, buckets, backup_of)
    opt._fused_plan = None if plan is None else _KeptPlan(plan, backup_of, opt.base_optimizer.state, opt.param_groups)
    return plan


def fused_sgd_applies(opt: ImbSAM) -> bool:
    """Whether this step's base step may be fused: the backend offers it, a plain SGD base, no clipping,
    no scaler, no ImbSAM step hook with a ``before_base_step`` (the fused pass restores and steps at once,
    with no point between them; hooks on the backwards alone run as usual), no step hooks of the base
    optimizer or torch's global ones, no FSDP2."""
    base = opt.base_optimizer
    if getattr(opt._ops, "restore_sgd_", None) is None or type(base) is not torch.optim.SGD:
        return False
    if opt.max_grad_norm is not None or opt._scaled is not None or any(
            map(_acts_before_base_step, opt._step_hooks if opt._active_hooks is None else opt._active_hooks)):
        return False
    return not (step_hooks_registered(base) or opt._sync.kind == "fsdp2")


def _acts_before_base_step(hooks: StepHooks) -> bool:
    """Whether ``hooks`` has a ``before_base_step`` of its own (on its class or set on the instance)."""
    return (getattr(type(hooks), "before_base_step", None) is not StepHooks.before_base_step
            or "before_base_step" in getattr(hooks, "__dict__", ()))


def kept_plan(opt: ImbSAM, backup_of: dict[int, tuple[Tensor, int]]) -> Optional[_KeptPlan]:
    """The plan kept from an earlier step when the fused step applies and the plan still holds for the
    parameters, the optimizer state and the groups; the gradients are not read (the extension's
    ParamBook reads them itself)."""
    kept: Optional[_KeptPlan] = opt._fused_plan
    if kept is None or kept.backup_of is not backup_of or not fused_sgd_applies(opt) or not kept.holds(opt):
        return None
    return kept


def plan_grads(plan: FusedSGDPlan) -> list[list[Tensor]]:
    """The plan's gradients, one list per group: every gradient of the step (a plan covers them all), each
    list of one device and dtype."""
    return [entry[2] for entry in plan]


def _plan(opt: ImbSAM, buckets: list[Bucket], backup_of: dict[int, tuple[Tensor, int]]) -> Optional[FusedSGDPlan]:
    plan: FusedSGDPlan = []
    covered = 0
    state_of = opt.base_optimizer.state.get
    backup_and_bucket = backup_of.get
    for group in opt.param_groups:
        if isinstance(group["lr"], Tensor) or group.get("differentiable"):
            return None
        momentum = group["momentum"] != 0
        params, backups, grads, buffers, homes = [], [], [], [], set()
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            entry = backup_and_bucket(id(p))
            if entry is None:
                return None
            if momentum:
                st = state_of(p)
                buf = None if st is None else st.get("momentum_buffer")
                if buf is None:
                    return None
                buffers.append(buf)
            params.append(p)
            backups.append(entry[0])
            homes.add(entry[1])
            grads.append(g)
        if params:
            # One bucket: one device and dtype (and the backend's checks on the first tensors hold for all).
            lists = (params, backups, grads, *((buffers,) if momentum else ()))
            if len(homes) != 1 or opt._ops._why_not(lists) is not None:
                return None
            plan.append((params, backups, grads, buffers, group))
            covered += len(params)
    if covered != sum(len(b.params) for b in buckets):
        return None
    return plan


class _KeptPlan:
    """A plan kept for the next steps: valid while the backup layout, the optimizer state, the set of
    parameters with a gradient, the momentum buffers and the groups' kinds of options stay as they were.

    The optimizer state is checked through its per-parameter dicts, in the state's own order: a dict
    added, removed or replaced shows there, a buffer replaced shows in its dict. No parameter is
    looked up by tensor (``Tensor.__hash__`` is a Python call, 95 of them a step on ResNet-32).

    The kept plan holds no gradients (each step's are read again by :meth:`refresh`, or by the ParamBook):
    holding the planning step's would keep a whole set of stale gradient tensors alive."""

    def __init__(self, plan: FusedSGDPlan, backup_of: dict[int, tuple[Tensor, int]], state: Any,
                 groups: list[dict[str, Any]]) -> None:
        self.plan: FusedSGDPlan = [(params, backups, [], buffers, group) for params, backups, _, buffers, group in plan]
        self.backup_of = backup_of
        self.state = state
        planned = {id(p) for entry in plan for p in entry[0]}
        self.others = [p for g in groups for p in g["params"] if id(p) not in planned]
        self.total = sum(len(g["params"]) for g in groups)
        self.param_states = [[state[p] for p in params] if buffers else [] for params, _, _, buffers, _ in plan]
        self.entries = tuple(state.values())

    def holds(self, opt: ImbSAM) -> bool:
        """Whether the plan still holds, gradients apart: the same state, groups and momentum buffers, and no
        gradient on a parameter outside the plan."""
        if opt.base_optimizer.state is not self.state:
            return False
        # The groups are the same size as when planned.
        if sum(map(len, map(_PARAMS, opt.param_groups))) != self.total or (
                self.others and any(p.grad is not None for p in self.others)):
            return False
        state = self.state
        if len(state) != len(self.entries) or not all(map(operator.is_, state.values(), self.entries)):
            return False
        for (_, _, _, buffers, group), states in zip(self.plan, self.param_states):
            if isinstance(group["lr"], Tensor) or group.get("differentiable") or (group["momentum"] != 0) != bool(
                    buffers):
                return False
            if buffers:
                try:
                    if not all(map(operator.is_, map(_momentum_buffer, states), buffers)):
                        return False
                except KeyError:
                    return False
        return True

    def refresh(self, opt: ImbSAM) -> Optional[FusedSGDPlan]:
        """The plan with this step's gradients, or ``None`` when it no longer holds."""
        if not self.holds(opt):
            return None
        out: FusedSGDPlan = []
        for params, backups, _, buffers, group in self.plan:
            grads = [p.grad for p in params]
            if any(g is None for g in grads):
                return None
            # Gradients are new tensors every step, and a parameter's layout can change in place.
            if opt._ops._why_not((params, grads)) is not None:
                return None
            out.append((params, backups, grads, buffers, group))
        return out


def apply_fused_sgd(opt: ImbSAM, plan: FusedSGDPlan, skip: Optional[Tensor] = None) -> None:
    """Run the planned fused passes; where the device-side flag ``skip`` is set they only restore."""
    for params, backups, grads, buffers, g in plan:
        opt._ops.restore_sgd_(params, backups, grads, buffers, g["lr"], g["momentum"], g["dampening"],
                              g["weight_decay"], g["nesterov"], g["maximize"], skip)
