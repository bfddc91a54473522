"""torch.optim's step hooks and profiler range on ImbSAM.step: there whenever used, skipped otherwise."""

import pytest
import torch
import torch.autograd.profiler as autograd_profiler
from models import mlp, per_sample_closure, vector_batches
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from imbsam_fast import ImbSAM
from imbsam_fast.torch_step_hooks import CAN_SKIP_WRAPPER

TAIL = torch.tensor([False] * 7 + [True] * 3)


def fast_opt(cls=ImbSAM):
    torch.manual_seed(0)
    model = mlp()
    opt = cls(model.parameters(), torch.optim.SGD, lr=0.1, tail_mask=TAIL, mode="fast", model=model)
    batches = vector_batches(3)
    for i, (_, y) in enumerate(batches):
        y[0] = 7 + i
    return opt, model, batches


def test_the_optimizers_own_hooks_fire_once_a_step_and_may_rewrite_the_arguments():
    opt, model, batches = fast_opt()
    seen, calls = [], []
    x, y = batches[0]
    replacement = per_sample_closure(model, x, y, calls)

    def pre(o, args, kwargs):
        seen.append(("pre", o, len(args), dict(kwargs)))
        return ((args[0], replacement, *args[2:]), kwargs) if len(args) > 1 else None

    handles = [opt.register_step_pre_hook(pre),
               opt.register_step_post_hook(lambda o, args, kwargs: seen.append(("post", o, len(args), kwargs)))]
    opt.step(per_sample_closure(model, x, y), y)
    assert seen == [("pre", opt, 3, {}), ("post", opt, 3, {})]
    assert calls and calls[0] is None  # the closure the pre-hook put in ran the full forward
    opt.step()
    assert [s[0] for s in seen] == ["pre", "post", "pre", "post"]
    assert seen[2][2] == 1
    for h in handles:
        h.remove()
    opt.step(per_sample_closure(model, *batches[1]), batches[1][1])
    assert len(seen) == 4


def test_global_step_hooks_fire_once_a_step():
    opt, model, batches = fast_opt()
    seen = []
    handles = [register_optimizer_step_pre_hook(lambda o, a, k: seen.append(("pre", type(o).__name__))),
               register_optimizer_step_post_hook(lambda o, a, k: seen.append(("post", type(o).__name__)))]
    try:
        x, y = batches[0]
        opt.step(per_sample_closure(model, x, y), y)
    finally:
        for h in handles:
            h.remove()
    # The base optimizer's own step (torch's wrapper, not ImbSAM's) fires them too, inside ImbSAM's.
    assert [s for s in seen if s[1] == "ImbSAM"] == [("pre", "ImbSAM"), ("post", "ImbSAM")]
    assert seen[0] == ("pre", "ImbSAM") and seen[-1] == ("post", "ImbSAM")


def test_the_profiler_sees_one_step_range_a_step():
    opt, model, batches = fast_opt()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for x, y in batches:
            opt.step(per_sample_closure(model, x, y), y)
    names = [e.name for e in prof.events()]
    assert names.count("Optimizer.step#ImbSAM.step") == len(batches)


@pytest.mark.skipif(not CAN_SKIP_WRAPPER, reason="this torch has no global hook registries to check")
def test_with_nothing_listening_the_step_enters_no_profiler_range(monkeypatch):
    opt, model, batches = fast_opt()
    entered = []
    enter = autograd_profiler.record_function.__enter__

    def counting_enter(self):
        entered.append(self.name)
        return enter(self)

    monkeypatch.setattr(autograd_profiler.record_function, "__enter__", counting_enter)
    x, y = batches[0]
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(per_sample_closure(model, x, y), y)
    assert not [n for n in entered if n.startswith("Optimizer.step#")]
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_a_subclass_that_overrides_step_gets_each_hook_once():
    class Logged(ImbSAM):
        def step(self, closure=None, targets=None, **kwargs):
            self.calls = getattr(self, "calls", 0) + 1
            return super().step(closure, targets, **kwargs)

    opt, model, batches = fast_opt(Logged)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    x, y = batches[0]
    opt.step(per_sample_closure(model, x, y), y)
    assert seen == ["pre", "post"] and opt.calls == 1


def test_step_hooks_on_the_base_optimizer_or_global_ones_turn_the_fused_sgd_step_off():
    """The fused restore + SGD pass skips the base optimizer's own step, so its hooks would never fire:
    while one is registered (on the base or globally) the step is not fused, and after removal it is again."""
    from imbsam_fast.backends.extension import ext_available
    from imbsam_fast.fused_sgd import fused_sgd_applies

    if not ext_available():
        pytest.skip("the C++ extension is not built")
    torch.manual_seed(0)
    model = mlp()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1, tail_mask=TAIL, mode="fast", model=model,
                 backend="ext")
    assert fused_sgd_applies(opt)
    for register in (opt.base_optimizer.register_step_pre_hook, opt.base_optimizer.register_step_post_hook,
                     register_optimizer_step_pre_hook, register_optimizer_step_post_hook):
        handle = register(lambda o, a, k: None)
        try:
            assert not fused_sgd_applies(opt)
        finally:
            handle.remove()
        assert fused_sgd_applies(opt)
