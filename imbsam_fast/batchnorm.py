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
subclass of ``torch.nn.modules.batchnorm._BatchNorm``: each training-mode
layer's ``forward`` is, while a context is entered, a switching forward (an
instance attribute) that records, replays, freezes or just calls the layer's
own forward, by one mode shared by all layers. Changing contexts sets that
mode, so a fast step walks the layers twice (one install, one removal, see
:meth:`BatchNormStats.pin_plan`) instead of twice per context. Layers in eval
mode use their running statistics as usual and are left alone. A layer called
several times in one forward gets its recorded statistics back in call order
(cycling, so that activation checkpointing's recomputation in the backward
sees them again).
"""

from __future__ import annotations

import collections
import functools
import itertools
import operator
from typing import Any, Callable, Iterator, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .grad_mode import without_grad

__all__ = ["BatchNormStats", "BatchNormSnapshot", "batchnorm_layers"]

_NORMAL, _RECORD, _REPLAY, _FREEZE = 0, 1, 2, 3
"""The modes of the switching forwards (:class:`_Switch`)."""
_MISSING = object()
_BUFFERS = operator.attrgetter("_buffers")
_RUNNING_MEAN = operator.itemgetter("running_mean")
_RUNNING_VAR = operator.itemgetter("running_var")
_MOMENTUM = operator.attrgetter("momentum")
_MODE = operator.attrgetter("training", "momentum", "track_running_stats")
_NOT_NONE = functools.partial(operator.is_not, None)
_consume: Callable[[Iterator[Any]], None] = collections.deque(maxlen=0).extend
"""Run an iterator to its end, keeping nothing (a bound C method: no frame, no deque made per call)."""


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
        self._plan = _LayerPlan([], [], [], [], [])
        self._bound: Optional[list[list[tuple[Tensor, Tensor]]]] = None
        """The flat solve's per-layer views last put in ``_stats`` for the current plan (``None``: not all there)."""
        self._recorded_plan: Optional[_LayerPlan] = None
        self._pinning = False
        self._pinned: Optional[_LayerPlan] = None
        self._replay_calls: dict[_BatchNorm, int] = {}
        self._snapshot_copy = _ReusedCopy()
        self._switch = _Switch()
        self._recording = _Recording(self)
        self._replaying = _ModeContext(self, _REPLAY, "replay()", nestable=False)
        self._freezing = _ModeContext(self, _FREEZE, "freeze_running_stats()", nestable=True)

    def active(self) -> bool:
        """Whether any BatchNorm layer is in training mode (eval-mode layers need no handling)."""
        if self._pinning:
            return bool(self._layer_plan().training)
        return any(m.training for m in self.layers)

    def pin_plan(self) -> None:
        """Until :meth:`unpin_plan`, read the layers' modes once, at the first context that needs them: a step's
        record, replay and freeze then share one plan instead of reading 31 layers' modes each (the modes cannot
        change between a step's passes unless the user's closure changes them mid-step), and the switching
        forwards installed by the first context stay until :meth:`unpin_plan` removes them. A step that needs
        no context reads and writes nothing."""
        self._pinning, self._pinned = True, None

    def unpin_plan(self) -> None:
        """Back to reading the layers' modes at every context; the switching forwards removed."""
        self._pinning, self._pinned = False, None
        if self._switch.plan is not None and not self._switch.entered:
            self._switch.remove()

    def buffers(self) -> list[Tensor]:
        """The running statistics and batch counters of every layer (the tensors a forward may update)."""
        # A module's _buffers dict outlives model.to() (which replaces its values), and reading it directly
        # skips nn.Module.__getattr__.
        return list(filter(_NOT_NONE, itertools.chain.from_iterable(map(dict.values, map(_BUFFERS, self.layers)))))

    @without_grad
    def snapshot(self) -> Optional[BatchNormSnapshot]:
        """A copy of :meth:`buffers` (one foreach copy into storage reused across calls), or ``None`` when
        there are none. A snapshot is good until the next call."""
        buffers = self.buffers()
        if not buffers:
            return None
        return BatchNormSnapshot(buffers, self._snapshot_copy.of(buffers))

    def record(self) -> _Recording:
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
        return self._recording

    def _layer_plan(self) -> _LayerPlan:
        """Which layers each context acts on, kept while the layers' mode, momentum and tracking stay as they
        were (one read of each per step instead of the checks), or the plan pinned by :meth:`pin_plan`."""
        if self._pinned is not None:
            return self._pinned
        key = (tuple(map(_MODE, self.layers)), len(self._per_call))
        if self._plan_key != key:
            training = [m for m in self.layers if m.training]
            solved = [m for m in training if _derivable(m) and m not in self._per_call]
            self._plan = _LayerPlan(
                training,
                solved,
                [m for m in training if m not in solved],
                [m.__dict__ for m in training],
                [_switching_forward(m, self._switch, self._stats, self._replay_calls, self._recording)
                 for m in training],
            )
            self._plan_key = key
            self._bound = None
        if self._pinning:
            self._pinned = self._plan
        return self._plan

    def replay(self) -> _ModeContext:
        """Within: training-mode layers normalize with the recorded statistics and update nothing."""
        plan = self._current_plan()
        # Under the plan of the record, its entries are some of plan.training's: as many means all of them.
        if self._recorded_plan is not plan or len(self._stats) != len(plan.training):
            unrecorded = [m for m in plan.training if not self._stats.get(m)]
            if unrecorded:
                raise RuntimeError(
                    f"{type(unrecorded[0]).__name__} ran in training mode in a tail pass but not in the full-batch "
                    "forward; fast mode needs the same layers to run in both"
                )
        self._replay_calls.clear()
        return self._replaying

    def freeze_running_stats(self) -> _ModeContext:
        """Within: training-mode layers use batch statistics but leave running statistics (and their count) alone:
        each tracking layer's forward runs with ``track_running_stats = False``."""
        return self._freezing

    def _current_plan(self) -> _LayerPlan:
        """The plan the switching forwards were installed with while they are, else the pinned or current one."""
        installed = self._switch.plan
        if installed is not None:
            return installed
        return self._pinned if self._pinned is not None else self._layer_plan()

    def _enter(self, mode: int) -> tuple[int, bool]:
        """Set the switching forwards' ``mode``, installing them first where they are not; returns what
        :meth:`_leave` needs to undo it."""
        switch = self._switch
        installed = switch.plan is None
        if installed:
            switch.install(self._current_plan())
        previous, switch.mode = switch.mode, mode
        switch.entered += 1
        return previous, installed

    def _leave(self, token: tuple[int, bool]) -> None:
        """Undo :meth:`_enter`: the mode before it, and the forwards removed if it installed them, unless a pinned
        step keeps them for its next context (:meth:`unpin_plan` removes them)."""
        switch = self._switch
        switch.mode = token[0]
        switch.entered -= 1
        if token[1] and not self._pinning:
            switch.remove()


class _Recording:
    """:meth:`BatchNormStats.record`'s context, one kept per :class:`BatchNormStats`: a step records with three
    Python calls (``record``, ``__enter__``, ``__exit__``), no generator and no context object made. It cannot
    be entered again before it is left. Within it the switching forwards call :meth:`observe` before each
    training-mode layer's own forward."""

    __slots__ = ("_bn", "_flat", "_order", "_solved", "_calls", "_sizes", "_token", "_active")

    def __init__(self, bn: BatchNormStats) -> None:
        self._bn = bn
        self._flat: Optional[_FlatStats] = None
        self._order: list[_BatchNorm] = []
        self._solved: set[_BatchNorm] = set()
        self._calls: dict[_BatchNorm, int] = {}
        self._sizes: dict[_BatchNorm, int] = {}
        self._token: tuple[int, bool] = (_NORMAL, False)
        self._active = False

    def __enter__(self) -> None:
        if self._active:
            raise RuntimeError("BatchNormStats.record() is already recording; it cannot be nested")
        bn = self._bn
        plan = bn._current_plan()
        order = plan.solved
        stats = bn._stats  # changed in place: the replaying forwards read this dict
        flat = bn._flat.gather(order) if order else None
        # The solved layers' entries are views of the flat solve's output, kept across steps (rewritten in place
        # by each solve); every other layer's list is rebuilt by this forward.
        if flat is None or bn._bound is None:
            stats.clear()
            bn._bound = None
        else:
            for m in plan.computed:
                stats.pop(m, None)
        bn._recorded_plan = plan
        self._flat, self._order = flat, order
        self._solved = set(order) if flat is not None else set()
        self._calls, self._sizes = {}, {}
        self._token = bn._enter(_RECORD)
        self._active = True

    def observe(self, module: _BatchNorm, args: tuple[Any, ...]) -> None:
        """``module`` is called on ``args`` in the recorded forward: note its input size (a solved layer's first
        call) or compute its batch statistics."""
        if not module.training:
            return
        calls = self._calls
        count = calls[module] = calls.get(module, 0) + 1
        if module in self._solved:
            if count == 1:
                x = args[0]
                self._sizes[module] = x.numel() // x.shape[1]
                return
            # A second call of the same layer: solve its first call now, and go per call from here on.
            self._solved.discard(module)
            self._bn._per_call.add(module)
            assert self._flat is not None
            self._bn._stats[module] = [self._flat.solve_one(module, self._sizes[module])]
        x = args[0]
        with torch.no_grad():
            var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=0)
        self._bn._stats.setdefault(module, []).append((mean, var))

    def __exit__(self, exc_type: Optional[type], *rest: object) -> None:
        self._active = False
        self._bn._leave(self._token)
        flat, order, solved, sizes, bn = self._flat, self._order, self._solved, self._sizes, self._bn
        self._flat = None
        if exc_type is not None:
            return
        stats = bn._stats
        # Every solved layer ran once (sizes holds the layers solved at their first call, solved loses those
        # called again): one solve for all of them, into the views the entries already hold.
        if flat is not None and len(solved) == len(sizes) == len(order):
            recorded = flat.solve(tuple(map(sizes.__getitem__, order)))
            if bn._bound is not recorded:
                stats.update(zip(order, recorded))
                bn._bound = recorded
        elif flat is not None:
            bn._bound = None
            for m in order:
                if m in solved and m in sizes:
                    stats[m] = [flat.solve_one(m, sizes[m])]
                elif m not in sizes:
                    stats.pop(m, None)


class _LayerPlan(NamedTuple):
    """The layers each context of :class:`BatchNormStats` acts on, for the layers' current modes."""

    training: list[_BatchNorm]
    solved: list[_BatchNorm]
    """Training-mode layers whose batch statistics :meth:`BatchNormStats.record` solves from running statistics."""
    computed: list[_BatchNorm]
    """The other training-mode layers: their statistics are computed from the input at every call."""
    dicts: list[dict[str, Any]]
    """The training-mode layers' instance dicts, where the switching forwards go."""
    forwards: list[Callable[..., Any]]
    """Each training-mode layer's switching forward (:func:`_switching_forward`)."""


class _Switch:
    """The switching forwards of one :class:`BatchNormStats`: while installed, ``module.forward`` of each
    training-mode layer of ``plan`` is its switching forward (an entry of the module's instance dict, which
    skips ``nn.Module.__setattr__``), and ``mode`` says what they do. What an instance had as ``forward``
    before (an attribute the user set) is what the switching forward calls as the layer's own forward, and is
    put back by :meth:`remove`.

    Installing and removing are C-level ``map`` calls over the instance dicts; in between, a context is one
    attribute write. A fast step on a ResNet-32 then touches its 31 layers' dicts twice instead of eight
    times, each time with the caches cold from a forward or a backward (``benchmarks/RESULTS.md``, fourteenth
    session).
    """

    __slots__ = ("mode", "entered", "plan", "own")

    def __init__(self) -> None:
        self.mode = _NORMAL
        self.entered = 0
        """How many contexts are entered (the forwards stay while one is)."""
        self.plan: Optional[_LayerPlan] = None
        """The plan the forwards are installed with; ``None`` while they are not."""
        self.own: dict[_BatchNorm, Any] = {}
        """The instance-level ``forward`` a layer had before :meth:`install` (most have none)."""

    def install(self, plan: _LayerPlan) -> None:
        names = itertools.repeat("forward")
        saved = list(map(dict.get, plan.dicts, names, itertools.repeat(_MISSING)))
        self.own = {} if saved.count(_MISSING) == len(saved) else {
            m: f for m, f in zip(plan.training, saved) if f is not _MISSING}
        _consume(map(operator.setitem, plan.dicts, names, plan.forwards))
        self.plan, self.mode = plan, _NORMAL

    def remove(self) -> None:
        plan, own = self.plan, self.own
        assert plan is not None
        _consume(map(dict.pop, plan.dicts, itertools.repeat("forward"), itertools.repeat(None)))
        if own:
            for m, d in zip(plan.training, plan.dicts):
                if m in own:
                    d["forward"] = own[m]
        self.plan, self.own, self.mode = None, {}, _NORMAL


class _ModeContext:
    """:meth:`BatchNormStats.replay`'s or :meth:`BatchNormStats.freeze_running_stats`'s context, one kept per
    :class:`BatchNormStats`: entering sets the switching forwards' mode (installing them where they are not),
    leaving puts the previous mode back. Unless ``nestable``, it cannot be entered again before it is left."""

    __slots__ = ("_bn", "_mode", "_name", "_nestable", "_tokens")

    def __init__(self, bn: BatchNormStats, mode: int, name: str, nestable: bool) -> None:
        self._bn = bn
        self._mode = mode
        self._name = name
        self._nestable = nestable
        self._tokens: list[tuple[int, bool]] = []

    def __enter__(self) -> None:
        if self._tokens and not self._nestable:
            raise RuntimeError(f"BatchNormStats.{self._name} is already entered; it cannot be nested")
        self._tokens.append(self._bn._enter(self._mode))

    def __exit__(self, *exc: object) -> None:
        self._bn._leave(self._tokens.pop())


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

    into one output vector kept with the layout: each solve rewrites it in place and hands back the same
    per-layer views of it (no tensor is allocated or freed in a step).

    Layers must share device and dtype (else ``gather`` returns ``None``: the caller computes the
    statistics per call instead). Running statistics never require grad, so no autograd mode is needed.
    """

    def __init__(self) -> None:
        self._src: list[Tensor] = []
        self._momenta: tuple[Any, ...] = ()
        self._old = self._new = self._out = self._variances = torch.empty(0)
        self._recorded: list[list[tuple[Tensor, Tensor]]] = []
        self._counts: list[int] = []
        self._position: dict[_BatchNorm, int] = {}
        self._inv_m: Any = 1.0
        self._factors: dict[tuple[int, ...], Tensor] = {}

    def gather(self, layers: list[_BatchNorm]) -> Optional[_FlatStats]:
        buffers = list(map(_BUFFERS, layers))
        src = list(map(_RUNNING_MEAN, buffers))
        src += map(_RUNNING_VAR, buffers)
        momenta = tuple(map(_MOMENTUM, layers))
        if (len(src) != len(self._src) or not all(map(operator.is_, src, self._src))
                or momenta != self._momenta):
            if not self._layout(layers, src, momenta):
                return None
        torch.cat(src, out=self._old)
        return self

    def _layout(self, layers: list[_BatchNorm], src: list[Tensor], momenta: tuple[Any, ...]) -> bool:
        first = src[0]
        if any(t.device != first.device or t.dtype != first.dtype or t.dim() != 1 for t in src):
            self._src = []
            return False
        self._src, self._momenta = src, momenta
        self._counts = [t.numel() for t in src]
        self._position = {m: i for i, m in enumerate(layers)}
        self._old = torch.empty(sum(self._counts), device=first.device, dtype=first.dtype)
        self._new, self._out = torch.empty_like(self._old), torch.empty_like(self._old)
        parts = self._out.split_with_sizes(self._counts)
        n = len(layers)
        self._recorded = [[pair] for pair in zip(parts[:n], parts[n:])]
        self._variances = self._out[sum(self._counts[:n]):]
        self._factors = {}
        inverse = [1.0 / float(m) for m in momenta]
        if len(set(inverse)) == 1:
            self._inv_m = inverse[0]
        else:
            inv = torch.tensor(inverse * 2, dtype=first.dtype)
            self._inv_m = inv.repeat_interleave(torch.tensor(self._counts)).to(first.device)
        return True

    def solve(self, sizes: tuple[int, ...]) -> list[list[tuple[Tensor, Tensor]]]:
        """Per layer ``[(mean, biased var)]`` from the running statistics now and those gathered, ``n`` = ``sizes``
        elements per channel: views of the kept output, the same lists at every call until the layout changes."""
        factor = self._factors.get(sizes)
        if factor is None:
            # Sizes change only with the input shape; a few tables are kept (one per shape seen lately).
            if len(self._factors) >= 8:
                self._factors.clear()
            factor = torch.tensor([(n - 1) / n for n in sizes], dtype=self._old.dtype).repeat_interleave(
                torch.tensor(self._counts[len(sizes):])).to(self._old.device)
            self._factors[sizes] = factor
        torch.cat(self._src, out=self._new)
        torch.lerp(self._old, self._new, self._inv_m, out=self._out)
        self._variances.mul_(factor).clamp_min_(0.0)
        return self._recorded

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


def _switching_forward(module: _BatchNorm, switch: _Switch, stats: dict[_BatchNorm, list[tuple[Tensor, Tensor]]],
                       calls: dict[_BatchNorm, int], recording: _Recording) -> Callable[..., Any]:
    """``module``'s forward while the switch is installed, by ``switch.mode``:

    * replay: ``(x - mu) / sqrt(var + eps) * gamma + beta`` on its recorded statistics ``stats[module]``, in
      call order (cycling; ``calls`` counts this replay's calls and is cleared at each
      :meth:`BatchNormStats.replay`), and no running statistics updated;
    * freeze: its own forward with ``track_running_stats = False`` for the call (batch statistics, running
      statistics and their count left alone): ``F.batch_norm`` on no running statistics for BatchNorm's own
      forward, the attribute set for the call for any other;
    * record: its own forward, after :meth:`_Recording.observe` has seen the input;
    * otherwise its own forward.

    Its own forward is the instance attribute it had before the switch (``switch.own``), else its class's.
    """
    own_forward = type(module).forward
    standard = own_forward is _BatchNorm.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        mode = switch.mode
        if mode == _REPLAY:
            x = args[0]
            module._check_input_dim(x)
            recorded = stats[module]
            k = calls.get(module, 0)
            calls[module] = k + 1
            mean, var = recorded[k % len(recorded)]
            return F.batch_norm(x, mean, var, module.weight, module.bias, training=False, momentum=0.0,
                                eps=module.eps)
        if mode == _RECORD:
            recording.observe(module, args)
        patched = switch.own.get(module)
        tracking = mode == _FREEZE and module.training and module.track_running_stats
        if tracking:
            if patched is None and standard:
                # _BatchNorm.forward with track_running_stats = False, which passes no running statistics.
                x = args[0]
                module._check_input_dim(x)
                return F.batch_norm(x, None, None, module.weight, module.bias, True,
                                    0.0 if module.momentum is None else module.momentum, module.eps)
            # Another forward (SyncBatchNorm's, a subclass's, the user's): it reads the attribute itself.
            # nn.Module.__setattr__, which torch.compile traces as a module mutation.
            module.track_running_stats = False
            try:
                return own_forward(module, *args, **kwargs) if patched is None else patched(*args, **kwargs)
            finally:
                module.track_running_stats = tracking
        return own_forward(module, *args, **kwargs) if patched is None else patched(*args, **kwargs)

    return forward
