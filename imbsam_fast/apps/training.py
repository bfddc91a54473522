"""A compact long-tailed training loop shared by the command line and the benchmarks."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..optimizer import ImbSAM
from ..priors import ClassWeights, focal_sam_weights, plain_weights, sam_weights, split_classes, tail_class_mask
from .data.digits import LongTailSplit
from .lt_losses import make_loss

__all__ = ["OPTIMIZERS", "RunResult", "TrainConfig", "class_weights_for", "make_optimizer", "prepare_images",
           "progress_bar", "train_classifier", "train_on_split", "split_accuracy", "evaluate"]

OPTIMIZERS = ("sgd", "sam", "imbsam", "imbsam-fast", "focal-sam")


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


@dataclass
class TrainConfig:
    """Hyper-parameters of one run; the defaults are the public ImbSAM code's where it has them."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-3
    rho: float = 0.05
    eta: float = 20
    tail_weight: float = 2.0
    loss: str = "ce"
    drw_epoch: Optional[int] = None
    focal_lam: float = 1.0
    focal_gamma: float = 2.0
    fast_bn: str = "replay-ghost"
    many: float = 100
    few: float = 20
    device: str = "cpu"
    bf16: bool = False
    augment: Optional[Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = None
    normalize: Optional[tuple[list[float], list[float]]] = None
    progress: bool = False


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


def class_weights_for(name: str, class_counts: list[int], focal_lam: float = 1.0, focal_gamma: float = 2.0
                      ) -> Optional[ClassWeights]:
    """The class-weight preset of optimizer ``name``; ``None`` for ImbSAM, which builds it from the tail mask."""
    c = len(class_counts)
    if name == "sgd":
        return plain_weights(c)
    if name == "sam":
        return sam_weights(c)
    if name == "focal-sam":
        return focal_sam_weights(class_counts, focal_lam, focal_gamma)
    if name in ("imbsam", "imbsam-fast"):
        return None  # ImbSAM builds the preset from the tail mask
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def make_optimizer(name: str, model: nn.Module, class_counts: list[int], cfg: TrainConfig,
                   forward_module: Optional[nn.Module] = None, **options) -> torch.optim.Optimizer:
    """``torch.optim.SGD`` for ``"sgd"``; else :class:`ImbSAM` over SGD with ``name``'s class-weight preset
    (fast mode for ``"imbsam-fast"``), ``model=`` the module the closure calls (``forward_module``, e.g. a
    DDP wrapper; ``model`` by default) and any further ImbSAM ``options``."""
    sgd_kw = dict(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), **sgd_kw)
    weights = class_weights_for(name, class_counts, cfg.focal_lam, cfg.focal_gamma)
    spec = (dict(tail_mask=tail_class_mask(class_counts, cfg.eta), tail_weight=cfg.tail_weight) if weights is None
            else dict(class_weights=weights))
    fast = dict(mode="fast", fast_bn=cfg.fast_bn) if name == "imbsam-fast" else {}
    closure_module = model if forward_module is None else forward_module
    return ImbSAM(model.parameters(), torch.optim.SGD, rho=cfg.rho, model=closure_module, **spec, **fast, **options,
                  **sgd_kw)


def prepare_images(x: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """uint8 images to float in [0, 1], then the optional per-channel normalization."""
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    if cfg.normalize is not None:
        mean, std = (torch.tensor(v, device=x.device).view(1, -1, 1, 1) for v in cfg.normalize)
        x = (x - mean) / std
    return x


def train_on_split(optimizer: str, model_fn: Callable[[], nn.Module], split: LongTailSplit, cfg: TrainConfig,
                   seed: int = 0) -> RunResult:
    """Train one model with ``optimizer`` in :data:`OPTIMIZERS` on ``split``; cosine LR; evaluate per class.

    sgd takes one plain step per batch; the others run through :class:`ImbSAM`
    with the matching class-weight preset (SAM: every class perturbed;
    focal-sam: ``c_k = lam (1 - pi_k)^gamma``); imbsam-fast is ImbSAM in fast mode.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    torch.manual_seed(seed)
    device = cfg.device
    model = model_fn().to(device)
    counts = split.class_counts
    loss_fn = make_loss(cfg.loss, counts)
    x_train, y_train = split.x_train.to(device), split.y_train.to(device)
    opt = make_optimizer(optimizer, model, counts, cfg)
    steps_per_epoch = max(1, math.ceil(len(y_train) / cfg.batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    step_time, steps, losses = 0.0, 0, []
    model.train()
    bar = progress_bar(cfg.epochs * steps_per_epoch, f"{optimizer} seed {seed}", cfg.progress)
    for epoch in range(cfg.epochs):
        perm = torch.randperm(len(y_train), generator=gen).to(device)
        for i in range(0, len(perm), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            if idx.numel() < 2:
                continue
            x, y = x_train[idx], y_train[idx]
            if cfg.augment is not None:
                x = cfg.augment(x, gen)
            x = prepare_images(x, cfg)
            closure = _closure(model, x, y, loss_fn, epoch, cfg)
            t0 = time.perf_counter()
            if optimizer == "sgd":
                opt.zero_grad()
                loss = closure().mean()
                loss.backward()
                opt.step()
                losses.append(loss.detach())
            else:
                out = opt.step(closure, y)
                losses.append(out.per_sample.mean())
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            step_time += time.perf_counter() - t0
            steps += 1
            sched.step()
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    per_class, splits = evaluate(model, _prepare_all(split.x_test, cfg), split.y_test, counts, device, cfg.many,
                                 cfg.few)
    return RunResult(optimizer, seed, per_class, splits, step_time / max(steps, 1), steps,
                     [float(v) for v in torch.stack(losses).cpu()] if losses else [])


def train_classifier(
    optimizer: str, model_fn: Callable[[], nn.Module], x_train: torch.Tensor, y_train: torch.Tensor,
    x_test: torch.Tensor, y_test: torch.Tensor, class_counts: list[int], *, seed: int = 0, **config,
) -> RunResult:
    """:func:`train_on_split` with the split given as tensors and the config as keywords."""
    return train_on_split(optimizer, model_fn, LongTailSplit(x_train, y_train, x_test, y_test, class_counts),
                          TrainConfig(**config), seed)


def _prepare_all(x: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    return torch.cat([prepare_images(x[i : i + 1024], cfg) for i in range(0, len(x), 1024)]) if len(x) else x.float()


def _closure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, epoch: int, cfg: TrainConfig):
    """Per-sample losses of the batch, or of the samples ``index`` picks."""
    autocast = cfg.bf16 and cfg.device.startswith("cuda")

    def closure(index: Optional[torch.Tensor] = None) -> torch.Tensor:
        xs, ys = (x, y) if index is None else (x[index.to(x.device)], y[index.to(y.device)])
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            logits = model(xs)
        return loss_fn(logits.float(), ys, epoch=epoch, drw_epoch=cfg.drw_epoch)

    return closure


def progress_bar(total: int, desc: str, enabled: bool, initial: int = 0):
    """A tqdm bar over steps, or ``None`` when ``enabled`` is false."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, unit="step")


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


def random_crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """The usual CIFAR augmentation: zero-pad by ``pad``, crop back at a random offset, flip half the images."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).tolist()
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).tolist()
    flip = (torch.rand(n, generator=gen) < 0.5).tolist()
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    if any(flip):
        idx = torch.tensor([i for i, f in enumerate(flip) if f], device=x.device)
        out[idx] = out[idx].flip(-1)
    return out
