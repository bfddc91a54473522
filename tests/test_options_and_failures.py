"""Options that do not apply are rejected; the failures a new user hits have clear, tested outcomes."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from models import mlp, small_cnn, vector_batches
from models import per_sample_closure as _closure
from torch import nn

from imbsam_fast import ImbSAM, StepHooks, imbsam_weights, sam_weights

TAIL = torch.tensor([False] * 7 + [True] * 3)
KW = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------- options


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(fast_bn="ghost"), ValueError, "fast_bn applies to mode='fast' only"),
    (dict(ghost_batch=4), ValueError, "ghost_batch applies to mode='fast' only"),
    (dict(mode="fast", bn_stats="first"), ValueError, "bn_stats applies to mode='exact' only"),
    (dict(mode="fast", fast_bn="replay"), ValueError, "collapse the tail classes"),
    (dict(mode="fast", fast_bn="none"), ValueError, "fast_bn must be one of replay-ghost, ghost"),
    (dict(mode="fast", ghost_batch=0), ValueError, "ghost_batch must be an int >= 1"),
    (dict(mode="fast", fast_bn="ghost", ghost_batch=0), ValueError, "ghost_batch must be an int >= 1"),
    (dict(mode="fast", ghost_batch=True), ValueError, "ghost_batch must be an int >= 1"),
    (dict(tail_mask=imbsam_weights(TAIL)), TypeError, "pass a ClassWeights preset as class_weights="),
    (dict(tail_mask=TAIL, class_weights=sam_weights(10)), ValueError, "not both"),
    (dict(class_weights=sam_weights(10), tail_weight=3.0), ValueError, "tail_weight applies to tail_mask="),
    (dict(tail_weight=3.0), ValueError, "tail_weight applies to tail_mask="),
    (dict(class_weights=TAIL), TypeError, "class_weights must be a ClassWeights"),
    (dict(rho="0.05"), TypeError, "rho must be a real number, got str"),
    (dict(rho=float("nan")), ValueError, "rho must be finite"),
    (dict(rho=True), TypeError, "rho must be a real number"),
    (dict(tail_mask=torch.tensor([0, 1, 0])), ValueError, "tail_mask must be a non-empty 1-D bool tensor"),
    (dict(tail_mask=TAIL, tail_weight="2"), TypeError, "tail_weight must be a real number"),
    (dict(model="net"), TypeError, "model must be an nn.Module"),
])
def test_options_that_do_not_apply_or_are_malformed_are_rejected(kwargs, error, message):
    model = mlp()
    kwargs = dict(kwargs)
    if kwargs.get("mode") == "fast":
        kwargs["model"] = model
    with pytest.raises(error, match=message):
        ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1, **kwargs)


def test_group_rho_is_checked_too():
    model = mlp()
    with pytest.raises(TypeError, match="rho must be a real number"):
        ImbSAM([{"params": model.parameters(), "rho": "big"}], torch.optim.SGD, lr=0.1)


# ----------------------------------------------------------- user failures


def test_plain_sgd_state_dict_loads_with_rho_from_the_defaults():
    torch.manual_seed(0)
    model = mlp()
    sgd = torch.optim.SGD(model.parameters(), **KW)
    x, y = vector_batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    sgd.step()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, rho=0.07, tail_mask=TAIL, **KW)
    opt.load_state_dict(sgd.state_dict())
    assert [g["rho"] for g in opt.param_groups] == [0.07]
    assert opt.param_groups is opt.base_optimizer.param_groups
    y[0] = 9
    out = opt.step(_closure(model, x, y), y)
    assert torch.isfinite(out.perturbed_tail) and out.perturbed_tail > 0


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_empty_batch_is_a_no_op(mode):
    torch.manual_seed(0)
    model = small_cnn()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, tail_mask=TAIL, mode=mode, model=model, **KW)
    before = _state(model)
    calls = []
    out = opt.step(_closure(model, torch.zeros(0, 3, 8, 8), torch.zeros(0, dtype=torch.long), calls),
                   torch.zeros(0, dtype=torch.long))
    assert calls == [] and out.per_sample.shape == (0,) and out.head == 0 and out.tail == 0
    assert _same(before, _state(model))
    assert opt.steps == 0 and len(opt.state) == 0 and len(opt.base_optimizer.state) == 0
    assert all(p.grad is None for p in model.parameters())


def _nan_batch():
    x = torch.randn(16, 3, 8, 8)
    x[3] = float("nan")
    y = torch.arange(16) % 10
    return x, y


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
def test_nonfinite_step_restores_batchnorm_buffers(mode, nonfinite):
    torch.manual_seed(0)
    model = small_cnn()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, tail_mask=TAIL, mode=mode, model=model, nonfinite=nonfinite,
                 **KW)
    x, y = vector_batches(1)[0]
    opt.step(_closure(model, torch.randn(16, 3, 8, 8), y), y)  # a normal step first: momentum, stats
    before = _state(model)
    x, y = _nan_batch()
    if nonfinite == "raise":
        with pytest.raises(FloatingPointError, match="BatchNorm buffers too"):
            opt.step(_closure(model, x, y), y)
    else:
        with pytest.warns(RuntimeWarning, match="BatchNorm buffers too"):
            opt.step(_closure(model, x, y), y)
        assert opt.skipped_steps == 1
    assert _same(before, _state(model))
    model.eval()
    assert torch.isfinite(model(torch.randn(4, 3, 8, 8))).all()


def test_without_model_the_skip_warning_says_how_to_restore_batchnorm():
    torch.manual_seed(0)
    model = small_cnn()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, tail_mask=TAIL, **KW)
    x, y = _nan_batch()
    with pytest.warns(RuntimeWarning, match="pass model= to restore them"):
        opt.step(_closure(model, x, y), y)


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_gradients_present_before_the_step_join_the_head_gradient(mode):
    """With rho = 0 the update is the base step on grad(head + tail + aux), aux backpropagated beforehand."""
    torch.manual_seed(0)
    model = mlp()
    twin = copy.deepcopy(model)
    opt = ImbSAM(model.parameters(), torch.optim.SGD, rho=0.0, tail_mask=TAIL, tail_weight=2.0, mode=mode,
                 model=model, **KW)
    sgd = torch.optim.SGD(twin.parameters(), **KW)
    for x, y in vector_batches(4, seed=3):
        y[0] = 8
        aux_weight = 0.3
        (aux_weight * model[0].weight.square().sum()).backward()
        opt.step(_closure(model, x, y), y)
        sgd.zero_grad()
        losses = F.cross_entropy(twin(x), y, reduction="none")
        w = torch.where(TAIL[y], 2.0, 1.0)
        ((w * losses).sum() / len(y) + aux_weight * twin[0].weight.square().sum()).backward()
        sgd.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_fast_mode_closure_without_index_gets_a_clear_error_before_anything_runs():
    torch.manual_seed(0)
    model = mlp()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, tail_mask=TAIL, mode="fast", model=model, **KW)
    x, y = vector_batches(1)[0]
    y[0] = 9
    before = _state(model)
    with pytest.raises(TypeError, match=r"closure\(index\)"):
        opt.step(lambda: F.cross_entropy(model(x), y, reduction="none"), y)
    assert _same(before, _state(model)) and all(p.grad is None for p in model.parameters())
    import functools

    def loss_fn(x, y, index=None):
        return _closure(model, x, y)(index)

    opt.step(functools.partial(loss_fn, x, y), y)  # partials with a free index argument are fine


def test_targets_as_a_list_get_a_clear_error():
    model = mlp()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, tail_mask=TAIL, **KW)
    x, y = vector_batches(1)[0]
    with pytest.raises(TypeError, match="targets must be a 1-D tensor of class labels, got list"):
        opt.step(_closure(model, x, y), y.tolist())


def test_tail_mask_shorter_than_the_labels_names_the_mask():
    model = mlp()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, tail_mask=torch.tensor([False, False, True]), **KW)
    x, y = vector_batches(1)[0]
    with pytest.raises(ValueError, match=r"tail_mask: 3 entries, one per class; a label >= 3 means the tail_mask"):
        opt.step(_closure(model, x, y), y)


# ------------------------------------------------------------------- hooks


class Recorder(StepHooks):
    def __init__(self):
        self.events = []

    def before_backward(self, opt, phase, loss):
        self.events.append(("before", phase))
        return loss

    def after_backward(self, opt, phase):
        self.events.append(("after", phase))

    def before_base_step(self, opt):
        self.events.append(("base", None))


@pytest.mark.parametrize("mode,weights,tail,expected", [
    ("exact", "mask", True, ["head", "ascent", "perturbed"]),
    ("fast", "mask", True, ["head", "ascent", "perturbed"]),
    ("fast", "mask", False, ["head"]),
    ("exact", "sam", True, ["ascent", "perturbed"]),
])
def test_hooks_fire_around_every_backward_and_before_the_base_step(mode, weights, tail, expected):
    torch.manual_seed(0)
    model = mlp()
    spec = dict(tail_mask=TAIL) if weights == "mask" else dict(class_weights=sam_weights(10))
    opt = ImbSAM(model.parameters(), torch.optim.SGD, mode=mode, model=model, **spec, **KW)
    rec = Recorder()
    handle = opt.register_step_hooks(rec)
    x, y = vector_batches(1)[0]
    y = y % 7
    if tail:
        y[0] = 9
    opt.step(_closure(model, x, y), y)
    phases = [p for kind, p in rec.events if kind == "before"]
    assert phases == expected
    assert rec.events == [e for p in expected for e in (("before", p), ("after", p))] + [("base", None)]
    handle.remove()
    opt.step(_closure(model, x, y), y)
    assert len(rec.events) == 2 * len(expected) + 1


def test_hooks_see_the_weights_at_w_and_can_scale_and_clip():
    """A loss scale of 4 undone after each backward, then clipping to norm 0.1, equals clipping by hand."""
    torch.manual_seed(0)
    model = mlp()
    twin = copy.deepcopy(model)
    x, y = vector_batches(1)[0]
    y[:3] = torch.tensor([7, 8, 9])

    class ScaleAndClip(StepHooks):
        def __init__(self):
            self.start = None

        def before_backward(self, opt, phase, loss):
            self.scaled = {p: (p.grad.clone() if p.grad is not None else None) for p in model.parameters()}
            return loss * 4.0

        def after_backward(self, opt, phase):
            for p in model.parameters():
                old = self.scaled[p]
                new_part = p.grad - (old if old is not None else 0.0)
                p.grad = new_part / 4.0 + (old if old is not None else 0.0)

        def before_base_step(self, opt):
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
            self.norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)

    hooks = ScaleAndClip()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, tail_mask=TAIL, lr=1.0)
    opt.register_step_hooks(hooks)
    plain = ImbSAM(twin.parameters(), torch.optim.SGD, tail_mask=TAIL, lr=1.0)
    start = [p.detach().clone() for p in twin.parameters()]
    opt.step(_closure(model, x, y), y)
    # The same step without hooks, stopped before the base step to clip by hand.
    plain.zero_grad()
    losses = F.cross_entropy(twin(x), y, reduction="none")
    head = (losses * (~TAIL[y]).float()).sum() / 16
    tail = (losses * TAIL[y].float() * 2.0).sum() / 16
    head.backward(retain_graph=True)
    plain.first_step()
    tail.backward()
    plain.second_step()
    (F.cross_entropy(twin(x), y, reduction="none") * TAIL[y].float() * 2.0).sum().div(16).backward()
    with torch.no_grad():
        plain._ops.restore_(plain._perturbed)
    total = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.1)
    torch.testing.assert_close(hooks.norm, total, rtol=1e-5, atol=1e-7)
    for p, q, s in zip(model.parameters(), twin.parameters(), start):
        torch.testing.assert_close(p, s - q.grad, rtol=1e-5, atol=1e-7)
    assert total > 0.1  # the clip did act


def test_register_step_hooks_takes_stephooks_only():
    opt = ImbSAM(mlp().parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="StepHooks"):
        opt.register_step_hooks(object())


def test_a_step_that_fails_in_a_hook_is_undone():
    torch.manual_seed(0)
    model = mlp()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, tail_mask=TAIL, **KW)

    class Boom(StepHooks):
        def after_backward(self, opt, phase):
            if phase == "perturbed":
                raise RuntimeError("boom")

    opt.register_step_hooks(Boom())
    x, y = vector_batches(1)[0]
    y[0] = 9
    before = _state(model)
    with pytest.raises(RuntimeError, match="boom"):
        opt.step(_closure(model, x, y), y)
    assert _same(before, _state(model)) and all(p.grad is None for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.first_step()  # the optimizer is idle again


def test_batchnorm_layer_called_twice_records_each_call():
    from imbsam_fast.batchnorm import BatchNormStats

    torch.manual_seed(0)
    bn = nn.BatchNorm1d(5)
    stats = BatchNormStats(bn)
    for _ in range(2):  # the first recording learns that the layer runs twice; the second uses that
        a, b = torch.randn(6, 5) * 3 + 1, torch.randn(9, 5) - 2
        with stats.record():
            bn(a)
            bn(b)
        for (mean, var), x in zip(stats._stats[bn], (a, b)):
            ref_var, ref_mean = torch.var_mean(x, dim=0, correction=0)
            torch.testing.assert_close(mean, ref_mean, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(var, ref_var, rtol=1e-4, atol=1e-5)


def test_bucket_layout_follows_parameters_that_change_dtype_or_gain_a_gradient():
    """The cached bucket layout is rebuilt when a parameter is re-typed in place or the set with a gradient changes."""
    torch.manual_seed(0)
    model = mlp()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, tail_mask=TAIL, lr=0.1)
    x, y = vector_batches(1)[0]
    y[0] = 9
    model[2].bias.requires_grad_(False)
    opt.step(_closure(model, x, y), y)
    assert not any(model[2].bias is p for p in opt._buckets._layout[0].params)
    model[2].bias.requires_grad_(True)
    opt.step(_closure(model, x, y), y)
    assert any(model[2].bias is p for p in opt._buckets._layout[0].params)
    model[0].bias.requires_grad_(False)
    opt.step(_closure(model, x, y), y)
    model[0].bias.requires_grad_(True)  # as many parameters with a gradient as before, not the same ones
    model[2].bias.requires_grad_(False)
    opt.step(_closure(model, x, y), y)
    layout = [p for b in opt._buckets._layout for p in b.params]
    assert any(model[0].bias is p for p in layout) and not any(model[2].bias is p for p in layout)
    model[2].bias.requires_grad_(True)
    model.double()  # same Parameter objects, new float64 data
    before = [p.detach().clone() for p in model.parameters()]
    out = opt.step(_closure(model, x.double(), y), y)
    assert out.perturbed_tail.dtype == torch.float64
    assert all(b.dtype == torch.float64 for bucket in opt._buckets._layout for b in bucket.backups)
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_a_schedule_on_rho_regroups_without_new_backups_and_uses_the_new_rho():
    torch.manual_seed(0)
    model = mlp()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, tail_mask=TAIL, lr=0.1, rho=0.05)
    x, y = vector_batches(1)[0]
    y[0] = 9
    opt.step(_closure(model, x, y), y)
    backups = [b for bucket in opt._buckets._layout for b in bucket.backups]
    opt.param_groups[0]["rho"] = 0.2
    opt.zero_grad()
    losses = F.cross_entropy(model(x), y, reduction="none")
    (losses * (~TAIL[y]).float()).sum().div(16).backward(retain_graph=True)
    opt.first_step()
    (losses * TAIL[y].float()).sum().div(16).backward()
    g = [p.grad.clone() for p in model.parameters()]
    w = [p.detach().clone() for p in model.parameters()]
    opt.second_step()
    norm = torch.linalg.vector_norm(torch.stack([t.norm() for t in g]))
    for p, w0, g0 in zip(model.parameters(), w, g):
        torch.testing.assert_close(p.detach(), w0 + 0.2 * g0 / norm)
    assert all(a is b for a, b in zip(backups, (b for bucket in opt._buckets._layout for b in bucket.backups)))
