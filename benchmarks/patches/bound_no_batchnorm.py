"""A bound, wrong on purpose: arm B does no BatchNorm handling in its steps (no snapshot, record, replay or
freeze; the tail passes normalize by their own few samples and move the running statistics).

B - A is then at most what the step's BatchNorm handling costs: its Python and torch calls outside the
forwards and backwards. The replaying forwards themselves run inside the forward and are not counted either way.
"""

import types
from contextlib import nullcontext


def patch(opt, model) -> None:
    bn = opt._bn
    bn.snapshot = types.MethodType(lambda self: None, bn)
    for name in ("record", "replay", "freeze_running_stats"):
        setattr(bn, name, types.MethodType(lambda self: nullcontext(), bn))
