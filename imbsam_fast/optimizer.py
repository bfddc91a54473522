"""ImbSAM: class-imbalanced sharpness-aware minimization over any base optimizer.

With per-sample losses ``l_i`` and per-class weights ``a`` (head) and ``b``
(tail), ImbSAM minimizes::

    L_head(w) + max_{||e|| <= rho} L_tail(w + e),
    L_head = sum_i a[y_i] l_i / B,   L_tail = sum_i b[y_i] l_i / B

One step (the public reference's 2 forwards and 3 backwards)::

    g_h = grad L_head(w)                               first_step():  stash g_h
    g_t = grad L_tail(w)                               second_step(): e = rho g_t / (||g_t|| + 1e-16), w <- w + e
    g_t' = grad L_tail(w + e), accumulated onto g_h    third_step():  w <- w_saved, base step on g_h + g_t'
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .backends import resolve_param_backend
from .backends.buckets import Bucket
from .batchnorm import BatchNormStats
from .priors import ClassWeights, as_class_weights, sample_weights

__all__ = ["ImbSAM", "StepLosses"]

MODES = ("exact", "fast")
BN_STATS = ("reference", "first")
FAST_BN = ("ghost", "replay-ghost", "replay")
NONFINITE = ("skip", "raise", "none")

_IDLE, _STASHED, _PERTURBED = "idle", "head gradient stashed", "weights perturbed"


class StepLosses(NamedTuple):
    """Losses seen by :meth:`ImbSAM.step`, detached, on the device they were computed on."""

    head: Tensor
    tail: Tensor
    perturbed_tail: Tensor
    per_sample: Tensor


class ImbSAM(Optimizer):
    """ImbSAM as a ``torch.optim.Optimizer`` wrapping a base optimizer.

    Args:
        params: parameters or param groups (a group may set its own ``rho``).
            When ``base_optimizer`` is an instance, pass its parameters (or ``None``).
        base_optimizer: an optimizer class (built on the same param groups with
            ``base_kwargs``) or an already-built optimizer instance.
        rho: radius of the perturbation (public default 0.05).
        tail_mask: bool tensor, one entry per class (``True`` = tail), or a
            :class:`~imbsam_fast.priors.ClassWeights` preset. Needed only by
            :meth:`step` with a closure.
        tail_weight: factor on the tail loss when ``tail_mask`` is a bool mask
            (public code's latest revision: 2).
        mode: ``"exact"`` reproduces the reference passes (2 full forwards, 3
            full backwards). ``"fast"`` runs one full forward and backward for
            the head, and the tail gradient at w and at w + e on the tail
            samples only (``closure(index)``); a batch with no tail sample takes
            a plain step. Needs ``model``.
        model: the module the closure runs; fast mode handles its BatchNorm
            layers in the tail passes (``imbsam_fast.batchnorm``).
        fast_bn: how fast mode's tail passes treat BatchNorm layers in training
            mode: ``"ghost"`` adds ``ghost_batch`` random head samples (weight 0)
            so that the layers normalize with, and differentiate through, the
            statistics of a real batch; ``"replay"`` uses the full forward's
            statistics as constants (cheaper; measured to lose accuracy, see
            ``benchmarks/RESULTS.md``); ``"replay-ghost"`` replays in the pass at
            w (the ascent direction) and uses the ghost batch at w + e (the
            gradient that enters the update). Running statistics never move in
            tail passes.
        ghost_batch: head samples added to each tail pass with ``fast_bn="ghost"``.
        bn_stats: exact mode only: ``"reference"`` (BatchNorm running statistics
            update in both forwards, as the public code does) or ``"first"``
            (only the first forward updates them, the common SAM fix).
        backend: ``"auto" | "torch" | "triton" | "ext"`` for the parameter ops.
        nonfinite: what to do when the combined gradient or the tail gradient
            holds NaN/inf: ``"skip"`` the base step (weights restored, counted in
            ``skipped_steps``, a warning), ``"raise"`` ``FloatingPointError``, or
            ``"none"`` to not check (saves one read of the gradients and one host
            sync per step).
        ignore_index: label whose samples get zero weight in :meth:`step`.
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: Union[type[Optimizer], Optimizer],
        *,
        rho: float = 0.05,
        tail_mask: Optional[Union[Tensor, Sequence[bool], ClassWeights]] = None,
        tail_weight: float = 2.0,
        mode: str = "exact",
        backend: str = "auto",
        nonfinite: str = "skip",
        ignore_index: int = -100,
        model: Optional[nn.Module] = None,
        bn_stats: str = "reference",
        fast_bn: str = "replay-ghost",
        ghost_batch: int = 8,
        **base_kwargs: Any,
    ) -> None:
        if not rho >= 0.0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if mode == "fast" and model is None:
            raise ValueError(
                "mode='fast' needs model=<the module the closure runs>, to handle its BatchNorm layers in the "
                "tail-only passes"
            )
        if fast_bn not in FAST_BN:
            raise ValueError(f"fast_bn must be one of {', '.join(FAST_BN)}, got {fast_bn!r}")
        if not isinstance(ghost_batch, int) or ghost_batch < 0:
            raise ValueError(f"ghost_batch must be a non-negative int, got {ghost_batch!r}")
        if bn_stats not in BN_STATS:
            raise ValueError(f"bn_stats must be one of {', '.join(BN_STATS)}, got {bn_stats!r}")
        if bn_stats == "first" and model is None:
            raise ValueError("bn_stats='first' needs model=<the module the closure runs>")
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {', '.join(NONFINITE)}, got {nonfinite!r}")
        if isinstance(base_optimizer, Optimizer):
            if base_kwargs:
                raise TypeError(
                    f"base_kwargs {sorted(base_kwargs)} given with an already-built base optimizer; "
                    "pass an optimizer class to build it here"
                )
            base = base_optimizer
            if params is not None:
                ours = {id(p) for p in _flatten_params(params)}
                theirs = {id(p) for g in base.param_groups for p in g["params"]}
                if ours != theirs:
                    raise ValueError("params differ from the parameters of the given base optimizer instance")
            super().__init__(base.param_groups, {"rho": rho})
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer):
            if isinstance(base_optimizer, type) and issubclass(base_optimizer, ImbSAM):
                raise TypeError("base_optimizer cannot itself be ImbSAM")
            super().__init__(params, {"rho": rho, **base_kwargs})
            base = base_optimizer(self.param_groups, **base_kwargs)
        else:
            raise TypeError(
                f"base_optimizer must be a torch.optim.Optimizer class or instance, got {type(base_optimizer).__name__}"
            )
        self.base_optimizer = base
        self.param_groups = base.param_groups
        self.defaults.update({k: v for k, v in base.defaults.items() if k not in self.defaults})
        for group in self.param_groups:
            group.setdefault("rho", rho)
            if not group["rho"] >= 0.0:
                raise ValueError(f"rho must be >= 0, got {group['rho']}")

        self._set_class_weights(None if tail_mask is None else as_class_weights(tail_mask, tail_weight))
        self.mode = mode
        self.bn_stats = bn_stats
        self.fast_bn = fast_bn
        self.ghost_batch = ghost_batch
        self._bn = BatchNormStats(model if model is not None else nn.Module())
        self.nonfinite = nonfinite
        self.ignore_index = ignore_index
        devices = {p.device.type for g in self.param_groups for p in g["params"]}
        self._ops = resolve_param_backend(backend, devices)
        self.steps = 0
        self.skipped_steps = 0
        self.last_step_skipped = False
        self._phase = _IDLE
        self._head_grads: dict[Tensor, Optional[Tensor]] = {}
        self._backups: dict[Tensor, Tensor] = {}
        self._perturbed: list[Bucket] = []
        self._tail_norm: Optional[Tensor] = None

    def _set_class_weights(self, weights: Optional[ClassWeights]) -> None:
        self.class_weights = weights
        self._weights_on: dict[torch.device, ClassWeights] = {}
        # Presets with no head part (SAM) or no tail part (plain training) skip the passes they do not need.
        self._has_head = weights is None or bool((weights.head != 0).any())
        self._has_tail = weights is None or bool((weights.tail != 0).any())

    @property
    def backend(self) -> str:
        """Name of the parameter-op backend in use (``"torch"``, ``"triton"``, ...)."""
        return self._ops.name

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "base_optimizer" not in self.__dict__:
            super().add_param_group(param_group)
            return
        self.base_optimizer.add_param_group(param_group)
        group = self.base_optimizer.param_groups[-1]
        group.setdefault("rho", self.defaults["rho"])

    # ------------------------------------------------------------------ phases

    def _require(self, phase: str, caller: str) -> None:
        if self._phase != phase:
            order = "first_step() -> second_step() -> third_step()"
            raise RuntimeError(
                f"ImbSAM.{caller}() called while the optimizer is in state '{self._phase}'; "
                f"it expects '{phase}'. Call the steps in order: {order}."
            )

    def _params_with_grad(self) -> list[tuple[dict[str, Any], Tensor]]:
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError(
                        "ImbSAM does not support sparse gradients (e.g. nn.Embedding(sparse=True)); "
                        "use dense gradients"
                    )
                out.append((group, p))
        return out

    @torch.no_grad()
    def first_step(self) -> None:
        """After the head backward: move each ``.grad`` aside (no copy) as ``g_h``."""
        self._require(_IDLE, "first_step")
        stash = {}
        for _, p in self._params_with_grad():
            stash[p] = p.grad
            p.grad = None
        self._head_grads = stash
        self._phase = _STASHED

    @torch.no_grad()
    def second_step(self) -> None:
        """After the tail backward: ``e = rho g_t / (||g_t||_2 + 1e-16)``, ``w <- w + e``.

        The norm is one global L2 norm over all parameters. The head gradient is
        put back as ``.grad`` so the perturbed backward accumulates onto it.
        """
        self._require(_STASHED, "second_step")
        pairs = self._params_with_grad()
        by_key: dict[tuple[torch.device, torch.dtype, float], Bucket] = {}
        for group, p in pairs:
            key = (p.device, p.dtype, float(group["rho"]))
            b = by_key.get(key)
            if b is None:
                b = by_key[key] = Bucket([], [], [], key[2])
            b.params.append(p)
            b.grads.append(p.grad)
            b.backups.append(self._backup_for(p))
        buckets = list(by_key.values())
        self._tail_norm = self._ops.perturb_(buckets)
        self._perturbed = buckets

        for _, p in pairs:
            p.grad = None
        for p, g in self._head_grads.items():
            p.grad = g
        self._head_grads = {}
        self._phase = _PERTURBED

    @torch.no_grad()
    def third_step(self, zero_grad: bool = True) -> None:
        """After the perturbed tail backward: restore ``w`` bit-exactly, base step on ``g_h + g_t'``."""
        self._require(_PERTURBED, "third_step")
        self._ops.restore_(self._perturbed)
        self._perturbed = []
        self._phase = _IDLE
        self._opt_called = True
        self.steps += 1
        if self._skip_if_nonfinite():
            return
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def _skip_if_nonfinite(self) -> bool:
        """Apply the ``nonfinite`` policy; True when the base step must be skipped."""
        if self.nonfinite == "none" or self._grads_finite():
            self.last_step_skipped = False
            return False
        self.skipped_steps += 1
        self.last_step_skipped = True
        self.zero_grad(set_to_none=True)
        msg = (
            f"ImbSAM step {self.steps}: non-finite gradient; the base step was skipped and the weights "
            "left as they were"
        )
        if self.nonfinite == "raise":
            raise FloatingPointError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return True

    def _grads_finite(self) -> bool:
        grads: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for _, p in self._params_with_grad():
            grads.setdefault((p.device, p.dtype), []).append(p.grad)
        total = self._ops.grad_norm(list(grads.values()))
        tail = self._tail_norm if self._tail_norm is not None else total
        self._tail_norm = None
        # One host sync per step is the price of deciding whether to call the base
        # optimizer (as torch.amp.GradScaler does); nonfinite="none" avoids it.
        return bool(torch.isfinite(total + tail.to(total.device)))

    def _backup_for(self, p: Tensor) -> Tensor:
        b = self._backups.get(p)
        if b is None or b.shape != p.shape or b.dtype != p.dtype or b.device != p.device:
            b = torch.empty_like(p, memory_format=torch.preserve_format)
            self._backups[p] = b
        return b

    # -------------------------------------------------------------- one call

    def step(  # type: ignore[override]
        self,
        closure: Optional[Callable[..., Tensor]] = None,
        targets: Optional[Tensor] = None,
    ) -> Optional[StepLosses]:
        """One ImbSAM step, running every pass itself.

        ``closure(index=None)`` must run the forward and return per-sample losses
        for the whole batch (shape ``(B,)``). ``targets`` are the batch's labels.
        Returns the losses seen, detached, with no host sync.

        With no closure, this is the base optimizer's ``step()``, so ImbSAM can
        stand in for a plain optimizer.
        """
        if closure is None:
            if targets is not None:
                raise TypeError("targets given without a closure")
            self._require(_IDLE, "step")
            self._opt_called = True
            self.base_optimizer.step()
            return None
        if targets is None:
            raise TypeError(
                "ImbSAM.step(closure) needs targets=<batch labels>; call step() with no closure for a plain base step"
            )
        if self.class_weights is None:
            raise ValueError("ImbSAM.step(closure, targets) needs tail_mask (or ClassWeights) at construction")
        self._require(_IDLE, "step")
        head_w, tail_w = self._sample_weights(targets)
        if self.mode == "fast":
            return self._step_fast(closure, targets, head_w, tail_w)
        return self._step_exact(closure, targets, head_w, tail_w)

    def _step_exact(
        self, closure: Callable[..., Tensor], targets: Tensor, head_w: Tensor, tail_w: Tensor
    ) -> StepLosses:
        """The reference's passes: full forward, head and tail backward on it, full perturbed forward and backward."""
        batch = targets.shape[0]
        denom = max(batch, 1)
        losses = self._run_closure(closure, batch)
        head = _weighted_sum(head_w, losses, denom)
        tail = _weighted_sum(tail_w, losses, denom)
        self.zero_grad(set_to_none=True)
        if not self._has_tail:
            head.backward()
            self._plain_step()
            return StepLosses(head.detach(), tail.detach(), torch.zeros_like(tail.detach()), losses.detach())
        if self._has_head:
            head.backward(retain_graph=True)
        self.first_step()
        tail.backward()
        self.second_step()
        context = self._bn.freeze_running_stats if self.bn_stats == "first" else nullcontext
        tail2 = self._tail_pass(closure, batch, None, tail_w, denom, context)
        self.third_step()
        return StepLosses(head.detach(), tail.detach(), tail2, losses.detach())

    def _step_fast(
        self, closure: Callable[..., Tensor], targets: Tensor, head_w: Tensor, tail_w: Tensor
    ) -> StepLosses:
        """One full-batch pass for the head; the tail gradient at w and at w + e from the tail samples only.

        BatchNorm layers in training mode see, in each tail pass, either a
        ghost batch (the tail samples plus ``ghost_batch`` random head samples
        of zero weight, normalized by their own batch statistics so that
        gradients flow through the statistics as in a full batch) or the full
        forward's replayed statistics. ``fast_bn`` picks per pass: ``"ghost"``
        both ghost, ``"replay"`` both replay, ``"replay-ghost"`` replay for the
        ascent direction at w and a ghost batch for the gradient at w + e (the
        one that enters the update). Running statistics move only in the full
        forward. See ``batchnorm.py``.
        """
        batch = targets.shape[0]
        denom = max(batch, 1)
        # The tail passes are sized by the number of tail samples: reading it is one
        # host sync per step when the targets live on an accelerator (none on the CPU).
        index = torch.nonzero(tail_w).squeeze(1) if self._has_tail else tail_w.new_zeros(0, dtype=torch.long)
        bn = index.numel() > 0 and self._bn.active()
        ascent_ghost = bn and self.fast_bn == "ghost"
        perturbed_ghost = bn and self.fast_bn in ("ghost", "replay-ghost")
        with self._bn.record() if bn and not (ascent_ghost and perturbed_ghost) else nullcontext():
            losses = self._run_closure(closure, batch)
        head = _weighted_sum(head_w, losses, denom)
        tail = _weighted_sum(tail_w, losses.detach(), denom)
        self.zero_grad(set_to_none=True)
        if index.numel() == 0:
            head.backward()
            self._plain_step()
            return StepLosses(head.detach(), tail, torch.zeros_like(tail), losses.detach())
        if self._has_head:
            head.backward()
        self.first_step()
        ghosts = self._with_ghosts(index, tail_w) if perturbed_ghost else index
        first = ghosts if ascent_ghost else index
        self._tail_pass(closure, batch, first, tail_w[first], denom,
                        self._bn.freeze_running_stats if ascent_ghost else self._bn.replay)
        self.second_step()
        second = ghosts if perturbed_ghost else index
        tail2 = self._tail_pass(closure, batch, second, tail_w[second], denom,
                                self._bn.freeze_running_stats if perturbed_ghost else self._bn.replay)
        self.third_step()
        return StepLosses(head.detach(), tail, tail2, losses.detach())

    def _tail_pass(self, closure: Callable[..., Tensor], batch: int, index: Optional[Tensor], weights: Tensor,
                   denom: int, context: Callable[[], Any]) -> Tensor:
        """Forward ``closure(index)`` and backward ``sum_i w_i l_i / denom`` within ``context()``.

        Any error undoes the step so far (weights restored, gradients cleared) before it propagates.
        """
        try:
            with context():
                loss = _weighted_sum(weights, self._run_closure(closure, batch, index), denom)
                loss.backward()
        except BaseException:
            self._abort()
            raise
        return loss.detach()

    def _with_ghosts(self, index: Tensor, tail_w: Tensor) -> Tensor:
        """``index`` plus up to ``ghost_batch`` head samples drawn at random (torch's global RNG), sorted.

        The head samples get random keys and the tail samples +inf, so the ghosts are the
        ``k`` smallest keys: no second host sync (``k`` follows from the tail count already read).
        """
        k = min(self.ghost_batch, tail_w.numel() - index.numel())
        if k <= 0:
            return index
        keys = torch.rand(tail_w.shape, device=tail_w.device).masked_fill(tail_w != 0, float("inf"))
        pick = torch.topk(keys, k, largest=False).indices
        return torch.cat([index, pick]).sort().values

    @torch.no_grad()
    def _plain_step(self) -> None:
        """The base step on the gradients at hand, with the non-finite check."""
        self._opt_called = True
        self.steps += 1
        if self._skip_if_nonfinite():
            return
        self.base_optimizer.step()
        self.zero_grad(set_to_none=True)

    def _sample_weights(self, targets: Tensor) -> tuple[Tensor, Tensor]:
        assert self.class_weights is not None
        weights = self._weights_on.get(targets.device)
        if weights is None:
            weights = self.class_weights.to(targets.device)
            self._weights_on[targets.device] = weights
        return sample_weights(weights, targets, self.ignore_index)

    @staticmethod
    def _run_closure(closure: Callable[..., Tensor], batch: int, index: Optional[Tensor] = None) -> Tensor:
        with torch.enable_grad():
            losses = closure() if index is None else closure(index)
        expected = batch if index is None else index.shape[0]
        if not isinstance(losses, Tensor) or losses.shape != (expected,):
            shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise ValueError(
                f"the closure must return per-sample losses of shape ({expected},) "
                f"(reduction='none'), got {shape}"
            )
        if not losses.requires_grad:
            raise ValueError("the closure's losses do not require grad; run the forward inside the closure")
        return losses

    @torch.no_grad()
    def _abort(self) -> None:
        """Undo a step interrupted between the perturbation and the restore."""
        self._ops.restore_(self._perturbed)
        self._perturbed = []
        self._head_grads = {}
        self._phase = _IDLE
        self.zero_grad(set_to_none=True)

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
        if self._phase != _IDLE:
            raise RuntimeError(f"cannot load into ImbSAM in the middle of a step (state '{self._phase}')")
        sd = dict(state_dict)
        own = sd.pop("imbsam", None)
        self.base_optimizer.load_state_dict(sd)
        self.param_groups = self.base_optimizer.param_groups
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


def _weighted_sum(weights: Tensor, losses: Tensor, denom: int) -> Tensor:
    """``sum_i w_i l_i / denom``, the weights moved to the losses' device and dtype."""
    return (weights.to(device=losses.device, dtype=losses.dtype, non_blocking=True) * losses).sum() / denom


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
