"""Gradient synchronization of one ImbSAM step across processes: DDP, FSDP2, or none.

With ``W`` processes each holding ``B`` samples, the update must equal a
single process's on the concatenated batch of ``W B`` samples. Each process
normalizes its losses by its own ``B``, and DDP and FSDP average gradients
over processes, so an averaged gradient is the global one. Per step:

* **DDP** (``model=`` a ``DistributedDataParallel``). Every pass except the
  last runs under ``no_sync()``, so ``g_h`` accumulates locally. The last pass
  (the perturbed one, or the head pass of a plain step) synchronizes, and DDP
  averages the accumulated ``g_h + g_t'``: one all-reduce of the update per
  step. The tail gradient ``g_t`` at ``w`` is averaged by one explicit
  all-reduce (``ascent_sync="global"``, the default: the perturbation of the
  global batch), or left local (``"local"``: per-replica ascent, m-sharpness,
  no extra communication).
* **FSDP2** (parameters sharded as DTensors by ``fully_shard``). Every
  backward reduce-scatters its gradient (FSDP2 has no cheap local
  accumulation), the parameter ops run on the local shards, and every norm
  sums its squares over the shards with one all-reduce of a scalar.

In fast mode the tail passes depend on the data. :meth:`GradSync.global_count`
all-reduces the tail count, so every process runs the same passes (a process
with no tail sample runs them with zero weights) and so the same collectives
in the same order: no pairing of different passes, no hang.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, ContextManager, Optional

import torch
from torch import Tensor, nn

__all__ = ["ASCENT_SYNC", "GradSync", "local_tensor", "make_grad_sync"]

ASCENT_SYNC = ("global", "local")


def _dtensor_type() -> Optional[type]:
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch builds without DTensor
        return None
    return DTensor


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view sharing its storage), else ``t`` itself."""
    local = getattr(t, "_local_tensor", None)
    return t if local is None else local


class GradSync:
    """No synchronization: a single process (the base of the distributed kinds)."""

    kind = "none"
    ascent_sync = "global"

    def forward_context(self, sync: bool) -> ContextManager[Any]:
        """The context a pass's forward and backward run in; ``sync`` marks the pass whose gradients go
        into the update."""
        return nullcontext()

    def reduce_ascent(self, grads: list[Tensor]) -> None:
        """Average the tail gradient at ``w`` over processes, when the ascent is global."""

    def global_count(self, count: Tensor) -> Tensor:
        """The sum of ``count`` over processes (a 0-dim integer tensor)."""
        return count

    def reduce_sq_norm(self, sq_norm: Tensor) -> Tensor:
        """The sum of squares over every process's part of the parameters."""
        return sq_norm

    def any_flag(self, flag: Tensor) -> Tensor:
        """``max`` of a 0-dim flag over processes (device-side)."""
        return flag


class _ProcessGroupSync(GradSync):
    def __init__(self, group: Any) -> None:
        self.group = group
        self.world = torch.distributed.get_world_size(group)

    def _all_reduce(self, t: Tensor, op: Any) -> Tensor:
        torch.distributed.all_reduce(t, op=op, group=self.group)
        return t

    def global_count(self, count: Tensor) -> Tensor:
        return self._all_reduce(count.clone(), torch.distributed.ReduceOp.SUM)

    def any_flag(self, flag: Tensor) -> Tensor:
        return self._all_reduce(flag.clone(), torch.distributed.ReduceOp.MAX)


class DDPSync(_ProcessGroupSync):
    """``no_sync()`` around every pass but the last; one explicit average of ``g_t`` for a global ascent."""

    kind = "ddp"

    def __init__(self, model: nn.Module, ascent_sync: str) -> None:
        super().__init__(getattr(model, "process_group", None))
        self.model = model
        self.ascent_sync = ascent_sync

    def forward_context(self, sync: bool) -> ContextManager[Any]:
        return nullcontext() if sync else self.model.no_sync()

    def reduce_ascent(self, grads: list[Tensor]) -> None:
        """``g <- mean_r g_r``: one all-reduce per dtype, of the gradients flattened into one buffer."""
        if self.ascent_sync == "local" or self.world == 1:
            return
        by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for g in grads:
            by_kind.setdefault((g.device, g.dtype), []).append(g)
        for same in by_kind.values():
            flat = torch.cat([g.reshape(-1) for g in same])
            self._all_reduce(flat, torch.distributed.ReduceOp.SUM)
            flat.div_(self.world)
            torch._foreach_copy_(same, [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in same]), same)])


class ShardedSync(_ProcessGroupSync):
    """FSDP2: gradients are already averaged by each backward; norms sum their squares over the shards."""

    kind = "fsdp2"

    def reduce_sq_norm(self, sq_norm: Tensor) -> Tensor:
        return self._all_reduce(sq_norm.clone(), torch.distributed.ReduceOp.SUM)


def make_grad_sync(model: Optional[nn.Module], params: list[Tensor], ascent_sync: Optional[str]) -> GradSync:
    """The synchronization for ``model`` and ``params``, with clear errors for what is not supported."""
    if ascent_sync is not None and ascent_sync not in ASCENT_SYNC:
        raise ValueError(f"ascent_sync must be one of {', '.join(ASCENT_SYNC)}, got {ascent_sync!r}")
    if torch.distributed.is_available() and model is not None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if isinstance(model, FullyShardedDataParallel) or any(
                isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            raise TypeError(
                "FullyShardedDataParallel (FSDP1) is not supported: its flat parameters change between passes. "
                "Shard the model with torch.distributed.fsdp.fully_shard (FSDP2) instead"
            )
    dtensor = _dtensor_type()
    sharded = [p for p in params if dtensor is not None and isinstance(p, dtensor)]
    if sharded:
        return _sharded_sync(sharded, len(params), ascent_sync)
    if model is not None and isinstance(model, nn.parallel.DistributedDataParallel):
        return DDPSync(model, "global" if ascent_sync is None else ascent_sync)
    if ascent_sync is not None:
        raise ValueError("ascent_sync applies to model=<a DistributedDataParallel module>, which was not given")
    return GradSync()


def _sharded_sync(sharded: list[Tensor], n_params: int, ascent_sync: Optional[str]) -> ShardedSync:
    from torch.distributed.tensor import Shard

    if len(sharded) != n_params:
        raise ValueError(
            "some parameters are DTensors and some are not: shard the whole model with fully_shard (FSDP2), "
            "so that every parameter is sharded over the same mesh"
        )
    mesh = sharded[0].device_mesh
    for p in sharded:
        if p.device_mesh != mesh or mesh.ndim != 1 or not all(isinstance(pl, Shard) for pl in p.placements):
            raise ValueError(
                "ImbSAM supports DTensor parameters sharded (Shard placements) over one 1-D device mesh, as "
                "fully_shard makes them; got placements "
                f"{tuple(p.placements)} on a mesh of {mesh.ndim} dimension(s)"
            )
    if ascent_sync == "local":
        raise ValueError("ascent_sync='local' needs DDP; FSDP2 averages every backward's gradient over shards")
    return ShardedSync(mesh.get_group())
