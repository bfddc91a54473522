"""Example run: SGD vs SAM vs ImbSAM on long-tailed digits, on the CPU, in about a minute.

    python -m imbsam_fast.demo [--epochs 40] [--seeds 3] [--imbalance 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys

from .data.digits import long_tailed_digits
from .models import digits_cnn
from .priors import tail_class_mask
from .training import OPTIMIZERS, train_classifier


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--imbalance", type=float, default=50.0)
    ap.add_argument("--eta", type=float, default=20)
    args = ap.parse_args(argv)
    if args.imbalance < 1:
        print("error: --imbalance must be >= 1", file=sys.stderr)
        return 2
    split = long_tailed_digits(args.imbalance, seed=0)
    tail = tail_class_mask(split.class_counts, args.eta)
    print(f"long-tailed digits: train counts {split.class_counts}, test {len(split.y_test)} (balanced)")
    print(f"tail classes (count < {args.eta:g}): {tail.nonzero().flatten().tolist()}")
    rows = {}
    for name in OPTIMIZERS:
        runs = [
            train_classifier(name, digits_cnn, split.x_train, split.y_train, split.x_test, split.y_test,
                             split.class_counts, epochs=args.epochs, eta=args.eta, seed=s)
            for s in range(args.seeds)
        ]
        rows[name] = runs
    sgd_time = statistics.median(r.step_time for r in rows["sgd"])
    print(f"\n{'optimizer':<12}{'Many':>14}{'Medium':>14}{'Few':>14}{'All':>14}{'step/SGD':>10}")
    for name, runs in rows.items():
        cells = []
        for key in ("many", "medium", "few", "all"):
            vals = [r.splits[key] for r in runs]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):6.1f} ± {sd:4.1f}")
        ratio = statistics.median(r.step_time for r in runs) / sgd_time
        print(f"{name:<12}" + "".join(f"{c:>14}" for c in cells) + f"{ratio:>9.2f}x")
    print(f"\n{args.seeds} seeds, {args.epochs} epochs, batch 64, mean ± std of test accuracy (%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
