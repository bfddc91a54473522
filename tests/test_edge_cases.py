"""Bad input gets a clear error or a defined behaviour; weights are never silently corrupted."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from models import mlp, vector_batches
from torch import nn

from imbsam_fast import ImbSAM, head_tail_cross_entropy
from imbsam_fast.backends.extension import ext_available

TAIL = torch.tensor([False] * 7 + [True] * 3)


def _closure(model, x, y):
    return lambda index=None: F.cross_entropy(model(x), y, reduction="none")


def _snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def test_labels_out_of_range_raise_before_any_change():
    model = mlp()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1, tail_mask=TAIL)
    x, _ = vector_batches(1)[0]
    before = _snapshot(model)
    for bad in (10, -1):
        y = torch.zeros(16, dtype=torch.long)
        y[3] = bad
        with pytest.raises(ValueError, match=r"\[0, 10\)"):
            opt.step(lambda index=None: torch.zeros(16, requires_grad=True), y)
        with pytest.raises(ValueError, match=r"\[0, 10\)"):
            head_tail_cross_entropy(model(x), y, TAIL, tail_weight=2.0)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    y = torch.zeros(16, dtype=torch.long)
    with pytest.raises(ValueError, match="integer"):
        opt.step(lambda index=None: torch.zeros(16, requires_grad=True), y.float())


def test_ignore_index_samples_get_zero_weight():
    torch.manual_seed(0)
    logits = torch.randn(6, 10)
    y = torch.tensor([0, 9, -100, 8, 1, -100])
    head, tail = head_tail_cross_entropy(logits, y, TAIL, tail_weight=2.0)
    ls = F.cross_entropy(logits, y, reduction="none")
    torch.testing.assert_close(head, (ls[0] + ls[4]) / 6)
    torch.testing.assert_close(tail, 2 * (ls[1] + ls[3]) / 6)


def test_tail_mask_of_wrong_length():
    logits = torch.randn(4, 10)
    y = torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="9 entries but logits have 10 classes"):
        head_tail_cross_entropy(logits, y, TAIL[:9], tail_weight=2.0)
    model = mlp()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1, tail_mask=TAIL[:5])
    x, y = vector_batches(1)[0]
    y = y.clamp(max=9)
    y[0] = 7
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        opt.step(_closure(model, x, y), y)


def test_closure_returning_wrong_shape_is_rejected_and_weights_kept():
    model = mlp()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1, tail_mask=TAIL)
    x, y = vector_batches(1)[0]
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"shape \(16,\)"):
        opt.step(lambda index=None: F.cross_entropy(model(x), y), y)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_nan_loss_skips_step_and_restores_weights():
    torch.manual_seed(0)
    model = mlp()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, tail_mask=TAIL)
    x, y = vector_batches(1)[0]
    y[0] = 9  # at least one tail sample
    before = _snapshot(model)
    x_bad = x.clone()
    x_bad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(_closure(model, x_bad, y), y)
    assert opt.skipped_steps == 1 and opt.last_step_skipped
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())
    assert opt.base_optimizer.state == {} or all("momentum_buffer" not in s for s in opt.base_optimizer.state.values())
    opt.step(_closure(model, x, y), y)
    assert not opt.last_step_skipped and opt.skipped_steps == 1
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_inf_gradient_raises_when_configured():
    model = mlp()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1, tail_mask=TAIL, nonfinite="raise")
    x, y = vector_batches(1)[0]
    y[0] = 9
    before = _snapshot(model)

    def closure(index=None):
        out = F.cross_entropy(model(x), y, reduction="none")
        return out * torch.where(y == 9, float("inf"), 1.0)

    with pytest.raises(FloatingPointError):
        opt.step(closure, y)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    opt.step(_closure(model, x, y), y)  # usable afterwards


def test_nan_in_head_gradient_through_three_step_api():
    model = mlp()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = vector_batches(1)[0]
    before = _snapshot(model)
    loss = F.cross_entropy(model(x), y)
    loss.backward(retain_graph=True)
    next(model.parameters()).grad[0, 0] = float("nan")
    opt.first_step()
    loss.backward(retain_graph=True)
    opt.second_step()
    F.cross_entropy(model(x), y).backward()
    with pytest.warns(RuntimeWarning):
        opt.third_step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_batch_without_tail_sample_is_exactly_a_plain_head_step():
    torch.manual_seed(0)
    model = mlp()
    twin = copy.deepcopy(model)
    opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-3, tail_mask=TAIL)
    sgd = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for x, y in vector_batches(3):
        y = y % 7  # head classes only
        out = opt.step(_closure(model, x, y), y)
        assert torch.isfinite(torch.stack(list(out[:3]))).all()
        assert out.tail == 0
        sgd.zero_grad()
        head, _ = head_tail_cross_entropy(twin(x), y, TAIL, tail_weight=2.0)
        head.backward()
        sgd.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_zero_tail_gradient_gives_no_perturbation_and_no_nan():
    model = mlp()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = vector_batches(1)[0]
    before = _snapshot(model)
    F.cross_entropy(model(x), y).backward()
    opt.first_step()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.second_step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    F.cross_entropy(model(x), y).backward()
    opt.third_step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_frozen_and_gradless_parameters_are_left_alone():
    torch.manual_seed(0)
    model = mlp()
    unused = nn.Parameter(torch.randn(5))
    model[0].weight.requires_grad_(False)
    frozen_before = model[0].weight.detach().clone()
    unused_before = unused.detach().clone()
    opt = ImbSAM([*model.parameters(), unused], torch.optim.SGD, lr=0.1, momentum=0.9, tail_mask=TAIL)
    for x, y in vector_batches(3):
        opt.step(_closure(model, x, y), y)
    assert torch.equal(model[0].weight, frozen_before)
    assert torch.equal(unused, unused_before)
    assert unused.grad is None


def test_parameter_with_head_gradient_only_or_tail_gradient_only():
    """A parameter reached only by the head loss gets g_h; one reached only by the tail loss gets g_t'."""
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(3))
    b = nn.Parameter(torch.randn(3))
    a0, b0 = a.detach().clone(), b.detach().clone()
    opt = ImbSAM([a, b], torch.optim.SGD, lr=1.0, rho=0.1)
    (a**2).sum().backward()
    opt.first_step()
    (b**3).sum().backward()
    g_t = 3 * b0**2
    opt.second_step()
    b_pert = b0 + 0.1 * g_t / g_t.norm()
    torch.testing.assert_close(b.detach(), b_pert)
    torch.testing.assert_close(a.detach(), a0)  # no tail gradient: not perturbed
    (b**3).sum().backward()
    opt.third_step()
    torch.testing.assert_close(a, a0 - 2 * a0)
    torch.testing.assert_close(b, b0 - 3 * b_pert**2)


def test_mixed_dtypes_match_per_dtype_math():
    torch.manual_seed(0)
    p32 = nn.Parameter(torch.randn(7))
    p64 = nn.Parameter(torch.randn(5, dtype=torch.float64))
    p16 = nn.Parameter(torch.randn(4).to(torch.bfloat16))
    opt = ImbSAM([p32, p64, p16], torch.optim.SGD, lr=0.5, rho=0.2)
    for p in (p32, p64, p16):
        p.grad = torch.ones_like(p)
    opt.first_step()
    gs = [torch.randn(7), torch.randn(5, dtype=torch.float64), torch.randn(4).to(torch.bfloat16)]
    ws = [p.detach().clone() for p in (p32, p64, p16)]
    for p, g in zip((p32, p64, p16), gs):
        p.grad = g.clone()
    opt.second_step()
    norm = torch.linalg.vector_norm(torch.stack([g.float().norm() for g in gs]))
    for p, g, w in zip((p32, p64, p16), gs, ws):
        assert p.dtype == w.dtype
        tol = 1e-2 if p.dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(p, w + (g * (0.2 / (norm + 1e-16))).to(p.dtype), rtol=tol, atol=1e-6)
    for p in (p32, p64, p16):
        p.grad.add_(torch.ones_like(p))  # perturbed backward accumulates onto g_h
    opt.third_step()
    for p, w in zip((p32, p64, p16), ws):
        torch.testing.assert_close(p, w - 0.5 * 2 * torch.ones_like(w))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_params_on_two_devices_share_one_global_norm():
    torch.manual_seed(0)
    pc = nn.Parameter(torch.randn(6))
    pg = nn.Parameter(torch.randn(9, device="cuda"))
    opt = ImbSAM([pc, pg], torch.optim.SGD, lr=0.5, rho=0.2)
    for p in (pc, pg):
        p.grad = torch.ones_like(p)
    opt.first_step()
    gs = [torch.randn(6), torch.randn(9, device="cuda")]
    ws = [pc.detach().clone(), pg.detach().clone()]
    for p, g in zip((pc, pg), gs):
        p.grad = g.clone()
    opt.second_step()
    norm = torch.linalg.vector_norm(torch.cat([gs[0], gs[1].cpu()]))
    torch.testing.assert_close(pc, ws[0] + 0.2 * gs[0] / norm)
    torch.testing.assert_close(pg.cpu(), ws[1].cpu() + 0.2 * gs[1].cpu() / norm)
    for p in (pc, pg):
        p.grad.add_(1.0)
    opt.third_step()
    for p, w in zip((pc, pg), ws):
        assert torch.equal(p.detach().cpu(), (w - 0.5 * 2 * torch.ones_like(w)).cpu())


def test_sparse_gradients_are_rejected_clearly():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = ImbSAM(emb.parameters(), torch.optim.SGD, lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.first_step()


def test_steps_out_of_order_raise_clearly():
    model = mlp()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = vector_batches(1)[0]
    with pytest.raises(RuntimeError, match="expects 'head gradient stashed'"):
        opt.second_step()
    with pytest.raises(RuntimeError, match="expects 'weights perturbed'"):
        opt.third_step()
    F.cross_entropy(model(x), y).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="first_step"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="middle of a step"):
        opt.state_dict()
    with pytest.raises(RuntimeError, match="expects 'idle'"):
        opt.step()
    F.cross_entropy(model(x), y).backward()
    opt.second_step()
    with pytest.raises(RuntimeError, match="expects 'head gradient stashed'"):
        opt.second_step()


def test_closure_error_during_perturbed_pass_restores_weights():
    model = mlp()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1, tail_mask=TAIL)
    x, y = vector_batches(1)[0]
    y[0] = 9
    before = _snapshot(model)
    calls = []

    def closure(index=None):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return F.cross_entropy(model(x), y, reduction="none")

    with pytest.raises(KeyboardInterrupt):
        opt.step(closure, y)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(_closure(model, x, y), y)


@pytest.mark.parametrize("backend", ["torch", pytest.param("ext", marks=pytest.mark.skipif(
    not ext_available(), reason="the C++ extension is not built"))])
def test_parameters_retyped_in_place_get_new_backups(backend):
    """``model.double()`` after a step keeps the Parameter objects and changes their dtype: the kept bucket
    layout must notice, or the weights would be restored from fp32 backups (and lose their fp64 digits)."""
    torch.manual_seed(0)
    model = mlp()
    kw = dict(lr=0.1, tail_mask=TAIL, backend=backend)
    opt = ImbSAM(model.parameters(), torch.optim.SGD, **kw)
    batches = vector_batches(3)
    for i, (_, y) in enumerate(batches):
        y[0] = 7 + i
    x, y = batches[0]
    opt.step(_closure(model, x, y), y)
    twin = copy.deepcopy(model).double()
    model.double()
    fresh = ImbSAM(twin.parameters(), torch.optim.SGD, **kw)
    for x, y in batches[1:]:  # the second fp64 step starts from weights with fp64 digits
        opt.step(_closure(model, x.double(), y), y)
        fresh.step(_closure(twin, x.double(), y), y)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert p.dtype == torch.float64
        assert torch.equal(p, q)
