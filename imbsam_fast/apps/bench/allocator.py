"""The CPU allocator's part in a step's time: page faults, and keeping freed memory in the process.

glibc's ``malloc`` serves large blocks (PyTorch's activations and gradients)
from ``mmap`` or from the top of the heap, and hands them back to the kernel
when they are freed. The next step then touches fresh pages and takes one
page fault for every 4 KiB: on ResNet-32 at batch 64 on a 2-core CPU, about
23,000 faults and 70 ms of kernel time in a 370 ms step. How many depends on
the heap's layout at the moment, which differs between two models trained in
one process, so it adds a few percent of noise to any ratio of their steps.
:func:`keep_freed_memory` makes ``malloc`` keep what is freed for reuse (as
jemalloc or tcmalloc, which PyTorch recommends for CPU training, do anyway).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

try:
    import resource
except ImportError:  # not on Windows
    resource = None  # type: ignore[assignment]

__all__ = ["keep_freed_memory", "minor_faults"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLDS = (1 << 30, 1 << 25)
"""Tried in turn: older glibc refuses a threshold above ``HEAP_MAX_SIZE / 2`` (32 MiB on 64-bit)."""


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory: blocks up to 1 GiB (32 MiB on older glibc) come from the
    heap, and the heap is never trimmed. Returns whether it took effect (``False`` off glibc). Lasts for the
    process."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not any(mallopt(_M_MMAP_THRESHOLD, t) for t in _MMAP_THRESHOLDS):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is missing)."""
    return 0 if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt
