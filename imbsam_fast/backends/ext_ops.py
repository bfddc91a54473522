"""Parameter ops through the C++ extension (``torch.ops.imbsam_fast.*``, see ``csrc/param_ops.cpp``).

One op call per bucket and phase, each a single parallel pass over all of
the bucket's tensors: no per-tensor dispatch. Contiguous fp32, fp64, fp16 and
bf16 tensors on the CPU are covered, and on CUDA when the extension was built
with its CUDA kernels; anything else (non-contiguous tensors, other devices)
and ASAM's adaptive buckets go through the torch ops and are named in ``fallbacks``.

A bucket's tensors are not walked in Python to find out: the ops check every
tensor themselves and refuse what they do not take with a ``NotImplementedError``
before they write anything. The bucket then goes through the torch ops, and so
does every later call on the same bucket layout (one refusal, not one a step).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .buckets import EPS, Bucket, SqNormReduce, sum_sq_norms
from .coverage import ListCoverage
from .extension import BUILD_HINT, ext_error, load_extension
from .torch_ops import TorchParamOps, perturb_bucket_

__all__ = ["ExtParamOps"]

_COVERED = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_REFUSALS_KEPT = 16


class ExtParamOps(ListCoverage):
    """Norm / perturb / restore (and a fused restore + SGD step) through the extension's ops; ``capturable`` goes
    to the torch ops it falls back to."""

    name = "ext"

    def __init__(self, capturable: bool = False) -> None:
        if not load_extension():
            raise RuntimeError(f"backend='ext': the C++ extension is not available ({ext_error()}); {BUILD_HINT}")
        self._ops = torch.ops.imbsam_fast
        self._torch = TorchParamOps(capturable)
        self.fallbacks: set[str] = set()
        self._refused: dict[int, list[Tensor]] = {}
        """``id(bucket.params) -> bucket.params`` of layouts an op refused (kept, so the id stays its own)."""
        has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
        self._devices = {d for d in ("cpu", "cuda") if has_kernel("imbsam_fast::sq_norm", d.upper())}

    def _why_not_first(self, first: Tensor) -> Optional[str]:
        if first.device.type not in self._devices:
            return f"{first.device.type} tensors"
        if first.dtype not in _COVERED:
            return str(first.dtype)
        return None

    def sq_norm(self, grads: list[Tensor]) -> Tensor:
        """``sum_j ||g_j||_2^2`` (fp32, fp64 for fp64 tensors)."""
        if grads and self.covers(grads):
            return self._ops.sq_norm(grads)
        return self._torch.sq_norm(grads)

    def _tries(self, b: Bucket) -> bool:
        """Whether to run the kernels on bucket ``b``: its first tensor's device and dtype are covered and no
        earlier call refused its layout (the kernels check the rest themselves)."""
        if id(b.params) in self._refused:
            return False
        why = self._why_not_first(b.params[0])
        if why is not None:
            self.fallbacks.add(why)
        return why is None

    def _on_bucket(self, b: Bucket, op: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
        """``(True, op(*args))``, or ``(False, None)`` when ``b`` goes through the torch ops: refused now (the op
        wrote nothing, and the layout is remembered) or before."""
        if not self._tries(b):
            return False, None
        if torch.compiler.is_compiling():
            # Traced once: walk the lists here, as a refusal inside a compiled graph could not fall back.
            if not self.covers(*[a for a in args if isinstance(a, list)]):
                return False, None
            return True, op(*args)
        try:
            return True, op(*args)
        except NotImplementedError as err:
            if len(self._refused) >= _REFUSALS_KEPT:
                self._refused.clear()
            self._refused[id(b.params)] = b.params
            self.fallbacks.add("non-contiguous tensors" if "contiguous" in str(err) else "mixed devices or dtypes")
            return False, None

    def _bucket_sq_norm(self, b: Bucket) -> Tensor:
        ran, out = self._on_bucket(b, self._ops.sq_norm, b.grads)
        return out if ran else self._torch.sq_norm(b.grads)

    @staticmethod
    def _reduced(parts: list[Tensor], reduce: SqNormReduce) -> Tensor:
        if len({p.dtype for p in parts}) > 1:
            parts = [p.double() for p in parts]
        total = sum_sq_norms(parts)
        return total if reduce is None else reduce(total)

    def grad_norm(self, grad_lists: list[list[Tensor]], reduce: SqNormReduce = None) -> Tensor:
        """Global ``||g||_2 = sqrt(reduce(sum_j ||g_j||^2))``."""
        return self._reduced([self.sq_norm(gs) for gs in grad_lists if gs], reduce).sqrt()

    def perturb_(self, buckets: list[Bucket], reduce: SqNormReduce = None) -> Tensor:
        """One global norm, then per bucket ``backup <- w``, ``w <- w + rho / (norm + 1e-16) * g``."""
        if any(b.adaptive for b in buckets):
            self.fallbacks.add("adaptive (ASAM)")
            return self._torch.perturb_(buckets, reduce)
        total = self._reduced([self._bucket_sq_norm(b) for b in buckets], reduce)
        for b in buckets:
            ran, _ = self._on_bucket(b, self._ops.perturb_, b.params, b.grads, b.backups, total, b.rho, EPS)
            if not ran:
                perturb_bucket_(b, (b.rho / (total.sqrt() + EPS)).to(b.device), capturable=True)
        return total.sqrt()

    def restore_(self, buckets: list[Bucket]) -> None:
        """Bit-exact restore: ``w <- backup``."""
        for b in buckets:
            ran, _ = self._on_bucket(b, self._ops.restore_, b.params, b.backups)
            if not ran:
                torch._foreach_copy_(b.params, b.backups)

    def restore_sgd_(self, params: list[Tensor], backups: list[Tensor], grads: list[Tensor],
                     buffers: list[Tensor], lr: float, momentum: float, dampening: float, weight_decay: float,
                     nesterov: bool, maximize: bool, skip: Optional[Tensor] = None) -> None:
        """``w <- backup``, then ``torch.optim.SGD``'s update with these options, in one pass (the caller
        checks that the lists are covered and the momentum buffers exist); only the restore where the
        device-side flag ``skip`` is set."""
        self._ops.restore_sgd_(params, backups, grads, buffers, lr, momentum, dampening, weight_decay, nesterov,
                               maximize, skip)
