"""Which parameter-op backend runs: ``"auto" | "torch" | "triton" | "ext"``."""

from __future__ import annotations

from .contract import ParamOps
from .extension import ext_available
from .kernels import interpreting, triton_available
from .torch_ops import TorchParamOps

__all__ = ["BACKENDS", "check_backend_name", "resolve_param_backend", "check_triton_devices"]

BACKENDS = ("auto", "torch", "triton", "ext")


def check_backend_name(name: object) -> str:
    """``name`` if it is a known backend, else a ``ValueError`` that lists them."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name  # type: ignore[return-value]


def resolve_param_backend(name: str, device_types: set[str], capturable: bool = False) -> ParamOps:
    """Parameter-op backend for parameters living on ``device_types``.

    ``auto``: Triton when every parameter is on CUDA and Triton imports; the C++ extension when every
    parameter is on the CPU and the extension is built; else torch. ``triton`` on CPU tensors works only
    under Triton's interpreter (``TRITON_INTERPRET=1``). ``ext`` without the extension is a
    ``RuntimeError`` that says how to build it. ``capturable`` parameters on an accelerator take the
    torch foreach ops (``auto``; ``triton`` and ``ext`` are refused): only those are safe in a CUDA graph.
    """
    check_backend_name(name)
    if capturable and device_types - {"cpu"}:
        if name not in ("auto", "torch"):
            raise ValueError(
                f"backend={name!r} cannot run in a captured step on {sorted(device_types - {'cpu'})} tensors: its "
                "multi-tensor launches copy pointer tables from the host each step, which a CUDA graph would "
                "replay from memory freed since; use backend='torch' (or 'auto'), whose foreach ops capture"
            )
        return TorchParamOps(capturable)
    if name == "auto":
        if device_types == {"cuda"} and triton_available():
            from .triton_ops import TritonParamOps

            return TritonParamOps(capturable=capturable)
        if device_types <= {"cpu"} and ext_available():
            from .ext_ops import ExtParamOps

            return ExtParamOps(capturable)
        return TorchParamOps(capturable)
    if name == "torch":
        return TorchParamOps(capturable)
    if name == "ext":
        from .ext_ops import ExtParamOps

        return ExtParamOps(capturable)
    check_triton_devices(device_types)
    from .triton_ops import TritonParamOps

    return TritonParamOps(capturable=capturable)


def check_triton_devices(device_types: set[str]) -> None:
    """Raise unless Triton imports and can run on every device type given."""
    if not triton_available():
        raise RuntimeError("backend='triton' needs Triton: pip install 'imbsam_fast[triton]'")
    unsupported = device_types - {"cuda", "cpu"}
    if unsupported:
        raise RuntimeError(f"backend='triton' runs on CUDA tensors; got tensors on {sorted(unsupported)}")
    if "cpu" in device_types and not interpreting():
        raise RuntimeError(
            "backend='triton' got CPU tensors: Triton kernels run on CUDA, or on the CPU only under "
            "Triton's interpreter (set TRITON_INTERPRET=1 before importing imbsam_fast)"
        )
