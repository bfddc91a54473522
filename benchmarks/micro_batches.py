"""Activation memory and step time of ``micro_batches=k`` (ResNet-32, 32x32, CIFAR-100-LT labels, eta 20).

    python benchmarks/micro_batches.py [--batch 128] [--ks 1 4] [--steps 10] [--device cpu|cuda]

Memory: on CUDA the peak allocated memory of a step (``torch.cuda.max_memory_allocated``);
on the CPU the peak resident memory of a fresh process running only that ``(mode, k)``
(``ru_maxrss``); on every device the bytes that the largest single forward saves for its
backward (the activation memory, counted with ``saved_tensors_hooks``). Time: the total over
``--steps`` steps after one warm-up step, every ``k`` in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from imbsam_fast import ImbSAM
from imbsam_fast.apps.bench.step_time import cifar100_lt_batches
from imbsam_fast.apps.models import resnet32


def measure(k: int, mode: str, batch: int, steps: int, device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    model = resnet32(100).to(device)
    batches, tail = cifar100_lt_batches(steps + 1, batch, 20.0, device)
    opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=0.01, momentum=0.9, tail_mask=tail.to(device), mode=mode,
                 model=model)
    saved = [0]

    def closure_for(x, y):
        def closure(index=None):
            sizes = []

            def pack(t):
                sizes.append(t.numel() * t.element_size())
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                xs, ys = (x, y) if index is None else (x[index], y[index])
                out = F.cross_entropy(model(xs), ys, reduction="none")
            saved[0] = max(saved[0], sum(sizes))
            return out

        return closure

    def step(i):
        x, y = batches[i]
        opt.step(closure_for(x, y), y, micro_batches=k)

    step(0)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(1, steps + 1):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"saved_mib": saved[0] / 2 ** 20, "peak_mib": peak, "seconds": elapsed}


def measure_isolated(k: int, mode: str, batch: int, steps: int, device: torch.device) -> dict[str, float]:
    """:func:`measure` in a fresh process, so that the CPU's peak resident memory is this run's alone."""
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(k), "--batch", str(batch), "--steps",
                          str(steps), "--device", str(device)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--modes", default="exact,fast")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        mode, k = args.child
        print(json.dumps(measure(int(k), mode, args.batch, args.steps, torch.device(args.device))))
        return 0
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"# micro-batches: ResNet-32, batch {args.batch}, eta 20; {device.type} ({name}), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    peak = "peak allocated (MiB)" if device.type == "cuda" else "peak resident memory of the process (MiB)"
    print(f"| mode | k | activations saved by one forward (MiB) | {peak} | "
          f"total of {args.steps} steps (s) | time vs k=1 |")
    print("|---|---|---|---|---|---|")
    for mode in args.modes.split(","):
        base = None
        for k in args.ks:
            r = measure_isolated(k, mode, args.batch, args.steps, device)
            base = r["seconds"] if base is None else base
            print(f"| {mode} | {k} | {r['saved_mib']:.1f} | {r['peak_mib']:.1f} | {r['seconds']:.2f} | "
                  f"{r['seconds'] / base:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
