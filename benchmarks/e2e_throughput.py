"""End-to-end training throughput, images/s: SGD, the public code, exact and fast mode, eager and graphed.

Every method trains its own copy of one initial model on the same batches of random 32x32 images with
CIFAR-100-LT labels (eta 20, so most batches hold a few tail samples, some none). A rate is the
batch size times the number of timed batches over their total time (the device synchronized at the
start and the end only: what an epoch costs), after ``--warmup`` untimed batches.

* ``eager``: the plain loop (``opt.step(closure, y)``; the public code's own loop for ``public``);
* ``graphed``: the whole step in one CUDA graph: :class:`imbsam_fast.CapturedStep` for ImbSAM
  (``capturable=True``, fast mode with ``tail_capacity``), and torch's whole-network capture for SGD.

    python benchmarks/e2e_throughput.py [--models resnet32:64,resnet32:128,resnet34:64] [--dtypes fp32,bf16]
                                        [--batches 60] [--device cuda]

The public code runs as published, in fp32, once per model and batch size: its eager rate is the
baseline (``x public``) of every row, bf16 ones included. On the CPU only the eager rows run (there
is no graph); ``gpu_check.py`` calls :func:`run` on a GPU.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn.functional as F

from imbsam_fast import CapturedStep, ImbSAM
from imbsam_fast.apps.bench.step_time import KW, cifar100_lt_batches
from imbsam_fast.apps.models import resnet32, resnet34
from imbsam_fast.reference import ReferenceImbSAM, reference_train_step

METHODS = ("sgd", "public", "exact", "fast")
GRAPHED = ("sgd", "exact", "fast")


def build_model(name: str, device: torch.device) -> torch.nn.Module:
    """``resnet32`` (CIFAR ResNet-32, 100 classes) or ``resnet34`` (the public code's torchvision ResNet-34)."""
    torch.manual_seed(0)
    model = resnet32(num_classes=100) if name == "resnet32" else resnet34(num_classes=100)
    return model.to(device)


def loss_fn(model: torch.nn.Module, dtype: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Per-sample cross-entropy, the forward under bf16 autocast for ``dtype="bf16"``."""
    def losses(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # cache_enabled=False: torch's advice for autocast in CUDA graphs (each weight is cast once per forward
        # in these models anyway, so the cache would save nothing).
        ctx = (torch.autocast(x.device.type, dtype=torch.bfloat16, cache_enabled=False) if dtype == "bf16"
               else nullcontext())
        with ctx:
            logits = model(x)
        return F.cross_entropy(logits.float(), y, reduction="none")

    return losses


def tail_capacity(batch: int) -> int:
    """``K`` for fast mode's fixed-size tail passes: a sixteenth of the batch, at least 4."""
    return max(4, batch // 16)


Step = Callable[[torch.Tensor, torch.Tensor], None]


def stepper(method: str, graphed: bool, name: str, dtype: str, x0, y0, mask) -> Step:
    """``step(x, y)`` for one method on a fresh copy of the model."""
    device = x0.device
    model = build_model(name, device)
    losses = loss_fn(model, dtype)
    if method == "sgd":
        opt = torch.optim.SGD(model.parameters(), **KW)

        def sgd_step(x, y):
            opt.zero_grad(set_to_none=True)
            losses(x, y).mean().backward()
            opt.step()

        return sgd_graph(sgd_step, x0, y0) if graphed else sgd_step
    if method == "public":
        ref = ReferenceImbSAM(torch.optim.SGD(model.parameters(), **KW), model)
        return lambda x, y: reference_train_step(model, ref, x, y, mask)
    fast = dict(mode="fast", model=model, tail_capacity=tail_capacity(x0.shape[0])) if method == "fast" else dict(
        model=model)
    opt = ImbSAM(model.parameters(), torch.optim.SGD, tail_mask=mask, capturable=graphed, **fast, **KW)
    if graphed:
        return CapturedStep(opt, losses, x0, y0, model=model)

    def imbsam_step(x, y):
        opt.step(lambda index=None: losses(x, y) if index is None else losses(x[index], y[index]), y)

    return imbsam_step


def sgd_graph(step: Callable, x0: torch.Tensor, y0: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """torch's whole-network capture of a plain SGD step (warm-up on a side stream, grads made in the graph)."""
    static_x, static_y = x0.clone(), y0.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(static_x, static_y)

    def replay(x, y):
        static_x.copy_(x, non_blocking=True)
        static_y.copy_(y, non_blocking=True)
        graph.replay()

    return replay


def images_per_second(step: Callable, data: list, warmup: int) -> float:
    """Images per second over ``data[warmup:]`` (total time, synchronized at the ends)."""
    sync = torch.cuda.synchronize if data[0][0].is_cuda else (lambda: None)
    for x, y in data[:warmup]:
        step(x, y)
    sync()
    t0 = time.perf_counter()
    for x, y in data[warmup:]:
        step(x, y)
    sync()
    return sum(x.shape[0] for x, _ in data[warmup:]) / (time.perf_counter() - t0)


def run(configs: list[tuple[str, int]], dtypes: list[str], batches: int, warmup: int, device: torch.device,
        methods: tuple[str, ...] = METHODS) -> list[dict]:
    """One row per (model, batch, dtype, method, eager|graphed)."""
    rows = []
    for name, batch in configs:
        data, mask = cifar100_lt_batches(batches + warmup, batch, 20, device, seed=1)
        mask = mask.to(device)
        tails = [int(mask[y].sum()) for _, y in data[warmup:]]
        for dtype in dtypes:
            for method in methods:
                if method == "public" and dtype != dtypes[0]:
                    continue  # the public code trains in fp32 only: its one rate is every row's baseline
                for graphed in (False, True):
                    if graphed and (device.type != "cuda" or method not in GRAPHED):
                        continue
                    step = stepper(method, graphed, name, dtype, *data[0], mask)
                    rate = images_per_second(step, data, warmup)
                    rows.append(dict(model=name, batch=batch, dtype=dtype, method=method,
                                     run="graphed" if graphed else "eager", images_per_s=rate,
                                     no_tail_batches=sum(t == 0 for t in tails), batches=len(tails)))
                    del step
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    return rows


def report(rows: list[dict]) -> list[str]:
    """The table, with each rate over the public code's eager rate and the graphed fast/SGD step ratio."""
    lines = [f"{'model':<10}{'B':>5}{'dtype':>6}{'method':>8}{'run':>9}{'img/s':>10}{'x public':>10}"]
    public = {(r["model"], r["batch"]): r["images_per_s"] for r in rows if r["method"] == "public"}
    for r in rows:
        key = (r["model"], r["batch"])
        rel = r["images_per_s"] / public[key] if key in public else float("nan")
        lines.append(f"{r['model']:<10}{r['batch']:>5}{r['dtype']:>6}{r['method']:>8}{r['run']:>9}"
                     f"{r['images_per_s']:>10.0f}{rel:>9.2f}x")
    graphed = {(r["model"], r["batch"], r["dtype"], r["method"]): r["images_per_s"] for r in rows
               if r["run"] == "graphed"}
    for (model, batch, dtype, method), rate in graphed.items():
        if method == "fast" and (model, batch, dtype, "sgd") in graphed:
            lines.append(f"graphed fast step / graphed SGD step, {model} B={batch} {dtype}: "
                         f"{graphed[(model, batch, dtype, 'sgd')] / rate:.2f}x")
    return lines


def parse_configs(text: str) -> list[tuple[str, int]]:
    out = []
    for item in text.split(","):
        name, _, batch = item.partition(":")
        if name not in ("resnet32", "resnet34") or not batch.isdigit():
            raise SystemExit(f"e2e_throughput: bad model config {item!r} (want resnet32:64 or resnet34:64)")
        out.append((name, int(batch)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet32:64,resnet32:128,resnet34:64")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# end-to-end images/s on {name}, torch {torch.__version__}; {args.batches} timed batches per row")
    rows = run(parse_configs(args.models), args.dtypes.split(","), args.batches, args.warmup, device,
               tuple(args.methods.split(",")))
    print("\n".join(report(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
