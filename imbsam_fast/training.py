"""A compact long-tailed training loop shared by the demo and the command line."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .optimizer import ImbSAM
from .priors import ClassWeights, plain_weights, sam_weights, split_classes, tail_class_mask

__all__ = ["RunResult", "train_classifier", "split_accuracy", "OPTIMIZERS"]

OPTIMIZERS = ("sgd", "sam", "imbsam", "imbsam-fast")


@dataclass
class RunResult:
    """Per-class and per-split test accuracy (in %) and the mean time of one optimizer step (s)."""

    optimizer: str
    seed: int
    per_class: list[float]
    splits: dict[str, float]
    step_time: float
    steps: int
    losses: list[float] = field(default_factory=list)


def split_accuracy(
    per_class_correct: torch.Tensor, per_class_total: torch.Tensor, class_counts: list[int],
    many: float = 100, few: float = 20,
) -> dict[str, float]:
    """Mean of per-class accuracies within Many / Medium / Few, and overall accuracy (All), in %."""
    acc = per_class_correct.double() / per_class_total.clamp_min(1).double()
    out = {}
    for name, mask in split_classes(class_counts, many, few).items():
        out[name] = float(acc[mask].mean() * 100) if mask.any() else math.nan
    out["all"] = float(per_class_correct.sum() / per_class_total.sum().clamp_min(1) * 100)
    return out


def _class_weights(name: str, num_classes: int) -> Optional[ClassWeights]:
    c = num_classes
    if name == "sgd":
        return plain_weights(c)
    if name == "sam":
        return sam_weights(c)
    if name in ("imbsam", "imbsam-fast"):
        return None  # ImbSAM builds the preset from the tail mask
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def train_classifier(
    optimizer: str,
    model_fn: Callable[[], nn.Module],
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    class_counts: list[int],
    *,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 1e-3,
    rho: float = 0.05,
    eta: float = 20,
    tail_weight: float = 2.0,
    seed: int = 0,
    device: str = "cpu",
    many: float = 100,
    few: float = 20,
    fast_bn: str = "ghost",
) -> RunResult:
    """Train one model with ``optimizer`` in {sgd, sam, imbsam, imbsam-fast}, cosine LR; evaluate per class.

    sgd takes one plain step per batch; the others run through :class:`ImbSAM`
    with the matching class-weight preset (SAM: every class perturbed);
    imbsam-fast is ImbSAM in fast mode.
    """
    torch.manual_seed(seed)
    model = model_fn().to(device)
    x_train, y_train = x_train.to(device), y_train.to(device)
    sgd_kw = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), **sgd_kw)
    else:
        weights = _class_weights(optimizer, len(class_counts))
        mask = tail_class_mask(class_counts, eta) if weights is None else weights
        fast = dict(mode="fast", model=model, fast_bn=fast_bn) if optimizer == "imbsam-fast" else {}
        opt = ImbSAM(model.parameters(), torch.optim.SGD, rho=rho, tail_mask=mask, tail_weight=tail_weight,
                     **fast, **sgd_kw)
    steps_per_epoch = max(1, math.ceil(len(y_train) / batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    step_time, steps, losses = 0.0, 0, []
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y_train), generator=gen).to(device)
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            if idx.numel() < 2:
                continue
            x, y = x_train[idx], y_train[idx]
            t0 = time.perf_counter()
            if optimizer == "sgd":
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                losses.append(loss.detach())
            else:
                out = opt.step(_closure(model, x, y), y)
                losses.append(out.per_sample.mean())
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            step_time += time.perf_counter() - t0
            steps += 1
            sched.step()
    per_class, splits = evaluate(model, x_test, y_test, class_counts, device, many, few)
    return RunResult(optimizer, seed, per_class, splits, step_time / max(steps, 1), steps,
                     [float(v) for v in torch.stack(losses).cpu()] if losses else [])


def _closure(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[..., torch.Tensor]:
    """Per-sample cross-entropy of the batch, or of the samples ``index`` picks."""

    def closure(index: Optional[torch.Tensor] = None) -> torch.Tensor:
        if index is None:
            return F.cross_entropy(model(x), y, reduction="none")
        index = index.to(x.device)
        return F.cross_entropy(model(x[index]), y[index], reduction="none")

    return closure


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, class_counts: list[int], device: str = "cpu",
    many: float = 100, few: float = 20,
) -> tuple[list[float], dict[str, float]]:
    """Per-class accuracy (%) and the split accuracies of ``model`` on ``(x, y)``."""
    model.eval()
    c = len(class_counts)
    pred = torch.cat([model(x[i : i + 512].to(device)).argmax(1).cpu() for i in range(0, len(y), 512)])
    correct = torch.bincount(y[pred == y], minlength=c)
    total = torch.bincount(y, minlength=c)
    acc = (correct.double() / total.clamp_min(1).double() * 100).tolist()
    return acc, split_accuracy(correct, total, class_counts, many, few)
