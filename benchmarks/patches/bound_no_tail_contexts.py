"""A bound, wrong on purpose: arm B's tail passes enter no BatchNorm context (no replay at w, no freeze at
w + e). B - A is at most what entering and leaving the two contexts costs a step."""

import types
from contextlib import nullcontext


def patch(opt, model) -> None:
    bn = opt._bn
    for name in ("replay", "freeze_running_stats"):
        setattr(bn, name, types.MethodType(lambda self: nullcontext(), bn))
