"""The phases' gradient bookkeeping through the C++ extension (``torch.classes.imbsam_fast.ParamBook``).

With ``backend="ext"`` the optimizer's phases do not read, move or clear the
gradients in Python, nor hand lists of tensors to the kernels, which convert
every element at each call (about 0.5 us a tensor on a 2-core Xeon, 95 tensors
nine times a step on ResNet-32). A ``ParamBook`` holds the parameter lists in
C++, converted once while the layout holds, and each phase is one call::

    first_step    take()          g_h_j <- w_j.grad, w_j.grad <- None          (every parameter)
    second_step   ascend(eps)     s = ||g_t||^2; b <- w; w <- w + rho / (sqrt(s) + eps) g_t
                  give()          w_j.grad <- g_h_j
    third_step    update_norm()   ||g_h + g_t'||_2 (the non-finite check)
                  restore_sgd()   w <- b, torch.optim.SGD's update, per param group
                  clear()         w_j.grad <- None

It serves the common case: every parameter of every group has a dense
gradient, no ASAM group, the buckets and the fused SGD plan
(:mod:`imbsam_fast.fused_sgd`) as the Python phases last kept them. Anything
else, and whatever the book refuses (it checks every tensor before it writes
anything), runs the Python phases, with the same result bit for bit; a
refused layout is not asked again until the buckets regroup.
"""

from __future__ import annotations

import itertools
import operator
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor

from .buckets import EPS, Bucket
from .extension import ext_available

if TYPE_CHECKING:
    from ..fused_sgd import _KeptPlan
    from ..param_buckets import ParamBuckets
    from .ext_ops import ExtParamOps

__all__ = ["ExtBook", "book_available"]

_chain = itertools.chain.from_iterable


def _new_book(params: list[Tensor]) -> Any:
    return torch.classes.imbsam_fast.ParamBook(params)


_BOOK_METHODS = ("set_buckets", "set_sgd", "take", "give", "gradients", "drop", "ascend", "update_norm",
                 "restore_sgd", "clear")


class _BoundBook:
    """A ParamBook's methods, each looked up once.

    A method looked up on the TorchScript object fails the generic attribute lookup first (an AttributeError
    formatted and dropped), then runs the object's ``__getattr__``, which imports a module and builds a new
    ``ScriptMethod``. A step made six lookups: about 0.2 ms of host time a step on ResNet-32 on a 2-core CPU,
    paired in one process (``benchmarks/RESULTS.md``, eleventh session).
    """

    __slots__ = ("book", *_BOOK_METHODS)

    def __init__(self, book: Any) -> None:
        self.book = book
        for name in _BOOK_METHODS:
            setattr(self, name, getattr(book, name))


def book_available() -> bool:
    """Whether the extension is built and has the ParamBook class (one built before it has not)."""
    if not ext_available():
        return False
    try:
        return torch.classes.imbsam_fast.ParamBook is not None
    except (AttributeError, RuntimeError):
        return False


class ExtBook:
    """One optimizer's ParamBook, kept in step with its parameters, buckets and fused SGD plan."""

    def __init__(self, ops: ExtParamOps) -> None:
        self._ops = ops
        self._params: list[Tensor] = []
        self._book: Any = None
        self._settings: Optional[list[tuple[float, bool]]] = None
        self._generation = -1
        self._layout: list[Bucket] = []
        self._sgd_of: Optional[_KeptPlan] = None
        self._refused_at: Optional[int] = None
        """The bucket generation whose layout the book refused (or could not take): not asked again."""
        self.holding = False
        """Whether the book holds this step's head gradients (between take and give)."""

    def take(self, groups: list[dict[str, Any]], buckets: ParamBuckets) -> bool:
        """:meth:`ImbSAM.first_step`: every ``.grad`` moved into the book. ``False``, with nothing changed, when
        a parameter has no dense gradient or the book refused this layout."""
        if self._refused_at is not None and self._refused_at == buckets.generation:
            return False
        # One group's list is compared as it is (no list made a step); the book keeps a copy of it.
        params = groups[0]["params"] if len(groups) == 1 else list(_chain([g["params"] for g in groups]))
        if self._book is None or len(params) != len(self._params) or not all(
                map(operator.is_, params, self._params)):
            params = list(params)
            self._book = _BoundBook(_new_book(params))
            self._params, self._settings, self._sgd_of = params, None, None
        if self._book.take() != len(params):
            self._book.give()
            self._refused_at = buckets.generation
            return False
        self.holding = True
        return True

    def ascend(self, groups: list[dict[str, Any]], buckets: ParamBuckets) -> Optional[tuple[list[Bucket], Tensor]]:
        """:meth:`ImbSAM.second_step` from the gradients in ``.grad``, the head gradients given back: the buckets
        and ``||g_t||``. ``None`` when the book refuses; the head gradients are then still in it
        (:meth:`hand_back`)."""
        settings = [(g["rho"], g["adaptive"]) for g in groups]
        if settings != self._settings or buckets.generation != self._generation:
            rhos = list(_chain([itertools.repeat(s, len(g["params"])) for g, s in zip(groups, settings)]))
            layout = buckets.layout(self._params, rhos)
            if any(b.adaptive for b in layout):
                return self._refuse(buckets, "adaptive (ASAM)")
            self._book.set_buckets(list(_chain([b.params for b in layout])), list(_chain([b.backups for b in layout])),
                                   [len(b.params) for b in layout], [float(b.rho) for b in layout])
            self._settings, self._generation, self._layout = settings, buckets.generation, layout
        if not all(map(self._ops._tries, self._layout)):
            return self._refuse(buckets, None)
        try:
            norm = self._book.ascend(EPS)
        except NotImplementedError as err:
            return self._refuse(buckets, _why(err))
        self._book.give()
        self.holding = False
        return self._layout, norm

    def hand_back(self) -> tuple[list[Tensor], list[Optional[Tensor]]]:
        """The parameters and the head gradients the book holds, as Python lists; the book lets go of them."""
        grads = list(self._book.gradients())
        self._book.drop()
        self.holding = False
        return self._params, grads

    def sgd_step(self, kept: _KeptPlan, skip_check: bool) -> Optional[Tensor]:
        """The non-finite check's norm ``||g||_2`` (``None`` when ``skip_check``), read before anything is written.
        Raises ``NotImplementedError`` (nothing written) when the book refuses."""
        if self._sgd_of is not kept:
            plan = kept.plan
            self._book.set_sgd(list(_chain([e[0] for e in plan])), list(_chain([e[1] for e in plan])),
                               list(_chain([e[3] for e in plan])), [len(e[0]) for e in plan],
                               [bool(e[3]) for e in plan])
            self._sgd_of = kept
        return None if skip_check else self._book.update_norm()

    def restore_sgd(self, kept: _KeptPlan) -> None:
        """``w <- backup`` and SGD's update with each group's options now; ``NotImplementedError`` (nothing written)
        when the book refuses."""
        lr, momentum, dampening, weight_decay, nesterov, maximize = [], [], [], [], [], []
        for entry in kept.plan:
            g = entry[4]
            lr.append(float(g["lr"]))
            momentum.append(float(g["momentum"]))
            dampening.append(float(g["dampening"]))
            weight_decay.append(float(g["weight_decay"]))
            nesterov.append(bool(g["nesterov"]))
            maximize.append(bool(g["maximize"]))
        self._book.restore_sgd(lr, momentum, dampening, weight_decay, nesterov, maximize, None)

    def clear(self) -> None:
        """``p.grad = None`` for every parameter."""
        self._book.clear()

    def refused(self, buckets: ParamBuckets, err: NotImplementedError) -> None:
        """A phase fell back: not asked again until the buckets regroup."""
        self._refuse(buckets, _why(err))

    def drop(self) -> None:
        """A step undone: let go of any head gradients held."""
        if self._book is not None:
            self._book.drop()
        self.holding = False

    def _refuse(self, buckets: ParamBuckets, why: Optional[str]) -> None:
        self._refused_at = buckets.generation
        if why is not None:
            self._ops.fallbacks.add(why)
        return None


def _why(err: NotImplementedError) -> Optional[str]:
    """The fallback reason to record, or ``None`` for a parameter without a gradient (no kernel refused)."""
    msg = str(err)
    if "gradient" in msg:
        return None
    return "non-contiguous tensors" if "contiguous" in msg else "mixed devices or dtypes"
