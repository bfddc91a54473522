"""Triton parameter ops: a constant number of launches per phase, no host sync.

Per step, for buckets the kernels cover (fp32 / fp16 / bf16, contiguous, one
device): the tail-gradient norm is one stage-1 launch per bucket plus one
stage-2 launch; the perturbation one launch per bucket; the restore one
launch per bucket. Anything else (fp64, non-contiguous tensors, several
devices) goes through the torch ops, with the same results.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .buckets import EPS, Bucket
from .torch_ops import TorchParamOps, perturb_bucket_

__all__ = ["TritonParamOps", "triton_available"]

_is_contiguous = torch.Tensor.is_contiguous


def triton_available() -> bool:
    """True when Triton imports."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


class TritonParamOps:
    """Norm / perturb / restore through the kernels in ``imbsam_fast.kernels``."""

    name = "triton"

    def __init__(self) -> None:
        from imbsam_fast.kernels import grad_norm, multi_tensor, perturb, restore

        self._k_norm, self._k_perturb, self._k_restore = grad_norm, perturb, restore
        self._mt = multi_tensor
        self._tables = multi_tensor.PointerTables()
        self._torch = TorchParamOps()

    def covers(self, *lists: list[Tensor]) -> bool:
        """Whether the kernels handle these parallel lists (else the torch ops do).

        Within a list, tensors share device and dtype: the optimizer buckets
        parameters that way, autograd gives each gradient its parameter's
        device and dtype, and backups are made with ``empty_like``. So only the
        first tensor of each list is inspected for those, and every tensor for
        contiguity.
        """
        first = lists[0][0]
        if self._mt.triton_dtype(first.dtype) is None:
            return False
        if first.device.type == "cpu" and not self._mt.interpreting():
            return False
        for ts in lists:
            if ts[0].device != first.device or ts[0].dtype != first.dtype:
                return False
            if not all(map(_is_contiguous, ts)):
                return False
        return True

    def sq_norm(self, grads: list[Tensor]) -> Tensor:
        """``sum_j ||g_j||_2^2`` as a 0-dim fp32 tensor on the gradients' device."""
        if grads and self.covers(grads):
            return self._k_norm.sq_norm([grads], self._tables)
        return self._torch.sq_norm(grads)

    def _total_sq_norm(self, grad_lists: list[list[Tensor]]) -> Tensor:
        grad_lists = [gs for gs in grad_lists if gs]
        if not grad_lists:
            return torch.zeros(())
        device = grad_lists[0][0].device
        if all(gs[0].device == device and self.covers(gs) for gs in grad_lists):
            return self._k_norm.sq_norm(grad_lists, self._tables)
        parts = [self.sq_norm(gs).to(device, non_blocking=True) for gs in grad_lists]
        return torch.stack([p.to(torch.float64 if p.dtype == torch.float64 else torch.float32) for p in parts]).sum()

    def grad_norm(self, grad_lists: list[list[Tensor]]) -> Tensor:
        """Global ``||g||_2`` over every tensor of every list."""
        return self._total_sq_norm(grad_lists).sqrt()

    def perturb_(self, buckets: list[Bucket]) -> Tensor:
        """Global norm, then ``backup <- w``, ``w <- w + rho / (norm + 1e-16) * g`` per bucket. Returns the norm."""
        total = self._total_sq_norm([b.grads for b in buckets])
        on_device: dict[torch.device, Tensor] = {}
        for b in buckets:
            if b.device not in on_device:
                on_device[b.device] = total.to(b.device, non_blocking=True)
            if self.covers(b.params, b.grads, b.backups):
                self._k_perturb.perturb_(b.params, b.grads, b.backups, on_device[b.device].float(), b.rho, EPS,
                                         self._tables)
            else:
                norm = on_device[b.device].sqrt()
                perturb_bucket_(b, b.rho / (norm + EPS))
        return total.sqrt()

    def restore_(self, buckets: list[Bucket]) -> None:
        """Bit-exact restore: ``w <- backup``."""
        for b in buckets:
            if self.covers(b.params, b.backups):
                self._k_restore.restore_(b.params, b.backups, self._tables)
            else:
                torch._foreach_copy_(b.params, b.backups)
