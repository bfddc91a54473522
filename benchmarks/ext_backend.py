"""Optimizer-side time of one ImbSAM step with the C++ extension, the torch ops and the public code (CPU).

    python benchmarks/ext_backend.py [--reps 200 10]

One step here is what the optimizer does besides forward and backward: stash ``g_h``, norm +
perturb, restore + the base SGD step (momentum 0.9, weight decay 1e-3; no finite check, no
accumulation). Gradients are handed over fresh before each phase, outside the timed region. The
three methods run interleaved, rep by rep; the table gives the total over all reps and ratios of
totals. The byte floor is the ext backend's memory traffic (40 bytes per fp32 parameter: the norm
reads g; the perturbation reads w and g and writes the backup and w; the fused restore + SGD reads
the backup, g and the momentum buffer and writes w and the buffer) at the copy bandwidth measured in
the same run.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from imbsam_fast import ImbSAM
from imbsam_fast.apps.bench.overhead import SGD_KW, _Params, step_ours, step_reference
from imbsam_fast.apps.bench.shapes import numel, resnet32_shapes, transformer_shapes
from imbsam_fast.backends.extension import ext_available, ext_error
from imbsam_fast.reference import ReferenceImbSAM

EXT_BYTES_PER_PARAM = 40


def copy_bandwidth(n: int, reps: int = 5) -> float:
    """Bytes per second moved by ``dst.copy_(src)`` of ``n`` fp32 values (read + write counted)."""
    src, dst = torch.randn(n), torch.empty(n)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 8 * n / best


def run(name: str, shapes, reps: int, warmup: int = 3) -> dict[str, float]:
    device = torch.device("cpu")
    torch.manual_seed(0)
    models = {k: _Params(shapes, device) for k in ("public", "torch", "ext")}
    ref = ReferenceImbSAM(torch.optim.SGD(models["public"].parameters(), **SGD_KW), models["public"])
    opts = {k: ImbSAM(models[k].parameters(), torch.optim.SGD, nonfinite="none", backend=k, **SGD_KW)
            for k in ("torch", "ext")}
    totals = dict.fromkeys(("public", "torch", "ext"), 0.0)
    for i in range(warmup + reps):
        t = {"public": step_reference(ref, list(models["public"].parameters()), device)}
        for k, opt in opts.items():
            t[k] = step_ours(opt, list(models[k].parameters()), device, accumulate=False)
        if i >= warmup:
            for k in totals:
                totals[k] += t[k]
    n = numel(shapes)
    bw = copy_bandwidth(n)
    floor = EXT_BYTES_PER_PARAM * n / bw
    return {"name": name, "tensors": len(shapes), "params": n, "reps": reps, **totals, "floor": floor * reps,
            "bandwidth": bw}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, nargs=2, default=[200, 10], help="reps for ResNet-32 and for 42M")
    args = ap.parse_args(argv)
    if not ext_available():
        print(f"ext_backend: the C++ extension is not available ({ext_error()})")
        return 2
    rows = [run("ResNet-32", resnet32_shapes(), args.reps[0]),
            run("transformer 6x768", transformer_shapes(), args.reps[1], warmup=1)]
    print(f"# optimizer-side time per step, total over reps (cpu: {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__})")
    print("| model | tensors | params | reps | public (s) | torch (s) | ext (s) | torch / ext | public / ext | "
          "ext / byte floor | copy GB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['tensors']} | {r['params'] / 1e6:.2f}M | {r['reps']} | {r['public']:.3f} | "
              f"{r['torch']:.3f} | {r['ext']:.3f} | {r['torch'] / r['ext']:.2f}x | {r['public'] / r['ext']:.2f}x | "
              f"{r['ext'] / r['floor']:.2f}x | {r['bandwidth'] / 1e9:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
