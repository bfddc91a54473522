"""The same call, timed right after a backward and then again: what a cold host costs the step's own work.

A step's work outside its forwards and backwards (the gradient norm, the perturbation, the BatchNorm
contexts, the bookkeeping) runs right after a backward, which has pushed the interpreter's and torch's
code and objects out of the CPU's caches. This times one call, the optimizer backend's global gradient
norm ``||g_t||`` over every ``.grad``, ``--repeat`` times in a row at the ``"ascent"`` hook point of each
fast-mode step on the BatchNorm ResNet-32 (tail batches); the first of the calls is the one a step pays.

    python benchmarks/cold_calls.py [--width 1] [--steps 100] [--repeat 3] [--threads 1] [--keep-freed-memory]

``--keep-freed-memory`` keeps glibc from returning freed memory to the kernel, to tell a cold cache from
page faults. Hooks take the fused SGD path out of the step, so time the whole step with ``step_time.py``.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from imbsam_fast.apps.bench.allocator import keep_freed_memory
from imbsam_fast.apps.bench.step_time import cifar100_lt_batches, make_steppers
from imbsam_fast.hooks import ASCENT, StepHooks
from imbsam_fast.param_buckets import grads_in


class RepeatedNorm(StepHooks):
    """At the ascent hook point: the backend's gradient norm ``repeat`` times, each call's nanoseconds summed
    into ``totals[k]`` for the ``k``-th call."""

    def __init__(self, repeat: int) -> None:
        self.totals = [0] * repeat
        self.calls = 0

    def after_backward(self, opt, phase: str) -> None:
        if phase != ASCENT:
            return
        grads = [grads_in(opt.param_groups)]
        for k in range(len(self.totals)):
            t0 = time.perf_counter_ns()
            opt._ops.grad_norm(grads)
            self.totals[k] += time.perf_counter_ns() - t0
        self.calls += 1


def measure(width: int, steps: int, repeat: int, warmup: int = 10) -> list[float]:
    """Microseconds per call, for the first to the ``repeat``-th call after the ascent backward."""
    data, mask = cifar100_lt_batches(steps * 2 + 2 * warmup, 64, 20, torch.device("cpu"), 1)
    data = [(x if width >= 16 else x[:, :, :8, :8], y) for x, y in data if int(mask[y].sum()) > 0]
    data = data[:steps + warmup]
    step, opts = make_steppers(torch.device("cpu"), mask, methods=["fast"], width=width)
    opt, model = opts["fast"], step.models["fast"]

    def closure_of(x, y):
        def closure(index=None):
            xs, ys = (x, y) if index is None else (x[index], y[index])
            return F.cross_entropy(model(xs), ys, reduction="none")
        return closure

    for x, y in data[:warmup]:
        opt.step(closure_of(x, y), y)
    probe = RepeatedNorm(repeat)
    opt.register_step_hooks(probe)
    for x, y in data[warmup:]:
        opt.step(closure_of(x, y), y)
    return [t / max(probe.calls, 1) / 1e3 for t in probe.totals]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=1, help="ResNet-32's first-stage channels (16: the model)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keep-freed-memory", action="store_true")
    args = ap.parse_args(argv)
    if args.repeat < 1 or args.steps < 1:
        ap.error("--steps and --repeat must be at least 1")
    torch.set_num_threads(args.threads)
    kept = keep_freed_memory() if args.keep_freed_memory else False
    us = measure(args.width, args.steps, args.repeat)
    print(f"# grad norm at the ascent hook, width {args.width}, {args.steps} steps, {args.threads} threads, "
          f"freed memory kept: {kept}")
    for k, t in enumerate(us, 1):
        print(f"call {k}: {t:8.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
