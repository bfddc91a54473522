"""A known difference for ``python_share_paired.py``: a fixed amount of pure Python after each backward of
arm B (three a fast tail step), at a hook point that keeps the fused base step.

The loop counts iterations rather than watching the clock, so the sampler's pauses do not change its work.
4,000 iterations took 0.098 ms hot on the 2-core Xeon of ``benchmarks/RESULTS.md`` (Python 3.11): about
0.3 ms a step in all, more on a cold cache.
"""

from imbsam_fast.hooks import StepHooks

ITERATIONS = 4000


class BusyAfterBackward(StepHooks):
    def after_backward(self, opt, phase) -> None:
        for _ in range(ITERATIONS):
            pass


def patch(opt, model) -> None:
    opt.register_step_hooks(BusyAfterBackward())
