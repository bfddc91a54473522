"""BatchNorm handling for ImbSAM's extra passes.

Fast mode runs the tail passes on the batch's tail samples only, often one or
two of them. Batch statistics of so few samples are meaningless, and the
running statistics must not move. :class:`BatchNormStats` records, during the
first full-batch forward, the batch statistics every BatchNorm layer used::

    mu = mean_{n, spatial}(x),   var = mean_{n, spatial}((x - mu)^2)   (biased, as in training)

and replays them in the tail passes: each layer computes
``y = (x - mu) / sqrt(var + eps) * gamma + beta`` with the recorded ``mu`` and
``var`` (constants for autograd) and leaves its running statistics alone.
Gradients reach ``x``, ``gamma`` and ``beta``; they do not flow through the
batch statistics, which is where fast mode differs from exact mode on
BatchNorm models (measured in ``benchmarks/RESULTS.md``).

The optimizer's default treatment (``fast_bn="replay-ghost"``) replays only
in the pass at w; the pass at w + e runs a ghost batch (tail samples plus a
few zero-weight head samples) under :meth:`BatchNormStats.freeze_running_stats`,
so that its gradient flows through real batch statistics.

One mechanism covers BatchNorm1d/2d/3d, SyncBatchNorm and every other
subclass of ``torch.nn.modules.batchnorm._BatchNorm``. Layers in eval mode
use their running statistics as usual and are left alone. A layer called
several times in one forward gets its recorded statistics back in call order
(cycling, so that activation checkpointing's recomputation in the backward
sees them again).
"""

from __future__ import annotations

import itertools
import operator
from contextlib import contextmanager
from typing import Any, Callable, Iterator, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .grad_mode import without_grad

__all__ = ["BatchNormStats", "BatchNormSnapshot", "batchnorm_layers"]

_RECORD_HOOK = -1_000_003
"""The key of :meth:`BatchNormStats.record`'s forward pre-hook (negative: never a handle id torch hands out)."""


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm layer (any ``_BatchNorm`` subclass) in ``model``."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


class BatchNormStats:
    """Record the batch statistics of one forward; replay them, or freeze running statistics, later;
    snapshot and restore the buffers."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = batchnorm_layers(model)
        self._stats: dict[_BatchNorm, list[tuple[Tensor, Tensor]]] = {}
        self._per_call: set[_BatchNorm] = set()
        self._flat = _FlatStats()
        self._plan_key: Any = None
        self._plan = _LayerPlan([], [], [], [])
        self._pinning = False
        self._pinned: Optional[_LayerPlan] = None
        self._replay_calls: dict[_BatchNorm, int] = {}
        self._snapshot_copy = _ReusedCopy()

    def active(self) -> bool:
        """Whether any BatchNorm layer is in training mode (eval-mode layers need no handling)."""
        if self._pinning:
            return bool(self._layer_plan().training)
        return any(m.training for m in self.layers)

    def pin_plan(self) -> None:
        """Until :meth:`unpin_plan`, read the layers' modes once, at the first context that needs them: a step's
        record, replay and freeze then share one plan instead of reading 31 layers' modes each (the modes cannot
        change between a step's passes unless the user's closure changes them mid-step). A step that needs no
        context reads nothing."""
        self._pinning, self._pinned = True, None

    def unpin_plan(self) -> None:
        """Back to reading the layers' modes at every context."""
        self._pinning, self._pinned = False, None

    def buffers(self) -> list[Tensor]:
        """The running statistics and batch counters of every layer (the tensors a forward may update)."""
        # A module's _buffers dict outlives model.to() (which replaces its values), and reading it directly
        # skips nn.Module.__getattr__.
        return [t for m in self.layers for t in m._buffers.values() if t is not None]

    @without_grad
    def snapshot(self) -> Optional[BatchNormSnapshot]:
        """A copy of :meth:`buffers` (one foreach copy into storage reused across calls), or ``None`` when
        there are none. A snapshot is good until the next call."""
        buffers = self.buffers()
        if not buffers:
            return None
        return BatchNormSnapshot(buffers, self._snapshot_copy.of(buffers))

    @contextmanager
    def record(self) -> Iterator[None]:
        """Within: each training-mode layer stores the batch mean and biased variance of its input.

        Layers that track running statistics with a momentum ``m > 0`` give them
        back for free: ``r_new = (1 - m) r_old + m s`` solves for the batch
        statistic ``s = r_old + (r_new - r_old) / m`` (the running variance holds
        the unbiased one, rescaled by ``(n - 1) / n``). Their running statistics
        are gathered into one flat vector before the forward and once after it,
        and solved with three ops for all layers together (:class:`_FlatStats`).
        Other layers (no running statistics, cumulative averaging, or called
        more than once per forward) compute ``var_mean`` of their input.
        """
        self._stats.clear()  # in place: the replaying forwards read this dict
        plan = self._layer_plan()
        training, order = plan.training, plan.solved
        solved = set(order)
        flat = self._flat.gather(order) if order else None
        if flat is None:
            solved.clear()
        calls: dict[_BatchNorm, int] = {}
        sizes: dict[_BatchNorm, int] = {}

        def pre_hook(module: _BatchNorm, args: tuple[Tensor, ...]) -> None:
            if not module.training:
                return
            count = calls[module] = calls.get(module, 0) + 1
            if module in solved:
                if count == 1:
                    x = args[0]
                    sizes[module] = x.numel() // x.shape[1]
                    return
                # A second call of the same layer: solve its first call now, and go per call from here on.
                solved.discard(module)
                self._per_call.add(module)
                assert flat is not None
                self._stats[module] = [flat.solve_one(module, sizes[module])]
            x = args[0]
            with torch.no_grad():
                var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=0)
            self._stats.setdefault(module, []).append((mean, var))

        # One dict entry per layer instead of register_forward_pre_hook's handle objects (this runs every step).
        for m in training:
            m._forward_pre_hooks[_RECORD_HOOK] = pre_hook
        try:
            yield
        finally:
            for m in training:
                m._forward_pre_hooks.pop(_RECORD_HOOK, None)
        # Every solved layer ran once (sizes holds the layers solved at their first call, solved loses those
        # called again): one solve for all of them.
        if flat is not None and len(solved) == len(sizes) == len(order):
            self._stats.update(zip(order, flat.solve([sizes[m] for m in order])))
        elif flat is not None:
            for m in order:
                if m in solved and m in sizes:
                    self._stats[m] = [flat.solve_one(m, sizes[m])]

    def _layer_plan(self) -> _LayerPlan:
        """Which layers each context acts on, kept while the layers' mode, momentum and tracking stay as they
        were (one read of each per step instead of the checks), or the plan pinned by :meth:`pin_plan`."""
        if self._pinned is not None:
            return self._pinned
        key = (tuple([(m.training, m.momentum, m.track_running_stats) for m in self.layers]), len(self._per_call))
        if self._plan_key != key:
            training = [m for m in self.layers if m.training]
            self._plan = _LayerPlan(
                training,
                [m for m in training if _derivable(m) and m not in self._per_call],
                [m for m in training if m.track_running_stats],
                [_replaying_forward(m, self._stats, self._replay_calls) for m in training],
            )
            self._plan_key = key
        if self._pinning:
            self._pinned = self._plan
        return self._plan

    def replay(self) -> _InstanceAttrs:
        """Within: training-mode layers normalize with the recorded statistics and update nothing."""
        plan = self._layer_plan()
        unrecorded = [m for m in plan.training if not self._stats.get(m)]
        if unrecorded:
            raise RuntimeError(
                f"{type(unrecorded[0]).__name__} ran in training mode in a tail pass but not in the full-batch "
                "forward; fast mode needs the same layers to run in both"
            )
        self._replay_calls.clear()
        return _InstanceAttrs(plan.training, "forward", plan.replaying_forwards)

    def freeze_running_stats(self) -> _InstanceAttrs:
        """Within: training-mode layers use batch statistics but leave running statistics (and their count) alone."""
        frozen = self._layer_plan().frozen
        return _InstanceAttrs(frozen, "track_running_stats", [False] * len(frozen))


class _LayerPlan(NamedTuple):
    """The layers each context of :class:`BatchNormStats` acts on, for the layers' current modes."""

    training: list[_BatchNorm]
    solved: list[_BatchNorm]
    """Training-mode layers whose batch statistics :meth:`BatchNormStats.record` solves from running statistics."""
    frozen: list[_BatchNorm]
    """Training-mode layers that track running statistics."""
    replaying_forwards: list[Callable[[Tensor], Tensor]]
    """One per training-mode layer: its forward on the recorded statistics."""


_MISSING = object()


class _InstanceAttrs:
    """A context manager: within it, ``module.<name> = value`` for each module, as a plain attribute (written
    to the module's ``__dict__``, which skips ``nn.Module.__setattr__``); after it, what each module had there
    before (nothing, its own value, or an instance attribute the user set)."""

    __slots__ = ("_modules", "_name", "_values", "_saved")

    def __init__(self, modules: list[nn.Module], name: str, values: list[Any]) -> None:
        self._modules = modules
        self._name = name
        self._values = values
        self._saved: list[Any] = []

    def __enter__(self) -> None:
        name = self._name
        self._saved = [m.__dict__.get(name, _MISSING) for m in self._modules]
        for m, value in zip(self._modules, self._values):
            m.__dict__[name] = value

    def __exit__(self, *exc: object) -> None:
        name = self._name
        for m, old in zip(self._modules, self._saved):
            if old is _MISSING:
                m.__dict__.pop(name, None)
            else:
                m.__dict__[name] = old


class _ReusedCopy:
    """``of(tensors)``: a copy of ``tensors`` into storage kept across calls, reallocated only when the
    tensors are not the same objects as last time. A copy is good until the next call.

    1-D tensors of one device and dtype are copied by one ``cat`` into a flat buffer, 0-dim ones (such
    as BatchNorm's batch counters) by one ``stack``; the copies handed out are views of those buffers.
    Anything else takes a foreach copy.
    """

    def __init__(self) -> None:
        self._src: list[Tensor] = []
        self._copies: list[Tensor] = []
        self._groups: list[tuple[Callable[..., Tensor], list[Tensor], Tensor]] = []
        self._rest: tuple[list[Tensor], list[Tensor]] = ([], [])

    def of(self, tensors: list[Tensor]) -> list[Tensor]:
        if len(self._src) != len(tensors) or not all(map(operator.is_, self._src, tensors)):
            self._layout(tensors)
        for gather, group, flat in self._groups:
            gather(group, out=flat)
        if self._rest[0]:
            torch._foreach_copy_(self._rest[1], self._rest[0])
        return self._copies

    def _layout(self, tensors: list[Tensor]) -> None:
        by_kind: dict[tuple[int, torch.device, torch.dtype], list[int]] = {}
        for i, t in enumerate(tensors):
            by_kind.setdefault((t.dim() if t.dim() < 2 else -1, t.device, t.dtype), []).append(i)
        copies: list[Optional[Tensor]] = [None] * len(tensors)
        self._groups, rest = [], []
        for (dim, device, dtype), idx in by_kind.items():
            group = [tensors[i] for i in idx]
            if dim == 1:
                flat = torch.empty(sum(t.numel() for t in group), device=device, dtype=dtype)
                self._groups.append((torch.cat, group, flat))
                views = flat.split([t.numel() for t in group])
            elif dim == 0:
                flat = torch.empty(len(group), device=device, dtype=dtype)
                self._groups.append((torch.stack, group, flat))
                views = flat.unbind(0)
            else:
                rest += idx
                continue
            for i, v in zip(idx, views):
                copies[i] = v
        for i in rest:
            copies[i] = torch.empty_like(tensors[i])
        self._rest = ([tensors[i] for i in rest], [copies[i] for i in rest])  # type: ignore[misc]
        self._copies = copies  # type: ignore[assignment]
        self._src = tensors


class _FlatStats:
    """The running statistics of the solved layers as one flat vector ``[means..., variances...]``.

    ``gather(layers)`` copies them aside before the forward (one ``cat``); ``solve(sizes)`` after it
    reads them again and solves every layer's batch statistics at once::

        s = lerp(r_old, r_new, 1 / m)       (= r_old + (r_new - r_old) / m, per element)
        var_s <- max(var_s * (n - 1) / n, 0)

    Layers must share device and dtype (else ``gather`` returns ``None``: the caller computes the
    statistics per call instead). Running statistics never require grad, so no autograd mode is needed.
    """

    def __init__(self) -> None:
        self._src: list[Tensor] = []
        self._momenta: tuple[float, ...] = ()
        self._old = torch.empty(0)
        self._counts: list[int] = []
        self._position: dict[_BatchNorm, int] = {}
        self._inv_m: Any = 1.0
        self._factors: dict[tuple[int, ...], Tensor] = {}

    def gather(self, layers: list[_BatchNorm]) -> Optional[_FlatStats]:
        src = [m._buffers["running_mean"] for m in layers] + [m._buffers["running_var"] for m in layers]
        momenta = tuple(float(m.momentum) for m in layers)  # type: ignore[arg-type]
        if (len(src) != len(self._src) or not all(map(operator.is_, src, self._src))
                or momenta != self._momenta):
            if not self._layout(layers, src, momenta):
                return None
        torch.cat(src, out=self._old)
        return self

    def _layout(self, layers: list[_BatchNorm], src: list[Tensor], momenta: tuple[float, ...]) -> bool:
        first = src[0]
        if any(t.device != first.device or t.dtype != first.dtype or t.dim() != 1 for t in src):
            self._src = []
            return False
        self._src, self._momenta = src, momenta
        self._counts = [t.numel() for t in src]
        self._position = {m: i for i, m in enumerate(layers)}
        self._old = torch.empty(sum(self._counts), device=first.device, dtype=first.dtype)
        self._factors = {}
        if len(set(momenta)) == 1:
            self._inv_m = 1.0 / momenta[0]
        else:
            inv = torch.tensor([1.0 / m for m in momenta * 2], dtype=first.dtype)
            self._inv_m = inv.repeat_interleave(torch.tensor(self._counts)).to(first.device)
        return True

    def solve(self, sizes: list[int]) -> list[list[tuple[Tensor, Tensor]]]:
        """Per layer ``[(mean, biased var)]`` from the running statistics now and those gathered."""
        key = tuple(sizes)
        factor = self._factors.get(key)
        if factor is None:
            # Sizes change only with the input shape; a few tables are kept (one per shape seen lately).
            if len(self._factors) >= 8:
                self._factors.clear()
            factor = torch.tensor([(n - 1) / n for n in sizes], dtype=self._old.dtype).repeat_interleave(
                torch.tensor(self._counts[len(sizes):])).to(self._old.device)
            self._factors[key] = factor
        stats = _solved(self._old, torch.cat(self._src), self._inv_m, factor)
        parts = stats.split_with_sizes(self._counts)
        layers = len(sizes)
        return [[pair] for pair in zip(parts[:layers], parts[layers:])]

    def solve_one(self, module: _BatchNorm, n: int) -> tuple[Tensor, Tensor]:
        """``(mean, biased var)`` of one gathered layer (called once more per forward from here on)."""
        i, layers = self._position[module], len(self._counts) // 2
        offsets = [0, *itertools.accumulate(self._counts)]
        old = torch.cat([self._old[offsets[i]:offsets[i + 1]], self._old[offsets[layers + i]:offsets[layers + i + 1]]])
        mean, var = _running(module)
        c = mean.numel()
        factor = torch.full((c,), (n - 1) / n, dtype=old.dtype, device=old.device)
        stats = _solved(old, torch.cat([mean, var]), 1.0 / float(module.momentum), factor)  # type: ignore[arg-type]
        return stats[:c], stats[c:]


def _solved(old: Tensor, new: Tensor, inv_m: Any, var_factor: Tensor) -> Tensor:
    """``[means..., vars...]`` of the batch: ``lerp(old, new, 1 / m)``, the variances (the last
    ``var_factor.numel()`` entries) times ``(n - 1) / n`` and clamped at 0."""
    stats = torch.lerp(old, new, inv_m)
    variances = stats[stats.numel() - var_factor.numel():]
    variances.mul_(var_factor).clamp_min_(0.0)
    return stats


class BatchNormSnapshot:
    """BatchNorm buffers and a copy of them; :meth:`restore` puts the copy back (one foreach copy)."""

    def __init__(self, buffers: list[Tensor], saved: list[Tensor]) -> None:
        self.buffers = buffers
        self.saved = saved

    @torch.no_grad()
    def restore(self) -> None:
        torch._foreach_copy_(self.buffers, self.saved)


def _derivable(module: _BatchNorm) -> bool:
    """Whether the batch statistics can be solved from the running-statistics update with no host read.

    Cumulative averaging (``momentum=None``) would need the batch count on the host: not solved.
    """
    mean, var = _running(module)
    if not module.track_running_stats or mean is None or var is None:
        return False
    return module.momentum is not None and module.momentum > 0


def _running(module: _BatchNorm) -> tuple[Tensor, Tensor]:
    """``(running_mean, running_var)`` read from the buffer dict (no ``nn.Module.__getattr__``)."""
    buffers = module._buffers
    return buffers.get("running_mean"), buffers.get("running_var")  # type: ignore[return-value]


def _replaying_forward(module: _BatchNorm, stats: dict[_BatchNorm, list[tuple[Tensor, Tensor]]],
                       calls: dict[_BatchNorm, int]) -> Callable[[Tensor], Tensor]:
    """``module``'s forward on its recorded statistics ``stats[module]``, in call order (cycling; ``calls``
    counts this replay's calls and is cleared at each :meth:`BatchNormStats.replay`)."""

    def forward(x: Tensor) -> Tensor:
        module._check_input_dim(x)
        recorded = stats[module]
        k = calls.get(module, 0)
        calls[module] = k + 1
        mean, var = recorded[k % len(recorded)]
        return F.batch_norm(x, mean, var, module.weight, module.bias, training=False, momentum=0.0, eps=module.eps)

    return forward
