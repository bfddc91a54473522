"""Triton parameter ops: a constant number of launches per phase, no host sync.

Per step, for buckets the kernels cover (fp32 / fp16 / bf16, contiguous, one
device): the tail-gradient norm is one stage-1 launch per bucket plus one
stage-2 launch; the perturbation one launch per bucket; the restore one
launch per bucket. Anything else (fp64, non-contiguous tensors, several
devices) goes through the torch ops, with the same results, and is named in
``fallbacks``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .buckets import EPS, Bucket, SqNormReduce
from .coverage import ListCoverage
from .kernels import interpreting, load_kernels
from .torch_ops import TorchParamOps, perturb_bucket_

__all__ = ["TritonParamOps"]

class TritonParamOps(ListCoverage):
    """Norm / perturb / restore through the kernels in ``imbsam_fast.kernels``.

    ``launch`` is the multi-tensor launch configuration (``LaunchConfig``;
    the tuned default when ``None``); ``capturable`` goes to the torch ops it falls back to.
    """

    name = "triton"

    def __init__(self, launch: Optional[object] = None, capturable: bool = False) -> None:
        k = load_kernels()
        self._k = k
        self._cfg = launch if launch is not None else k.multi_tensor.DEFAULT_LAUNCH
        self._tables = k.multi_tensor.PointerTables()
        self._torch = TorchParamOps(capturable)
        self.fallbacks: set[str] = set()

    def _why_not_first(self, first: Tensor) -> Optional[str]:
        if self._k.multi_tensor.triton_dtype(first.dtype) is None:
            return str(first.dtype)
        if first.device.type == "cpu" and not interpreting():
            return "cpu tensors"
        return None

    def sq_norm(self, grads: list[Tensor]) -> Tensor:
        """``sum_j ||g_j||_2^2`` as a 0-dim fp32 tensor on the gradients' device."""
        if grads and self.covers(grads):
            return self._k.grad_norm.sq_norm([grads], self._tables, self._cfg)
        return self._torch.sq_norm(grads)

    def _total_sq_norm(self, grad_lists: list[list[Tensor]]) -> Tensor:
        grad_lists = [gs for gs in grad_lists if gs]
        if not grad_lists:
            return torch.zeros(())
        device = grad_lists[0][0].device
        if all(gs[0].device == device and self.covers(gs) for gs in grad_lists):
            return self._k.grad_norm.sq_norm(grad_lists, self._tables, self._cfg)
        parts = [self.sq_norm(gs).to(device, non_blocking=True) for gs in grad_lists]
        return torch.stack([p.to(torch.float64 if p.dtype == torch.float64 else torch.float32) for p in parts]).sum()

    def grad_norm(self, grad_lists: list[list[Tensor]], reduce: SqNormReduce = None) -> Tensor:
        """Global ``||g||_2 = sqrt(reduce(sum_j ||g_j||^2))`` over every tensor of every list."""
        total = self._total_sq_norm(grad_lists)
        return (total if reduce is None else reduce(total)).sqrt()

    def perturb_(self, buckets: list[Bucket], reduce: SqNormReduce = None) -> Tensor:
        """Global norm, then ``backup <- w``, ``w <- w + rho / (norm + 1e-16) * g`` per bucket. Returns the norm.

        ASAM (adaptive) buckets scale the gradient by ``|w|`` before the shared norm, so
        any adaptive bucket sends the whole phase through the torch ops.
        """
        if any(b.adaptive for b in buckets):
            self.fallbacks.add("adaptive (ASAM)")
            return self._torch.perturb_(buckets, reduce)
        total = self._total_sq_norm([b.grads for b in buckets])
        if reduce is not None:
            total = reduce(total)
        on_device: dict[torch.device, Tensor] = {}
        for b in buckets:
            if b.device not in on_device:
                on_device[b.device] = total.to(b.device, non_blocking=True)
            if self.covers(b.params, b.grads, b.backups):
                self._k.perturb.perturb_(b.params, b.grads, b.backups, on_device[b.device].float(), b.rho, EPS,
                                         self._tables, self._cfg)
            else:
                norm = on_device[b.device].sqrt()
                perturb_bucket_(b, b.rho / (norm + EPS), capturable=True)
        return total.sqrt()

    def restore_(self, buckets: list[Bucket]) -> None:
        """Bit-exact restore: ``w <- backup``."""
        for b in buckets:
            if self.covers(b.params, b.backups):
                self._k.restore.restore_(b.params, b.backups, self._tables, self._cfg)
            else:
                torch._foreach_copy_(b.params, b.backups)
