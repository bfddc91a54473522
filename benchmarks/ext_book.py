"""The extension's ParamBook against the Python phases: host time of a fast step outside its forwards and backwards.

Two fast-mode optimizers (``backend="ext"``, the default on the CPU) on two copies of the BatchNorm
ResNet-32, one with the ParamBook (the phases' gradient moves and kernel calls in C++, see
``imbsam_fast/backends/ext_book.py``) and one with it switched off, step the same batches, alternating
which goes first. Each step's host time outside its forwards and backwards is taken as in
``step_time.py --overhead`` (the step's wall time minus the closure's and the backwards' windows);
batches with a tail sample count, after 3 warm-up batches.

    python benchmarks/ext_book.py [--batches 150] [--width 1] [--threads 1]

``--width 1`` keeps ResNet-32's 95 tensors and 31 BatchNorm layers with almost no arithmetic (8x8 inputs):
what is left is the per-step host cost that a launch-bound GPU step pays too.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from imbsam_fast.apps.bench.step_time import _host_timer, cifar100_lt_batches


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=150)
    ap.add_argument("--width", type=int, default=1, help="ResNet-32's first-stage channels (16: the model)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eta", type=float, default=20.0, help="imbalance ratio of the CIFAR-100-LT labels")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data, mask = cifar100_lt_batches(args.batches + 3, 64, args.eta, torch.device("cpu"), 2)
    if args.width < 16:
        data = [(x[:, :, :8, :8], y) for x, y in data]
    runners = {"book": _host_timer("fast", mask, args.width), "python phases": _host_timer("fast", mask, args.width,
                                                                                            book=False)}
    times: dict[str, list[float]] = {k: [] for k in runners}
    for i, (x, y) in enumerate(data):
        for k in (list(runners) if i % 2 == 0 else list(runners)[::-1]):
            seconds = runners[k](x, y)
            if i >= 3 and bool(mask[y].any()):
                times[k].append(seconds)
    n = len(times["book"])
    print(f"# fast mode, BatchNorm ResNet-32 width {args.width}, batch 64, {args.threads} threads, {n} tail batches "
          f"of {args.batches}; host ms per step outside the forwards and backwards")
    print(f"{'phases':<14} {'total ms':>9} {'mean':>7} {'median':>7}")
    for k, v in times.items():
        print(f"{k:<14} {sum(v) * 1e3:9.1f} {statistics.mean(v) * 1e3:7.3f} {statistics.median(v) * 1e3:7.3f}")
    print(f"book / python phases: {sum(times['book']) / sum(times['python phases']):.3f}x (totals)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
