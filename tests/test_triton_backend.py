"""ImbSAM with backend='triton' against backend='torch', and backend dispatch."""

import copy

import pytest
import torch
import torch.nn.functional as F
from models import image_batches, small_cnn

from imbsam_fast import ImbSAM
from imbsam_fast.backends import resolve_loss_backend, resolve_param_backend
from imbsam_fast.backends.kernels import interpreting

needs_kernels = pytest.mark.skipif(
    not (interpreting() or torch.cuda.is_available()), reason="needs TRITON_INTERPRET=1 or a CUDA device"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TAIL = torch.tensor([False] * 6 + [True] * 4)


@needs_kernels
def test_triton_trajectory_matches_torch_backend_over_20_steps():
    torch.manual_seed(0)
    base = small_cnn().to(DEVICE)
    runs = {}
    for backend in ("torch", "triton"):
        model = copy.deepcopy(base)
        opt = ImbSAM(model.parameters(), torch.optim.SGD, tail_mask=TAIL, backend=backend,
                     lr=0.05, momentum=0.9, weight_decay=1e-3)
        assert opt.backend == backend
        for x, y in image_batches(20):
            x, y = x.to(DEVICE), y.to(DEVICE)
            opt.step(lambda index=None, x=x, y=y, m=model: F.cross_entropy(m(x), y, reduction="none"), y)
        runs[backend] = model
    for p, q in zip(runs["triton"].parameters(), runs["torch"].parameters()):
        assert ((p - q).norm() / q.norm().clamp_min(1e-12)).item() < 1e-5
    moved = max((p - q).norm().item() for p, q in zip(runs["triton"].parameters(), base.parameters()))
    assert moved > 1e-2


def test_auto_picks_the_extension_or_torch_for_cpu_tensors_and_reports_it():
    from imbsam_fast.backends.extension import ext_available

    expected = "ext" if ext_available() else "torch"
    opt = ImbSAM(small_cnn().parameters(), torch.optim.SGD, lr=0.1)
    assert opt.backend == expected
    assert resolve_param_backend("auto", {"cpu"}).name == expected
    assert resolve_param_backend("torch", {"cpu"}).name == "torch"
    assert resolve_loss_backend("auto", torch.randn(2, 3)) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_picks_triton_for_cuda_tensors():
    opt = ImbSAM(small_cnn().cuda().parameters(), torch.optim.SGD, lr=0.1)
    assert opt.backend == "triton"
    assert resolve_loss_backend("auto", torch.randn(2, 3, device="cuda")) is not None


def test_triton_on_cpu_without_interpreter_says_so(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ImbSAM(small_cnn().parameters(), torch.optim.SGD, lr=0.1, backend="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_loss_backend("triton", torch.randn(2, 3))


def test_only_existing_backends_are_offered():
    for name in ("cpp", "cuda", None):
        with pytest.raises(ValueError, match="choose one of auto, torch, triton, ext$"):
            ImbSAM(small_cnn().parameters(), torch.optim.SGD, lr=0.1, backend=name)


@needs_kernels
def test_backend_says_when_buckets_fell_back_to_torch():
    torch.manual_seed(0)
    p32 = torch.nn.Parameter(torch.randn(8, device=DEVICE))
    p64 = torch.nn.Parameter(torch.randn(5, dtype=torch.float64, device=DEVICE))
    opt = ImbSAM([p32], torch.optim.SGD, lr=0.1, backend="triton")
    mixed = ImbSAM([p32, p64], torch.optim.SGD, lr=0.1, backend="triton")
    for o in (opt, mixed):
        for p in o.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        o.first_step()
        for p in o.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        o.second_step()
        o.third_step()
    assert opt.backend == "triton" and opt.backend_fallbacks == set()
    assert mixed.backend == "triton+torch" and mixed.backend_fallbacks == {"torch.float64"}
    assert ImbSAM([p32], torch.optim.SGD, lr=0.1, backend="torch").backend == "torch"
