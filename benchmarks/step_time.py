"""End-to-end step time: SGD, SAM, the public ImbSAM code, exact mode and fast mode.

fast: fast mode's default BatchNorm treatment (replayed statistics in the
tail pass at w, a ghost batch of 8 head samples in the pass at w + e);
fast-ghost: a ghost batch of 8 in both tail passes; fast-g16: a ghost batch of
16 in both; fast-replay: replayed statistics in both (no ghost samples).

ResNet-32 at 32x32 input, batch 64, labels drawn from the CIFAR-100-LT profile
(imbalance 100: n_k = 500 * 100^(-k/99)); a class is tail when n_k < eta.
Methods run interleaved on the same batches; each row is the median step time
after warm-up, and the ratio to SGD measured in the same run.

    python benchmarks/step_time.py [--eta 20] [--reps 15] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from imbsam_fast import ImbSAM, sam_weights, tail_class_mask  # noqa: E402
from imbsam_fast.apps.data.long_tail import exponential_profile  # noqa: E402
from imbsam_fast.apps.models import resnet32  # noqa: E402
from imbsam_fast.reference import ReferenceImbSAM, reference_train_step  # noqa: E402

KW = dict(lr=0.01, momentum=0.9, weight_decay=1e-3)
METHODS = ("sgd", "sam", "public", "exact", "fast", "fast-ghost", "fast-g16", "fast-replay")


def cifar100_lt_batches(n: int, batch: int, eta: float, device, seed: int = 0):
    counts = exponential_profile(500, 100, 100)
    probs = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        y = torch.multinomial(probs, batch, replacement=True, generator=gen)
        x = torch.randn(batch, 3, 32, 32, generator=gen)
        out.append((x.to(device), y.to(device)))
    return out, tail_class_mask(counts, eta)


def make_steppers(device, tail_mask, norm: str = "batch"):
    torch.manual_seed(0)
    base = resnet32(norm=norm).to(device)
    models = {m: resnet32(norm=norm).to(device) for m in METHODS}
    for m in models.values():
        m.load_state_dict(base.state_dict())
    opts = {
        "sgd": torch.optim.SGD(models["sgd"].parameters(), **KW),
        "sam": ImbSAM(models["sam"].parameters(), torch.optim.SGD, class_weights=sam_weights(100), **KW),
        "public": ReferenceImbSAM(torch.optim.SGD(models["public"].parameters(), **KW), models["public"]),
        "exact": ImbSAM(models["exact"].parameters(), torch.optim.SGD, tail_mask=tail_mask, **KW),
        "fast": ImbSAM(models["fast"].parameters(), torch.optim.SGD, tail_mask=tail_mask, mode="fast",
                       model=models["fast"], **KW),
        "fast-ghost": ImbSAM(models["fast-ghost"].parameters(), torch.optim.SGD, tail_mask=tail_mask, mode="fast",
                             model=models["fast-ghost"], fast_bn="ghost", **KW),
        "fast-g16": ImbSAM(models["fast-g16"].parameters(), torch.optim.SGD, tail_mask=tail_mask, mode="fast",
                           model=models["fast-g16"], fast_bn="ghost", ghost_batch=16, **KW),
        "fast-replay": ImbSAM(models["fast-replay"].parameters(), torch.optim.SGD, tail_mask=tail_mask, mode="fast",
                              model=models["fast-replay"], fast_bn="replay", **KW),
    }
    mask_dev = tail_mask.to(device)

    def step(method, x, y):
        model, opt = models[method], opts[method]
        if method == "sgd":
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        elif method == "public":
            reference_train_step(model, opt, x, y, mask_dev)
        else:
            opt.step(lambda index=None: F.cross_entropy(model(x if index is None else x[index]),
                                                        y if index is None else y[index], reduction="none"), y)

    return step


def run(eta: float, reps: int, device, warmup: int = 2, norm: str = "batch"):
    batches, tail_mask = cifar100_lt_batches(reps + warmup, 64, eta, device)
    step = make_steppers(device, tail_mask, norm)
    times = {m: [] for m in METHODS}
    tails = []
    for i, (x, y) in enumerate(batches):
        tails.append(int(tail_mask.to(y.device)[y].sum()))
        for m in METHODS:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(m, x, y)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[m].append(time.perf_counter() - t0)
    med = {m: statistics.median(v) for m, v in times.items()}
    return med, tails[warmup:], times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eta", type=float, nargs="+", default=[20, 100])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--norm", default="batch", choices=["batch", "group"], help="ResNet-32's normalization layers")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"# ResNet-32 ({args.norm} norm), 32x32, batch 64, CIFAR-100-LT labels; {device.type} ({name}), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; median of {args.reps} interleaved steps")
    for eta in args.eta:
        med, tails, _ = run(eta, args.reps, device, norm=args.norm)
        frac = sum(tails) / (64 * len(tails))
        none = sum(t == 0 for t in tails)
        print(f"\neta={eta:g}: tail samples per batch {statistics.mean(tails):.1f} ({frac:.1%}), "
              f"{none}/{len(tails)} batches with none")
        print(f"{'method':<8}{'ms/step':>10}{'x SGD':>8}")
        for m in METHODS:
            print(f"{m:<8}{med[m] * 1e3:>10.1f}{med[m] / med['sgd']:>7.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
