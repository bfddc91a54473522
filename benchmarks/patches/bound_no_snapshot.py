"""A bound, wrong on purpose: arm B takes no BatchNorm snapshot (a skipped non-finite step would keep the
buffers of its forward). B - A is at most what the snapshot costs a step."""

import types


def patch(opt, model) -> None:
    opt._bn.snapshot = types.MethodType(lambda self: None, opt._bn)
