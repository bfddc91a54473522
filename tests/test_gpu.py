"""CUDA-only checks: no host sync on the hot path, and exact mode on the GPU. Skipped without a GPU."""

import copy

import pytest
import torch
import torch.nn.functional as F
from models import image_batches, small_cnn

from imbsam_fast import ImbSAM
from imbsam_fast.reference import ReferenceImbSAM, reference_train_step

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TAIL = torch.tensor([False] * 6 + [True] * 4)


def test_three_step_api_makes_no_host_sync():
    torch.manual_seed(0)
    model = small_cnn().cuda()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, nonfinite="none")
    x = torch.randn(16, 3, 8, 8, device="cuda")
    y = torch.randint(0, 10, (16,), device="cuda")
    for _ in range(2):  # second pass runs with every buffer allocated
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward(retain_graph=True)
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.first_step()
            loss.backward()
            opt.second_step()
            F.cross_entropy(model(x), y).backward()
            opt.third_step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_exact_mode_matches_reference_on_cuda():
    torch.manual_seed(0)
    model = small_cnn().cuda()
    twin = copy.deepcopy(model)
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
    opt = ImbSAM(model.parameters(), torch.optim.SGD, tail_mask=TAIL, **kw)
    ref = ReferenceImbSAM(torch.optim.SGD(twin.parameters(), **kw), twin)
    for x, y in image_batches(10):
        x, y = x.cuda(), y.cuda()
        opt.step(lambda index=None, x=x, y=y: F.cross_entropy(model(x), y, reduction="none"), y)
        reference_train_step(twin, ref, x, y, TAIL.cuda())
    for p, q in zip(model.parameters(), twin.parameters()):
        assert ((p - q).norm() / q.norm().clamp_min(1e-12)).item() < 1e-5
