"""Where ImbSAM.step's time goes outside the forwards and backwards: Python, torch's native code, libc.

Samples fast- or exact-mode steps of the BatchNorm ResNet-32 on tail batches with py-spy in native mode
(interpreter frames and native frames merged), then classifies every sample taken inside ``ImbSAM.step`` by
its innermost frame: a Python line or the interpreter (Python), libc (allocation, frees, copies), or any other
native library (torch operators, OpenMP, math). Samples inside the closure's forwards and inside ``backward``
are counted apart. py-spy is not a dependency: ``pip install py-spy`` first (it needs ptrace rights).

    python benchmarks/python_share.py [--mode fast|exact] [--steps 20] [--warmup 5] [--runs 1] [--rate 100]
                                      [--width 16] [--threads N] [--no-book]

``--warmup`` steps run first, under the sampler, and are left out of every count: the first steps build the
layouts, the fused plans and the extension's book, which a long run pays once. ``--runs N`` samples N
processes in turn and pools them: processes differ by more than their sampling error, so the pooled figure's
error comes from the runs' spread (:func:`pool`).

The same steps first run without the sampler, and their time per step turns each share into milliseconds.
The sampler stops the process for every sample: at 100 Hz with native frames, a full ResNet-32 step took
1.70 s under it against 0.6-0.7 s without, and a third of the samples repeat the one before. So samples are
not independent, the errors printed here (from the counts) are lower bounds, and the shares may be biased
(``benchmarks/RESULTS.md``, ninth session).
py-spy also drops libpython's frames, so the interpreter's work under a native frame (torch's bindings
parsing arguments, tensors' wrappers being freed) counts as native here. ``python_share_perf.py`` (Linux
perf's timer samples) stops nothing and counts it as Python: 1.76 ms a step (seven runs) where one run of
this gave 1.28 on the same code and VM (tenth session). Use this sampler for lines, that one for the time.
``--width 1 --threads 1`` keeps ResNet-32's 95 tensors and 31 BatchNorm layers with almost no arithmetic
(8x8 inputs): the Python is then a few percent of the step, and a few hundred steps give a few hundred
samples of it. py-spy does not see inside libpython here, so "Python" holds the interpreter's own work
(attribute and dict operations, allocation, reference counting) as well as the lines.
"""

from __future__ import annotations

import argparse
import collections
import math
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

PRELUDE = """
import importlib.util, sys, time, torch, torch.nn.functional as F
from imbsam_fast.apps.bench.step_time import cifar100_lt_batches, make_steppers
if {threads} > 0:
    torch.set_num_threads({threads})
data, mask = cifar100_lt_batches(({n} + {warmup}) * 2 + 20, 64, 20, torch.device("cpu"), 1)
data = [(x if {width} >= 16 else x[:, :, :8, :8], y) for x, y in data if int(mask[y].sum()) > 0][:{n} + {warmup}]
warm, data = data[:{warmup}], data[{warmup}:]
def user_forward(model, x, y, index):
    return F.cross_entropy(model(x if index is None else x[index]), y if index is None else y[index],
                           reduction="none")
def closure_of(model, x, y):
    def closure(index=None):
        return user_forward(model, x, y, index)
    return closure
"""
"""The targets' common start: the tail batches (``warm`` first, then ``data``) and the user's closure."""

TARGET = PRELUDE + """
step, opts = make_steppers(torch.device("cpu"), mask, methods=["{mode}"], width={width})
opt, model = opts["{mode}"], step.models["{mode}"]
if {no_book}:
    opt._book = None
def warm_up():
    for x, y in warm:
        opt.step(closure_of(model, x, y), y)
warm_up()
t0 = time.perf_counter()
for x, y in data:
    opt.step(closure_of(model, x, y), y)
print((time.perf_counter() - t0) / len(data))
"""


def classify(raw: Path, within: Optional[str] = None) -> tuple[int, collections.Counter]:
    """Samples inside ImbSAM.step, and their classes; with ``within``, only those under a frame of that
    function (the arms of ``python_share_paired.py``)."""
    counts: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, cnt = line.rpartition(" ")
        n, frames = int(cnt), stack.split(";")
        if not any(f.startswith("ImbSAM.step ") for f in frames) or any(f.startswith("warm_up (") for f in frames):
            continue
        if within is not None and not any(f.startswith(within + " (") for f in frames):
            continue
        total += n
        # py-spy names methods by class ("Tensor.backward"); older releases did not.
        # The user's closure (its own frame too) is the forward, not the library.
        if any(f.startswith(("closure (", "user_forward ", "Tensor.backward (", "backward (torch/_tensor.py"))
               or "run_backward" in f for f in frames):
            counts["forward and backward"] += n
            continue
        base = any(f.startswith(("SGD.step ", "SGD._init_group")) or "_single_tensor_sgd" in f for f in frames)
        counts[("base optimizer step: " if base else "ImbSAM outside fwd/bwd: ") + frame_kind(frames[-1])] += n
    return total, counts


def frame_kind(frame: str) -> str:
    """``python`` for a Python line (``f (x.py:12)``, ``<module> (<frozen ...>:3)``) or libpython, ``libc``,
    else ``native``: a shared library, or C++ with line tables (``sgd_loop (param_ops.cpp:142)``,
    ``std::fma (cmath:1399)``), which must not pass for Python."""
    m = re.search(r"\(([^()]*)\)$", frame)
    where = m.group(1) if m else frame
    if "libpython" in where or re.search(r"\.py:\d+$", where) or where.startswith("<"):
        return "python"
    return "libc" if "libc.so" in where else "native"


def report(total: int, counts: collections.Counter, step_seconds: float) -> list[str]:
    """One line per class: samples, share of the step's samples, and that share of the unsampled step in ms."""
    lines = [f"{'samples':>7} {'share':>7} {'ms/step':>8}  class"]
    for kind, n in counts.most_common():
        lines.append(f"{n:7d} {100 * n / max(total, 1):6.2f}% {ms_per_step(n, total, step_seconds):8.3f}  {kind}")
    return lines


def ms_per_step(samples: int, total: int, step_seconds: float) -> float:
    """A class's share of the step's samples, times the unsampled step, in ms."""
    return samples / max(total, 1) * step_seconds * 1e3


PYTHON = "ImbSAM outside fwd/bwd: python"


def pool(runs: list[tuple[int, collections.Counter, float]], kind: str = PYTHON) -> dict[str, Any]:
    """``kind``'s ms per step over several runs (each ``(samples in the step, classes, unsampled step in s)``).

    Every run is one process, and runs differ by more than their sampling error (the machine's load, and
    samples that are not independent, see the module's docstring): the mean is taken over runs, with the
    standard error from their spread (``stdev / sqrt(runs)``), beside the error sampling alone would give
    (``mean / sqrt(samples)``).
    """
    per_run = [ms_per_step(counts[kind], total, step) for total, counts, step in runs]
    samples = sum(counts[kind] for _, counts, _ in runs)
    mean = statistics.fmean(per_run)
    spread = statistics.stdev(per_run) / math.sqrt(len(per_run)) if len(per_run) > 1 else math.nan
    return {"per_run_ms": per_run, "samples": samples, "mean_ms": mean, "stderr_ms": spread,
            "sampling_stderr_ms": mean / math.sqrt(samples) if samples else math.nan}


def run_twice(spy: str, script: Path, raw: Path, rate: int) -> list[str]:
    """``script`` without the sampler (returns what it printed: its step times), then under py-spy with
    native frames at ``rate`` Hz, its samples written to ``raw``."""
    plain = subprocess.run([sys.executable, str(script)], check=True, capture_output=True, text=True)
    subprocess.run([spy, "record", "--native", "-r", str(rate), "-f", "raw", "-o", str(raw), "--",
                    sys.executable, str(script)], check=True, capture_output=True)
    return plain.stdout.split()


def measure(spy: str, script: Path, raw: Path, rate: int) -> tuple[int, collections.Counter, float]:
    """One run: the steps without the sampler (the step time), then under py-spy (the classes)."""
    step_seconds = float(run_twice(spy, script, raw, rate)[-1])
    total, counts = classify(raw)
    return total, counts, step_seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", default="fast", choices=["fast", "exact"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5,
                    help="steps run first and left out (layouts, plans and the extension's first calls)")
    ap.add_argument("--runs", type=int, default=1, help="processes sampled in turn, pooled at the end")
    ap.add_argument("--rate", type=int, default=100, help="samples per second (native unwinding is costly)")
    ap.add_argument("--width", type=int, default=16, help="ResNet-32's first-stage channels (16: the model)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--raw", help="also keep py-spy's raw samples in this file (run i > 1: suffix .i)")
    ap.add_argument("--no-book", action="store_true", help="the Python phases (the extension's ParamBook off)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.runs < 1 or args.rate < 1:
        ap.error("--steps, --runs and --rate must be >= 1 and --warmup >= 0")
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        print("python_share: py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 2
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        script, raw = Path(tmp) / "target.py", Path(tmp) / "raw.txt"
        script.write_text(TARGET.format(n=args.steps, warmup=args.warmup, mode=args.mode, width=args.width,
                                       threads=args.threads, no_book=args.no_book))
        for i in range(args.runs):
            total, counts, step_seconds = measure(spy, script, raw, args.rate)
            runs.append((total, counts, step_seconds))
            if args.raw:
                shutil.copyfile(raw, args.raw if i == 0 else f"{args.raw}.{i + 1}")
            print(f"# run {i + 1} of {args.runs}: {args.mode} mode, {args.steps} steps with tail samples (after "
                  f"{args.warmup} left out), BatchNorm ResNet-32 (width {args.width}) batch 64, "
                  f"{args.threads or 'default'} threads; {total} samples inside ImbSAM.step; unsampled step "
                  f"{step_seconds * 1e3:.1f} ms", flush=True)
            print("\n".join(report(total, counts, step_seconds)), flush=True)
    if args.runs > 1:
        p = pool(runs)
        print(f"# python outside fwd/bwd over {args.runs} runs: {p['mean_ms']:.3f} ms a step "
              f"(+- {p['stderr_ms']:.3f} from the runs' spread, +- {p['sampling_stderr_ms']:.3f} from "
              f"{p['samples']} samples alone); per run " + ", ".join(f"{ms:.3f}" for ms in p["per_run_ms"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
