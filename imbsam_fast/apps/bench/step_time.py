"""End-to-end step time: SGD, SAM, the public ImbSAM code, exact mode and fast mode, as an epoch costs it.

ResNet-32 at 32x32 input, batch 64, labels drawn from the CIFAR-100-LT profile
(imbalance 100: ``n_k = 500 * 100^(-k/99)``); a class is tail when ``n_k < eta``.
Every method trains its own copy of the model on the same batches, interleaved
batch by batch (the order rotates, so no method always runs first). What a user
pays is the **total** over all batches, those with tail samples and those
without, as they come; the median per-batch ratio is printed beside it.

fast: fast mode's default BatchNorm treatment (replayed statistics in the
tail pass at w, a ghost batch of 8 head samples in the pass at w + e);
fast-ghost: a ghost batch of 8 in both tail passes.
sgd-b: a second SGD on its own copy of the model, the control: its ratio to
``sgd`` is the harness's own noise (the two do the same work).

On the CPU a step's time includes the page faults of memory that ``malloc``
handed back to the kernel (:mod:`.allocator`); their count is reported per
step, and ``keep_freed_memory`` takes them out of the comparison.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ...hooks import StepHooks
from ...optimizer import ImbSAM
from ...priors import sam_weights, tail_class_mask
from ...reference import ReferenceImbSAM, reference_train_step
from ..data.long_tail import exponential_profile
from ..models import resnet32
from .allocator import minor_faults

__all__ = [
    "METHODS", "CONTROLS", "StepTimes", "cifar100_lt_batches", "make_steppers", "run", "host_overhead",
    "structural_host_time", "report",
]

KW = dict(lr=0.01, momentum=0.9, weight_decay=1e-3)
METHODS = ("sgd", "sam", "public", "exact", "fast", "fast-ghost")
CONTROLS = ("sgd-b",)


def cifar100_lt_batches(n: int, batch: int, eta: float, device: torch.device, seed: int = 0,
                        head_only: bool = False):
    """``n`` batches of random 32x32 images with CIFAR-100-LT labels, and the tail mask for ``eta``.

    ``head_only`` draws the labels from the head classes alone (batches with no tail sample)."""
    counts = exponential_profile(500, 100, 100)
    probs = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    if head_only:
        probs = probs.masked_fill(tail_class_mask(counts, eta), 0.0)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        y = torch.multinomial(probs, batch, replacement=True, generator=gen)
        x = torch.randn(batch, 3, 32, 32, generator=gen)
        out.append((x.to(device), y.to(device)))
    return out, tail_class_mask(counts, eta)


def _closure(model, x, y):
    def closure(index=None):
        xs, ys = (x, y) if index is None else (x[index], y[index])
        return F.cross_entropy(model(xs), ys, reduction="none")

    return closure


def make_steppers(device: torch.device, tail_mask: torch.Tensor, norm: str = "batch",
                  methods: Sequence[str] = METHODS, width: int = 16
                  ) -> tuple[Callable[[str, torch.Tensor, torch.Tensor], None], dict]:
    """``step(method, x, y)`` for each method, every method on its own copy of one initial ResNet-32.

    Also returns the optimizers by method (for :func:`host_overhead`)."""
    torch.manual_seed(0)
    base = resnet32(width=width, norm=norm).to(device)
    models = {m: resnet32(width=width, norm=norm).to(device) for m in methods}
    for m in models.values():
        m.load_state_dict(base.state_dict())
    builders = {
        "sgd": lambda m: torch.optim.SGD(m.parameters(), **KW),
        "sam": lambda m: ImbSAM(m.parameters(), torch.optim.SGD, class_weights=sam_weights(100), **KW),
        "public": lambda m: ReferenceImbSAM(torch.optim.SGD(m.parameters(), **KW), m),
        "exact": lambda m: ImbSAM(m.parameters(), torch.optim.SGD, tail_mask=tail_mask, **KW),
        "fast": lambda m: ImbSAM(m.parameters(), torch.optim.SGD, tail_mask=tail_mask, mode="fast", model=m, **KW),
        "fast-ghost": lambda m: ImbSAM(m.parameters(), torch.optim.SGD, tail_mask=tail_mask, mode="fast", model=m,
                                       fast_bn="ghost", **KW),
    }
    builders["sgd-b"] = builders["sgd"]  # the control: SGD again, on its own model copy
    unknown = set(methods) - set(builders)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from {', '.join(builders)}")
    opts = {m: builders[m](models[m]) for m in methods}
    mask_dev = tail_mask.to(device)

    def step(method: str, x: torch.Tensor, y: torch.Tensor) -> None:
        model, opt = models[method], opts[method]
        if method in ("sgd", "sgd-b"):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        elif method == "public":
            reference_train_step(model, opt, x, y, mask_dev)
        else:
            opt.step(_closure(model, x, y), y)

    step.models = models  # type: ignore[attr-defined]
    return step, opts


@dataclass
class StepTimes:
    """Seconds and minor page faults per batch for each method, and the number of tail samples in each batch."""

    eta: float
    tails: list[int]
    times: dict[str, list[float]] = field(default_factory=dict)
    faults: dict[str, list[int]] = field(default_factory=dict)

    def faults_per_step(self, method: str) -> float:
        f = self.faults.get(method) or []
        return sum(f) / len(f) if f else float("nan")

    def total(self, method: str, with_tail: Optional[bool] = None) -> float:
        """Total seconds over all batches, or over those with (``True``) / without (``False``) a tail sample."""
        return sum(t for t, n in zip(self.times[method], self.tails) if with_tail is None or (n > 0) == with_tail)

    def ratio(self, method: str, with_tail: Optional[bool] = None, base: str = "sgd") -> float:
        denom = self.total(base, with_tail)
        return self.total(method, with_tail) / denom if denom else float("nan")

    def median_ratio(self, method: str, base: str = "sgd") -> float:
        return statistics.median(a / b for a, b in zip(self.times[method], self.times[base]))


def run(eta: float, batches: int, device: torch.device, warmup: int = 3, norm: str = "batch",
        methods: Sequence[str] = METHODS, progress: bool = False, seed: int = 0, head_only: bool = False
        ) -> StepTimes:
    """Time one step per method on each of ``batches`` batches (after ``warmup`` untimed ones);
    ``head_only``: batches with no tail sample only."""
    data, tail_mask = cifar100_lt_batches(batches + warmup, 64, eta, device, seed, head_only)
    step, _ = make_steppers(device, tail_mask, norm, methods)
    out = StepTimes(eta, [], {m: [] for m in methods}, {m: [] for m in methods})
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(data), desc=f"step time, eta {eta:g}", leave=False, unit="batch")
    mask_dev = tail_mask.to(device)
    for i, (x, y) in enumerate(data):
        order = list(methods[i % len(methods):]) + list(methods[: i % len(methods)])
        for m in order:
            _sync(device)
            f0, t0 = minor_faults(), time.perf_counter()
            step(m, x, y)
            _sync(device)
            if i >= warmup:
                out.times[m].append(time.perf_counter() - t0)
                out.faults[m].append(minor_faults() - f0)
        if i >= warmup:
            out.tails.append(int(mask_dev[y].sum()))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class _TimedLoss(torch.Tensor):
    """An alias of a step's loss (``as_subclass``: the same storage, in the same graph behind one view node) whose
    ``backward()`` calls ``on_return`` when it returns.

    The timers close their backward windows there, not at ``after_backward``: that hook runs once the pass is
    complete, after whatever the library does between a backward and its hooks (leaving a pass's BatchNorm
    context, the DDP sync of the ascent gradient), which would then count as backward time."""

    __torch_function__ = torch._C._disabled_torch_function_impl
    on_return: Callable[[], None]

    def backward(self, *args, **kwargs):  # type: ignore[override]
        try:
            super().backward(*args, **kwargs)
        finally:
            self.on_return()


def timed_loss(loss: torch.Tensor, on_return: Callable[[], None]) -> torch.Tensor:
    """``loss`` as a :class:`_TimedLoss`: what a ``before_backward`` hook returns to time the backward exactly."""
    timed = loss.as_subclass(_TimedLoss)
    timed.on_return = on_return
    return timed


class _Windows(StepHooks):
    """Marks every backward of a step as a profiler range, from its call to its return (:func:`timed_loss`)."""

    def before_backward(self, opt, phase, loss):
        rf = torch.autograd.profiler.record_function("imbsam_bench::backward")
        rf.__enter__()
        return timed_loss(loss, lambda: rf.__exit__(None, None, None))


def host_overhead(method: str, eta: float, batches: int, device: torch.device, norm: str = "batch",
                  seed: int = 1, width: int = 16) -> dict[str, float]:
    """Per-step host time of ``ImbSAM.step`` outside the closure's forwards and the backwards, in ms.

    One run under the profiler. For every step: ``outside`` = the step's time minus its forward and
    backward windows; ``ops`` = the time of the operators and base-optimizer calls the step issues
    outside those windows; ``python`` = ``outside - ops``, the library's own Python. All three come
    from the same steps, so the noise of the operators' run time cancels; ``python`` still holds the
    profiler's bookkeeping between events and the freeing of gradient tensors, so it is an upper bound.
    ``width=1`` (8x8 inputs) keeps ResNet-32's 95 tensors and 31 BatchNorm layers with almost no arithmetic
    or memory to free: what remains of ``python`` is then the Python alone.
    """
    from torch.profiler import ProfilerActivity, profile

    data, tail_mask = cifar100_lt_batches(batches + 2, 64, eta, device, seed)
    if width < 16:
        data = [(x[:, :, :8, :8], y) for x, y in data]
    step, opts = make_steppers(device, tail_mask, norm, [method], width)
    opt = opts[method]
    opt.register_step_hooks(_Windows())
    model = step.models[method]  # type: ignore[attr-defined]

    def closure_for(x, y):
        inner = _closure(model, x, y)

        def closure(index=None):
            with torch.autograd.profiler.record_function("imbsam_bench::forward"):
                return inner(index)

        return closure

    for x, y in data[:2]:
        opt.step(closure_for(x, y), y)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for x, y in data[2:]:
            opt.step(closure_for(x, y), y)
    outside = ops = 0.0
    steps = [e for e in prof.events() if e.name.startswith("Optimizer.step#ImbSAM")]
    for e in steps:
        windows = sum(c.cpu_time_total for c in e.cpu_children if c.name.startswith("imbsam_bench::"))
        outside += e.cpu_time_total - windows
        ops += sum(c.cpu_time_total for c in e.cpu_children if not c.name.startswith("imbsam_bench::"))
    tails = [int(tail_mask.to(y.device)[y].sum()) for _, y in data[2:]]
    n = max(len(steps), 1)
    return {"outside_ms": outside / n / 1e3, "ops_ms": ops / n / 1e3, "python_ms": (outside - ops) / n / 1e3,
            "steps": float(len(steps)), "tail_batches": float(sum(t > 0 for t in tails))}


def structural_host_time(methods: Sequence[str], eta: float, batches: int, width: int = 1, seed: int = 2
                         ) -> dict[str, float]:
    """Median host time per step outside the forwards and backwards, in ms, on ResNet-32's structure with
    almost no arithmetic: ``width`` channels in the first stage and 8x8 inputs on the CPU, one thread.

    The model keeps ResNet-32's 95 parameter tensors and 31 BatchNorm layers, so what remains is the
    per-step cost that does not scale with the model: Python, operator dispatch, allocation. That is what
    a launch-bound GPU step pays on the host. For ``"sgd"`` it is ``zero_grad()`` plus ``step()``; for the
    others the time of ``step(closure, targets)`` minus its forwards and backwards. The methods run
    interleaved batch by batch; only batches with a tail sample are counted.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data, tail_mask = cifar100_lt_batches(batches + 3, 64, eta, torch.device("cpu"), seed)
        data = [(x[:, :, :8, :8], y) for x, y in data]
        runners = {m: _host_timer(m, tail_mask, width) for m in methods}
        times: dict[str, list[float]] = {m: [] for m in methods}
        for i, (x, y) in enumerate(data):
            for m in methods:
                t = runners[m](x, y)
                if i >= 3 and bool(tail_mask[y].any()):
                    times[m].append(t)
        return {m: statistics.median(v) * 1e3 for m, v in times.items()}
    finally:
        torch.set_num_threads(threads)


def _host_timer(method: str, tail_mask: torch.Tensor, width: int, book: bool = True
                ) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """``time(x, y)``: one step of ``method`` on its own model; returns its host seconds outside fwd/bwd.
    ``book=False`` switches off the extension's ParamBook (the Python phases, for an A/B)."""
    torch.manual_seed(0)
    model = resnet32(width=width)
    if method == "sgd":
        sgd = torch.optim.SGD(model.parameters(), **KW)

        def time_sgd(x, y):
            F.cross_entropy(model(x), y).backward()
            t0 = time.perf_counter()
            sgd.step()
            sgd.zero_grad()
            return time.perf_counter() - t0

        return time_sgd
    kw = dict(class_weights=sam_weights(100)) if method == "sam" else dict(tail_mask=tail_mask)
    mode = dict(mode="fast", model=model) if method.startswith("fast") else dict(model=model)
    if method == "fast-ghost":
        mode["fast_bn"] = "ghost"
    opt = ImbSAM(model.parameters(), torch.optim.SGD, **kw, **mode, **KW)
    if not book:
        opt._book = None
    windows = _WallWindows()
    opt.register_step_hooks(windows)

    def time_imbsam(x, y):
        closure = windows.timed(_closure(model, x, y))
        windows.seconds = 0.0
        t0 = time.perf_counter()
        opt.step(closure, y)
        return time.perf_counter() - t0 - windows.seconds

    return time_imbsam


class _WallWindows(StepHooks):
    """Wall-clock seconds spent in backwards (from each call to its return, :func:`timed_loss`) and in the
    closure (``timed``) during a step."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._t0 = 0.0

    def before_backward(self, opt, phase, loss):
        self._t0 = time.perf_counter()
        return timed_loss(loss, self._end)

    def _end(self) -> None:
        self.seconds += time.perf_counter() - self._t0

    def timed(self, closure):
        def wrapped(index=None):
            t0 = time.perf_counter()
            try:
                return closure(index)
            finally:
                self.seconds += time.perf_counter() - t0

        return wrapped


def tail_histogram(tails: list[int]) -> str:
    """``"0:8 1:15 2:12 ..."``: how many batches held each number of tail samples."""
    counts: dict[int, int] = {}
    for t in tails:
        counts[t] = counts.get(t, 0) + 1
    return " ".join(f"{k}:{counts[k]}" for k in sorted(counts))


def report(res: StepTimes) -> list[str]:
    """The table for one run: totals and ratios to SGD over all batches, with / without tail samples, medians."""
    n = len(res.tails)
    with_tail = sum(t > 0 for t in res.tails)
    lines = [
        f"eta={res.eta:g}: {n} batches, {with_tail} with tail samples, {n - with_tail} without; tail samples per "
        f"batch mean {statistics.mean(res.tails):.2f} (count:batches {tail_histogram(res.tails)})",
        f"{'method':<12}{'total s':>9}{'x SGD':>8}{'tail b.':>9}{'no-tail b.':>11}{'median':>8}{'faults':>9}",
    ]
    def cell(value: float, width: int) -> str:
        return f"{value:>{width - 1}.2f}x" if value == value else f"{'-':>{width}}"

    for m in res.times:
        lines.append(f"{m:<12}{res.total(m):>9.2f}{cell(res.ratio(m), 8)}{cell(res.ratio(m, True), 9)}"
                     f"{cell(res.ratio(m, False), 11)}{cell(res.median_ratio(m), 8)}{res.faults_per_step(m):>9.0f}")
    lines.append("x SGD: total time over all batches / SGD's total; tail b. / no-tail b.: the same over the batches "
                 "with / without a tail sample; median: of the per-batch ratios; faults: minor page faults per step")
    return lines
