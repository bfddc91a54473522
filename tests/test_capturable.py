"""``capturable=True``: no value read back anywhere in a step, and the same trajectories as without it."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from models import per_sample_closure as closure_of
from models import seeded_mlp as mlp
from models import small_cnn
from models import tail_batches as batches

from imbsam_fast import ImbSAM
from imbsam_fast.backends.extension import ext_available

TAIL = torch.tensor([False] * 7 + [True] * 3)
NEEDS_EXT = pytest.mark.skipif(not ext_available(), reason="the C++ extension is not built")
READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "nonzero")


class SyncDetector:
    """Records every value read (``Tensor.item``, ``bool(t)``, ``nonzero``, ...) made by library code."""

    def __init__(self):
        self.calls = []

    def __enter__(self):
        self.saved = {name: getattr(torch.Tensor, name) for name in READS}
        self.nonzero = torch.nonzero
        for name, fn in self.saved.items():
            setattr(torch.Tensor, name, self._spy(name, fn))
        torch.nonzero = self._spy("torch.nonzero", self.nonzero)
        return self

    def _spy(self, name, fn):
        def call(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if "imbsam_fast" in caller:
                self.calls.append(f"{name} from {caller}:{sys._getframe(1).f_lineno}")
            return fn(*args, **kwargs)

        return call

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(torch.Tensor, name, fn)
        torch.nonzero = self.nonzero


@pytest.mark.parametrize("backend,adaptive", [("torch", False), pytest.param("ext", False, marks=NEEDS_EXT),
                                              pytest.param("ext", True, marks=NEEDS_EXT)])
@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_no_value_is_read_in_a_capturable_step(mode, backend, adaptive):
    """``ext`` with ASAM perturbs through its torch fallback, which must be capturable too."""
    torch.manual_seed(0)
    model = small_cnn(10)
    fast = dict(mode="fast", tail_capacity=6) if mode == "fast" else {}
    opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, tail_mask=TAIL, model=model,
                 capturable=True, backend=backend, max_grad_norm=5.0, adaptive=adaptive, **fast)
    g = torch.Generator().manual_seed(0)
    with SyncDetector() as detector:
        for n in (2, 0, 9):
            x = torch.randn(16, 3, 8, 8, generator=g)
            y = torch.randint(0, 7, (16,), generator=g)
            y[:n] = 8
            opt.step(closure_of(model, x, y), y)
    assert detector.calls == []
    assert opt.skipped_steps == 0


def test_no_value_is_read_with_a_grad_scaler():
    model = mlp()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1, tail_mask=TAIL, model=model, capturable=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    x, y = batches([2])[0]
    with SyncDetector() as detector:
        opt.step(closure_of(model, x, y), y, scaler=scaler)
    assert detector.calls == []
    scaler.update()


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_capturable_trajectory_equals_the_plain_one(mode):
    data = batches([0, 2, 4, 1, 3])

    def run(capturable):
        model = mlp()
        fast = dict(mode="fast", tail_capacity=4) if mode == "fast" else {}
        opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, tail_mask=TAIL, model=model,
                     capturable=capturable, backend="torch", **fast)
        for x, y in data:
            opt.step(closure_of(model, x, y), y)
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    got, want = run(True), run(False)
    assert ((got - want).norm() / want.norm()) < 1e-6


@pytest.mark.parametrize("backend,base", [("torch", torch.optim.SGD), ("torch", torch.optim.Adam),
                                          pytest.param("ext", torch.optim.SGD, marks=NEEDS_EXT)])
def test_a_nonfinite_step_is_undone_on_the_device(backend, base):
    torch.manual_seed(0)
    model = small_cnn(10)
    kw = dict(lr=0.1, momentum=0.9) if base is torch.optim.SGD else dict(lr=1e-3)
    opt = ImbSAM(model.parameters(), base, tail_mask=TAIL, model=model, capturable=True, backend=backend, **kw)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 8, 8, generator=g)
    y = torch.randint(0, 9, (16,), generator=g)
    for _ in range(2):
        opt.step(closure_of(model, x, y), y)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {id(p): {k: v.clone() for k, v in opt.base_optimizer.state[p].items()} for p in model.parameters()}

    def poisoned(index=None):
        return F.cross_entropy(model(x), y, reduction="none") * float("nan")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(poisoned, y)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "weights or BatchNorm buffers changed"
    for p in model.parameters():
        for k, v in opt.base_optimizer.state[p].items():
            assert torch.equal(v, state[id(p)][k]), k
    assert opt.skipped_steps == 1 and opt.last_step_skipped
    opt.step(closure_of(model, x, y), y)
    assert opt.skipped_steps == 1 and not opt.last_step_skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_capturable_options_are_checked():
    model = mlp()
    with pytest.raises(ValueError, match="needs tail_capacity"):
        ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1, tail_mask=TAIL, model=model, mode="fast",
               capturable=True)
    with pytest.raises(ValueError, match="nonfinite='raise'"):
        ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1, tail_mask=TAIL, capturable=True, nonfinite="raise")
    with pytest.raises(TypeError, match="capturable must be True or False"):
        ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1, tail_mask=TAIL, capturable=1)
    adam = ImbSAM(model.parameters(), torch.optim.Adam, lr=0.1, tail_mask=TAIL, capturable=True)
    # torch's capturable optimizers refuse CPU tensors: CPU groups keep capturable=False (CUDA: the test below).
    assert adam.param_groups[0]["capturable"] is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_base_optimizer_groups_become_capturable_on_cuda():
    model = mlp().cuda()
    adam = ImbSAM(model.parameters(), torch.optim.Adam, lr=0.1, tail_mask=TAIL, capturable=True)
    assert adam.param_groups[0]["capturable"] is True
