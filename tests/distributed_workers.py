"""Process launcher and worker functions for the multi-process tests (gloo on CPU).

``run_workers(fn, world, *args)`` starts ``world`` processes running
``fn(rank, world, init_file, *args)`` and fails the test when one raises or
when they do not all finish within the timeout (a hang is a failure, not a
wait). Workers write what the test checks with ``torch.save`` to ``out``.

Teardown is deterministic. torch's optimizers live in reference cycles, and so do the DDP
modules they hold, so without help a DDP (and its reducer, holding the process group and
the Python comm hook's futures) is freed whenever the cyclic collector happens to run:
on a gloo worker thread inside a comm hook's callback, or during interpreter
finalization, where a thread that needs the GIL is torn down and the process aborts
("terminate called without an active exception", seen once in CI). So the workers
collect each config's cycles before the next one, and every rank collects, meets at a
barrier and destroys the process group before it exits. ``faulthandler`` prints every
thread's Python stack if a worker still dies of a signal.
"""

from __future__ import annotations

import faulthandler
import gc
import os
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

TIMEOUT_S = 120.0


def run_workers(fn: Callable[..., None], world: int, tmp_path: Any, *args: Any, timeout: float = TIMEOUT_S,
                backend: str = "gloo") -> None:
    init_file = str(tmp_path / "init")
    ctx = mp.start_processes(_entry, args=(fn, world, init_file, backend, args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"distributed workers did not finish within {timeout:.0f} s (a hang)")


def _entry(rank: int, fn: Callable[..., None], world: int, init_file: str, backend: str,
           args: tuple[Any, ...]) -> None:
    faulthandler.enable(all_threads=True)
    torch.set_num_threads(1)
    if torch.cuda.is_available():
        torch.cuda.set_device(rank % torch.cuda.device_count())
    else:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=__import__("datetime").timedelta(seconds=60))
    try:
        fn(rank, world, *args)
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- shared data


NUM_CLASSES = 6
TAIL = torch.tensor([False, False, False, False, True, True])


def mlp(seed: int = 0, batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    if batchnorm:
        return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, NUM_CLASSES))
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, NUM_CLASSES))


def global_batches(steps: int, per_rank: int, world: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``world * per_rank`` samples; rank r takes rows ``[r * per_rank, (r + 1) * per_rank)``.

    The tail count per rank cycles through: both ranks, rank 0 only, neither, rank 1 only, so that a
    rank with no tail sample meets one with some, and both meet a batch with none.
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        x = torch.randn(world * per_rank, 8, generator=g)
        y = torch.randint(0, 4, (world * per_rank,), generator=g)
        pattern = step % 4
        for r in range(world):
            has_tail = pattern == 0 or (pattern == 1 and r == 0) or (pattern == 3 and r == world - 1)
            if has_tail:
                y[r * per_rank + (step % per_rank)] = 4 + (step % 2)
        out.append((x, y))
    return out


def per_sample_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[..., torch.Tensor]:
    def closure(index: Any = None) -> torch.Tensor:
        if index is None:
            return nn.functional.cross_entropy(model(x), y, reduction="none")
        return nn.functional.cross_entropy(model(x[index]), y[index], reduction="none")

    return closure


# ---------------------------------------------------------------- DDP workers

STEPS, PER_RANK, LR, RHO = 10, 8, 0.1, 0.05


def _flat(tensors: Any) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


def _gathered(flat: torch.Tensor, world: int) -> list[torch.Tensor]:
    out = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(out, flat)
    return out


def ddp_configs(rank: int, world: int, configs: list[dict[str, Any]], out: str) -> None:
    """Train one DDP model per config for ``STEPS`` steps; save, per config, rank 0's parameters and
    buffers, every rank's parameters, and the number of DDP all-reduces of each step."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    from imbsam_fast import ImbSAM

    results = []
    for cfg in configs:
        model = mlp(0, batchnorm=cfg.get("batchnorm", False))
        ddp = DDP(model, gradient_as_bucket_view=cfg.get("bucket_view", False))
        calls: list[int] = []

        def counting_hook(state, bucket, calls=calls):  # noqa: ANN001 - DDP rejects string annotations
            calls.append(1)
            return allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, counting_hook)
        opt = ImbSAM(ddp.parameters(), torch.optim.SGD, lr=LR, momentum=0.9, rho=RHO, tail_mask=TAIL,
                     mode=cfg["mode"], model=ddp, **cfg.get("options", {}))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=10 ** 6) if cfg.get(
            "scaler") else None
        per_step = []
        for x, y in global_batches(STEPS, PER_RANK, world):
            xs, ys = x[rank * PER_RANK:(rank + 1) * PER_RANK], y[rank * PER_RANK:(rank + 1) * PER_RANK]
            before = len(calls)
            opt.step(per_sample_loss(ddp, xs, ys), ys, scaler=scaler, **cfg.get("step", {}))
            if scaler is not None:
                scaler.update()
            per_step.append(len(calls) - before)
        results.append({
            "params": [p.detach().clone() for p in model.parameters()],
            "replicas": _gathered(_flat(model.parameters()), world),
            "buffers": [b.detach().clone() for b in model.buffers()],
            "allreduces": per_step,
        })
        del ddp, opt, counting_hook
        gc.collect()  # this config's DDP and its reducer freed here, on this thread, not by a later collection
    if rank == 0:
        torch.save(results, out)


def fsdp2_configs(rank: int, world: int, configs: list[dict[str, Any]], out: str) -> None:
    """Train one FSDP2 (``fully_shard``) model per config; save the full parameters (rank 0)."""
    from torch.distributed.fsdp import fully_shard

    from imbsam_fast import ImbSAM

    results = []
    for cfg in configs:
        model = mlp(0)
        fully_shard(model[0])
        fully_shard(model[2])
        fully_shard(model)
        opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=LR, momentum=0.9, rho=RHO, tail_mask=TAIL,
                     mode=cfg["mode"], model=model, **cfg.get("options", {}))
        for x, y in global_batches(STEPS, PER_RANK, world):
            xs, ys = x[rank * PER_RANK:(rank + 1) * PER_RANK], y[rank * PER_RANK:(rank + 1) * PER_RANK]
            opt.step(per_sample_loss(model, xs, ys), ys, **cfg.get("step", {}))
        results.append({"params": [p.full_tensor().detach().clone() for p in model.parameters()]})
        del model, opt
        gc.collect()
    if rank == 0:
        torch.save(results, out)


def syncbn_in_sync(rank: int, world: int, out: str) -> None:
    """A SyncBatchNorm model under DDP (CUDA, NCCL) in fast mode: parameters and running statistics agree."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from imbsam_fast import ImbSAM

    device = torch.device("cuda", torch.cuda.current_device())
    model = nn.SyncBatchNorm.convert_sync_batchnorm(mlp(0, batchnorm=True)).to(device)
    ddp = DDP(model, device_ids=[device.index])
    opt = ImbSAM(ddp.parameters(), torch.optim.SGD, lr=LR, momentum=0.9, tail_mask=TAIL, mode="fast", model=ddp)
    for x, y in global_batches(STEPS, PER_RANK, world):
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        xs, ys = x[rows].to(device), y[rows].to(device)
        opt.step(per_sample_loss(ddp, xs, ys), ys)
    state = _flat([*model.parameters(), *model.buffers()])
    replicas = [t.cpu() for t in _gathered(state, world)]
    if rank == 0:
        torch.save(replicas, out)
