"""ImbSAM: class-imbalanced sharpness-aware minimization over any base optimizer.

With per-sample losses ``l_i`` and per-class weights ``a`` (head) and ``b``
(tail), ImbSAM minimizes::

    L_head(w) + max_{||e|| <= rho} L_tail(w + e),
    L_head = sum_i a[y_i] l_i / B,   L_tail = sum_i b[y_i] l_i / B

One step, in the three-step API of the public reference::

    g_h = grad L_head(w)                               first_step():  stash g_h (moved aside, no copy)
    g_t = grad L_tail(w)                               second_step(): e = rho g_t / (||g_t|| + 1e-16), w <- w + e
    g_t' = grad L_tail(w + e), accumulated onto g_h    third_step():  w <- w_saved, base step on g_h + g_t'

:meth:`ImbSAM.step` with a closure runs every pass itself, in the order a
pass schedule gives (:mod:`imbsam_fast.schedules`: exact or fast), with the
hook points of :mod:`imbsam_fast.hooks`. This module is the wrapper: param
groups, the three phases, the non-finite policy and the state dict.
"""

from __future__ import annotations

import operator
import warnings
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .backends import Bucket, resolve_param_backend
from .backends.ext_book import ExtBook, book_available
from .batchnorm import BatchNormSnapshot, BatchNormStats
from .closures import split_wrapped_closure
from .distributed import local_tensor, make_grad_sync
from .fused_sgd import FusedSGDPlan, apply_fused_sgd, kept_plan, plan_fused_sgd, plan_grads
from .grad_mode import without_grad
from .hooks import HookHandle, StepHooks
from .labels import check_targets, class_index, weight_rows
from .masked_step import masked_base_step, nonfinite_flag, norms_finite, restore_where
from .options import check_adaptive, check_max_grad_norm, check_micro_batches, check_rho, class_weights_from
from .param_buckets import ParamBuckets, all_params, clear_grads, grads_in, params_with_grad, set_grads
from .priors import ClassWeights
from .scaling import ScaledStep, check_scaler
from .schedules import StepLosses, StepRun, check_index_closure, make_schedule
from .torch_step_hooks import CAN_SKIP_WRAPPER, keep_unwrapped, torch_step_hooks_active, with_torch_step_hooks

__all__ = ["ImbSAM", "StepLosses", "NONFINITE"]

_group_by_device_and_dtype = torch._C._group_tensors_by_device_and_dtype
"""torch.optim's own grouping of tensor lists by device and dtype (in C++: no Python loop over the tensors)."""

NONFINITE = ("skip", "raise", "none")

_IDLE, _STASHED, _PERTURBED = "idle", "head gradient stashed", "weights perturbed"


class ImbSAM(Optimizer):
    """ImbSAM as a ``torch.optim.Optimizer`` wrapping a base optimizer.

    Args:
        params: parameters or param groups (a group may set its own ``rho`` and ``adaptive``).
            When ``base_optimizer`` is an instance, pass its parameters (or ``None``).
        base_optimizer: an optimizer class (built on the same param groups with
            ``base_kwargs``) or an already-built optimizer instance.
        rho: radius of the perturbation (public default 0.05).
        adaptive: ASAM's scale-invariant perturbation (Kwon et al. 2021), per group:
            ``e = rho * w^2 * g_t / ||(|w| * g_t)||`` (the norm over every parameter).
        tail_mask: bool tensor, one entry per class (``True`` = tail): the ImbSAM
            preset with ``tail_weight``.
        tail_weight: factor on the tail loss with ``tail_mask`` (default 2.0, the
            public code's latest revision; the paper uses 1.0).
        class_weights: a :class:`~imbsam_fast.priors.ClassWeights` (any preset of
            the family: plain, SAM, ImbSAM, Focal-SAM), instead of ``tail_mask``.
            :meth:`step` with a closure needs one of the two.
        mode: ``"exact"`` reproduces the reference passes (2 full forwards, 3
            full backwards). ``"fast"`` runs one full forward and backward for the
            head and the tail gradient at w and at w + e on the tail samples only
            (``closure(index)``). Needs ``model``.
        model: the module the closure runs. Fast mode handles its BatchNorm
            layers; in both modes a skipped non-finite step restores its
            BatchNorm buffers. A ``DistributedDataParallel`` module here makes the
            step synchronize as :mod:`imbsam_fast.distributed` describes; FSDP2
            (``fully_shard``) parameters are recognized from the parameters.
        ascent_sync: with DDP, ``"global"`` (default: the tail gradient is averaged
            over processes before the ascent, as one process on the global batch
            would) or ``"local"`` (each replica ascends along its own, m-sharpness,
            with no extra communication).
        max_grad_norm: clip the combined gradient to this global L2 norm before the
            base step (on the device, over every process's gradient under DDP or FSDP2).
        bn_stats: exact mode only: ``"reference"`` (default; running statistics
            update in both forwards, as the public code does) or ``"first"``.
        fast_bn, ghost_batch: fast mode only: the BatchNorm treatment of the tail
            passes, ``"replay-ghost"`` (default) or ``"ghost"``, and the number
            of zero-weight head samples in a ghost batch (default 8, >= 1).
        tail_capacity: fast mode only: run the tail passes on exactly ``K`` samples, with no host
            sync for the tail count: the tail samples first, then zero-weight head samples (which
            also serve as the BatchNorm ghost batch); a batch with more than ``K`` tail samples
            takes a uniform random subset of ``K`` of them, reweighted by ``n_tail / K`` (unbiased).
            ``ghost_batch`` does not apply then.
        backend: ``"auto" | "torch" | "triton" | "ext"`` for the parameter ops. With ``"ext"``
            the phases' gradient bookkeeping runs in C++ too
            (:mod:`imbsam_fast.backends.ext_book`).
        nonfinite: a NaN/inf in the tail or combined gradient: ``"skip"`` the base
            step (weights and BatchNorm buffers restored, counted in
            ``skipped_steps``, a warning), ``"raise"`` ``FloatingPointError``
            after the same restore, or ``"none"`` (no check: saves one read of
            the gradients and one host sync per step).
        ignore_index: label whose samples get zero weight in :meth:`step`.
        capturable: no value is read back anywhere in :meth:`step` (``closure, targets``), so the
            step can be captured in a CUDA graph, and the same path runs on the CPU. The non-finite
            skip is decided on the device: the base step is taken and undone where a flag is set
            (weights, optimizer state, BatchNorm buffers), with no warning; ``skipped_steps`` reads
            the count lazily. Needs ``tail_capacity`` in fast mode; ``nonfinite="raise"`` is not
            possible. A base optimizer with a ``capturable`` option gets it for accelerator parameters,
            and accelerator parameters take the torch foreach ops (``auto``; see :mod:`imbsam_fast.capture`).
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: Union[type[Optimizer], Optimizer],
        *,
        rho: float = 0.05,
        adaptive: bool = False,
        tail_mask: Optional[Union[Tensor, Sequence[bool]]] = None,
        tail_weight: Optional[float] = None,
        class_weights: Optional[ClassWeights] = None,
        mode: str = "exact",
        model: Optional[nn.Module] = None,
        bn_stats: Optional[str] = None,
        fast_bn: Optional[str] = None,
        ghost_batch: Optional[int] = None,
        tail_capacity: Optional[int] = None,
        backend: str = "auto",
        nonfinite: str = "skip",
        ignore_index: int = -100,
        ascent_sync: Optional[str] = None,
        max_grad_norm: Optional[float] = None,
        capturable: bool = False,
        **base_kwargs: Any,
    ) -> None:
        rho = check_rho(rho)
        adaptive = check_adaptive(adaptive)
        self.max_grad_norm = check_max_grad_norm(max_grad_norm)
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {', '.join(NONFINITE)}, got {nonfinite!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(capturable, bool):
            raise TypeError(f"capturable must be True or False, got {type(capturable).__name__}")
        if capturable and nonfinite == "raise":
            raise ValueError("nonfinite='raise' needs a host read of the gradients' finiteness; capturable=True "
                             "decides on the device: use nonfinite='skip' (or 'none')")
        if capturable and mode == "fast" and tail_capacity is None:
            raise ValueError("capturable=True in fast mode needs tail_capacity=K: the tail passes must have a "
                             "fixed size that no host read decides")
        self.capturable = capturable
        weights = class_weights_from(tail_mask, tail_weight, class_weights)
        self._weights_source = "tail_mask" if tail_mask is not None else "class weights"
        self._bn = BatchNormStats(model) if model is not None else None
        self.schedule = make_schedule(mode, model, self._bn, bn_stats=bn_stats, fast_bn=fast_bn,
                                      ghost_batch=ghost_batch, tail_capacity=tail_capacity)
        base = self._build_base(params, base_optimizer, {"rho": rho, "adaptive": adaptive}, base_kwargs)
        self.base_optimizer = base
        self.param_groups = base.param_groups
        self.defaults.update({k: v for k, v in base.defaults.items() if k not in self.defaults})
        self._fill_rho()
        self._sync = make_grad_sync(model, all_params(self.param_groups), ascent_sync)
        if capturable:
            self._make_base_capturable()

        self._set_class_weights(weights)
        self.nonfinite = nonfinite
        self.ignore_index = ignore_index
        devices = {p.device.type for p in all_params(self.param_groups)}
        self._ops = resolve_param_backend(backend, devices, capturable)
        self._step_hooks: list[StepHooks] = []
        self.steps = 0
        self._skipped = 0
        self._skipped_on_device: Optional[Tensor] = None
        self._last_skipped: Any = False
        self._phase = _IDLE
        # (params, their g_h): two lists, since hashing a tensor is a Python call (Tensor.__hash__).
        self._head_grads: tuple[list[Tensor], list[Tensor]] = ([], [])
        self._buckets = ParamBuckets()
        self._perturbed: list[Bucket] = []
        self._tail_norm: Optional[Tensor] = None
        self._bn_backup: Optional[BatchNormSnapshot] = None
        self._scaled: Optional[ScaledStep] = None
        self._active_hooks: Optional[list[StepHooks]] = None
        self._restored_bn = False
        self._fused_plan: Any = None
        self._book = (ExtBook(self._ops) if self._ops.name == "ext" and not capturable and self._sync.kind != "fsdp2"
                      and book_available() else None)
        """The phases' gradient bookkeeping in C++ (:mod:`imbsam_fast.backends.ext_book`), or ``None``."""
        self._book_ascended = False

    def _build_base(self, params: Any, base_optimizer: Any, own: dict[str, Any], base_kwargs: dict[str, Any]
                    ) -> Optimizer:
        if isinstance(base_optimizer, Optimizer):
            if isinstance(base_optimizer, ImbSAM):
                raise TypeError("base_optimizer cannot itself be ImbSAM")
            if base_kwargs:
                raise TypeError(
                    f"base_kwargs {sorted(base_kwargs)} given with an already-built base optimizer; "
                    "pass an optimizer class to build it here"
                )
            if params is not None:
                ours = {id(p) for p in _flatten_params(params)}
                theirs = {id(p) for p in all_params(base_optimizer.param_groups)}
                if ours != theirs:
                    raise ValueError("params differ from the parameters of the given base optimizer instance")
            super().__init__(base_optimizer.param_groups, own)
            return base_optimizer
        if isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer):
            if issubclass(base_optimizer, ImbSAM):
                raise TypeError("base_optimizer cannot itself be ImbSAM")
            super().__init__(params, {**own, **base_kwargs})
            return base_optimizer(self.param_groups, **base_kwargs)
        raise TypeError(
            f"base_optimizer must be a torch.optim.Optimizer class or instance, got {type(base_optimizer).__name__}"
        )

    def _make_base_capturable(self) -> None:
        """Groups of a base optimizer with a ``capturable`` option take it, where their parameters are on an
        accelerator (torch's capturable optimizers refuse CPU tensors; the CPU path needs it not)."""
        for group in self.param_groups:
            if "capturable" in group and all(p.device.type != "cpu" for p in group["params"]):
                group["capturable"] = True

    def _fill_rho(self) -> None:
        """Every group gets ``rho`` and ``adaptive`` (the defaults where it has none), checked."""
        for group in self.param_groups:
            group["rho"] = check_rho(group.setdefault("rho", self.defaults["rho"]))
            group["adaptive"] = check_adaptive(group.setdefault("adaptive", self.defaults.get("adaptive", False)))

    def _set_class_weights(self, weights: Optional[ClassWeights]) -> None:
        self.class_weights = weights
        self._weights_on: dict[tuple[torch.device, int], tuple[int, Tensor]] = {}
        # Presets with no head part (SAM) or no tail part (plain training) skip the passes they do not need.
        self._has_head = weights is None or bool((weights.head != 0).any())
        self._has_tail = weights is None or bool((weights.tail != 0).any())

    @property
    def skipped_steps(self) -> int:
        """Steps whose base step was skipped (with ``capturable=True``, read from the device now)."""
        extra = 0 if self._skipped_on_device is None else int(self._skipped_on_device)
        return self._skipped + extra

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._skipped = int(value)
        if self._skipped_on_device is not None:
            self._skipped_on_device.zero_()  # in place: a captured step keeps adding into this tensor

    @property
    def last_step_skipped(self) -> bool:
        """Whether the last step's base step was skipped (a read from the device with ``capturable=True``)."""
        return bool(self._last_skipped)

    @last_step_skipped.setter
    def last_step_skipped(self, value: Any) -> None:
        self._last_skipped = value

    def _count_on_device(self, found: Tensor) -> None:
        # In place after the first step, so that a captured step keeps counting when replayed.
        if self._skipped_on_device is None or self._skipped_on_device.device != found.device:
            if self._skipped_on_device is not None:
                self._skipped += int(self._skipped_on_device)  # the parameters moved: one read, once
            self._skipped_on_device = torch.zeros_like(found)
        self._skipped_on_device.add_(found)
        self._last_skipped = found

    @property
    def mode(self) -> str:
        """``"exact"`` or ``"fast"``: the pass schedule :meth:`step` runs."""
        return self.schedule.name

    @property
    def backend(self) -> str:
        """The parameter-op backend that ran: ``"torch"``, ``"triton"``, or ``"triton+torch"`` when some
        buckets fell back to the torch ops (``backend_fallbacks`` says why)."""
        return self._ops.name + ("+torch" if self._ops.fallbacks else "")

    @property
    def backend_fallbacks(self) -> set[str]:
        """Why buckets went through the torch ops instead of the chosen backend (e.g. ``{"torch.float64"}``)."""
        return set(self._ops.fallbacks)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "base_optimizer" not in self.__dict__:
            super().add_param_group(param_group)
            return
        self.base_optimizer.add_param_group(param_group)
        self._fill_rho()

    def register_step_hooks(self, hooks: StepHooks) -> HookHandle:
        """Call ``hooks`` at the hook points of every :meth:`step` (see :mod:`imbsam_fast.hooks`)."""
        if not isinstance(hooks, StepHooks):
            raise TypeError(f"hooks must subclass imbsam_fast.hooks.StepHooks, got {type(hooks).__name__}")
        self._step_hooks.append(hooks)
        return HookHandle(self._step_hooks, hooks)

    # ------------------------------------------------------------------ phases

    def _require(self, phase: str, caller: str) -> None:
        """``RuntimeError`` unless the optimizer is in ``phase`` (the phases check ``_phase`` first, inline)."""
        if self._phase != phase:
            order = "first_step() -> second_step() -> third_step()"
            raise RuntimeError(
                f"ImbSAM.{caller}() called while the optimizer is in state '{self._phase}'; "
                f"it expects '{phase}'. Call the steps in order: {order}."
            )

    def first_step(self) -> None:
        """After the head backward: move each ``.grad`` aside (no copy) as ``g_h``."""
        if self._phase != _IDLE:
            self._require(_IDLE, "first_step")
        book = self._book
        if book is not None and not torch.compiler.is_compiling() and book.take(self.param_groups, self._buckets):
            self._phase = _STASHED
            return
        params, grads, _ = params_with_grad(self.param_groups)
        self._head_grads = (params, grads)
        clear_grads(params)
        self._phase = _STASHED

    @without_grad
    def second_step(self) -> None:
        """After the tail backward: ``e = rho g_t / (||g_t||_2 + 1e-16)``, ``w <- w + e``.

        The norm is one global L2 norm over all parameters (over all shards under
        FSDP2); adaptive groups take ASAM's ``e`` (see ``adaptive``). The head
        gradient is put back as ``.grad`` so the perturbed backward accumulates onto it.
        """
        if self._phase != _STASHED:
            self._require(_STASHED, "second_step")
        book = self._book
        if book is not None and book.holding:
            ascended = book.ascend(self.param_groups, self._buckets)
            if ascended is not None:
                self._perturbed, self._tail_norm = ascended
                self._book_ascended = True
                self._phase = _PERTURBED
                return
            self._head_grads = book.hand_back()  # type: ignore[assignment]
        params, grads, rhos = params_with_grad(self.param_groups)
        buckets = self._buckets.build(params, grads, rhos)
        self._tail_norm = self._ops.perturb_(buckets, self._sq_reduce)
        self._perturbed = buckets
        head_params, head_grads = self._head_grads
        if len(head_params) != len(params) or not all(map(operator.is_, head_params, params)):
            clear_grads(params)
        set_grads(head_params, head_grads)
        self._head_grads = ([], [])
        self._phase = _PERTURBED

    @without_grad
    def third_step(self, zero_grad: bool = True) -> None:
        """After the perturbed tail backward: restore ``w`` bit-exactly, base step on ``g_h + g_t'``.

        With a plain ``torch.optim.SGD`` base and the C++ extension's backend, the restore and
        SGD's update run as one pass (:mod:`imbsam_fast.fused_sgd`), with the same result.
        """
        if self._phase != _PERTURBED:
            self._require(_PERTURBED, "third_step")
        perturbed, self._perturbed = self._perturbed, []
        self._phase = _IDLE
        ascended, self._book_ascended = self._book_ascended, False
        if ascended and self._book_base_step(perturbed, zero_grad):
            return
        plan = plan_fused_sgd(self, perturbed, self._buckets.backup_of)
        if plan is None:
            self._ops.restore_(perturbed)
            self._base_step(zero_grad)
        else:
            self._fused_base_step(perturbed, plan, zero_grad)

    def _fused_base_step(self, perturbed: list[Any], plan: FusedSGDPlan, zero_grad: bool) -> None:
        """The non-finite policy on the gradients, then restore + SGD in one pass (no hooks: the plan needs none)."""
        self._opt_called = self.base_optimizer._opt_called = True  # type: ignore[attr-defined]
        self.steps += 1
        tail_norm, self._tail_norm = self._tail_norm, None
        if self.capturable and self.nonfinite != "none":
            found = nonfinite_flag(self._plan_norm(plan), tail_norm)
            apply_fused_sgd(self, plan, skip=found)
            self._finish_on_device(found, zero_grad)
            return
        if self.nonfinite != "none" and not _finite(self._plan_norm(plan), tail_norm):
            self._ops.restore_(perturbed)
            self._skip()
            self._report_nonfinite()
            return
        self.last_step_skipped = False
        apply_fused_sgd(self, plan)
        if zero_grad:
            _clear_grads(self.param_groups)

    def _book_base_step(self, perturbed: list[Bucket], zero_grad: bool) -> bool:
        """:meth:`_fused_base_step` through the extension's ParamBook, with the fused plan kept from an earlier
        step. ``False``, with nothing changed, where no kept plan holds or the book refuses."""
        book = self._book
        kept = kept_plan(self, self._buckets.backup_of)
        if book is None or kept is None:
            return False
        check = self.nonfinite != "none"
        tail_norm = self._tail_norm
        try:
            total = book.sgd_step(kept, not check)
            finite = not check or _finite(total, tail_norm)
            if finite:
                book.restore_sgd(kept)
        except NotImplementedError as err:
            book.refused(self._buckets, err)
            return False
        # The base optimizer's step is taken here: a scheduler attached to it must see it as taken.
        self._opt_called = self.base_optimizer._opt_called = True  # type: ignore[attr-defined]
        self.steps += 1
        self._tail_norm = None
        if not finite:
            self._ops.restore_(perturbed)
            self._skip()
            self._report_nonfinite()
            return True
        self.last_step_skipped = False
        if zero_grad:
            book.clear()
        return True

    @property
    def _sq_reduce(self) -> Optional[Callable[[Tensor], Tensor]]:
        return None if self._sync.kind != "fsdp2" else self._sync.reduce_sq_norm

    def _base_step(self, zero_grad: bool = True) -> None:
        """The ``before_base_step`` hooks, clipping, the non-finite policy, then the base optimizer's step."""
        self._opt_called = True
        self.steps += 1
        scaled = self._scaled
        for h in self._step_hooks if self._active_hooks is None else self._active_hooks:
            h.before_base_step(self)
        check = self.nonfinite != "none" and scaled is None
        total = self._update_norm() if check or self.max_grad_norm is not None else None
        if self.max_grad_norm is not None:
            assert total is not None
            self._clip(total)
        tail_norm, self._tail_norm = self._tail_norm, None
        if self.capturable and (check or scaled is not None):
            found = scaled.found_flag(self) if scaled is not None else nonfinite_flag(total, tail_norm)
            masked_base_step(self.base_optimizer, [p for p in all_params(self.param_groups) if p.grad is not None],
                             found)
            self._finish_on_device(found, zero_grad)
            return
        if scaled is not None:
            if scaled.found_inf(self):
                self._skip()
                return
        elif check and not _finite(total, tail_norm):
            self._skip()
            self._report_nonfinite()
            return
        self.last_step_skipped = False
        self.base_optimizer.step()
        if zero_grad:
            _clear_grads(self.param_groups)

    def _finish_on_device(self, found: Tensor, zero_grad: bool) -> None:
        """After a base step that ``found`` may have undone: BatchNorm buffers back to the step's snapshot
        where it is set, the count kept on the device, gradients cleared."""
        backup, self._bn_backup = self._bn_backup, None
        if backup is not None:
            restore_where(backup.buffers, backup.saved, found)
        self._count_on_device(found)
        if zero_grad:
            _clear_grads(self.param_groups)

    def _local_grads(self) -> list[list[Tensor]]:
        """The gradients in ``.grad`` (local shards under FSDP2), one list per device and dtype."""
        grads = grads_in(self.param_groups)
        if self._sync.kind == "fsdp2":
            grads = [local_tensor(g) for g in grads]
        if not grads:
            return []
        return [lists[0] for lists, _ in _group_by_device_and_dtype([grads], False).values()]

    def _plan_norm(self, plan: FusedSGDPlan) -> Tensor:
        """:meth:`_update_norm` from a fused plan's gradient lists (no regrouping: the plan holds them all)."""
        return self._ops.grad_norm(plan_grads(plan), self._sq_reduce)

    def _update_norm(self) -> Tensor:
        """``||g||_2`` of the combined gradient in ``.grad``, over every shard."""
        return self._ops.grad_norm(self._local_grads(), self._sq_reduce)

    def _clip(self, total: Tensor) -> None:
        """``g <- g * min(1, max_grad_norm / (||g|| + 1e-6))``, as ``clip_grad_norm_``, with no host sync."""
        for grads in self._local_grads():
            coef = (self.max_grad_norm / (total.to(grads[0].device) + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(grads, coef.to(grads[0].dtype))

    def _skip(self) -> None:
        """Skip the base step: gradients cleared, BatchNorm buffers restored when a snapshot exists."""
        self.skipped_steps += 1
        self.last_step_skipped = True
        _clear_grads(self.param_groups)
        self._restored_bn = self._bn_backup is not None
        if self._bn_backup is not None:
            self._bn_backup.restore()
            self._bn_backup = None

    def _report_nonfinite(self) -> None:
        """Warn or raise (``nonfinite``) about the skipped step."""
        restored = self._restored_bn
        msg = (
            f"ImbSAM step {self.steps}: non-finite gradient; the base step was skipped and the weights "
            "left as they were"
        )
        if restored:
            msg += ", BatchNorm buffers too"
        elif self._bn is None:
            msg += " (BatchNorm buffers, if any, keep this step's update: pass model= to restore them)"
        else:
            msg += " (BatchNorm buffers are restored only by step(closure, targets))"
        if self.nonfinite == "raise":
            raise FloatingPointError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)

    # -------------------------------------------------------------- one call

    @keep_unwrapped
    def step(  # type: ignore[override]
        self,
        closure: Optional[Callable[..., Tensor]] = None,
        targets: Optional[Tensor] = None,
        *,
        scaler: Optional[torch.amp.GradScaler] = None,
        micro_batches: int = 1,
    ) -> Optional[StepLosses]:
        """One ImbSAM step, running every pass itself.

        ``closure()`` must run the forward and return per-sample losses for the
        whole batch (shape ``(B,)``); in fast mode it is also called as
        ``closure(index)`` for a subset. ``targets`` are the batch's labels, a
        1-D integer tensor. Returns the losses seen, detached, with no host sync.

        Gradients already in ``.grad`` when the step starts are kept: they join
        the head gradient ``g_h`` (taken at w), so an auxiliary loss backpropagated
        before the call enters the update unperturbed. An empty batch (``B = 0``)
        is a no-op: the closure is not called and no state changes. A step that
        fails half-way is undone (weights restored, gradients cleared) before
        the error propagates.

        ``scaler``: a ``torch.amp.GradScaler`` for fp16. Every backward is scaled
        and every pass unscaled once (:mod:`imbsam_fast.scaling`); an inf or NaN
        skips the step (weights and BatchNorm buffers restored, no warning) and
        makes ``scaler.update()``, which the caller runs after the step as
        usual, back off. Do not call ``scaler.step(opt)``.

        ``micro_batches=k``: every pass runs over ``k`` chunks through
        ``closure(chunk_index)`` (so the closure must take an index, in both
        modes), gradients accumulating: activation memory of one chunk. Losses
        stay normalized by the whole batch, so without BatchNorm the update
        equals ``k=1``'s; BatchNorm layers normalize each chunk by its own
        statistics, and fast mode's pass at w takes the ghost batch.

        A closure wrapped by Lightning's precision plugin is taken apart
        (:mod:`imbsam_fast.closures`): ``on_before_optimizer_step`` fires once per step.

        With no closure, this is the base optimizer's ``step()``, so ImbSAM can
        stand in for a plain optimizer.

        torch's step pre- and post-hooks and the profiler range
        ``Optimizer.step#ImbSAM.step`` are entered (by torch's own wrapper) only
        while a hook is registered or a profiler runs
        (:mod:`imbsam_fast.torch_step_hooks`); hooks see ``closure`` and
        ``targets``, where given, as positional arguments and any other given
        argument by keyword.
        """
        if CAN_SKIP_WRAPPER and type(self).step is ImbSAM.step and torch_step_hooks_active(self):
            given = (closure, targets) if targets is not None else (closure,) if closure is not None else ()
            keywords: dict[str, Any] = {}
            if scaler is not None:
                keywords["scaler"] = scaler
            if micro_batches != 1:
                keywords["micro_batches"] = micro_batches
            return _step_with_torch_hooks(self, *given, **keywords)
        return self._step(closure, targets, scaler=scaler, micro_batches=micro_batches)

    def _step(self, closure: Optional[Callable[..., Tensor]] = None, targets: Optional[Tensor] = None, *,
              scaler: Optional[torch.amp.GradScaler] = None, micro_batches: int = 1) -> Optional[StepLosses]:
        """:meth:`step` itself, without torch's hooks."""
        if closure is None:
            if targets is not None:
                raise TypeError("targets given without a closure")
            if scaler is not None or micro_batches != 1:
                raise TypeError("scaler= and micro_batches= apply to step(closure, targets)")
            self._require(_IDLE, "step")
            self._opt_called = True
            self.base_optimizer.step()
            return None
        if targets is None:
            raise TypeError(
                "ImbSAM.step(closure) needs targets=<batch labels>; call step() with no closure for a plain base step"
            )
        if self.class_weights is None:
            raise ValueError("ImbSAM.step(closure, targets) needs tail_mask= or class_weights= at construction")
        if self._phase != _IDLE:
            self._require(_IDLE, "step")
        check_targets(targets)
        micro_batches = check_micro_batches(micro_batches)
        closure, after_closure = split_wrapped_closure(closure)
        if self.schedule.name == "fast" or micro_batches > 1:
            check_index_closure(closure)
        hooks = self._step_hooks if after_closure is None else [*self._step_hooks, after_closure]
        scaled = None
        if scaler is not None:
            check_scaler(scaler)
            if self._sync.kind == "fsdp2":
                raise ValueError("scaler= is not supported with FSDP2 parameters yet; train in bf16 autocast")
            if scaler.is_enabled():
                scaled = ScaledStep(scaler, self._sync)
                hooks = [scaled, *hooks]
        batch = targets.shape[0]
        if batch == 0:
            zero = torch.zeros((), device=targets.device)
            return StepLosses(zero, zero.clone(), zero.clone(), torch.zeros(0, device=targets.device))
        head_w, tail_w = self._sample_weights(targets)
        self._bn_backup = (self._bn.snapshot() if self._bn is not None and (self.nonfinite != "none" or scaled)
                           else None)
        run = StepRun(self, closure, batch, hooks, self._sync, micro_batches)
        self._scaled, self._active_hooks = scaled, hooks
        try:
            return self.schedule.run(run, targets, head_w, tail_w, self._has_head, self._has_tail)
        except BaseException:
            self._abort()
            raise
        finally:
            self._bn_backup = None
            self._scaled, self._active_hooks = None, None

    def _sample_weights(self, targets: Tensor) -> tuple[Tensor, Tensor]:
        """``(a[y_i] / B, b[y_i] / B)``: a pass's loss is then one dot product, with no division in its graph
        (see :class:`StepRun`). The table divided by ``B`` is kept per device and batch size, and never dropped:
        a captured step reads its table's memory at every replay. Each is ``(C + 1) x 2`` values."""
        assert self.class_weights is not None
        key = (targets.device, targets.shape[0])
        on_device = self._weights_on.get(key)
        if on_device is None:
            weights = self.class_weights.to(targets.device)
            on_device = self._weights_on[key] = (weights.num_classes, weights.table() / key[1])
        # sample_weights(...) without its check of the targets, which step() has made.
        return weight_rows(on_device[1], class_index(targets, on_device[0], self.ignore_index, self._weights_source,
                                                     self.capturable))

    @torch.no_grad()
    def _abort(self) -> None:
        """Undo a step interrupted anywhere: weights restored from their backups, gradients cleared."""
        if self._perturbed:
            self._ops.restore_(self._perturbed)
        self._perturbed = []
        self._head_grads = ([], [])
        if self._book is not None:
            self._book.drop()
        self._book_ascended = False
        self._tail_norm = None
        self._phase = _IDLE
        _clear_grads(self.param_groups)

    # ----------------------------------------------------------- checkpoint

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict with an ``"imbsam"`` entry for the wrapper's own state."""
        if self._phase != _IDLE:
            raise RuntimeError(f"cannot save ImbSAM in the middle of a step (state '{self._phase}')")
        sd = self.base_optimizer.state_dict()
        cw = self.class_weights
        sd["imbsam"] = {
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "mode": self.mode,
            "nonfinite": self.nonfinite,
            "class_weights": None if cw is None else {"head": cw.head.clone(), "tail": cw.tail.clone()},
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load an ImbSAM state dict, or a plain base-optimizer one (``rho`` then comes from the defaults)."""
        if self._phase != _IDLE:
            raise RuntimeError(f"cannot load into ImbSAM in the middle of a step (state '{self._phase}')")
        sd = dict(state_dict)
        own = sd.pop("imbsam", None)
        self.base_optimizer.load_state_dict(sd)
        self.param_groups = self.base_optimizer.param_groups
        self._fill_rho()
        if own is not None:
            self.steps = int(own["steps"])
            self.skipped_steps = int(own["skipped_steps"])
            cw = own.get("class_weights")
            if cw is not None:
                self._set_class_weights(ClassWeights(cw["head"].clone(), cw["tail"].clone()))

    def __repr__(self) -> str:
        return (
            f"ImbSAM(mode={self.mode!r}, backend={self.backend!r}, nonfinite={self.nonfinite!r}, "
            f"base={self.base_optimizer!r})"
        )


_step_with_torch_hooks = with_torch_step_hooks(ImbSAM._step)


def _finite(total: Optional[Tensor], tail: Optional[Tensor]) -> bool:
    """Whether the update's norm and the tail gradient's norm are finite."""
    assert total is not None
    # One host sync per step is the price of deciding whether to call the base
    # optimizer (as torch.amp.GradScaler does); nonfinite="none" avoids it.
    return bool(norms_finite(total, tail))


def _clear_grads(groups: list[dict[str, Any]]) -> None:
    for group in groups:
        clear_grads(group["params"])


def _flatten_params(params: Any) -> list[Tensor]:
    if isinstance(params, Tensor):
        return [params]
    out: list[Tensor] = []
    for item in params:
        if isinstance(item, dict):
            ps = item["params"]
            out.extend([ps] if isinstance(ps, Tensor) else list(ps))
        else:
            out.append(item)
    return out
