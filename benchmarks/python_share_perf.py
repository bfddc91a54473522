"""ImbSAM.step's CPU time outside the forwards and backwards, by where the CPU was: Linux perf's timer samples.

    python benchmarks/python_share_perf.py [--mode fast|exact] [--steps 150] [--warmup 5] [--runs 1]
                                           [--period-us 250] [--patch PATCH.py] [--width 16] [--threads N]

``perf record -e cpu-clock`` interrupts the process every ``--period-us`` microseconds of a thread's CPU time
and writes down the instruction pointer, the thread and the time (``CLOCK_MONOTONIC``). Unlike py-spy
(``python_share.py``), it does not stop the process to read its stacks: at 4 kHz a full ResNet-32 step runs
about as fast under it as without it, and every sample stands for ``period`` of the main thread's CPU time,
so a class's samples times the period, over the steps, is its CPU time per step with no step time to borrow.

The target records, on the same clock, every step's window and the windows of the forwards (the user's
closure) and of every ``Tensor.backward`` call. A sample of the main thread inside a step and outside those
windows is the step's own work, classed by the library its instruction pointer lies in (:func:`dso_kind`):
``python`` is the interpreter (libpython: bytecode, attribute and dict work, reference counting, object
allocation, also when torch's bindings call into it), then torch's Python bindings, torch's native code,
the imbsam_fast extension, libc, the kernel (page faults, system calls). Work of other threads (OpenMP
workers) is not counted. The window timers add a few microseconds a step to the step's own Python.

With ``--patch PATCH.py`` a second arm, its optimizer and model given to ``patch(opt, model)``, steps the
same tail batches in turn with the first (A then B on even batches, B then A on odd ones): ``B - A`` is
printed with the counts' error. ``benchmarks/patches/`` holds an A/A patch and a known amount of Python.

``--regions`` also says where in the library the step's own samples fall: every function and method of the
core package's modules the target has imported (``imbsam_fast``, not ``imbsam_fast.apps``) and torch's
``record_function`` (which ``Optimizer.step``'s wrapper enters every step) is wrapped to write its call's
window, and a sample goes to the innermost call it lies in (:func:`by_region`): its self time. The wrappers
add their own Python to their callers, so take the step's total from a run without ``--regions``.

``--runs N`` repeats the process and pools the runs (mean, and the error from their spread). perf must be
installed and allowed to sample the process (``perf_event_paranoid`` <= 2 for a process of one's own).
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import python_share as share  # the sibling script (its directory is sys.path[0] when run)

TARGET = share.PRELUDE + """
import json, threading
now = time.monotonic_ns
inner = []
def windowed(fn):
    def timed(*args, **kwargs):
        t0 = now()
        try:
            return fn(*args, **kwargs)
        finally:
            inner.append((t0, now()))
    return timed
torch.Tensor.backward = windowed(torch.Tensor.backward)
user_forward = windowed(user_forward)
regions = []
if {regions}:
    import functools, types
    import torch.autograd.profiler as profiler
    def region(fn, name):
        @functools.wraps(fn)  # keeps marks such as ImbSAM.step's ``hooked``
        def timed(*args, **kwargs):
            t0 = now()
            try:
                return fn(*args, **kwargs)
            finally:
                regions.append((name, t0, now()))
        return timed
    modules = [m for name, m in list(sys.modules.items())
               if name.startswith("imbsam_fast.") and not name.startswith("imbsam_fast.apps")]
    wrapped = {{}}
    for mod in modules:
        for obj in list(vars(mod).values()):
            if isinstance(obj, type) and obj.__module__ == mod.__name__:
                for attr, raw in list(vars(obj).items()):
                    fn = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
                    if isinstance(fn, types.FunctionType):
                        timed = wrapped.setdefault(fn, region(fn, f"{{obj.__name__}}.{{attr}}"))
                        setattr(obj, attr, type(raw)(timed) if fn is not raw else timed)
            elif isinstance(obj, types.FunctionType) and obj.__module__ == mod.__name__:
                wrapped.setdefault(obj, region(obj, obj.__name__))
    for mod in modules:
        for attr, obj in list(vars(mod).items()):
            if isinstance(obj, types.FunctionType) and obj in wrapped:
                setattr(mod, attr, wrapped[obj])
    for attr in ("__enter__", "__exit__"):
        setattr(profiler.record_function, attr,
                region(getattr(profiler.record_function, attr), "torch record_function." + attr))
arms = []
for _ in range({arms}):
    step, opts = make_steppers(torch.device("cpu"), mask, methods=["{mode}"], width={width})
    arms.append((opts["{mode}"], step.models["{mode}"]))
if {patch!r}:
    spec = importlib.util.spec_from_file_location("patch", {patch!r})
    patch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(patch)
    patch.patch(*arms[-1])
for x, y in warm:
    for opt, model in arms:
        opt.step(closure_of(model, x, y), y)
inner.clear()
steps = []
for i, (x, y) in enumerate(data):
    for a in (range(len(arms)) if i % 2 == 0 else reversed(range(len(arms)))):
        opt, model = arms[a]
        closure = closure_of(model, x, y)
        t0 = now()
        opt.step(closure, y)
        steps.append((a, t0, now()))
with open({windows!r}, "w") as f:
    json.dump({{"tid": threading.get_native_id(), "steps": steps, "inner": inner, "regions": regions}}, f)
"""

INSIDE = "forward and backward"
PYTHON = "python"


def dso_kind(dso: str) -> str:
    """The class of a sample by the file its instruction pointer lies in (perf's ``dso`` field)."""
    name = dso.strip("()").rsplit("/", 1)[-1]
    if "libpython" in name or name.startswith("python"):
        return PYTHON
    if name.startswith("[kernel"):
        return "kernel"
    if name.startswith(("libc.so", "libc-", "ld-linux")):
        return "libc"
    if name.startswith("libtorch_python"):
        return "torch's Python bindings"
    if "imbsam_fast" in dso:
        return "imbsam_fast extension"
    if name.startswith(("libtorch", "libc10", "libgomp", "libiomp", "libmkl", "libsleef", "libopenblas")):
        return "torch native"
    return "other native"


def parse_samples(script_output: str) -> list[tuple[int, int, str]]:
    """``(tid, time in ns, dso)`` of each line of ``perf script -F tid,time,ip,dso --ns``
    (``  4242 50895.271529651:  7f3a12 (/usr/lib/libc.so.6)``)."""
    samples = []
    for line in script_output.splitlines():
        parts = line.split()
        if len(parts) < 3 or not parts[0].isdigit() or not parts[1].endswith(":"):
            continue
        seconds, _, nanos = parts[1][:-1].partition(".")
        if not (seconds.isdigit() and nanos.isdigit()):
            continue
        samples.append((int(parts[0]), int(seconds) * 1_000_000_000 + int(nanos.ljust(9, "0")),
                        parts[-1] if parts[-1].startswith("(") else "(unknown)"))
    return samples


def merged(windows: Iterable[Sequence[int]]) -> list[tuple[int, int]]:
    """Overlapping or nested ``(start, end)`` windows joined, sorted by start."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(map(tuple, windows)):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _inside(windows: list[tuple[int, int]], starts: list[int], t: int) -> Optional[int]:
    i = bisect.bisect_right(starts, t) - 1
    return i if i >= 0 and t < windows[i][1] else None


def _step_samples(samples: list[tuple[int, int, str]], windows: dict[str, Any]
                  ) -> Iterator[tuple[tuple[int, int, int], int, str, bool]]:
    """The main thread's samples inside a step: ``((start, end, arm) of the step, time, dso, within a forward
    or backward window)``. Samples of other threads, and outside every step (start-up, warm-up), are left out."""
    steps = sorted((t0, t1, arm) for arm, t0, t1 in windows["steps"])
    step_windows = [(t0, t1) for t0, t1, _ in steps]
    step_starts = [t0 for t0, _ in step_windows]
    inner = merged(windows["inner"])
    inner_starts = [t0 for t0, _ in inner]
    for tid, t, dso in samples:
        k = _inside(step_windows, step_starts, t) if tid == windows["tid"] else None
        if k is not None:
            yield steps[k], t, dso, _inside(inner, inner_starts, t) is not None


def classify(samples: list[tuple[int, int, str]], windows: dict[str, Any]) -> dict[int, collections.Counter]:
    """Per arm, the main thread's samples inside its steps: ``INSIDE`` within a forward or backward window,
    else by :func:`dso_kind`."""
    counts: dict[int, collections.Counter] = {arm: collections.Counter() for arm, _, _ in windows["steps"]}
    for (_, _, arm), _, dso, inside in _step_samples(samples, windows):
        counts[arm][INSIDE if inside else dso_kind(dso)] += 1
    return counts


def by_region(samples: list[tuple[int, int, str]], windows: dict[str, Any]) -> collections.Counter:
    """The step's own samples (main thread, inside a step, outside the forwards and backwards) by the innermost
    recorded call (``windows["regions"]``: ``(name, start, end)``, properly nested) they lie in, and their
    class: ``{(region, kind): samples}``; ``"(no region)"`` for those in none."""
    regions = sorted((t0, -t1, name) for name, t0, t1 in windows["regions"])
    starts = [t0 for t0, _, _ in regions]
    out: collections.Counter = collections.Counter()
    for (step_start, _, _), t, dso, inside in _step_samples(samples, windows):
        if inside:
            continue
        name = "(no region)"
        for i in range(bisect.bisect_right(starts, t) - 1, -1, -1):
            t0, neg_end, candidate = regions[i]
            if t0 < step_start:
                break
            if t < -neg_end:
                name = candidate
                break
        out[(name, dso_kind(dso))] += 1
    return out


def per_step(counts: collections.Counter, steps: int, period_ns: int) -> dict[str, tuple[float, float]]:
    """Each class's CPU time per step in ms, and its counting error (``sqrt(n)`` samples), from ``n`` samples
    of ``period_ns`` each over ``steps`` steps."""
    scale = period_ns / 1e6 / max(steps, 1)
    return {kind: (n * scale, math.sqrt(n) * scale) for kind, n in counts.items()}


def pooled(values: Sequence[float]) -> tuple[float, float]:
    """The mean of per-run values and its standard error from their spread (``nan`` for one run)."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan


def record(perf: str, script: Path, data: Path, period_us: int) -> str:
    """``script`` under ``perf record`` (CPU-clock timer, monotonic timestamps); returns ``perf script``'s
    samples."""
    rec = subprocess.run([perf, "record", "-q", "-e", "cpu-clock", "-c", str(period_us * 1000), "-k", "mono",
                          "-o", str(data), "--", sys.executable, str(script)], capture_output=True, text=True)
    if rec.returncode != 0:
        raise RuntimeError(f"perf record of the target failed ({rec.returncode}):\n{rec.stderr[-4000:]}")
    out = subprocess.run([perf, "script", "-i", str(data), "-F", "tid,time,ip,dso", "--ns"], check=True,
                         capture_output=True, text=True)
    return out.stdout


def report(arm_counts: collections.Counter, steps: int, wall_ms: float, period_ns: int) -> list[str]:
    """One line per class: samples, CPU ms per step with its counting error; the step's wall time first."""
    total = sum(arm_counts.values())
    lines = [f"{'samples':>8} {'ms/step':>8} {'+-':>6}  class (main thread; step wall {wall_ms:.1f} ms, "
             f"sampled CPU {total * period_ns / 1e6 / max(steps, 1):.1f} ms)"]
    for kind, (ms, err) in sorted(per_step(arm_counts, steps, period_ns).items(), key=lambda kv: -kv[1][0]):
        lines.append(f"{arm_counts[kind]:8d} {ms:8.3f} {err:6.3f}  {kind}")
    return lines


def region_report(counts: collections.Counter, steps: int, period_ns: int, top: int) -> list[str]:
    """The ``top`` regions by their self time per step (all arms' steps together): python and all classes."""
    scale = period_ns / 1e6 / max(steps, 1)
    total: collections.Counter = collections.Counter()
    python: collections.Counter = collections.Counter()
    for (name, kind), n in counts.items():
        total[name] += n
        if kind == PYTHON:
            python[name] += n
    lines = [f"{'python':>8} {'all':>8}  ms/step of the step's own work, by innermost library call"]
    for name, _ in python.most_common(top):
        lines.append(f"{python[name] * scale:8.3f} {total[name] * scale:8.3f}  {name}")
    rest = sum(python.values()) - sum(n for _, n in python.most_common(top))
    lines.append(f"{rest * scale:8.3f} {'':8}  (the other regions)")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", default="fast", choices=["fast", "exact"])
    ap.add_argument("--steps", type=int, default=150, help="tail batches (each stepped by every arm)")
    ap.add_argument("--warmup", type=int, default=5, help="steps run first and left out")
    ap.add_argument("--runs", type=int, default=1, help="processes recorded in turn, pooled at the end")
    ap.add_argument("--period-us", type=int, default=250, help="CPU time between samples, in microseconds")
    ap.add_argument("--patch", help="a Python file defining patch(opt, model): a second arm B with it")
    ap.add_argument("--regions", type=int, default=0, metavar="N",
                    help="also print the N library calls holding most of the step's own samples (their self time)")
    ap.add_argument("--width", type=int, default=16, help="ResNet-32's first-stage channels (16: the model)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.runs < 1 or args.period_us < 10:
        ap.error("--steps and --runs must be >= 1, --warmup >= 0 and --period-us >= 10")
    patch = str(Path(args.patch).resolve()) if args.patch else ""
    if patch and not Path(patch).is_file():
        ap.error(f"no patch file {args.patch}")
    perf = shutil.which("perf")
    if perf is None:
        print("python_share_perf: Linux perf is not installed", file=sys.stderr)
        return 2
    period_ns = args.period_us * 1000
    arms = 2 if patch else 1
    python_ms: dict[int, list[float]] = {a: [] for a in range(arms)}
    python_err: dict[int, list[float]] = {a: [] for a in range(arms)}
    with tempfile.TemporaryDirectory() as tmp:
        script, data, win = Path(tmp) / "target.py", Path(tmp) / "perf.data", Path(tmp) / "windows.json"
        script.write_text(TARGET.format(n=args.steps, warmup=args.warmup, mode=args.mode, width=args.width,
                                        threads=args.threads, arms=arms, patch=patch, windows=str(win),
                                        regions=bool(args.regions)))
        for i in range(args.runs):
            samples = parse_samples(record(perf, script, data, args.period_us))
            windows = json.loads(win.read_text())
            counts = classify(samples, windows)
            print(f"# run {i + 1} of {args.runs}: {args.mode} mode, {args.steps} steps with tail samples an arm "
                  f"(after {args.warmup} left out), BatchNorm ResNet-32 (width {args.width}) batch 64, "
                  f"{args.threads or 'default'} threads, a sample every {args.period_us} us of CPU", flush=True)
            for a in range(arms):
                walls = [t1 - t0 for arm, t0, t1 in windows["steps"] if arm == a]
                if arms > 1:
                    print(f"arm {'AB'[a]}" + (f" ({Path(patch).name})" if a else ""), flush=True)
                print("\n".join(report(counts[a], len(walls), statistics.fmean(walls) / 1e6, period_ns)),
                      flush=True)
                ms, err = per_step(counts[a], len(walls), period_ns).get(PYTHON, (0.0, 0.0))
                python_ms[a].append(ms)
                python_err[a].append(err)
            if args.regions:
                print("\n".join(region_report(by_region(samples, windows), len(windows["steps"]), period_ns,
                                               args.regions)), flush=True)
            if arms > 1:
                diff, err = python_ms[1][-1] - python_ms[0][-1], math.hypot(python_err[0][-1], python_err[1][-1])
                print(f"B - A python: {diff:+.3f} ms a step (+- {err:.3f})", flush=True)
    if args.runs > 1:
        for a in range(arms):
            mean, err = pooled(python_ms[a])
            print(f"# {'arm ' + 'AB'[a] + ': ' if arms > 1 else ''}python outside fwd/bwd over {args.runs} runs: "
                  f"{mean:.3f} ms a step (+- {err:.3f} from the runs' spread); per run "
                  + ", ".join(f"{ms:.3f}" for ms in python_ms[a]))
        if arms > 1:
            mean, err = pooled([b - a for a, b in zip(python_ms[0], python_ms[1])])
            print(f"# B - A python over {args.runs} runs: {mean:+.3f} ms a step (+- {err:.3f} from the spread)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
