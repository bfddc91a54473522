"""Exact mode against the transcription of the public reference code."""

import copy

import pytest
import torch
from models import image_batches, small_cnn

from imbsam_fast import ImbSAM, head_tail_cross_entropy
from imbsam_fast.reference import ReferenceImbSAM, reference_train_step

STEPS = 20
SGD_KW = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
TAIL = torch.tensor([False] * 6 + [True] * 4)


def _max_rel_err(a: torch.nn.Module, b: torch.nn.Module) -> float:
    worst = 0.0
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        if not p.is_floating_point():
            assert torch.equal(p, q), n
            continue
        worst = max(worst, ((p - q).norm() / q.norm().clamp_min(1e-12)).item())
    return worst


def _reference_run(model, batches):
    ref = ReferenceImbSAM(torch.optim.SGD(model.parameters(), **SGD_KW), model, rho=0.05)
    states = []
    for x, y in batches:
        reference_train_step(model, ref, x, y, TAIL, tail_weight=2.0)
        states.append(copy.deepcopy(model.state_dict()))
    return states


@pytest.fixture(scope="module")
def reference_states():
    torch.manual_seed(0)
    model = small_cnn()
    init = copy.deepcopy(model.state_dict())
    return init, _reference_run(model, image_batches(STEPS))


def _compare(model, states, step_idx):
    ref_model = small_cnn()
    ref_model.load_state_dict(states[step_idx])
    return _max_rel_err(model, ref_model)


def test_three_step_api_matches_reference(reference_states):
    init, states = reference_states
    model = small_cnn()
    model.load_state_dict(init)
    opt = ImbSAM(model.parameters(), torch.optim.SGD, rho=0.05, **SGD_KW)
    errs = []
    for i, (x, y) in enumerate(image_batches(STEPS)):
        head, tail = head_tail_cross_entropy(model(x), y, TAIL, tail_weight=2.0)
        opt.zero_grad()
        head.backward(retain_graph=True)
        opt.first_step()
        tail.backward()
        opt.second_step()
        _, tail = head_tail_cross_entropy(model(x), y, TAIL, tail_weight=2.0)
        tail.backward()
        opt.third_step()
        errs.append(_compare(model, states, i))
    assert max(errs) < 1e-5, errs
    start = _load(init)
    pairs = zip(model.parameters(), start.parameters())
    moved = max((p - q).norm().item() / max(q.norm().item(), 1.0) for p, q in pairs)
    assert moved > 1e-2, "the run must actually train"


def test_closure_step_matches_reference(reference_states):
    init, states = reference_states
    model = small_cnn()
    model.load_state_dict(init)
    opt = ImbSAM(model.parameters(), torch.optim.SGD, rho=0.05, tail_mask=TAIL, tail_weight=2.0, **SGD_KW)
    errs = []
    for i, (x, y) in enumerate(image_batches(STEPS)):
        def closure(index=None, x=x, y=y):
            return torch.nn.functional.cross_entropy(model(x), y, reduction="none")

        out = opt.step(closure, y)
        assert out.per_sample.shape == (x.shape[0],)
        errs.append(_compare(model, states, i))
    assert max(errs) < 1e-5, errs


def test_rho_zero_is_base_optimizer_on_full_loss():
    """With rho = 0, ImbSAM's update is SGD on head + tail loss (tail_weight folded in)."""
    torch.manual_seed(1)
    model = small_cnn(batchnorm=False)
    twin = copy.deepcopy(model)
    opt = ImbSAM(model.parameters(), torch.optim.SGD, rho=0.0, tail_mask=TAIL, tail_weight=2.0, **SGD_KW)
    sgd = torch.optim.SGD(twin.parameters(), **SGD_KW)
    for x, y in image_batches(5):
        opt.step(lambda index=None, x=x, y=y: torch.nn.functional.cross_entropy(model(x), y, reduction="none"), y)
        losses = torch.nn.functional.cross_entropy(twin(x), y, reduction="none")
        sgd.zero_grad()
        (losses[~TAIL[y]].sum() / len(y) + 2.0 * losses[TAIL[y]].sum() / len(y)).backward()
        sgd.step()
    assert _max_rel_err(model, twin) < 1e-6


def _load(state):
    m = small_cnn()
    m.load_state_dict(state)
    return m
