"""CapturedStep: a whole step through static buffers, captured in a CUDA graph on a GPU (eager on the CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from models import image_batches, small_cnn, tail_batches
from models import seeded_mlp as mlp
from test_capturable import SyncDetector

from imbsam_fast import CapturedStep, ImbSAM
from imbsam_fast.backends.param_dispatch import resolve_param_backend
from imbsam_fast.backends.torch_ops import TorchParamOps

TAIL = torch.tensor([False] * 7 + [True] * 3)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def loss_of(model):
    return lambda x, y: F.cross_entropy(model(x), y, reduction="none")


def optimizer(model, mode, device="cpu", **extra):
    fast = dict(mode="fast", tail_capacity=4) if mode == "fast" else {}
    return ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4, tail_mask=TAIL.to(
        device), model=model, capturable=True, **fast, **extra)


def data(kind, steps=6):
    if kind == "mlp":
        return tail_batches([1, 0, 3, 2, 4, 1, 2, 0, 1, 3][:steps] * (1 + steps // 10))[:steps]
    out = image_batches(steps)
    for i, (_, y) in enumerate(out):
        y[i % 16] = 8
    return out


def make(kind, seed=0):
    torch.manual_seed(seed)
    return mlp(seed) if kind == "mlp" else small_cnn(10)


def state_of(model, opt):
    return ([t.detach().clone() for t in model.state_dict().values()],
            {k: v.clone() for p in opt.base_optimizer.state for k, v in opt.base_optimizer.state[p].items()})


@pytest.mark.parametrize("kind,mode", [("mlp", "exact"), ("mlp", "fast"), ("cnn", "exact"), ("cnn", "fast")])
def test_the_step_through_static_buffers_equals_plain_steps(kind, mode):
    batches = data(kind)
    model_a, model_b = make(kind), make(kind)
    opt_a, opt_b = optimizer(model_a, mode), optimizer(model_b, mode)
    x0, y0 = batches[0]
    before = copy.deepcopy(model_b.state_dict())
    step = CapturedStep(opt_b, loss_of(model_b), x0, y0, model=model_b)
    assert not step.graphed
    after = model_b.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "building the step must not train"
    assert opt_b.steps == 0 and not any(p.grad is not None for p in model_b.parameters())

    torch.manual_seed(3)
    for x, y in batches:
        opt_a.step(lambda index=None, x=x, y=y: F.cross_entropy(
            model_a(x if index is None else x[index]), y if index is None else y[index], reduction="none"), y)
    torch.manual_seed(3)
    for x, y in batches:
        losses = step(x, y)
    assert opt_b.steps == opt_a.steps == len(batches)
    for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert losses.per_sample.shape == (16,)


def test_no_value_is_read_through_the_step():
    model = make("cnn")
    opt = optimizer(model, "fast")
    batches = data("cnn")
    step = CapturedStep(opt, loss_of(model), *batches[0], model=model)
    with SyncDetector() as spy:
        for x, y in batches:
            step(x, y)
    assert spy.calls == []


def test_the_device_skip_count_is_kept_in_one_tensor():
    model = make("mlp")
    opt = optimizer(model, "exact")
    (x, y), = data("mlp", 1)
    step = CapturedStep(opt, loss_of(model), x, y)
    step(x, y)
    counter = opt._skipped_on_device
    step(torch.full_like(x, float("nan")), y)
    assert opt._skipped_on_device is counter, "a replayed graph keeps adding into the tensor it captured"
    assert opt.skipped_steps == 1 and opt.last_step_skipped
    opt.skipped_steps = 0
    assert opt._skipped_on_device is counter and opt.skipped_steps == 0


def test_misuse_is_refused_clearly():
    model = make("mlp")
    (x, y), = data("mlp", 1)
    plain = ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1, tail_mask=TAIL)
    with pytest.raises(ValueError, match="capturable=True"):
        CapturedStep(plain, loss_of(model), x, y)
    opt = optimizer(model, "exact")
    with pytest.raises(ValueError, match="warmup"):
        CapturedStep(opt, loss_of(model), x, y, warmup=0)
    with pytest.raises(ValueError, match="needs CUDA inputs"):
        CapturedStep(opt, loss_of(model), x, y, graph=True)
    step = CapturedStep(opt, loss_of(model), x, y)
    with pytest.raises(ValueError, match="static shapes"):
        step(x[:8], y[:8])
    with pytest.raises(ValueError, match="static shapes"):
        step(x, y.int())


def test_capturable_parameters_on_an_accelerator_take_the_foreach_ops():
    assert isinstance(resolve_param_backend("auto", {"cuda"}, capturable=True), TorchParamOps)
    for name in ("triton", "ext"):
        with pytest.raises(ValueError, match="pointer tables"):
            resolve_param_backend(name, {"cuda"}, capturable=True)


@CUDA
@pytest.mark.parametrize("kind,mode", [("mlp", "exact"), ("mlp", "fast"), ("cnn", "exact"), ("cnn", "fast")])
def test_graph_replay_equals_the_eager_trajectory(kind, mode):
    """20 replayed steps against 20 eager ones (fast mode on the MLP: n_tail <= K, so the random fill has
    weight 0 and the two agree; on the CNN the ghost samples are drawn from one generator in both)."""
    batches = [(x.cuda(), y.cuda()) for x, y in data(kind, 20)]
    model_e, model_g = make(kind).cuda(), make(kind).cuda()
    opt_e, opt_g = optimizer(model_e, mode, "cuda"), optimizer(model_g, mode, "cuda")
    assert opt_g.backend == "torch"
    step = CapturedStep(opt_g, loss_of(model_g), *batches[0], model=model_g)
    assert step.graphed
    eager = CapturedStep(opt_e, loss_of(model_e), *batches[0], model=model_e, graph=False)
    torch.manual_seed(11)
    for x, y in batches:
        eager(x, y)
    torch.manual_seed(11)
    for x, y in batches:
        step(x, y)
    torch.cuda.synchronize()
    for a, b in zip(model_e.state_dict().values(), model_g.state_dict().values()):
        torch.testing.assert_close(b.float(), a.float(), rtol=1e-5, atol=1e-5)
    assert opt_g.steps == 20 and opt_g.skipped_steps == 0
