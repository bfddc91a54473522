"""Backends: one parameter-op contract (:class:`ParamOps`) with a torch and a Triton implementation,
and the class-masked cross-entropy's dispatch, kept apart.

``"auto"`` picks the fastest backend available for the tensors at hand; the
optimizer reports what really ran through its ``backend`` attribute.
"""

from .buckets import Bucket
from .contract import ParamOps
from .kernels import interpreting, triton_available
from .loss_dispatch import resolve_loss_backend
from .param_dispatch import BACKENDS, resolve_param_backend
from .torch_ops import TorchParamOps

__all__ = [
    "BACKENDS", "Bucket", "ParamOps", "TorchParamOps", "interpreting", "resolve_loss_backend",
    "resolve_param_backend", "triton_available",
]
