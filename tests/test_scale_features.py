"""fp16 scaling, micro-batches, clipping and ASAM, each against a plain loop or the unscaled run."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from models import per_sample_closure as closure_of
from models import seeded_mlp as mlp
from models import small_cnn, vector_batches
from torch import nn

from imbsam_fast import ImbSAM, StepHooks
from imbsam_fast.priors import imbsam_weights, sample_weights

TAIL = torch.tensor([False] * 7 + [True] * 3)
RHO, LR = 0.05, 0.1


def batches(steps=6, batch=16, seed=0):
    """Batches where most hold a tail sample and one holds none."""
    out = vector_batches(steps, batch=batch, seed=seed)
    for i, (_, y) in enumerate(out):
        y.clamp_(max=6)
        if i % 3 != 2:
            y[i % batch] = 7 + i % 3
    return out


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def train(mode, steps=None, model=None, step_kwargs=None, **options):
    model = mlp() if model is None else model
    opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=LR, momentum=0.9, rho=RHO, tail_mask=TAIL, mode=mode,
                 model=model, **options)
    for x, y in steps or batches():
        opt.step(closure_of(model, x, y), y, **(step_kwargs or {}))
    return model, opt


def loop_reference(batches_, clip=None, adaptive=(False, False)):
    """ImbSAM written out by hand (exact passes), with optional clipping and ASAM per parameter group
    (groups: the first layer, the rest), after davda54/sam's formulas."""
    model = mlp()
    groups = [list(model[0].parameters()), list(model[2].parameters())]
    params = [p for g in groups for p in g]
    sgd = torch.optim.SGD(params, lr=LR, momentum=0.9)
    weights = imbsam_weights(TAIL, 2.0)
    for x, y in batches_:
        a, b = sample_weights(weights, y, -100)
        losses = F.cross_entropy(model(x), y, reduction="none")
        g_h = torch.autograd.grad((a * losses).sum() / len(y), params, retain_graph=True)
        g_t = torch.autograd.grad((b * losses).sum() / len(y), params)
        flags = [adaptive[0]] * len(groups[0]) + [adaptive[1]] * len(groups[1])
        norm = torch.stack([((p.abs() if a else 1.0) * g).norm() for p, g, a in zip(params, g_t, flags)]).norm()
        e = [(p.pow(2) if a else 1.0) * g * RHO / (norm + 1e-16) for p, g, a in zip(params, g_t, flags)]
        with torch.no_grad():
            saved = [p.clone() for p in params]
            for p, d in zip(params, e):
                p.add_(d)
        g_t2 = torch.autograd.grad((b * F.cross_entropy(model(x), y, reduction="none")).sum() / len(y), params)
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        for p, h, t in zip(params, g_h, g_t2):
            p.grad = h + t
        if clip is not None:
            nn.utils.clip_grad_norm_(params, clip)
        sgd.step()
    return model


def assert_close(got, want, rel):
    err = ((got - want).norm() / want.norm()).item()
    assert err < rel, f"relative distance {err:.2e}"


# ----------------------------------------------------------------- GradScaler


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_scaled_trajectory_equals_the_unscaled_one(mode):
    plain, _ = train(mode)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=10 ** 6)
    model = mlp()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=LR, momentum=0.9, rho=RHO, tail_mask=TAIL, mode=mode,
                 model=model)
    for x, y in batches():
        opt.step(closure_of(model, x, y), y, scaler=scaler)
        scaler.update()
    assert_close(flat(model), flat(plain), 1e-6)
    assert scaler.get_scale() == 2.0 ** 12 and opt.skipped_steps == 0


class _LossLog(StepHooks):
    def __init__(self):
        self.losses = []

    def before_backward(self, opt, phase, loss):
        self.losses.append((phase, loss.detach().clone()))
        return loss


def test_every_backward_is_scaled():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    model = mlp()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=LR, tail_mask=TAIL, mode="fast", model=model)
    log = _LossLog()
    opt.register_step_hooks(log)
    x, y = batches()[0]
    unscaled = copy.deepcopy(model)
    ref = ImbSAM(unscaled.parameters(), torch.optim.SGD, lr=LR, tail_mask=TAIL, mode="fast", model=unscaled)
    ref_log = _LossLog()
    ref.register_step_hooks(ref_log)
    opt.step(closure_of(model, x, y), y, scaler=scaler)
    ref.step(closure_of(unscaled, x, y), y)
    assert [p for p, _ in log.losses] == ["head", "ascent", "perturbed"]
    for (_, got), (_, want) in zip(log.losses, ref_log.losses):
        torch.testing.assert_close(got, want * 2.0 ** 8)


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("where", ["forward", "ascent"])
def test_inf_skips_the_step_restores_everything_and_backs_off(mode, where):
    torch.manual_seed(0)
    model = small_cnn(10)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=LR, momentum=0.9, tail_mask=TAIL, mode=mode, model=model)
    x = torch.randn(12, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2])
    calls = []

    def closure(index=None):
        calls.append(index)
        xs, ys = (x, y) if index is None else (x[index], y[index])
        out = F.cross_entropy(model(xs), ys, reduction="none")
        # "forward": the first pass's losses; "ascent": only the second pass (the tail gradient at w).
        if (where == "forward" and len(calls) == 1) or (where == "ascent" and len(calls) == 2):
            out = out * torch.tensor(float("inf"))
        return out

    opt.step(closure_of(model, x, y), y, scaler=scaler)  # one clean step: momentum buffers exist
    scaler.update()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = [opt.base_optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if mode == "exact" and where == "ascent":
            # Exact mode's tail gradient at w comes from the first forward: make its tail loss inf instead.
            def closure(index=None):  # noqa: F811
                calls.append(index)
                out = F.cross_entropy(model(x), y, reduction="none")
                if len(calls) == 1:
                    out = torch.where(y >= 7, out * torch.tensor(float("inf")), out)
                return out
        opt.step(closure, y, scaler=scaler)
    scaler.update()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "weights or BatchNorm buffers changed"
    state = opt.base_optimizer.state
    assert all(torch.equal(m, state[p]["momentum_buffer"]) for m, p in zip(momentum, model.parameters()))
    assert scaler.get_scale() == 2.0 ** 9
    assert opt.skipped_steps == 1 and opt.last_step_skipped


def test_scaled_step_reads_the_device_once():
    """The only host read is the found-inf decision, as in GradScaler.step (exact mode, no other sync)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    model = mlp()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=LR, tail_mask=TAIL, model=model)
    x, y = batches()[0]
    reads = []
    item, to_bool = torch.Tensor.item, torch.Tensor.__bool__

    def counted_item(t):
        reads.append("item")
        return item(t)

    def counted_bool(t):
        reads.append("bool")
        return to_bool(t)

    torch.Tensor.item, torch.Tensor.__bool__ = counted_item, counted_bool
    try:
        opt.step(closure_of(model, x, y), y, scaler=scaler)
    finally:
        torch.Tensor.item, torch.Tensor.__bool__ = item, to_bool
    assert reads == ["item"]


def test_scaler_must_be_a_grad_scaler_and_a_disabled_one_is_a_plain_step():
    model = mlp()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=LR, tail_mask=TAIL, model=model)
    x, y = batches()[0]
    with pytest.raises(TypeError, match="scaler must be a torch.amp.GradScaler"):
        opt.step(closure_of(model, x, y), y, scaler=object())
    with pytest.raises(TypeError, match="apply to step\\(closure, targets\\)"):
        opt.step(scaler=torch.amp.GradScaler("cpu"))
    twin = copy.deepcopy(model)
    ref = ImbSAM(twin.parameters(), torch.optim.SGD, lr=LR, tail_mask=TAIL, model=twin)
    opt.step(closure_of(model, x, y), y, scaler=torch.amp.GradScaler("cpu", enabled=False))
    ref.step(closure_of(twin, x, y), y)
    assert torch.equal(flat(model), flat(twin))


# -------------------------------------------------------------- micro-batches


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("k", [2, 4, 5])
def test_micro_batches_equal_one_batch(mode, k):
    whole, _ = train(mode)
    chunked, _ = train(mode, step_kwargs={"micro_batches": k})
    assert_close(flat(chunked), flat(whole), 1e-5)


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_micro_batches_run_the_closure_on_chunks(mode):
    model = mlp()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=LR, tail_mask=TAIL, mode=mode, model=model)
    x, y = batches()[0]
    calls = []
    losses = opt.step(closure_of(model, x, y, calls), y, micro_batches=4)
    assert all(c is not None and c.numel() <= 4 for c in calls)
    full = [c for c in calls[:4]]
    assert torch.equal(torch.cat(full), torch.arange(16))
    assert losses.per_sample.shape == (16,)
    with pytest.raises(ValueError, match="micro_batches must be an int >= 1"):
        opt.step(closure_of(model, x, y), y, micro_batches=0)


def test_micro_batches_need_an_index_closure_in_exact_mode_too():
    model = mlp()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=LR, tail_mask=TAIL, model=model)
    x, y = batches()[0]
    with pytest.raises(TypeError, match="closure\\(index\\)"):
        opt.step(lambda: F.cross_entropy(model(x), y, reduction="none"), y, micro_batches=2)


def test_micro_batches_keep_one_chunk_of_activations():
    """Bytes saved for backward by the largest single forward: a chunk's, not the batch's."""
    one, four = _largest_forward(1), _largest_forward(4)
    assert four * 3 < one, (one, four)


def _largest_forward(k):
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 10))
    opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=LR, tail_mask=TAIL, model=model)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 64, generator=g), torch.randint(0, 10, (256,), generator=g)
    per_forward = []

    def closure(index=None):
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            xs, ys = (x, y) if index is None else (x[index], y[index])
            out = F.cross_entropy(model(xs), ys, reduction="none")
        per_forward.append(sum(sizes))
        return out

    opt.step(closure, y, micro_batches=k)
    return max(per_forward)


# ------------------------------------------------------------ clipping, ASAM


@pytest.mark.parametrize("clip", [0.05, 100.0])
def test_max_grad_norm_equals_clip_grad_norm_in_a_plain_loop(clip):
    data = batches()
    model = mlp()
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters()}]
    opt = ImbSAM(groups, torch.optim.SGD, lr=LR, momentum=0.9, rho=RHO, tail_mask=TAIL, model=model,
                 max_grad_norm=clip)
    for x, y in data:
        opt.step(closure_of(model, x, y), y)
    assert_close(flat(model), flat(loop_reference(data, clip=clip)), 1e-5)


def test_clipping_acts_after_the_hooks_and_with_no_host_read():
    model = mlp()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=0.0, tail_mask=TAIL, model=model, max_grad_norm=0.01,
                 nonfinite="none")
    seen = []

    class Norm(StepHooks):
        def before_base_step(self, opt):
            seen.append(torch.stack([p.grad.norm() for p in model.parameters()]).norm())

    opt.register_step_hooks(Norm())
    x, y = batches()[0]
    item = torch.Tensor.item
    torch.Tensor.item = lambda t: (_ for _ in ()).throw(AssertionError("host read"))
    try:
        opt.step(closure_of(model, x, y), y)
    finally:
        torch.Tensor.item = item
    assert seen[0] > 0.01


@pytest.mark.parametrize("adaptive", [(True, True), (True, False)])
def test_asam_equals_the_plain_loop(adaptive):
    data = batches()
    model = mlp()
    groups = [{"params": model[0].parameters(), "adaptive": adaptive[0]},
              {"params": model[2].parameters(), "adaptive": adaptive[1]}]
    opt = ImbSAM(groups, torch.optim.SGD, lr=LR, momentum=0.9, rho=RHO, tail_mask=TAIL, model=model)
    for x, y in data:
        opt.step(closure_of(model, x, y), y)
    want = loop_reference(data, adaptive=adaptive)
    assert_close(flat(model), flat(want), 1e-5)
    # ASAM moves differently from SAM: the comparison above can tell them apart.
    assert ((flat(want) - flat(loop_reference(data))).norm() / flat(want).norm()) > 1e-5


def test_adaptive_constructor_default_and_fast_mode():
    data = batches()
    exact, _ = train("exact", steps=data, adaptive=True)
    fast, _ = train("fast", steps=data, adaptive=True)
    want = loop_reference(data, adaptive=(True, True))
    assert_close(flat(exact), flat(want), 1e-5)
    assert_close(flat(fast), flat(want), 1e-5)
    with pytest.raises(TypeError, match="adaptive must be True or False"):
        train("exact", adaptive=1)


def test_triton_backend_sends_asam_through_the_torch_ops():
    pytest.importorskip("triton")
    data = batches(2)
    model, opt = train("exact", steps=data, adaptive=True, backend="triton")
    ref, _ = train("exact", steps=data, adaptive=True, backend="torch")
    assert_close(flat(model), flat(ref), 1e-6)
    assert "adaptive (ASAM)" in opt.backend_fallbacks


@pytest.mark.parametrize("value,error", [(0.0, ValueError), (float("inf"), ValueError), ("1", TypeError)])
def test_max_grad_norm_is_checked(value, error):
    with pytest.raises(error, match="max_grad_norm"):
        ImbSAM(mlp().parameters(), torch.optim.SGD, lr=LR, tail_mask=TAIL, max_grad_norm=value)


def test_ascent_sync_needs_ddp():
    with pytest.raises(ValueError, match="ascent_sync applies to model=<a DistributedDataParallel"):
        ImbSAM(mlp().parameters(), torch.optim.SGD, lr=LR, tail_mask=TAIL, ascent_sync="local")
    with pytest.raises(ValueError, match="ascent_sync must be one of"):
        ImbSAM(mlp().parameters(), torch.optim.SGD, lr=LR, tail_mask=TAIL, ascent_sync="nope")


def test_inf_only_in_the_ascent_gradient_skips_the_step():
    """An inf that stays in the tail gradient at w (a parameter the other passes do not use) still
    skips the step: the ascent's own unscale reports it to the scaler."""
    model = mlp()
    extra = nn.Parameter(torch.ones(()))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    opt = ImbSAM([*model.parameters(), extra], torch.optim.SGD, lr=LR, tail_mask=TAIL, mode="fast", model=model)
    x, y = batches()[0]
    calls = []

    def closure(index=None):
        calls.append(index)
        xs, ys = (x, y) if index is None else (x[index], y[index])
        out = F.cross_entropy(model(xs), ys, reduction="none")
        return out + extra * float("inf") if len(calls) == 2 else out

    before = flat(model).clone()
    opt.step(closure, y, scaler=scaler)
    scaler.update()
    assert len(calls) == 3 and opt.last_step_skipped
    assert torch.equal(flat(model), before) and scaler.get_scale() == 2.0 ** 9


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_bf16_autocast_tracks_fp32(mode):
    """bf16 autocast in the closure: fp32 weights, a trajectory within bf16 rounding of fp32's."""
    data = [(x.reshape(16, 1, 4, 4).expand(16, 3, 4, 4).contiguous(), y) for x, y in batches()]

    def run(autocast):
        torch.manual_seed(0)
        model = small_cnn(10)
        opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=LR, momentum=0.9, tail_mask=TAIL, mode=mode,
                     model=model)
        for x, y in data:
            def closure(index=None, x=x, y=y):
                xs, ys = (x, y) if index is None else (x[index], y[index])
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    logits = model(xs)
                assert logits.dtype == (torch.bfloat16 if autocast else torch.float32)
                return F.cross_entropy(logits.float(), ys, reduction="none")

            opt.step(closure, y)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        return flat(model)

    got, want = run(True), run(False)
    assert torch.isfinite(got).all()
    assert_close(got, want, 5e-2)
