"""The extension's class-masked cross-entropy against torch's two masked losses, forward + backward.

Times ``class_weighted_cross_entropy(..., backend="ext")`` (one C++ op, autograd in C++) and
``backend="torch"`` (``F.cross_entropy(reduction="none")`` and two weighted sums), interleaved, the
total over ``--reps`` calls of each, on the CPU (or ``--device cuda``, where the CUDA op runs; there a
synchronize closes each timing).

    python benchmarks/ext_cross_entropy.py [--device cpu] [--reps 300]
"""

from __future__ import annotations

import argparse
import time

import torch

from imbsam_fast import ClassWeights
from imbsam_fast.backends.loss_dispatch import ext_ce_covers
from imbsam_fast.losses import class_weighted_cross_entropy

SHAPES = [(64, 10), (128, 100), (256, 1000), (64, 8142)]


def time_pair(batch: int, classes: int, device: torch.device, dtype: torch.dtype, reps: int) -> dict[str, float]:
    """Total seconds of ``reps`` forward + backward calls per backend (interleaved call by call)."""
    gen = torch.Generator().manual_seed(batch * classes)
    x = torch.randn(batch, classes, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    y = torch.randint(0, classes, (batch,), generator=gen).to(device)
    tail = torch.rand(classes, generator=gen) < 0.3
    weights = ClassWeights((~tail).float(), tail.float() * 2.0).to(device)
    totals = {"ext": 0.0, "torch": 0.0}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(reps + 5):
        for name in totals:
            sync()
            t0 = time.perf_counter()
            head, tail_loss = class_weighted_cross_entropy(x, y, weights, backend=name)
            (head + tail_loss).backward()
            sync()
            if i >= 5:
                totals[name] += time.perf_counter() - t0
            x.grad = None
    return totals


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if not ext_ce_covers(torch.empty(0, device=device)):
        print(f"ext_cross_entropy: the extension has no cross-entropy kernel for {device.type}")
        return 2
    print(f"# {args.reps} forward + backward calls each, {device.type}, {args.dtype}, torch {torch.__version__}")
    print(f"{'B x C':>12}{'ext us':>10}{'torch us':>10}{'torch / ext':>13}")
    for batch, classes in SHAPES:
        t = time_pair(batch, classes, device, dtype, args.reps)
        print(f"{f'{batch}x{classes}':>12}{t['ext'] / args.reps * 1e6:>10.1f}{t['torch'] / args.reps * 1e6:>10.1f}"
              f"{t['torch'] / t['ext']:>12.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
