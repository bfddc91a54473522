"""The library's Python in a fast step, two arms paired in one process: A as it is, B with a patch.

    python benchmarks/python_share_paired.py PATCH.py [--steps 150] [--warmup 5] [--runs 1] [--rate 100]
                                                      [--width 16] [--threads N]

``PATCH.py`` defines ``patch(opt, model)``, applied to arm B's optimizer and model only (set instance
attributes, register step hooks). Both arms are fast-mode ImbSAM on copies of one BatchNorm ResNet-32, and
they step on the same tail batches in turn (A then B on even batches, B then A on odd ones), each from its
own function, so py-spy's samples split by arm (:func:`python_share.classify` with ``within``). A machine
that runs slower or faster for a while is then common to both arms, which ``python_share.py --runs`` cannot
give between processes. The difference ``B - A`` in ms a step is printed with the sampling error of the two
counts, ``sqrt(a^2 / n_a + b^2 / n_b)``: a lower bound, since the samples are not independent (see
``python_share.py``).

``benchmarks/patches/`` holds two patches that check the instrument: ``nothing.py`` (an A/A run: the
difference should come out near 0) and ``busy_after_backward.py`` (about 0.3 ms of pure Python a step).
On the 2-core Xeon of ``benchmarks/RESULTS.md`` (ninth session, full ResNet-32, 150 tail batches, 100 Hz)
the A/A run gave +0.68 +- 0.26 ms and the busy patch +0.03 +- 0.33 ms: there the sampler cannot resolve
differences of this size.
``python_share_perf.py --patch PATCH.py`` pairs the same arms under Linux perf, which stops nothing: on a
2-core EPYC it gave +0.03 +- 0.10 ms for the A/A pair and +0.42 +- 0.10 ms for the busy patch (tenth
session).
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import python_share as share  # the sibling script (its directory is sys.path[0] when run)

TARGET = share.PRELUDE + """
arms = []
for _ in range(2):
    step, opts = make_steppers(torch.device("cpu"), mask, methods=["fast"], width={width})
    arms.append((opts["fast"], step.models["fast"]))
spec = importlib.util.spec_from_file_location("patch", {patch!r})
patch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(patch)
patch.patch(*arms[1])
def arm_a(x, y):
    opt, model = arms[0]
    opt.step(closure_of(model, x, y), y)
def arm_b(x, y):
    opt, model = arms[1]
    opt.step(closure_of(model, x, y), y)
def warm_up():
    for x, y in warm:
        arm_a(x, y)
        arm_b(x, y)
warm_up()
spent = {{arm_a: 0.0, arm_b: 0.0}}
for i, (x, y) in enumerate(data):
    for arm in ((arm_a, arm_b) if i % 2 == 0 else (arm_b, arm_a)):
        t0 = time.perf_counter()
        arm(x, y)
        spent[arm] += time.perf_counter() - t0
print(spent[arm_a] / len(data), spent[arm_b] / len(data))
"""


def compare(a: tuple[int, int, float], b: tuple[int, int, float]) -> dict[str, float]:
    """Each arm's ``(samples in its steps, Python samples, unsampled step in s)`` -> ms a step and ``B - A``
    with its sampling error."""
    ms_a, ms_b = share.ms_per_step(a[1], a[0], a[2]), share.ms_per_step(b[1], b[0], b[2])
    err = math.sqrt((ms_a ** 2 / a[1] if a[1] else 0.0) + (ms_b ** 2 / b[1] if b[1] else 0.0))
    return {"a_ms": ms_a, "b_ms": ms_b, "diff_ms": ms_b - ms_a, "diff_err_ms": err}


def measure(spy: str, script: Path, raw: Path, rate: int) -> dict[str, Any]:
    """One process without the sampler (each arm's step time), one under py-spy (each arm's samples)."""
    step_a, step_b = map(float, share.run_twice(spy, script, raw, rate)[-2:])
    arms = {}
    for name, step in (("arm_a", step_a), ("arm_b", step_b)):
        total, counts = share.classify(raw, within=name)
        arms[name] = (total, counts[share.PYTHON], step)
    return {"arms": arms, **compare(arms["arm_a"], arms["arm_b"])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("patch", help="a Python file defining patch(opt, model), applied to arm B")
    ap.add_argument("--steps", type=int, default=150, help="tail batches, each stepped by both arms")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--rate", type=int, default=100)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    patch = Path(args.patch).resolve()
    if not patch.is_file():
        ap.error(f"no patch file {args.patch}")
    if args.steps < 1 or args.warmup < 0 or args.runs < 1 or args.rate < 1:
        ap.error("--steps, --runs and --rate must be >= 1 and --warmup >= 0")
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        print("python_share_paired: py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        script, raw = Path(tmp) / "target.py", Path(tmp) / "raw.txt"
        script.write_text(TARGET.format(n=args.steps, warmup=args.warmup, width=args.width, threads=args.threads,
                                        patch=str(patch)))
        for i in range(args.runs):
            r = measure(spy, script, raw, args.rate)
            (ta, na, sa), (tb, nb, sb) = r["arms"]["arm_a"], r["arms"]["arm_b"]
            print(f"# run {i + 1} of {args.runs}: {patch.name}, {args.steps} tail batches a arm (after {args.warmup}),"
                  f" width {args.width}, {args.threads or 'default'} threads", flush=True)
            print(f"A: {na} Python samples of {ta}, step {sa * 1e3:.1f} ms -> {r['a_ms']:.3f} ms a step", flush=True)
            print(f"B: {nb} Python samples of {tb}, step {sb * 1e3:.1f} ms -> {r['b_ms']:.3f} ms a step", flush=True)
            print(f"B - A: {r['diff_ms']:+.3f} ms a step (+- {r['diff_err_ms']:.3f} from sampling)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
