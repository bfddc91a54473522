"""Host side of the multi-tensor kernels: pointer tables and chunk tables.

A bucket of ``T`` same-dtype tensors on one device is cut into chunks of
``CHUNK`` elements; one Triton program handles one chunk. The kernels find
their tensor through two tables:

* a pointer table, ``int64[L, T]``: the data pointers of ``L`` parallel lists
  (for instance params, grads, backups);
* a chunk table: ``sizes[T]`` (elements per tensor), and per chunk its tensor
  index and first element.

Chunk tables depend only on the tensors' sizes and are cached for good.
Pointer tables are cached by the pointers themselves, so a table is rebuilt
exactly when some storage moved (a new gradient tensor, ``model.to()``).
Tables for a GPU travel through pinned memory with a non-blocking copy: no
host synchronization.

Inside a kernel, each program walks its chunk in full ``BLOCK``s without a
mask, then one masked tail block. With every pointer 16-byte aligned (checked
on the host, passed as ``ALIGNED``) and chunk starts at multiples of
``CHUNK``, the compiler can then use 16-byte vector loads and stores.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = [
    "CHUNK", "BLOCK", "ChunkTable", "chunk_table", "PointerTables", "triton_dtype", "chunk_base",
    "chunk_of", "numels", "LaunchConfig", "DEFAULT_LAUNCH", "launch",
]

_data_ptr = torch.Tensor.data_ptr
_numel = torch.Tensor.numel

CHUNK = 4096
BLOCK = 2048


@dataclass(frozen=True)
class LaunchConfig:
    """Elements per program (``chunk``, a multiple of ``block``), per loop step (``block``), and warps.

    The defaults were chosen on an H100 (``benchmarks/RESULTS.md``); pass another
    config to the kernels (or to ``TritonParamOps``) to tune.
    """

    chunk: int = CHUNK
    block: int = BLOCK
    num_warps: int = 8

    def __post_init__(self) -> None:
        if self.block < 16 or self.chunk % self.block or self.block & (self.block - 1):
            raise ValueError(f"block must be a power of two >= 16 dividing chunk, got {self}")


DEFAULT_LAUNCH = LaunchConfig()


@triton.jit
def chunk_of(chunk_tensor, chunk_start, sizes, CHUNK: tl.constexpr):
    """This program's chunk: tensor index ``t``, first element ``start`` and length ``n <= CHUNK``."""
    c = tl.program_id(0)
    t = tl.load(chunk_tensor + c)
    start = tl.load(chunk_start + c)
    return t, start, tl.minimum(tl.load(sizes + t) - start, CHUNK)


@triton.jit
def chunk_base(ptrs, row, num_tensors, t, start, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointer to element ``start`` of tensor ``t`` of list ``row`` in the pointer table."""
    addr = tl.load(ptrs + row * num_tensors + t) + start * (DTYPE.primitive_bitwidth // 8)
    if ALIGNED:
        addr = tl.multiple_of(addr, 16)
    return addr.to(tl.pointer_type(DTYPE))


def triton_dtype(dtype: torch.dtype):
    """The ``tl`` element type for a supported torch dtype, else ``None``."""
    import triton.language as tl

    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(dtype)


def numels(tensors: list[Tensor]) -> tuple[int, ...]:
    """Element counts, the key of :func:`chunk_table`."""
    return tuple(map(_numel, tensors))


def _to_device(values: list[int], device: torch.device) -> Tensor:
    host = torch.tensor(values, dtype=torch.int64)
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


class ChunkTable(NamedTuple):
    """``sizes[T]``, ``chunk_tensor[C]`` and ``chunk_start[C]`` for ``C`` chunks of ``CHUNK`` elements."""

    sizes: Tensor
    chunk_tensor: Tensor
    chunk_start: Tensor
    num_chunks: int


@lru_cache(maxsize=256)
def chunk_table(numels: tuple[int, ...], device: torch.device, chunk: int = CHUNK) -> ChunkTable:
    """Chunks of ``chunk`` elements over tensors of ``numels`` elements (empty tensors get none)."""
    tensor_idx: list[int] = []
    starts: list[int] = []
    for t, n in enumerate(numels):
        for s in range(0, n, chunk):
            tensor_idx.append(t)
            starts.append(s)
    return ChunkTable(
        _to_device(list(numels), device), _to_device(tensor_idx, device), _to_device(starts, device), len(starts)
    )


class PointerTables:
    """A small cache of pointer tables keyed by the pointers they hold."""

    def __init__(self, capacity: int = 16) -> None:
        self._cache: OrderedDict[tuple[int, ...], tuple[Tensor, bool]] = OrderedDict()
        self._capacity = capacity

    def get(self, lists: list[list[Tensor]], device: torch.device) -> tuple[Tensor, bool]:
        """``int64[L, T]`` table of data pointers of the ``L`` lists, on ``device``, and whether every
        pointer is 16-byte aligned (which lets the kernels use vector loads)."""
        ptrs = tuple(chain.from_iterable(map(_data_ptr, ts) for ts in lists))
        key = (len(lists), device.index or 0, *ptrs)
        entry = self._cache.get(key)
        if entry is None:
            table = _to_device(list(ptrs), device).view(len(lists), -1)
            entry = (table, all(p % 16 == 0 for p in ptrs))
            self._cache[key] = entry
            if len(self._cache) > self._capacity:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return entry

    def clear(self) -> None:
        self._cache.clear()


def launch(kernel, lists: list[list[Tensor]], tables: PointerTables, cfg: LaunchConfig, *args, **constexprs) -> int:
    """Run a multi-tensor ``kernel`` with one program per chunk of the tensors of ``lists[0]``.

    Every multi-tensor kernel takes ``(ptrs, num_tensors, sizes, chunk_tensor,
    chunk_start, *args)`` and the constexprs ``DTYPE``, ``ALIGNED``, ``CHUNK``,
    ``BLOCK``; ``lists`` are parallel lists of same-shape tensors of one dtype on
    one device. Returns the number of programs launched (0 launches nothing).
    """
    first = lists[0]
    device = first[0].device
    ct = chunk_table(numels(first), device, cfg.chunk)
    if ct.num_chunks == 0:
        return 0
    ptrs, aligned = tables.get(lists, device)
    kernel[(ct.num_chunks,)](
        ptrs, len(first), ct.sizes, ct.chunk_tensor, ct.chunk_start, *args,
        DTYPE=triton_dtype(first[0].dtype), ALIGNED=aligned, CHUNK=cfg.chunk, BLOCK=cfg.block,
        num_warps=cfg.num_warps, **constexprs,
    )
    return ct.num_chunks
