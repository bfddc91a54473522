"""Many / Medium / Few / All test accuracy on long-tailed digits: SGD, exact and fast ImbSAM, over seeds.

    python benchmarks/digits_accuracy.py [--seeds 5] [--epochs 40] [--imbalance 50]
"""

from __future__ import annotations

import argparse
import statistics

from imbsam_fast.apps.data.digits import long_tailed_digits
from imbsam_fast.apps.models import digits_cnn
from imbsam_fast.apps.training import train_classifier

RUNS = {
    "sgd": dict(optimizer="sgd"),
    "imbsam exact": dict(optimizer="imbsam"),
    "imbsam fast (ghost 8)": dict(optimizer="imbsam-fast", fast_bn="ghost"),
    "imbsam fast (replay-ghost)": dict(optimizer="imbsam-fast", fast_bn="replay-ghost"),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--imbalance", type=float, default=50.0)
    args = ap.parse_args(argv)
    split = long_tailed_digits(args.imbalance, seed=0)
    print(f"# long-tailed digits (imbalance {args.imbalance:g}, train counts {split.class_counts}), digits_cnn "
          f"with BatchNorm, {args.epochs} epochs, batch 64, eta 20; mean ± std over {args.seeds} seeds")
    print(f"{'method':<28}{'Many':>13}{'Medium':>13}{'Few':>13}{'All':>13}")
    for name, kw in RUNS.items():
        runs = [train_classifier(model_fn=digits_cnn, x_train=split.x_train, y_train=split.y_train,
                                 x_test=split.x_test, y_test=split.y_test, class_counts=split.class_counts,
                                 epochs=args.epochs, seed=s, **kw) for s in range(args.seeds)]
        cells = []
        for key in ("many", "medium", "few", "all"):
            v = [r.splits[key] for r in runs]
            cells.append(f"{statistics.mean(v):5.1f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:4.1f}")
        print(f"{name:<28}" + "".join(f"{c:>13}" for c in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
