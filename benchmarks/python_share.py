"""Where ImbSAM.step's time goes outside the forwards and backwards: Python, torch's native code, libc.

Samples a few fast- or exact-mode steps of the BatchNorm ResNet-32 with py-spy in native mode (interpreter
frames and native frames merged), then classifies every sample taken inside ``ImbSAM.step`` by its innermost
frame: a Python line or the interpreter (Python), libc (allocation, frees, copies), or any other native
library (torch operators, OpenMP, math). Samples inside the closure's forwards and inside ``backward`` are
counted apart. py-spy is not a dependency: ``pip install py-spy`` first (it needs ptrace rights).

    python benchmarks/python_share.py [--mode fast|exact] [--steps 20] [--rate 250]

Multiply a share by the step time measured without the sampler (``benchmarks/step_time.py``) for ms per
step; the sampler slows the process down about uniformly, so shares carry over, absolute times do not.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

TARGET = """
import torch, torch.nn.functional as F
from imbsam_fast.apps.bench.step_time import cifar100_lt_batches, make_steppers
data, mask = cifar100_lt_batches({n} * 2, 64, 20, torch.device("cpu"), 1)
data = [(x, y) for x, y in data if int(mask[y].sum()) > 0][:{n}]
step, opts = make_steppers(torch.device("cpu"), mask, methods=["{mode}"])
opt, model = opts["{mode}"], step.models["{mode}"]
def user_forward(x, y, index):
    return F.cross_entropy(model(x if index is None else x[index]), y if index is None else y[index],
                           reduction="none")
for x, y in data:
    opt.step(lambda index=None, x=x, y=y: user_forward(x, y, index), y)
"""


def classify(raw: Path) -> tuple[int, collections.Counter]:
    """Samples inside ImbSAM.step, and their classes."""
    counts: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, cnt = line.rpartition(" ")
        n, frames = int(cnt), stack.split(";")
        if not any(f.startswith("ImbSAM.step ") for f in frames):
            continue
        total += n
        # py-spy names methods by class ("Tensor.backward"); older releases did not.
        if any(f.startswith(("user_forward ", "Tensor.backward (", "backward (torch/_tensor.py"))
               or "run_backward" in f for f in frames):
            counts["forward and backward"] += n
            continue
        base = any(f.startswith(("SGD.step ", "SGD._init_group")) or "_single_tensor_sgd" in f for f in frames)
        m = re.search(r"\(([^()]*)\)$", frames[-1])
        where = m.group(1) if m else frames[-1]
        native = where == "?" or ".so" in where
        kind = "python" if (not native or "libpython" in where) else "libc" if "libc.so" in where else "native"
        counts[("base optimizer step: " if base else "ImbSAM outside fwd/bwd: ") + kind] += n
    return total, counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", default="fast", choices=["fast", "exact"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rate", type=int, default=250)
    args = ap.parse_args(argv)
    spy = shutil.which("py-spy")
    if spy is None:
        print("python_share: py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        script, raw = Path(tmp) / "target.py", Path(tmp) / "raw.txt"
        script.write_text(TARGET.format(n=args.steps, mode=args.mode))
        subprocess.run([spy, "record", "--native", "-r", str(args.rate), "-f", "raw", "-o", str(raw), "--",
                        sys.executable, str(script)], check=True, capture_output=True)
        total, counts = classify(raw)
    print(f"# {args.mode} mode, {args.steps} steps with tail samples, BatchNorm ResNet-32 batch 64; "
          f"{total} samples inside ImbSAM.step")
    for kind, n in counts.most_common():
        print(f"{n:7d} {100 * n / max(total, 1):7.2f}%  {kind}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
