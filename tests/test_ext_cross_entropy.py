"""The extension's class-masked cross-entropy (``torch.ops.imbsam_fast.masked_ce*``, csrc/class_masked_ce*)
against torch: values, gradients, labels, op checks, ``torch.compile``, and the CUDA kernels on a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from imbsam_fast import ClassWeights
from imbsam_fast.backends.extension import ext_available
from imbsam_fast.losses import class_weighted_cross_entropy

pytestmark = pytest.mark.skipif(not ext_available(), reason="the C++ extension is not built")

# fp64 logits: the losses, sums and row weights are fp32 (as for every dtype), so fp32 tolerances.
TOL = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-6, 1e-7), torch.float16: (2e-3, 2e-3),
       torch.bfloat16: (2e-2, 2e-2)}
SHAPES = [(1, 1), (7, 3), (33, 100), (64, 1000), (5, 5000)]


def problem(batch: int, classes: int, dtype: torch.dtype, seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, classes, generator=g) * 3).to(device=device, dtype=dtype)
    y = torch.randint(0, classes, (batch,), generator=g)
    if batch > 2:
        y[1] = -100
    a, b = torch.rand(classes, generator=g), torch.rand(classes, generator=g) * 2
    return x, y.to(device), a.to(device), b.to(device)


def reference(x, y, a, b, smoothing):
    """``(head, tail, losses)`` by torch's cross-entropy in fp64 (ignored rows: weight 0, loss 0)."""
    losses = F.cross_entropy(x.double(), y, reduction="none", ignore_index=-100, label_smoothing=smoothing)
    keep = (y != -100).double()
    yy = y.clamp(min=0)
    return ((a.double()[yy] * keep * losses).sum() / len(y), (b.double()[yy] * keep * losses).sum() / len(y),
            losses)


def masked_ce(x, y, a, b, smoothing=0.0):
    return torch.ops.imbsam_fast.masked_ce(x, y, a, b, -100, smoothing)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_values_and_gradient_match_torch(dtype, shape, smoothing):
    x, y, a, b = problem(*shape, dtype)
    rtol, atol = TOL[dtype]
    xe = x.clone().requires_grad_()
    head, tail, losses = masked_ce(xe, y, a, b, smoothing)
    gh, gt, gl = 0.7, -1.3, torch.linspace(-1, 1, shape[0], dtype=torch.float64)
    (head * gh + tail * gt + (losses.double() * gl).sum()).backward()

    xr = x.double().requires_grad_()
    h_ref, t_ref, l_ref = reference(xr, y, a, b, smoothing)
    (h_ref * gh + t_ref * gt + (l_ref * gl).sum()).backward()
    # Losses and sums are fp32 for every logits dtype (fp64's gradient keeps fp64).
    vr, va = max(rtol, TOL[torch.float32][0]), max(atol, TOL[torch.float32][1])
    for got, want in ((head, h_ref), (tail, t_ref), (losses, l_ref)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want.detach(), rtol=vr, atol=va * 10)
    assert xe.grad.dtype == dtype
    torch.testing.assert_close(xe.grad.double(), xr.grad, rtol=rtol, atol=atol)


def test_one_output_alone_and_non_contiguous_logits():
    x, y, a, b = problem(16, 40, torch.float32)
    xt = x.t().contiguous().t().requires_grad_()
    assert not xt.is_contiguous()
    _, tail, _ = masked_ce(xt, y, a, b)
    tail.backward()
    xr = x.double().requires_grad_()
    reference(xr, y, a, b, 0.0)[1].backward()
    torch.testing.assert_close(xt.grad.double(), xr.grad, rtol=1e-5, atol=1e-7)


def test_labels_are_checked_and_ignore_index_is_skipped():
    x, y, a, b = problem(8, 10, torch.float32)
    y[:] = -100
    head, tail, losses = masked_ce(x, y, a, b)
    assert head == 0 and tail == 0 and not losses.any()
    y[3] = 10
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        masked_ce(x, y, a, b)
    with pytest.raises(ValueError, match="class weights have 9 entries"):
        masked_ce(x, torch.zeros(8, dtype=torch.long), a[:9], b[:9])
    with pytest.raises(ValueError, match="integer class labels"):
        masked_ce(x, torch.zeros(8), a, b)


def test_empty_batch():
    x, y, a, b = problem(0, 10, torch.float32)
    head, tail, losses = masked_ce(x.requires_grad_(), y, a, b)
    assert head == 0 and tail == 0 and losses.shape == (0,)
    (head + tail).backward()
    assert x.grad.shape == (0, 10)


def test_opcheck():
    x, y, a, b = problem(9, 17, torch.float32)
    ops = torch.ops.imbsam_fast
    torch.library.opcheck(ops.masked_ce_forward.default, (x, y, a, b, -100, 0.1))
    _, _, _, grad, row_w = ops.masked_ce_forward(x, y, a, b, -100, 0.1)
    torch.library.opcheck(ops.masked_ce_backward.default, (grad, row_w, torch.tensor(1.0), None, torch.ones(9)))
    torch.library.opcheck(ops.masked_ce.default, (x.requires_grad_(), y, a, b, -100, 0.1))


def test_compiles_in_one_graph_and_matches_eager():
    x, y, a, b = problem(12, 20, torch.float32)

    def step(x):
        head, tail, _ = masked_ce(x, y, a, b, 0.1)
        return head + 2 * tail

    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    step(xe).backward()
    torch._dynamo.reset()
    torch.compile(step, fullgraph=True, backend="aot_eager")(xc).backward()
    torch.testing.assert_close(xc.grad, xe.grad)


def test_the_loss_api_takes_the_ext_backend():
    x, y, a, b = problem(32, 10, torch.float32)
    weights = ClassWeights(a, b)
    xe, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    he, te = class_weighted_cross_entropy(xe, y, weights, backend="ext", label_smoothing=0.05)
    ht, tt = class_weighted_cross_entropy(xt, y, weights, backend="torch", label_smoothing=0.05)
    torch.testing.assert_close((he, te), (ht, tt))
    (he + te).backward()
    (ht + tt).backward()
    torch.testing.assert_close(xe.grad, xt.grad)


CUDA_OP = torch.cuda.is_available() and ext_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "imbsam_fast::masked_ce_forward", "CUDA")


@pytest.mark.skipif(not CUDA_OP, reason="needs a CUDA device and the extension built with CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (33, 100), (256, 1000), (7, 40_000)])
def test_cuda_kernels_match_the_cpu_op(dtype, shape):
    x, y, a, b = problem(*shape, dtype)
    rtol, atol = TOL[dtype]
    xc = x.cuda().requires_grad_()
    outs = masked_ce(xc, y.cuda(), a.cuda(), b.cuda(), 0.1)
    xr = x.double().requires_grad_()
    refs = reference(xr, y, a, b, 0.1)
    for got, want in zip(outs, refs):
        torch.testing.assert_close(got.double().cpu(), want.detach(), rtol=rtol, atol=atol * 10)
    (outs[0] - outs[1] + outs[2].sum()).backward()
    (refs[0] - refs[1] + refs[2].sum()).backward()
    torch.testing.assert_close(xc.grad.double().cpu(), xr.grad, rtol=rtol, atol=atol)
    again = masked_ce(x.cuda(), y.cuda(), a.cuda(), b.cuda(), 0.1)
    assert torch.equal(again[0], outs[0].detach()), "the CUDA sums must be deterministic"
