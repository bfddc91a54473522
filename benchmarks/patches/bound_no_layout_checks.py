"""A bound, unsafe on purpose: arm B skips the checks that the layouts kept from earlier steps still hold, and
trusts them instead. B - A is at most what those checks cost a step.

- the ParamBook's take: no list of the groups' parameters, no identity walk against the book's;
- the fused base step: the kept plan without ``fused_sgd_applies`` or ``_KeptPlan.holds``;
- the BatchNorm snapshot: the buffers listed once, at the patch (no walk, no identity check);
- the BatchNorm layer plan: the plan kept, its key (every layer's mode, momentum, tracking) not read;
- the record's gather: the running statistics kept, not read again from the layers.

Each falls back to the real code until there is something kept to trust (the warm-up's first steps).
"""

import types

import torch

from imbsam_fast import optimizer
from imbsam_fast.batchnorm import BatchNormSnapshot


def patch(opt, model) -> None:
    book, bn, flat = opt._book, opt._bn, opt._bn._flat
    real_take, real_plan, real_gather, real_kept = book.take, bn._layer_plan, flat.gather, optimizer.kept_plan

    def take(self, groups, buckets):
        if self._book is None:
            return real_take(groups, buckets)
        self._book.take()
        self.holding = True
        return True

    def kept_plan(of, backup_of):
        if of is opt and opt._fused_plan is not None and book._sgd_of is opt._fused_plan:
            return opt._fused_plan
        return real_kept(of, backup_of)

    buffers = bn.buffers()

    def snapshot(self):
        return BatchNormSnapshot(buffers, self._snapshot_copy.of(buffers))

    def layer_plan(self):
        return real_plan() if self._plan_key is None else self._plan

    def gather(self, layers):
        if not self._src:
            return real_gather(layers)
        torch.cat(self._src, out=self._old)
        return self

    book.take = types.MethodType(take, book)
    optimizer.kept_plan = kept_plan
    bn.snapshot = types.MethodType(snapshot, bn)
    bn._layer_plan = types.MethodType(layer_plan, bn)
    flat.gather = types.MethodType(gather, flat)
