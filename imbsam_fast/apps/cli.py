"""The ``imbsam-fast`` command: ``train``, ``anomaly`` and ``bench``.

Bad input gets one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Optional

__all__ = ["main"]

DATASETS = ("digits", "cifar10", "cifar100", "list")
CIFAR_MEAN_STD = ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616])


class UsageError(Exception):
    """A problem with the user's input, reported as one line."""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="first seed (runs use seed, seed+1, ...)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward passes (CUDA only)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars, only the final table")
    p.add_argument("--out", default="runs", help="folder for the JSON result and the plot")


PUBLIC_RECIPE = dict(dataset="cifar100", model="resnet34", lr=0.01, batch_size=64, schedule="epoch", rho=0.05,
                     eta=20.0, tail_weight=2.0, imbalance=100.0, epochs=200)
"""The public ImbSAM code's CIFAR-100-LT setup (momentum 0.9 and weight decay 1e-3 are the defaults anyway)."""

_PARSER_DEFAULTS = dict(batch_size=64, rho=0.05, eta=20.0, tail_weight=2.0)


def build_parser() -> argparse.ArgumentParser:
    from .anomaly import ANOMALY_OPTIMIZERS
    from .lt_losses import LOSSES
    from .models import BACKBONES
    from .training import OPTIMIZERS

    ap = argparse.ArgumentParser(prog="imbsam-fast", description="ImbSAM for long-tailed training: train, detect "
                                 "anomalies, benchmark.")
    sub = ap.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="compare optimizers on a long-tailed dataset over seeds",
                       description="Train one model per optimizer and seed on a long-tailed dataset; print Many / "
                       "Medium / Few / All accuracy (mean ± std) and the step time relative to SGD; write a JSON "
                       "result and a per-class accuracy plot.")
    t.add_argument("--dataset", default=None, help=f"one of {', '.join(DATASETS)} (default: digits; cifar100 with "
                   "--recipe public)")
    t.add_argument("--recipe", default=None, choices=["public"],
                   help="public: the public ImbSAM code's CIFAR-100-LT setup (ResNet-34 at 32x32, lr 0.01, momentum "
                   "0.9, wd 1e-3, batch 64, cosine per epoch, rho 0.05, eta 20, tail weight 2, 200 epochs); other "
                   "flags override it")
    t.add_argument("--model", default=None, help=f"one of {', '.join(BACKBONES)} (default: a small CNN for digits, "
                   "resnet32 otherwise; resnet34 with --recipe public)")
    t.add_argument("--data-dir", help="folder with the CIFAR python pickles, or the image root for --dataset list")
    t.add_argument("--train-list", help="list file ('path label' per line) for --dataset list")
    t.add_argument("--test-list", help="list file for --dataset list")
    t.add_argument("--image-size", type=int, default=32, help="image side for --dataset list")
    t.add_argument("--imbalance", type=float, default=None,
                   help="n_max / n_min of the training set (default: 50 for digits, 100 for CIFAR)")
    t.add_argument("--optimizers", default="sgd,sam,imbsam,imbsam-fast,focal-sam",
                   help=f"comma-separated, from {', '.join(OPTIMIZERS)}")
    t.add_argument("--loss", default="ce", help=f"one of {', '.join(LOSSES)}")
    t.add_argument("--drw-epoch", type=int, default=None, help="deferred re-weighting from this epoch (ldam)")
    t.add_argument("--seeds", type=int, default=3)
    t.add_argument("--epochs", type=int, default=None, help="default: 40 for digits, 200 for CIFAR, 90 for lists")
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=None, help="default: 0.05 (digits), 0.1 (others)")
    t.add_argument("--rho", type=float, default=0.05)
    t.add_argument("--eta", type=float, default=20, help="a class is tail when it has fewer training samples")
    t.add_argument("--tail-weight", type=float, default=2.0)
    t.add_argument("--schedule", default=None, choices=["batch", "epoch"],
                   help="cosine learning rate stepped per batch (default) or per epoch")
    t.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (default 2)")
    t.add_argument("--micro-batches", type=int, default=1, help="run every pass in this many chunks (ImbSAM)")
    t.add_argument("--fp16", action="store_true", help="fp16 autocast with a GradScaler")
    t.add_argument("--max-grad-norm", type=float, default=None, help="clip the update's gradient to this L2 norm")
    t.add_argument("--resume", action="store_true",
                   help="continue each run from its checkpoint in --out (written after every epoch)")
    t.add_argument("--many", type=float, default=100, help="Many: more than this many training samples")
    t.add_argument("--few", type=float, default=20, help="Few: fewer than this many training samples")
    _common(t)

    a = sub.add_parser("anomaly", help="Deep SAD style anomaly detection with SGD, SAM and ImbSAM",
                       description="Semi-supervised anomaly detection on digits: one class normal, the rest "
                       "anomalies, a few of them labeled. ImbSAM perturbs the labeled-anomaly term only. Prints "
                       "AUROC (mean ± std over seeds).")
    a.add_argument("--normal-class", type=int, default=8, help="the digit that is normal (default 8)")
    a.add_argument("--labeled-ratio", type=float, default=0.05, help="labeled anomalies per normal training image")
    a.add_argument("--pollution", type=float, default=0.1, help="unlabeled anomalies per normal training image")
    a.add_argument("--optimizers", default=",".join(ANOMALY_OPTIMIZERS))
    a.add_argument("--seeds", type=int, default=5)
    a.add_argument("--epochs", type=int, default=30)
    a.add_argument("--eta", type=float, default=1.0, help="weight of the anomaly term eta / (d + eps)")
    _common(a)

    b = sub.add_parser("bench", help="run the benchmark suites and summarize them",
                       description="Optimizer-side time against the public code, and end-to-end step time of a "
                       "ResNet-32 (batch 64, CIFAR-100-LT labels) as a ratio to SGD, totalled over --batches batches "
                       "as an epoch pays it. Prints one table; writes JSON and Markdown. The defaults take about 3 "
                       "minutes on 2 CPU cores.")
    b.add_argument("--reps", type=int, default=3, help="repeats of the optimizer-side measurement")
    b.add_argument("--batches", type=int, default=50, help="batches timed per method for the step time (>= 1)")
    b.add_argument("--eta", type=float, nargs="+", default=[20.0], help="tail thresholds to time (default 20)")
    b.add_argument("--methods", default="sgd,sam,public,exact,fast",
                   help="comma-separated, from sgd, sam, public, exact, fast, fast-ghost, and sgd-b (a second SGD, "
                   "the control: its ratio is the measurement's own noise)")
    b.add_argument("--keep-freed-memory", action="store_true",
                   help="make glibc's malloc keep freed memory, so that no step pays page faults for memory another "
                   "freed (on the CPU these add several percent of noise to the step-time ratios)")
    b.add_argument("--skip-step-time", action="store_true", help="only the optimizer-side benchmark")
    b.add_argument("--skip-large", action="store_true", help="leave out the 42M-parameter optimizer-side case")
    _common(b)
    return ap


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name} asked for, but no CUDA device is available")
        return name
    if name == "cpu":
        return name
    raise UsageError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")


def _names(spec: str, allowed: tuple[str, ...], what: str) -> list[str]:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise UsageError(f"unknown {what} {', '.join(bad) or '(none given)'}; choose from {', '.join(allowed)}")
    return names


def _load_split(args):
    from .data.cifar import cifar_lt
    from .data.digits import long_tailed_digits
    from .data.list_file import list_file_split

    if args.dataset == "digits":
        return long_tailed_digits(args.imbalance or 50.0, seed=args.seed)
    if not args.data_dir:
        raise UsageError(f"--dataset {args.dataset} needs --data-dir")
    if not Path(args.data_dir).is_dir():
        raise UsageError(f"--data-dir {args.data_dir} does not exist")
    if args.dataset in ("cifar10", "cifar100"):
        return cifar_lt(args.dataset, args.data_dir, args.imbalance or 100.0, seed=args.seed)
    if not args.train_list or not args.test_list:
        raise UsageError("--dataset list needs --train-list and --test-list")
    return list_file_split(args.data_dir, args.train_list, args.test_list, args.image_size)


def _mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):5.1f} ± {sd:4.1f}"


def _apply_recipe(args) -> None:
    """Fill what the user left unset: the recipe's values, then the plain defaults."""
    if args.recipe == "public":
        for key, value in PUBLIC_RECIPE.items():
            current = getattr(args, key)
            if current is None or (key in _PARSER_DEFAULTS and current == _PARSER_DEFAULTS[key]):
                setattr(args, key, value)
    if args.dataset is None:
        args.dataset = "digits"
    if args.schedule is None:
        args.schedule = "batch"


def _at_scale(args, world: int) -> bool:
    """Whether the run goes through the streaming loop (DataLoader, DDP, checkpoints): every dataset but the
    in-memory digits comparison, and digits too when a scale option asks for it."""
    return (args.dataset != "digits" or world > 1 or args.micro_batches > 1 or args.fp16 or args.resume
            or args.max_grad_norm is not None or args.model is not None or args.schedule == "epoch")


def _streaming_sets(args):
    from .data.streaming import ListImages, TensorImages, class_counts

    if args.dataset == "list":
        train = ListImages(args.data_dir, args.train_list, args.image_size, train=True)
        test = ListImages(args.data_dir, args.test_list, args.image_size, train=False)
        num_classes = int(max(train.labels.max(), test.labels.max())) + 1
        return train, test, class_counts(train.labels, num_classes)
    split = _load_split(args)
    pad = 0 if args.dataset == "digits" else 4
    return (TensorImages(split.x_train, split.y_train, True, pad), TensorImages(split.x_test, split.y_test, False, 0),
            split.class_counts)


def cmd_train(args) -> int:
    import torch

    from ..priors import tail_class_mask
    from .fit import FitConfig, Processes, fit
    from .models import digits_cnn, make_backbone
    from .training import OPTIMIZERS, TrainConfig, random_crop_flip, train_on_split

    optimizers = _names(args.optimizers, OPTIMIZERS, "optimizer")
    device = _device(args.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    scale = _at_scale(args, world)
    procs = Processes.start(device) if scale else None
    main_rank = procs is None or procs.main
    if scale:
        train_set, test_set, counts = _streaming_sets(args)
        n_train, n_test = len(train_set), len(test_set)
    else:
        split = _load_split(args)
        counts = split.class_counts
        n_train, n_test = len(split.y_train), len(split.y_test)
    tail = tail_class_mask(counts, args.eta)
    if not tail.any() and main_rank:
        print(f"imbsam-fast: warning: eta={args.eta:g} leaves no tail class (smallest class has {min(counts)} "
              "samples): ImbSAM reduces to plain training", file=sys.stderr)
    small = args.dataset == "digits"
    epochs = args.epochs or (40 if small else 200 if args.dataset.startswith("cifar") else 90)
    lr = args.lr or (0.05 if small else 0.1)
    normalize = CIFAR_MEAN_STD if args.dataset.startswith("cifar") else None
    num_classes = len(counts)
    model_name = args.model or ("digits-cnn" if small else "resnet32")
    model_fn = ((lambda: digits_cnn(num_classes)) if model_name == "digits-cnn"
                else (lambda: make_backbone(model_name, num_classes)))
    if not args.quiet and main_rank:
        where = f"{device}" + (f", {world} processes" if world > 1 else "")
        print(f"{args.dataset}: {n_train} training samples in {num_classes} classes (counts {max(counts)} .. "
              f"{min(counts)}), {n_test} test; {int(tail.sum())} tail classes (eta {args.eta:g}); {model_name}; "
              f"{where}", file=sys.stderr)
    out = Path(args.out)
    if scale:
        cfg = FitConfig(
            epochs=epochs, batch_size=args.batch_size, lr=lr, rho=args.rho, eta=args.eta,
            tail_weight=args.tail_weight, loss=args.loss, drw_epoch=args.drw_epoch, schedule=args.schedule,
            workers=args.workers, micro_batches=args.micro_batches, fp16=args.fp16,
            bf16=args.bf16 and device.startswith("cuda"), max_grad_norm=args.max_grad_norm, many=args.many,
            few=args.few, device=device, normalize=normalize, progress=not args.quiet,
        )
        if main_rank:
            out.mkdir(parents=True, exist_ok=True)
        results = {name: [fit(name, model_fn, train_set, test_set, counts, cfg, seed=args.seed + s,
                              checkpoint=out / f"checkpoint_{args.dataset}_{name}_seed{args.seed + s}.pt",
                              resume=args.resume, procs=procs) for s in range(args.seeds)]
                   for name in optimizers}
        if not main_rank:
            return 0
    else:
        cfg = TrainConfig(
            epochs=epochs, batch_size=args.batch_size, lr=lr, rho=args.rho, eta=args.eta,
            tail_weight=args.tail_weight, loss=args.loss, drw_epoch=args.drw_epoch, many=args.many, few=args.few,
            device=device, bf16=args.bf16 and device.startswith("cuda"), progress=not args.quiet,
            augment=None if small else random_crop_flip, normalize=normalize,
        )
        results = {name: [train_on_split(name, model_fn, split, cfg, seed=args.seed + s) for s in range(args.seeds)]
                   for name in optimizers}
    base = "sgd" if "sgd" in results else optimizers[0]
    base_time = statistics.median(r.step_time for r in results[base])
    header = f"{'optimizer':<12}{'Many':>14}{'Medium':>14}{'Few':>14}{'All':>14}  {'step/' + base:>16}"
    lines = [header]
    for name, runs in results.items():
        cells = [_mean_std([r.splits[k] for r in runs]) for k in ("many", "medium", "few", "all")]
        ratio = statistics.median(r.step_time for r in runs) / base_time
        lines.append(f"{name:<12}" + "".join(f"{c:>14}" for c in cells) + f"  {ratio:>15.2f}x")
    per_process = f" per process x {world}" if world > 1 else ""
    lines.append(f"{args.seeds} seeds, {epochs} epochs, batch {args.batch_size}{per_process}, loss {args.loss}; test "
                 f"accuracy (%) mean ± std; splits: Many > {args.many:g}, Medium {args.few:g}..{args.many:g}, "
                 f"Few < {args.few:g}")
    print("\n".join(lines))
    out.mkdir(parents=True, exist_ok=True)
    stem = f"train_{args.dataset}"
    payload = dict(
        command="train", dataset=args.dataset, class_counts=counts, tail_classes=tail.nonzero().flatten().tolist(),
        config={k: v for k, v in vars(cfg).items() if k not in ("augment",)}, device=device, processes=world,
        model=model_name, date=datetime.datetime.now().isoformat(timespec="seconds"), torch=torch.__version__,
        results={name: [vars(r) for r in runs] for name, runs in results.items()},
    )
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    _plot(results, counts, out / f"{stem}.png", args.dataset)
    if not args.quiet:
        print(f"wrote {out / (stem + '.json')} and {out / (stem + '.png')}", file=sys.stderr)
    return 0


def _plot(results, counts: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = sorted(range(len(counts)), key=lambda k: -counts[k])
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, runs in results.items():
        acc = [statistics.mean(r.per_class[k] for r in runs) for k in order]
        ax.plot([counts[k] for k in order], acc, marker="o", ms=3, label=name)
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("training samples of the class (log scale)")
    ax.set_ylabel("test accuracy of the class (%)")
    ax.set_title(f"{title}: per-class accuracy, mean over seeds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_anomaly(args) -> int:
    from .anomaly import ANOMALY_OPTIMIZERS, digits_anomaly_split, train_deep_sad

    optimizers = _names(args.optimizers, ANOMALY_OPTIMIZERS, "optimizer")
    device = _device(args.device)
    from tqdm.auto import tqdm

    aurocs: dict[str, list[float]] = {}
    jobs = [(o, s) for o in optimizers for s in range(args.seeds)]
    for name, s in tqdm(jobs, disable=args.quiet, desc="anomaly", leave=False):
        split = digits_anomaly_split(args.normal_class, args.labeled_ratio, args.pollution, seed=args.seed + s)
        aurocs.setdefault(name, []).append(train_deep_sad(name, split, epochs=args.epochs, eta=args.eta,
                                                          seed=args.seed + s, device=device))
    print(f"{'optimizer':<10}{'AUROC':>18}")
    for name, v in aurocs.items():
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        print(f"{name:<10}{statistics.mean(v):>10.4f} ± {sd:.4f}")
    print(f"digits, normal class {args.normal_class}, {args.labeled_ratio:g} labeled anomalies and {args.pollution:g} "
          f"unlabeled anomalies per normal training image, {args.seeds} seeds, {args.epochs} epochs")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "anomaly_digits.json").write_text(json.dumps(dict(command="anomaly", args=vars(args), auroc=aurocs),
                                                        indent=1, default=str))
    return 0


def cmd_bench(args) -> int:
    import torch

    from .bench import allocator, overhead, step_time
    from .bench.shapes import resnet32_shapes, transformer_shapes

    device = _device(args.device)
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "not installed"
    info = dict(machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
                device=torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
                threads=torch.get_num_threads(), torch=torch.__version__, triton=triton_version,
                date=datetime.date.today().isoformat(), malloc="default")
    if args.keep_freed_memory:
        info["malloc"] = "keeps freed memory" if allocator.keep_freed_memory() else "default (mallopt unavailable)"
    rows = []
    dev = torch.device(device)
    say = (lambda msg: None) if args.quiet else (lambda msg: print(f"imbsam-fast bench: {msg}", file=sys.stderr))
    cases = [("ResNet-32 shapes", resnet32_shapes(), max(args.reps * 3, 5))]
    if not args.skip_large:
        cases.append(("transformer 6x768", transformer_shapes(), args.reps))
    for name, shapes, reps in cases:
        say(f"optimizer-side time, {name} ({reps} repeats)")
        _, nt, n, med = overhead.bench(name, shapes, dev, reps, warmup=1)
        rows.append(("optimizer-side time", name, "public code / ours (+accumulate)",
                     med["reference"] / med["ours + accumulate"]))
    if not args.skip_step_time:
        for eta in args.eta:
            say(f"step time, ResNet-32 batch 64, eta {eta:g}: {args.batches} batches x {len(args.methods)} methods")
            res = step_time.run(eta, args.batches, dev, methods=args.methods, progress=not args.quiet)
            tails = sum(t > 0 for t in res.tails)
            for m in args.methods:
                rows.append((f"step time, eta {eta:g}", m, f"x SGD, total over {args.batches} batches", res.ratio(m)))
                if tails and tails < len(res.tails):
                    rows.append((f"step time, eta {eta:g}", m, f"x SGD, {len(res.tails) - tails} no-tail batches",
                                 res.ratio(m, False)))
    head = " | ".join(f"{k} {v}" for k, v in info.items())
    table = [f"{'suite':<22}{'case':<20}{'metric':<40}{'value':>8}"]
    table += [f"{s:<22}{c:<20}{m:<40}{v:>8.2f}" for s, c, m, v in rows]
    print(head)
    print("\n".join(table))
    if device.startswith("cuda"):
        print("kernel tables (launches, bandwidth, graph replay): run benchmarks/gpu_check.py from a source checkout")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(dict(info=info, rows=rows), indent=1))
    md = [f"Benchmarks — {head}", "", "| suite | case | metric | value |", "|---|---|---|---|"]
    md += [f"| {s} | {c} | {m} | {v:.2f} |" for s, c, m, v in rows]
    (out / "bench.md").write_text("\n".join(md) + "\n")
    if not args.quiet:
        print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}", file=sys.stderr)
    return 0


def _finite(args, name: str, low: float, *, strict: bool = False, what: str = "") -> None:
    value = getattr(args, name.lstrip("-").replace("-", "_"))
    if value is None:
        return
    ok = math.isfinite(value) and (value > low if strict else value >= low)
    if not ok:
        raise UsageError(f"{name} must be a finite number {'>' if strict else '>='} {low:g}{what}, got {value:g}")


def _at_least(args, name: str, low: int) -> None:
    value = getattr(args, name.lstrip("-").replace("-", "_"))
    if value is not None and value < low:
        raise UsageError(f"{name} must be >= {low}, got {value}")


def check_args(args) -> None:
    """Every argument of the command, checked before anything runs (one ``UsageError`` for the first bad one)."""
    if args.command == "train":
        from .lt_losses import LOSSES
        from .models import BACKBONES
        from .training import OPTIMIZERS

        _apply_recipe(args)
        if args.dataset not in DATASETS:
            raise UsageError(f"unknown dataset {args.dataset!r}; choose one of {', '.join(DATASETS)}")
        if args.recipe == "public" and args.dataset != "cifar100":
            raise UsageError(f"--recipe public is the CIFAR-100-LT setup; got --dataset {args.dataset}")
        _names(args.optimizers, OPTIMIZERS, "optimizer")
        if args.loss not in LOSSES:
            raise UsageError(f"unknown loss {args.loss!r}; choose one of {', '.join(LOSSES)}")
        _at_least(args, "--batch-size", 2)
        for name in ("--seeds", "--epochs", "--image-size"):
            _at_least(args, name, 1)
        _at_least(args, "--drw-epoch", 0)
        _finite(args, "--lr", 0.0, strict=True)
        _finite(args, "--rho", 0.0)
        _finite(args, "--tail-weight", 0.0)
        _finite(args, "--eta", 0.0, strict=True)
        _finite(args, "--imbalance", 1.0)
        _finite(args, "--many", 0.0)
        _finite(args, "--few", 0.0)
        if args.few > args.many:
            raise UsageError(f"--few ({args.few:g}) must not exceed --many ({args.many:g})")
        if args.model is not None and args.model not in BACKBONES:
            raise UsageError(f"unknown model {args.model!r}; choose one of {', '.join(BACKBONES)}")
        if args.model is not None and args.dataset == "digits":
            raise UsageError(f"--model {args.model} takes RGB images; digits are 8x8 grey (use the default model)")
        _at_least(args, "--workers", 0)
        _at_least(args, "--micro-batches", 1)
        _finite(args, "--max-grad-norm", 0.0, strict=True)
        if args.fp16 and args.bf16:
            raise UsageError("--fp16 and --bf16 exclude each other")
        if args.dataset != "digits":
            if not args.data_dir:
                raise UsageError(f"--dataset {args.dataset} needs --data-dir")
            if not Path(args.data_dir).is_dir():
                raise UsageError(f"--data-dir {args.data_dir} does not exist")
        if args.dataset == "list" and (not args.train_list or not args.test_list):
            raise UsageError("--dataset list needs --train-list and --test-list")
    elif args.command == "anomaly":
        from .anomaly import ANOMALY_OPTIMIZERS

        _names(args.optimizers, ANOMALY_OPTIMIZERS, "optimizer")
        if not 0 <= args.normal_class <= 9:
            raise UsageError(f"--normal-class must lie in 0..9, got {args.normal_class}")
        if not 0 < args.labeled_ratio <= 1:
            raise UsageError(f"--labeled-ratio must lie in (0, 1], got {args.labeled_ratio:g}")
        _finite(args, "--pollution", 0.0)
        _finite(args, "--eta", 0.0, strict=True)
        _at_least(args, "--seeds", 1)
        _at_least(args, "--epochs", 1)
    else:
        from .bench.step_time import CONTROLS, METHODS

        args.methods = _names(args.methods, METHODS + CONTROLS, "method")
        _at_least(args, "--reps", 1)
        _at_least(args, "--batches", 1)
        for eta in args.eta:
            if not (math.isfinite(eta) and eta > 0):
                raise UsageError(f"--eta must be a finite number > 0, got {eta:g}")
    _device(args.device)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``imbsam-fast`` and ``python -m imbsam_fast``."""
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        return {"train": cmd_train, "anomaly": cmd_anomaly, "bench": cmd_bench}[args.command](args)
    except UsageError as e:
        print(f"imbsam-fast: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"imbsam-fast: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("imbsam-fast: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
