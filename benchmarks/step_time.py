"""End-to-end step time (ResNet-32, batch 64, CIFAR-100-LT labels): totals over many batches, ratios to SGD.

    python benchmarks/step_time.py [--eta 20 100] [--batches 50] [--device cpu|cuda] [--norm batch|group]
                                   [--methods sgd,fast] [--no-tail] [--overhead] [--keep-freed-memory]

``--methods`` also takes ``sgd-b``, a second SGD run as a control (its ratio is the harness's noise).
``--keep-freed-memory`` stops glibc from handing freed blocks back to the kernel, so that no step pays
page faults for another's frees (``imbsam_fast.apps.bench.allocator``); the ``faults`` column shows them.

The harness lives in ``imbsam_fast.apps.bench.step_time`` (also run by ``imbsam-fast bench``).
"""

from __future__ import annotations

import argparse
import platform

import torch

from imbsam_fast.apps.bench.allocator import keep_freed_memory
from imbsam_fast.apps.bench.step_time import METHODS, host_overhead, report, run, structural_host_time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eta", type=float, nargs="+", default=[20, 100])
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--norm", default="batch", choices=["batch", "group"], help="ResNet-32's normalization layers")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--overhead", action="store_true", help="also measure the host time of exact and fast steps")
    ap.add_argument("--no-tail", action="store_true",
                    help="batches with no tail sample only (what fast mode's plain step costs against SGD)")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="glibc malloc keeps freed memory (no page faults for reused activations)")
    args = ap.parse_args(argv)
    malloc = "default malloc"
    if args.keep_freed_memory:
        malloc = "malloc keeps freed memory" if keep_freed_memory() else "default malloc (mallopt unavailable)"
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"# ResNet-32 ({args.norm} norm), 32x32, batch 64, CIFAR-100-LT labels; {device.type} ({name}), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {malloc}")
    for eta in args.eta:
        res = run(eta, args.batches, device, norm=args.norm, methods=args.methods.split(","), progress=True,
                  head_only=args.no_tail)
        print()
        print("\n".join(report(res)))
        if args.overhead:
            for m in ("exact", "fast"):
                o = host_overhead(m, eta, 20, device, norm=args.norm)
                print(f"{m}: ImbSAM.step outside forward/backward {o['outside_ms']:.2f} ms/step (profiler): "
                      f"operators and base step {o['ops_ms']:.2f} ms, the rest {o['python_ms']:.2f} ms "
                      f"({o['steps']:.0f} steps, {o['tail_batches']:.0f} with tail samples)")
            host = structural_host_time(["sgd", "exact", "fast"], eta, 60)
            print("host time outside forward/backward on ResNet-32's structure with width 1 (median ms, tail "
                  "batches): " + ", ".join(f"{m} {v:.2f}" for m, v in host.items()) + " (sgd: zero_grad + step)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
