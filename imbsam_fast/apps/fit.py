"""The training loop at scale: a ``DataLoader`` with workers, DDP under ``torchrun``, fp16 or bf16,
micro-batches, clipping, and a checkpoint every epoch to resume from.

Under ``torchrun --nproc_per_node N`` every process trains on its shard of
each epoch (``DistributedSampler``, the same number of full batches on every
rank, so no rank waits on a collective another never joins), the model is
wrapped in ``DistributedDataParallel`` and ImbSAM synchronizes its passes as
:mod:`imbsam_fast.distributed` describes. ``--batch-size`` is per process.
Only rank 0 writes checkpoints, evaluates and prints.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .lt_losses import make_loss
from .training import OPTIMIZERS, RunResult, TrainConfig, make_optimizer, prepare_images, progress_bar, split_accuracy

__all__ = ["FitConfig", "Processes", "fit"]


@dataclass
class FitConfig(TrainConfig):
    """Hyper-parameters of one run of :func:`fit`: those of ``TrainConfig`` (whose ``augment`` it does not
    use: the datasets augment per item), and the options of training at scale."""

    epochs: int = 200
    lr: float = 0.1
    schedule: str = "batch"
    workers: int = 2
    micro_batches: int = 1
    fp16: bool = False
    max_grad_norm: Optional[float] = None


@dataclass
class Processes:
    """This process's place in the job: ``rank`` of ``world``, and its device."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @classmethod
    def start(cls, device: str) -> Processes:
        """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1), else a single process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(0, 1, device)
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.startswith("cuda"):
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), device)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _autocast(cfg: FitConfig, device: torch.device):
    dtype = torch.float16 if cfg.fp16 else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=cfg.fp16 or cfg.bf16)


def fit(optimizer: str, model_fn: Callable[[], nn.Module], train_set: Dataset, test_set: Dataset,
        class_counts: list[int], cfg: FitConfig, *, seed: int = 0, checkpoint: Optional[Path] = None,
        resume: bool = False, procs: Optional[Processes] = None) -> Optional[RunResult]:
    """Train with ``optimizer`` (one of :data:`~imbsam_fast.apps.training.OPTIMIZERS`); evaluate per class.

    ``checkpoint``: written by rank 0 after every epoch; with ``resume`` the run
    continues from it when it exists. Returns the result on rank 0, ``None`` elsewhere.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    procs = procs or Processes(device=cfg.device)
    device = torch.device(procs.device)
    torch.manual_seed(seed)
    model = model_fn().to(device)
    net: nn.Module = model
    if procs.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    loss_fn = make_loss(cfg.loss, class_counts)
    options = {} if optimizer == "sgd" else dict(max_grad_norm=cfg.max_grad_norm)
    opt = make_optimizer(optimizer, model, class_counts, cfg, forward_module=net, **options)
    sampler = DistributedSampler(train_set, num_replicas=procs.world, rank=procs.rank, shuffle=True, seed=seed,
                                 drop_last=True)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                        drop_last=True, pin_memory=device.type == "cuda")
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_set)} training samples over {procs.world} process(es) make no full batch of "
                         f"{cfg.batch_size}")
    per_batch = cfg.schedule == "batch"
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * (steps_per_epoch if per_batch else 1))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.fp16)
    state = {"epoch": -1, "step_time": 0.0, "steps": 0, "losses": []}
    if resume and checkpoint is not None and checkpoint.is_file():
        state = _load(checkpoint, model, opt, sched, scaler, device)
    bar = progress_bar(cfg.epochs * steps_per_epoch, f"{optimizer} seed {seed}", cfg.progress and procs.main,
                    initial=(state["epoch"] + 1) * steps_per_epoch)
    net.train()
    for epoch in range(state["epoch"] + 1, cfg.epochs):
        sampler.set_epoch(epoch)
        epoch_losses: list[torch.Tensor] = []  # on the device: read back once per epoch, not once per step
        for x, y in loader:
            x, y = prepare_images(x.to(device, non_blocking=True), cfg), y.to(device, non_blocking=True)
            closure = _closure(net, x, y, loss_fn, epoch, cfg, device)
            t0 = time.perf_counter()
            if optimizer == "sgd":
                loss = _sgd_step(opt, model, closure, scaler, cfg)
            else:
                loss = opt.step(closure, y, scaler=scaler if cfg.fp16 else None,
                                micro_batches=cfg.micro_batches).per_sample.mean()
                scaler.update()
            if device.type == "cuda":
                torch.cuda.synchronize()  # the table reports step time, which needs the step to have finished
            state["step_time"] += time.perf_counter() - t0
            state["steps"] += 1
            epoch_losses.append(loss.detach().float())
            if per_batch:
                sched.step()
            if bar is not None:
                bar.update(1)
        if not per_batch:
            sched.step()
        if epoch_losses:
            state["losses"].extend(torch.stack(epoch_losses).cpu().unbind())
        state["epoch"] = epoch
        if checkpoint is not None and procs.main:
            _save(checkpoint, model, opt, sched, scaler, state)
        procs.barrier()
    if bar is not None:
        bar.close()
    result = None
    if procs.main:
        per_class, splits = evaluate_loader(model, test_set, class_counts, device, cfg)
        losses = [float(v) for v in state["losses"]]
        result = RunResult(optimizer, seed, per_class, splits, state["step_time"] / max(state["steps"], 1),
                           state["steps"], losses)
    procs.barrier()
    return result


def _sgd_step(opt: torch.optim.Optimizer, model: nn.Module, closure, scaler: torch.amp.GradScaler,
              cfg: FitConfig) -> torch.Tensor:
    opt.zero_grad(set_to_none=True)
    loss = closure().mean()
    scaler.scale(loss).backward()
    if cfg.max_grad_norm is not None:
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    scaler.step(opt)
    scaler.update()
    return loss


def _closure(net: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, epoch: int, cfg: FitConfig,
             device: torch.device):
    def closure(index: Optional[torch.Tensor] = None) -> torch.Tensor:
        xs, ys = (x, y) if index is None else (x[index], y[index])
        with _autocast(cfg, device):
            logits = net(xs)
        return loss_fn(logits.float(), ys, epoch=epoch, drw_epoch=cfg.drw_epoch)

    return closure


def _save(path: Path, model, opt, sched, scaler, state) -> None:
    payload = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
               "scaler": scaler.state_dict(), "rng": torch.get_rng_state(), **state}
    if torch.cuda.is_available():
        payload["cuda_rng"] = torch.cuda.get_rng_state_all()
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _load(path: Path, model, opt, sched, scaler, device: torch.device) -> dict:
    payload = torch.load(path, map_location=device, weights_only=False)
    model.load_state_dict(payload["model"])
    opt.load_state_dict(payload["optimizer"])
    sched.load_state_dict(payload["scheduler"])
    scaler.load_state_dict(payload["scaler"])
    torch.set_rng_state(payload["rng"].cpu())
    if "cuda_rng" in payload and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in payload["cuda_rng"]])
    return {k: payload[k] for k in ("epoch", "step_time", "steps", "losses")}


@torch.no_grad()
def evaluate_loader(model: nn.Module, test_set: Dataset, class_counts: list[int], device: torch.device,
                    cfg: FitConfig) -> tuple[list[float], dict[str, float]]:
    """Per-class accuracy (%) and the Many / Medium / Few / All accuracies on ``test_set``."""
    was_training = model.training
    model.eval()
    c = len(class_counts)
    correct = torch.zeros(c, dtype=torch.int64)
    total = torch.zeros(c, dtype=torch.int64)
    for x, y in DataLoader(test_set, batch_size=256, num_workers=cfg.workers):
        with _autocast(cfg, device):
            pred = model(prepare_images(x.to(device), cfg)).argmax(1).cpu()
        correct += torch.bincount(y[pred == y], minlength=c)
        total += torch.bincount(y, minlength=c)
    model.train(was_training)
    acc = (correct.double() / total.clamp_min(1).double() * 100).tolist()
    return acc, split_accuracy(correct, total, class_counts, cfg.many, cfg.few)
