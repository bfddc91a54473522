"""Fast mode with ``tail_capacity=K``: fixed-size tail passes chosen on the device."""

from __future__ import annotations

import pytest
import torch
from models import per_sample_closure as closure_of
from models import seeded_mlp as mlp
from models import small_cnn
from models import tail_batches as batches

from imbsam_fast import ImbSAM
from imbsam_fast.schedules.fast import fixed_tail_index

TAIL = torch.tensor([False] * 7 + [True] * 3)


def train(data, **options):
    model = mlp()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, tail_mask=TAIL, model=model, **options)
    calls = []
    for x, y in data:
        opt.step(closure_of(model, x, y, calls), y)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), calls


def test_every_tail_pass_has_k_samples_whatever_the_tail_count():
    _, calls = train(batches([0, 1, 3, 5, 9, 16]), mode="fast", tail_capacity=5)
    sizes = [c.shape[0] for c in calls if c is not None]
    assert sizes == [5] * 12, "two tail passes of 5 samples per batch, tail-free and over-full batches included"


def test_without_batchnorm_and_at_most_k_tail_samples_it_equals_exact_mode():
    data = batches([0, 2, 4, 1, 0, 3])
    fixed, _ = train(data, mode="fast", tail_capacity=4)
    exact, _ = train(data, mode="exact")
    assert ((fixed - exact).norm() / exact.norm()) < 1e-5


def test_more_tail_samples_than_k_are_an_unbiased_subsample():
    torch.manual_seed(0)
    tail_w = torch.zeros(32)
    tail_w[:12] = torch.rand(12) + 0.5
    losses = torch.rand(32)
    full = (tail_w * losses).sum()
    draws = []
    for _ in range(4000):
        index, weights = fixed_tail_index(tail_w, 4)
        assert index.shape == (4,) and bool((tail_w[index] != 0).all())
        draws.append((weights[index] * losses[index]).sum())
    mean = torch.stack(draws).mean()
    assert abs(mean - full) / full < 0.02, (float(mean), float(full))


def test_head_samples_fill_the_pass_with_zero_weight():
    tail_w = torch.tensor([0.0, 2.0, 0.0, 0.0, 2.0, 0.0])
    index, weights = fixed_tail_index(tail_w, 4)
    assert {1, 4} <= set(index.tolist()) and torch.equal(weights, tail_w)
    assert int((weights[index] == 0).sum()) == 2


def test_no_host_read_of_the_tail_count():
    model = mlp()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1, tail_mask=TAIL, model=model, mode="fast",
                 tail_capacity=4, nonfinite="none", backend="torch")
    x, y = batches([3])[0]
    reads = []
    saved = {name: getattr(torch.Tensor, name) for name in ("item", "__bool__", "tolist", "nonzero")}
    nonzero = torch.nonzero

    def spy(name):
        def call(t, *a, **k):
            reads.append(name)
            return saved[name](t, *a, **k)

        return call

    for name in saved:
        setattr(torch.Tensor, name, spy(name))
    torch.nonzero = lambda *a, **k: reads.append("torch.nonzero") or nonzero(*a, **k)
    try:
        opt.step(closure_of(model, x, y), y)
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
        torch.nonzero = nonzero
    assert reads == []


def test_batchnorm_model_trains_with_fixed_passes():
    torch.manual_seed(0)
    model = small_cnn(10)
    opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1, tail_mask=TAIL, model=model, mode="fast",
                 tail_capacity=6)
    g = torch.Generator().manual_seed(0)
    for n in (0, 2, 9):
        x = torch.randn(16, 3, 8, 8, generator=g)
        y = torch.randint(0, 7, (16,), generator=g)
        y[:n] = 8
        out = opt.step(closure_of(model, x, y), y)
        assert torch.isfinite(out.perturbed_tail)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("kwargs,error", [
    (dict(tail_capacity=4), "tail_capacity applies to mode='fast' only"),
    (dict(mode="fast", tail_capacity=0), "tail_capacity must be an int >= 1"),
    (dict(mode="fast", tail_capacity=2.5), "tail_capacity must be an int >= 1"),
])
def test_tail_capacity_is_checked(kwargs, error):
    model = mlp()
    with pytest.raises(ValueError, match=error):
        ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1, tail_mask=TAIL, model=model, **kwargs)
