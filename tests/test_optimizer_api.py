"""PyTorch conventions: param groups, base instances, schedulers, state_dict, plain step."""

import copy

import pytest
import torch
import torch.nn.functional as F
from models import mlp, vector_batches

from imbsam_fast import ImbSAM

TAIL = torch.tensor([False] * 7 + [True] * 3)


def _closure(model, x, y):
    return lambda index=None: F.cross_entropy(model(x), y, reduction="none")


def test_builds_base_from_class_and_shares_param_groups():
    model = mlp()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["rho"] == 0.05
    opt.param_groups[0]["lr"] = 0.5
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.5


def test_accepts_built_instance_and_rejects_mismatch():
    model = mlp()
    base = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = ImbSAM(model.parameters(), base, rho=0.1)
    assert opt.base_optimizer is base and opt.param_groups is base.param_groups
    assert base.param_groups[0]["rho"] == 0.1
    with pytest.raises(ValueError, match="differ"):
        ImbSAM(mlp().parameters(), base)
    with pytest.raises(TypeError, match="already-built"):
        ImbSAM(model.parameters(), base, lr=0.1)
    with pytest.raises(TypeError, match="Optimizer class or instance"):
        ImbSAM(model.parameters(), "sgd")


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rho"):
        ImbSAM(mlp().parameters(), torch.optim.SGD, lr=0.1, rho=-1.0)
    with pytest.raises(ValueError, match="mode"):
        ImbSAM(mlp().parameters(), torch.optim.SGD, lr=0.1, mode="turbo")
    with pytest.raises(ValueError, match="backend"):
        ImbSAM(mlp().parameters(), torch.optim.SGD, lr=0.1, backend="cuda")
    with pytest.raises(ValueError, match="nonfinite"):
        ImbSAM(mlp().parameters(), torch.optim.SGD, lr=0.1, nonfinite="maybe")


def test_per_group_rho_scales_the_perturbation():
    """Group with rho=0 is never perturbed; the other moves by exactly its share of rho."""
    torch.manual_seed(0)
    model = mlp()
    w1, b1, w2, b2 = model.parameters()
    opt = ImbSAM([{"params": [w1, b1], "rho": 0.0}, {"params": [w2, b2], "rho": 0.3}], torch.optim.SGD, lr=0.1)
    x, y = vector_batches(1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    loss = F.cross_entropy(model(x), y)
    loss.backward(retain_graph=True)
    opt.first_step()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.second_step()
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    assert torch.equal(w1, before[0]) and torch.equal(b1, before[1])
    torch.testing.assert_close(w2 - before[2], 0.3 * grads[2] / norm)
    step = torch.cat([(p - q).flatten() for p, q in zip([w2, b2], before[2:])])
    expected = 0.3 * (grads[2].norm() ** 2 + grads[3].norm() ** 2).sqrt() / norm
    torch.testing.assert_close(step.norm(), expected)


def test_lr_scheduler_on_wrapper_changes_base_lr_without_warning():
    model = mlp()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=1.0, tail_mask=TAIL)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = vector_batches(1)[0]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            opt.step(_closure(model, x, y), y)
            sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.125)


def test_add_param_group_reaches_base():
    a, b = mlp(), mlp()
    opt = ImbSAM(a.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    opt.add_param_group({"params": b.parameters(), "rho": 0.2})
    assert len(opt.base_optimizer.param_groups) == 2
    assert opt.param_groups[1]["rho"] == 0.2 and opt.param_groups[1]["momentum"] == 0.9


def test_plain_step_without_closure_is_base_step():
    torch.manual_seed(0)
    model = mlp()
    twin = copy.deepcopy(model)
    opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    sgd = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    for x, y in vector_batches(3):
        for m, o in ((model, opt), (twin, sgd)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_step_with_closure_needs_targets_and_mask():
    model = mlp()
    x, y = vector_batches(1)[0]
    with pytest.raises(TypeError, match="targets"):
        ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1, tail_mask=TAIL).step(_closure(model, x, y))
    with pytest.raises(ValueError, match="tail_mask"):
        ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1).step(_closure(model, x, y), y)


def test_step_returns_detached_losses_matching_a_manual_computation():
    torch.manual_seed(0)
    model = mlp()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1, tail_mask=TAIL, tail_weight=2.0)
    x, y = vector_batches(1)[0]
    with torch.no_grad():
        ls = F.cross_entropy(model(x), y, reduction="none")
    out = opt.step(_closure(model, x, y), y)
    is_tail = TAIL[y]
    torch.testing.assert_close(out.head, ls[~is_tail].sum() / len(y))
    torch.testing.assert_close(out.tail, 2 * ls[is_tail].sum() / len(y))
    torch.testing.assert_close(out.per_sample, ls)
    assert not any(t.requires_grad for t in out)
    assert out.perturbed_tail > out.tail  # the ascent raises the tail loss


def _train(model, opt, batches):
    for x, y in batches:
        opt.step(_closure(model, x, y), y)


@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.AdamW])
def test_save_and_resume_is_bit_identical(tmp_path, base):
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-3) if base is torch.optim.SGD else dict(lr=1e-2)
    batches = vector_batches(10, seed=3)
    torch.manual_seed(0)
    model = mlp()
    opt = ImbSAM(model.parameters(), base, tail_mask=TAIL, **kw)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    _train(model, opt, batches[:5])
    sched.step()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, tmp_path / "ck.pt")
    _train(model, opt, batches[5:])
    torch.manual_seed(123)
    resumed = mlp()
    opt2 = ImbSAM(resumed.parameters(), base, tail_mask=torch.zeros(10, dtype=torch.bool), **kw)
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=10)
    ck = torch.load(tmp_path / "ck.pt")
    resumed.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    sched2.load_state_dict(ck["sched"])
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    assert torch.equal(opt2.class_weights.tail, opt.class_weights.tail)
    assert opt2.steps == 5
    _train(resumed, opt2, batches[5:])
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_scheduler_attached_to_base_optimizer_also_works():
    model = mlp()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=1.0, tail_mask=TAIL)
    sched = torch.optim.lr_scheduler.StepLR(opt.base_optimizer, step_size=1, gamma=0.1)
    x, y = vector_batches(1)[0]
    opt.step(_closure(model, x, y), y)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


@pytest.mark.parametrize("backend", ["torch", pytest.param("ext", marks=pytest.mark.skipif(
    not __import__("imbsam_fast.backends.extension", fromlist=["x"]).ext_available(), reason="no C++ extension"))])
def test_a_scheduler_on_the_base_optimizer_sees_fused_steps_as_taken(backend):
    """The fused restore + SGD pass takes the base step without calling base.step() (with no momentum, from the
    first step on): a scheduler attached to the base optimizer must not warn that it stepped first."""
    import warnings

    model = mlp()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=1.0, tail_mask=TAIL, backend=backend)
    sched = torch.optim.lr_scheduler.StepLR(opt.base_optimizer, step_size=1, gamma=0.5)
    for x, y in vector_batches(4):
        y[0] = 9
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt.step(_closure(model, x, y), y)
            sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0 / 16)


def test_restore_is_bit_exact_where_subtraction_is_not():
    """w + e - e differs from w in the last bits for many entries; ImbSAM's restore does not."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4096) * 1e3)
    w0 = p.detach().clone()
    opt = ImbSAM([p], torch.optim.SGD, lr=0.0, rho=7.3)
    p.grad = torch.randn(4096)
    opt.first_step()
    g = torch.randn(4096) * 1e-3
    p.grad = g.clone()
    opt.second_step()
    e = g * (7.3 / (g.norm() + 1e-16))
    torch.testing.assert_close(p.detach(), w0 + e)
    assert not torch.equal((w0 + e) - e, w0)  # the public code's subtraction would not come back exactly
    p.grad.add_(torch.randn(4096))
    opt.third_step()
    assert torch.equal(p.detach(), w0)


def test_sam_preset_is_plain_sam_with_two_passes():
    from imbsam_fast import sam_weights

    torch.manual_seed(0)
    model = mlp()
    twin = copy.deepcopy(model)
    opt = ImbSAM(model.parameters(), torch.optim.SGD, rho=0.1, class_weights=sam_weights(10), lr=0.1)
    sgd = torch.optim.SGD(twin.parameters(), lr=0.1)
    for x, y in vector_batches(3):
        calls = []

        def closure(index=None, x=x, y=y, calls=calls):
            calls.append(index)
            return F.cross_entropy(model(x), y, reduction="none")

        opt.step(closure, y)
        assert len(calls) == 2
        sgd.zero_grad()
        F.cross_entropy(twin(x), y).backward()
        grads = [p.grad.clone() for p in twin.parameters()]
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
        saved = [p.detach().clone() for p in twin.parameters()]
        with torch.no_grad():
            for p, g in zip(twin.parameters(), grads):
                p.add_(0.1 * g / (norm + 1e-16))
        sgd.zero_grad()
        F.cross_entropy(twin(x), y).backward()
        with torch.no_grad():
            for p, s in zip(twin.parameters(), saved):
                p.copy_(s)
        sgd.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_plain_preset_takes_one_pass():
    from imbsam_fast import plain_weights

    model = mlp()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, class_weights=plain_weights(10), lr=0.1)
    x, y = vector_batches(1)[0]
    calls = []
    opt.step(lambda index=None: calls.append(index) or F.cross_entropy(model(x), y, reduction="none"), y)
    assert len(calls) == 1


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_each_batch_size_has_its_losses_divided_by_itself(mode):
    """The per-sample weights come divided by B from a table kept per batch size: a last, smaller batch and
    the full one after it each report sum_i w_i l_i / B for their own B."""
    torch.manual_seed(0)
    model = mlp()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=0.0, tail_mask=TAIL, mode=mode, model=model)
    a, b = opt.class_weights.head, opt.class_weights.tail
    for n in (8, 5, 8, 3):
        x, y = torch.randn(n, 16), torch.randint(0, 10, (n,))
        y[0] = 8
        with torch.no_grad():
            per_sample = F.cross_entropy(model(x), y, reduction="none")
        out = opt.step(lambda index=None, x=x, y=y: F.cross_entropy(model(x if index is None else x[index]),
                                                                   y if index is None else y[index],
                                                                   reduction="none"), y)
        torch.testing.assert_close(out.head, (a[y] * per_sample).sum() / n)
        torch.testing.assert_close(out.tail, (b[y] * per_sample).sum() / n)
