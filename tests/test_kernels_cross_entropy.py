"""Class-masked cross-entropy kernel against torch, through Triton's interpreter on CPU (or on CUDA)."""

import zlib

import pytest
import torch
import torch.nn.functional as F

from imbsam_fast import ClassWeights, class_weighted_cross_entropy, head_tail_cross_entropy
from imbsam_fast.backends.kernels import interpreting, triton_available

pytestmark = pytest.mark.skipif(
    not (interpreting() or torch.cuda.is_available()), reason="needs TRITON_INTERPRET=1 or a CUDA device"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# loss: fp32 accumulation everywhere; grads are stored in the logits' dtype.
TOL = {
    torch.float32: dict(loss=1e-5, grad=1e-5),
    torch.float16: dict(loss=1e-4, grad=2e-3),
    torch.bfloat16: dict(loss=1e-4, grad=1.6e-2),
}


def _inputs(batch, classes, dtype, seed, ignore=True):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, classes, generator=gen) * 3).to(dtype).to(DEVICE)
    y = torch.randint(0, classes, (batch,), generator=gen)
    if ignore and batch > 2:
        y[1] = -100
    mask = torch.rand(classes, generator=gen) < 0.3
    return logits, y.to(DEVICE), mask


def _grads(logits, fn):
    x = logits.detach().clone().requires_grad_()
    head, tail = fn(x)
    gh = torch.autograd.grad(head, x, retain_graph=True)[0]
    gt = torch.autograd.grad(tail, x, retain_graph=True)[0]
    x.grad = None
    (head + tail).backward()
    return head, tail, gh, gt, x.grad


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("batch,classes", [(1, 2), (7, 10), (33, 100), (5, 1000), (3, 8142), (2, 33000)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_forward_and_both_backwards_match_torch_in_float64(dtype, batch, classes, smoothing):
    logits, y, mask = _inputs(batch, classes, dtype, zlib.crc32(f"{dtype}{batch}{classes}{smoothing}".encode()))

    def run(backend):
        leaf = logits if backend == "triton" else logits.double()
        return _grads(leaf, lambda x: head_tail_cross_entropy(
            x, y, mask, tail_weight=2.0, label_smoothing=smoothing, backend=backend))

    got, ref = run("triton"), run("torch")
    tol = TOL[dtype]
    for g, r in zip(got[:2], ref[:2]):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), r, rtol=tol["loss"], atol=tol["loss"])
    for g, r in zip(got[2:], ref[2:]):
        assert g.dtype == dtype and g.shape == logits.shape
        torch.testing.assert_close(g.double(), r, rtol=tol["grad"], atol=tol["grad"] / max(batch, 1))


def test_general_weights_and_per_sample_losses():
    from imbsam_fast.kernels.cross_entropy import class_masked_cross_entropy

    logits, y, _ = _inputs(16, 50, torch.float32, 11)
    gen = torch.Generator().manual_seed(2)
    a, b = torch.rand(50, generator=gen), torch.rand(50, generator=gen)
    x = logits.clone().requires_grad_()
    head, tail, losses = class_masked_cross_entropy(x, y, a.to(DEVICE), b.to(DEVICE))
    x2 = logits.double().clone().requires_grad_()
    ref_losses = F.cross_entropy(x2, y, reduction="none")
    h2, t2 = class_weighted_cross_entropy(x2, y, ClassWeights(a.double(), b.double()), backend="torch")
    torch.testing.assert_close(losses.double(), ref_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((head.double(), tail.double()), (h2, t2), rtol=1e-5, atol=1e-6)
    w = torch.randn(16, generator=gen).to(DEVICE)
    (0.3 * head - 1.7 * tail + (w * losses).sum()).backward()
    (0.3 * h2 - 1.7 * t2 + (w.double() * ref_losses).sum()).backward()
    torch.testing.assert_close(x.grad.double(), x2.grad, rtol=1e-5, atol=1e-6)


def test_nan_and_inf_logits_propagate_like_torch():
    logits, y, mask = _inputs(6, 20, torch.float32, 5, ignore=False)
    logits[2, 3] = float("nan")
    logits[4, 7] = float("inf")
    from imbsam_fast.kernels.cross_entropy import class_masked_cross_entropy

    _, _, losses = class_masked_cross_entropy(logits, y, torch.ones(20, device=DEVICE), torch.zeros(20, device=DEVICE))
    ref = F.cross_entropy(logits, y, reduction="none")
    assert torch.equal(losses.isnan(), ref.isnan())
    torch.testing.assert_close(losses[~ref.isnan()], ref[~ref.isnan()])


def test_all_ignored_and_empty_batches():
    logits, _, mask = _inputs(4, 9, torch.float32, 6)
    y = torch.full((4,), -100, device=DEVICE)
    x = logits.clone().requires_grad_()
    head, tail = head_tail_cross_entropy(x, y, mask, tail_weight=2.0, backend="triton")
    (head + tail).backward()
    assert head.item() == 0 and tail.item() == 0 and torch.equal(x.grad, torch.zeros_like(x))
    empty = torch.zeros(0, 9, device=DEVICE, requires_grad=True)
    h, t = head_tail_cross_entropy(empty, torch.zeros(0, dtype=torch.long, device=DEVICE), mask, tail_weight=2.0,
                                   backend="triton")
    (h + t).backward()
    assert h.item() == 0 and empty.grad.shape == (0, 9)


def test_non_contiguous_logits():
    logits, y, mask = _inputs(8, 30, torch.float32, 7, ignore=False)
    wide = torch.cat([logits, logits], dim=1)[:, ::2]
    assert not wide.is_contiguous()
    got = head_tail_cross_entropy(wide, y, mask, tail_weight=1.0, backend="triton")
    ref = head_tail_cross_entropy(wide, y, mask, tail_weight=1.0, backend="torch")
    torch.testing.assert_close(got, ref)


def test_bad_labels_and_dtypes_are_rejected():
    logits, y, mask = _inputs(4, 9, torch.float32, 8, ignore=False)
    y = y.clone()
    y[0] = 9
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match=r"\[0, 9\)"):
            head_tail_cross_entropy(logits, y, mask, tail_weight=2.0, backend="triton")
    with pytest.raises(TypeError, match="fp32, fp16 or bf16"):
        head_tail_cross_entropy(logits.double(), y.clamp(max=8), mask, tail_weight=2.0, backend="triton")


@pytest.mark.skipif(not triton_available(), reason="needs Triton")
def test_the_fused_cross_entropy_is_one_torch_op_for_compile_and_capture():
    from imbsam_fast.kernels.cross_entropy import class_masked_ce_op

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 11, generator=g).to(DEVICE).requires_grad_()
    y = torch.tensor([0, 3, 10, -100, 7, 3]).to(DEVICE)
    a, b = torch.rand(11, generator=g).to(DEVICE), torch.rand(11, generator=g).to(DEVICE)
    torch.library.opcheck(class_masked_ce_op, (x, y, a, b, -100, 0.0))
    torch.library.opcheck(class_masked_ce_op, (x, y, a, b, -100, 0.1))
    from imbsam_fast.kernels.cross_entropy import class_masked_ce_backward_op, class_masked_cross_entropy

    _, _, _, stored, row_w = class_masked_ce_op(x.detach(), y, a, b, -100, 0.0)
    torch.library.opcheck(class_masked_ce_backward_op, (stored, row_w, torch.tensor(1.0, device=DEVICE), None,
                                                        torch.ones(6, device=DEVICE)))

    def loss(logits):
        head, tail, _ = class_masked_cross_entropy(logits, y, a, b)
        return head + 2 * tail

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")  # fullgraph: no graph break at the op
    want = torch.autograd.grad(loss(x), x)[0]
    got = torch.autograd.grad(compiled(x), x)[0]
    torch.testing.assert_close(got, want)
