"""A floor, wrong on purpose: arm B's ``step`` is a hand-written fast step with the library's passes and the same
calls into the C++ ParamBook, and nothing else.

    l = closure();  (l . a[y] / B).backward()          head pass
    take()                                              g_h aside
    T = nonzero(b[y]);  (closure(T) . b[y][T] / B).backward()
    ascend(eps); give()                                 w <- w + rho g_t / ||g_t||, g_h back
    (closure(T) . b[y][T] / B).backward()               perturbed pass
    restore_sgd(...); clear()                           w <- backup, SGD on g_h + g_t'

Left out: every check of the inputs and of the kept layouts, the hooks, micro-batches, distributed sync,
the non-finite check and all BatchNorm handling (the tail passes normalize by their own few samples and
move the running statistics), the losses returned, and the step counter. Its step's Python is what any
schedule written in Python pays for these passes and calls, so arm B's own figure is a floor for the
library's step and B - A is at most what the library can save while it stays in Python.

Until the library's own steps have set the book's buckets and fused SGD plan (the warm-up's first steps), arm B
steps through the library.
"""

import types

import torch

EPS = 1e-12


def patch(opt, model) -> None:
    if opt._book is None or len(opt.param_groups) != 1:
        raise ValueError("floor_minimal_step: needs the extension's ParamBook and one param group")
    group = opt.param_groups[0]
    options = ([float(group["lr"])], [float(group["momentum"])], [float(group["dampening"])],
               [float(group["weight_decay"])], [bool(group["nesterov"])], [bool(group["maximize"])], None)
    table = {}
    library_step = opt.step

    def step(self, closure, targets):
        if self._book._sgd_of is None or not self._book._layout:
            return library_step(closure, targets)
        book = self._book._book
        key = targets.shape[0]
        weights = table.get(key)
        if weights is None:
            weights = table[key] = self.class_weights.table() / key
        head_w, tail_w = weights[targets].unbind(1)
        losses = closure()
        torch.dot(losses, head_w).backward()
        book.take()
        index = torch.nonzero(tail_w).squeeze(1)
        tail_at = tail_w[index]
        torch.dot(closure(index), tail_at).backward()
        book.ascend(EPS)
        book.give()
        torch.dot(closure(index), tail_at).backward()
        book.restore_sgd(*options)
        book.clear()

    opt.step = types.MethodType(step, opt)
