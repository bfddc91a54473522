"""Arm B calls its ParamBook's methods on the TorchScript object itself, looking each one up at every call, as
every step did before ``ext_book._BoundBook``: the book is made here, unbound, for the optimizer's parameters,
and the ExtBook keeps it while they stay the same.

B - A is then what looking the methods up once saves.
"""

import itertools

from imbsam_fast.backends import ext_book


def patch(opt, model) -> None:
    params = list(itertools.chain.from_iterable(g["params"] for g in opt.param_groups))
    opt._book._book, opt._book._params = ext_book._new_book(params), params
