"""The C++ extension's ops (csrc/) against the torch reference, and the ``ext`` backend in the optimizer.

Skipped where the extension is not built, except under ``IMBSAM_FAST_REQUIRE_EXT=1`` (the Makefile's test
target sets it), where a missing extension is a failure: CI must not skip these silently.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys

import pytest
import torch
from models import small_cnn

from imbsam_fast import ImbSAM
from imbsam_fast.backends import Bucket, TorchParamOps
from imbsam_fast.backends.extension import ext_available, ext_error

REQUIRED = os.environ.get("IMBSAM_FAST_REQUIRE_EXT") == "1"


def test_extension_is_built_where_required():
    if REQUIRED:
        assert ext_available(), ext_error()
    elif not ext_available():
        pytest.skip(f"the C++ extension is not built: {ext_error()}")


pytestmark_ext = pytest.mark.skipif(not ext_available(), reason="the C++ extension is not built")
ops = torch.ops.imbsam_fast if ext_available() else None

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SIZES = {
    "odd": [1, 7, 33, 1000, 40_003, 70_001],
    "empty": [0, 5, 0],
    "many": [3 + (i * 37) % 501 for i in range(300)],
}
TOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.float16: 1e-5, torch.bfloat16: 1e-5}


def tensors(sizes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g).to(dtype) for n in sizes]


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between two fp32 tensors (same sign assumed)."""
    ai, bi = a.contiguous().view(torch.int32).long(), b.contiguous().view(torch.int32).long()
    return int((ai - bi).abs().max()) if a.numel() else 0


@pytestmark_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(SIZES))
def test_sq_norm_matches_torch(dtype, case):
    ts = tensors(SIZES[case], dtype)
    want = sum(t.double().square().sum() for t in ts)
    got = ops.sq_norm(ts)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got.double(), torch.as_tensor(want, dtype=torch.float64), rtol=TOL[dtype], atol=0)


@pytestmark_ext
def test_sq_norm_is_deterministic_across_thread_counts():
    ts = tensors(SIZES["odd"] + SIZES["many"], torch.float32)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(ops.sq_norm(ts))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


@pytestmark_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(SIZES))
def test_perturb_and_restore_match_the_torch_ops(dtype, case):
    params, grads = tensors(SIZES[case], dtype, 1), tensors(SIZES[case], dtype, 2)
    twin = [p.clone() for p in params]
    original = [p.clone() for p in params]
    backups = [torch.empty_like(p) for p in params]
    total = ops.sq_norm(grads)
    ops.perturb_(params, grads, backups, total, 0.3, 1e-16)
    TorchParamOps().perturb_([Bucket(twin, [g.clone() for g in grads], [torch.empty_like(p) for p in twin], 0.3)])
    assert all(torch.equal(b, o) for b, o in zip(backups, original)), "the backup is not a bit copy of w"
    tol = {torch.float32: 2e-6, torch.float64: 1e-12, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    for p, t in zip(params, twin):
        torch.testing.assert_close(p, t, rtol=tol, atol=tol)
    ops.restore_(params, backups)
    assert all(torch.equal(p, o) for p, o in zip(params, original)), "restore is not bit-exact"


@pytestmark_ext
def test_nan_and_inf_propagate():
    g = [torch.tensor([1.0, float("nan")]), torch.ones(3)]
    assert torch.isnan(ops.sq_norm(g))
    assert torch.isinf(ops.sq_norm([torch.tensor([float("inf"), 1.0])]))
    w, b = [torch.ones(2), torch.ones(3)], [torch.empty(2), torch.empty(3)]
    ops.perturb_(w, g, b, ops.sq_norm(g), 0.05, 1e-16)
    assert torch.isnan(w[0]).all() and torch.isnan(w[1]).all()
    assert torch.equal(b[0], torch.ones(2))


@pytestmark_ext
@pytest.mark.parametrize("momentum,dampening,nesterov,weight_decay,maximize", [
    c for c in itertools.product([0.0, 0.9], [0.0, 0.1], [False, True], [0.0, 1e-3], [False, True])
    if not (c[2] and (c[0] == 0 or c[1] != 0))  # nesterov needs momentum and zero dampening
])
def test_fused_restore_sgd_matches_torch_sgd(momentum, dampening, nesterov, weight_decay, maximize):
    """From the backups, one fused pass makes torch.optim.SGD's step (with its momentum buffers already
    there: the optimizer takes the unfused path on a buffer's first step). Bit-exact here; at most 1 ulp
    where a CPU without FMA makes torch round its vectorized multiply-adds twice."""
    kw = dict(lr=0.1, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay,
              maximize=maximize)
    sizes = SIZES["odd"] + SIZES["many"][:50]
    backups, grads, buffers = (tensors(sizes, torch.float32, seed) for seed in (3, 4, 5))
    theirs = [torch.nn.Parameter(b.clone()) for b in backups]
    sgd = torch.optim.SGD(theirs, **kw)
    for p, g, m in zip(theirs, grads, buffers):
        p.grad = g.clone()
        if momentum:
            sgd.state[p]["momentum_buffer"] = m.clone()
    sgd.step()
    ours = [torch.randn_like(b) for b in backups]  # the perturbed weights: the op restores from the backups
    ours_buffers = [m.clone() for m in buffers]
    ops.restore_sgd_(ours, backups, grads, ours_buffers, **kw)
    assert max(ulp_distance(o, t.detach()) for o, t in zip(ours, theirs)) <= 1
    if momentum:
        assert max(ulp_distance(o, sgd.state[t]["momentum_buffer"]) for o, t in zip(ours_buffers, theirs)) <= 1


@pytestmark_ext
def test_fused_restore_sgd_with_the_skip_flag_only_restores():
    backups, grads, buffers = (tensors([7, 40_003], torch.float32, seed) for seed in (3, 4, 5))
    weights = [torch.randn_like(b) for b in backups]
    kept = [m.clone() for m in buffers]
    ops.restore_sgd_(weights, backups, grads, buffers, 0.1, 0.9, 0.0, 1e-3, False, False, torch.tensor(1.0))
    assert all(torch.equal(w, b) for w, b in zip(weights, backups))
    assert all(torch.equal(m, k) for m, k in zip(buffers, kept))
    ops.restore_sgd_(weights, backups, grads, buffers, 0.1, 0.9, 0.0, 1e-3, False, False, torch.tensor(0.0))
    assert not torch.equal(weights[0], backups[0]) and not torch.equal(buffers[0], kept[0])


@pytestmark_ext
def test_opcheck():
    ts = tensors([5, 17], torch.float32)
    torch.library.opcheck(torch.ops.imbsam_fast.sq_norm.default, ([t.clone() for t in ts],))
    torch.library.opcheck(torch.ops.imbsam_fast.perturb_.default,
                          ([t.clone() for t in ts], [t.clone() for t in ts], [torch.empty_like(t) for t in ts],
                           torch.tensor(2.0), 0.05, 1e-16))
    torch.library.opcheck(torch.ops.imbsam_fast.restore_.default, ([t.clone() for t in ts], [t.clone() for t in ts]))
    torch.library.opcheck(torch.ops.imbsam_fast.restore_sgd_.default,
                          ([t.clone() for t in ts], [t.clone() for t in ts], [t.clone() for t in ts],
                           [torch.zeros_like(t) for t in ts], 0.1, 0.9, 0.0, 1e-3, False, False))


@pytestmark_ext
@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_trajectory_with_the_extension_equals_the_torch_backend(mode):
    from models import image_batches

    tail = torch.tensor([False] * 7 + [True] * 3)

    def run(backend):
        torch.manual_seed(0)
        model = small_cnn(10)
        opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-3, tail_mask=tail,
                     mode=mode, model=model, backend=backend)
        torch.manual_seed(1)
        for i, (x, y) in enumerate(image_batches(6)):
            y[i % 16] = 8

            def closure(index=None, x=x, y=y):
                xs, ys = (x, y) if index is None else (x[index], y[index])
                return torch.nn.functional.cross_entropy(model(xs), ys, reduction="none")

            opt.step(closure, y)
        assert opt.backend == backend
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    got, want = run("ext"), run("torch")
    assert ((got - want).norm() / want.norm()) < 1e-5


class _CountingOps:
    """``torch.ops.imbsam_fast`` with a count of the calls that refused their lists."""

    def __init__(self, inner):
        self.inner, self.refused = inner, 0

    def __getattr__(self, name):
        op = getattr(self.inner, name)

        def call(*args):
            try:
                return op(*args)
            except NotImplementedError:
                self.refused += 1
                raise

        return call


@pytestmark_ext
def test_a_bucket_the_kernels_refuse_goes_through_the_torch_ops_once_refused():
    """Channels-last convolution weights (non-contiguous, and so are their gradients): the ops refuse the bucket
    before writing, the torch ops take it with the same trajectory as the torch backend, the fallback is named,
    and later steps do not ask the kernels again."""
    from models import image_batches

    tail = torch.tensor([False] * 7 + [True] * 3)

    def run(backend):
        torch.manual_seed(0)
        model = small_cnn(10).to(memory_format=torch.channels_last)
        assert not all(p.is_contiguous() for p in model.parameters())
        opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, tail_mask=tail, mode="fast",
                     model=model, backend=backend)
        if backend == "ext":
            opt._ops._ops = _CountingOps(opt._ops._ops)
        for i, (x, y) in enumerate(image_batches(4)):
            y[i % 16] = 8
            opt.step(lambda index=None, x=x, y=y: torch.nn.functional.cross_entropy(
                model(x if index is None else x[index]), y if index is None else y[index], reduction="none"), y)
        return opt, torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    opt, got = run("ext")
    _, want = run("torch")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert "non-contiguous tensors" in opt.backend_fallbacks
    assert opt._ops._ops.refused == 1


@pytestmark_ext
def test_under_compile_the_backend_checks_the_lists_instead_of_asking_the_ops(monkeypatch):
    """While torch.compile traces, a refusal could not fall back at run time: the lists are walked in Python."""
    from imbsam_fast.backends.ext_ops import ExtParamOps

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    backend = ExtParamOps()
    backend._ops = _CountingOps(backend._ops)
    w = [torch.randn(4, 3).t(), torch.randn(5)]
    bucket = Bucket(w, [torch.randn_like(t) for t in w], [torch.empty_like(t) for t in w], 0.05)
    start = [t.clone() for t in w]
    backend.perturb_([bucket])
    backend.restore_([bucket])
    assert backend._ops.refused == 0 and "non-contiguous tensors" in backend.fallbacks
    assert all(torch.equal(a, b) for a, b in zip(w, start))


def test_missing_extension_names_how_to_build(monkeypatch):
    from imbsam_fast.backends import ext_ops

    monkeypatch.setattr(ext_ops, "load_extension", lambda: False)
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation -e ."):
        ext_ops.ExtParamOps()


@pytest.mark.skipif(not ext_available(), reason="the JIT build is compared with the built extension")
def test_jit_build_compiles_csrc_into_a_cache(tmp_path):
    """A fresh process that cannot see the built extension compiles csrc/ with ninja into the cache."""
    code = (
        "import importlib.util, torch\n"
        "importlib.util.find_spec = lambda name, *a, _f=importlib.util.find_spec: None if name == "
        "'imbsam_fast._C' else _f(name, *a)\n"
        "from imbsam_fast.backends.extension import load_extension, ext_error\n"
        "assert load_extension(jit=True), ext_error()\n"
        "print(float(torch.ops.imbsam_fast.sq_norm([torch.ones(3)])))\n"
    )
    env = {**os.environ, "IMBSAM_FAST_EXT_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "3.0"
    assert any(tmp_path.glob("*.so"))


def _train_small(steps=5, hooks=None, book=True, **options):
    """``book=False``: the Python phases only (the extension's ParamBook switched off)."""
    from models import image_batches

    tail = torch.tensor([False] * 7 + [True] * 3)
    torch.manual_seed(0)
    model = small_cnn(10)
    opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True,
                 tail_mask=tail, model=model, backend="ext", **options)
    if hooks is not None:
        opt.register_step_hooks(hooks)
    if not book:
        opt._book = None
    torch.manual_seed(1)
    for i, (x, y) in enumerate(image_batches(steps)):
        y[i % 16] = 8

        def closure(index=None, x=x, y=y):
            xs, ys = (x, y) if index is None else (x[index], y[index])
            return torch.nn.functional.cross_entropy(model(xs), ys, reduction="none")

        opt.step(closure, y)
    return model, opt


def _count_fused_steps(monkeypatch) -> list[str]:
    """Which fused path each fused base step took: "python" (apply_fused_sgd) or "book" (the ParamBook)."""
    from imbsam_fast import fused_sgd, optimizer
    from imbsam_fast.backends.ext_book import ExtBook

    calls = []
    real, real_book = fused_sgd.apply_fused_sgd, ExtBook.restore_sgd

    def counted(opt, plan, skip=None):
        calls.append("python")
        real(opt, plan, skip)

    def counted_book(self, kept):
        calls.append("book")
        real_book(self, kept)

    monkeypatch.setattr(optimizer, "apply_fused_sgd", counted)
    monkeypatch.setattr(ExtBook, "restore_sgd", counted_book)
    return calls


@pytestmark_ext
@pytest.mark.parametrize("book", [True, False], ids=["book", "python-phases"])
def test_fused_restore_sgd_gives_the_unfused_trajectory(monkeypatch, book):
    from imbsam_fast import optimizer

    calls = _count_fused_steps(monkeypatch)
    fused, _ = _train_small(book=book)
    # SGD's first step makes the buffers; the second plans the fused pass; the book takes the kept plan after.
    assert calls == (["python"] + ["book"] * 3 if book else ["python"] * 4)
    calls.clear()
    monkeypatch.setattr(optimizer, "plan_fused_sgd", lambda *a: None)
    monkeypatch.setattr(optimizer, "kept_plan", lambda *a: None)
    unfused, _ = _train_small(book=book)
    assert calls == []
    for a, b in zip(fused.parameters(), unfused.parameters()):
        assert ulp_distance(a.detach(), b.detach()) <= 1
    for a, b in zip(fused.buffers(), unfused.buffers()):
        assert torch.equal(a, b)


@pytestmark_ext
@pytest.mark.parametrize("book", [True, False], ids=["book", "python-phases"])
def test_fused_path_steps_aside_for_hooks_clipping_and_subclasses(monkeypatch, book):
    from imbsam_fast import StepHooks

    class BeforeStep(StepHooks):
        def before_base_step(self, opt):
            seen.append("before_base_step")

    class Observer(StepHooks):  # on the backwards only (timing, logging): the fused pass stays on
        def after_backward(self, opt, phase):
            seen.append(phase)

    seen = []
    calls = _count_fused_steps(monkeypatch)
    _train_small(steps=4, max_grad_norm=1.0, book=book)
    _train_small(steps=4, hooks=BeforeStep(), book=book)
    patched = StepHooks()
    patched.before_base_step = lambda opt: seen.append("before_base_step")
    _train_small(steps=4, hooks=patched, book=book)
    assert calls == []
    assert seen.count("before_base_step") == 8
    seen.clear()
    plain, _ = _train_small(steps=4, book=book)
    assert calls == (["python", "book", "book"] if book else ["python"] * 3)
    calls.clear()
    observed, _ = _train_small(steps=4, hooks=Observer(), book=book)
    assert calls == (["python", "book", "book"] if book else ["python"] * 3)
    assert seen and set(seen) <= {"head", "ascent", "perturbed"}
    for a, b in zip(plain.parameters(), observed.parameters()):
        assert torch.equal(a, b)


@pytestmark_ext
@pytest.mark.parametrize("book", [True, False], ids=["book", "python-phases"])
def test_fused_path_skips_a_nonfinite_step_and_restores_the_weights(monkeypatch, book):
    calls = _count_fused_steps(monkeypatch)
    model, opt = _train_small(steps=3, book=book)
    assert calls[-1] == ("book" if book else "python")
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(16, 3, 8, 8)
    y = torch.arange(16) % 10

    def closure(index=None):
        return torch.nn.functional.cross_entropy(model(x), y, reduction="none") * float("nan")

    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(closure, y)
    assert opt.last_step_skipped
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


_CUDA_EXT = (torch.cuda.is_available() and ext_available()
             and torch._C._dispatch_has_kernel_for_dispatch_key("imbsam_fast::sq_norm", "CUDA"))
NEEDS_CUDA_EXT = pytest.mark.skipif(not _CUDA_EXT, reason="needs a CUDA device and the extension built with its CUDA "
                                    "kernels")


@NEEDS_CUDA_EXT
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_ops_match_the_cpu_ops(dtype):
    sizes = SIZES["odd"] + SIZES["many"]
    params, grads, buffers = (tensors(sizes, dtype, seed) for seed in (1, 2, 3))
    cuda = [[t.cuda() for t in ts] for ts in (params, grads, buffers)]
    torch.testing.assert_close(ops.sq_norm(cuda[1]).cpu(), ops.sq_norm(grads), rtol=TOL[dtype] * 10, atol=0)
    assert torch.equal(ops.sq_norm(cuda[1]), ops.sq_norm(cuda[1])), "the CUDA norm must be deterministic"
    backups_cpu, backups_cuda = [torch.empty_like(p) for p in params], [torch.empty_like(p) for p in cuda[0]]
    ops.perturb_(params, grads, backups_cpu, ops.sq_norm(grads), 0.3, 1e-16)
    ops.perturb_(cuda[0], cuda[1], backups_cuda, ops.sq_norm(cuda[1]), 0.3, 1e-16)
    tol = {torch.float32: 2e-6, torch.float64: 1e-12, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    for a, b in zip(cuda[0], params):
        torch.testing.assert_close(a.cpu(), b, rtol=tol, atol=tol)
    ops.restore_(cuda[0], backups_cuda)
    assert all(torch.equal(a, b) for a, b in zip(cuda[0], backups_cuda))
    if dtype == torch.float32:
        kw = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-3, nesterov=True, maximize=False)
        ops.restore_sgd_(params, backups_cpu, grads, buffers, **kw)
        ops.restore_sgd_(cuda[0], backups_cuda, cuda[1], cuda[2], **kw)
        for a, b in zip(cuda[0], params):
            assert ulp_distance(a.cpu(), b) <= 1
        skipped = [t.clone() for t in cuda[0]]
        ops.restore_sgd_(skipped, backups_cuda, cuda[1], cuda[2], **kw, skip=torch.ones((), device="cuda"))
        assert all(torch.equal(a, b) for a, b in zip(skipped, backups_cuda))


@pytestmark_ext
def test_a_kept_fused_plan_follows_new_momentum_buffers_and_gradients():
    """The fused plan is kept across steps; replacing the momentum buffers (a momentum reset) or moving a
    gradient to another parameter must make it re-plan, not update stale tensors."""
    model, opt = _train_small(steps=3)
    state = opt.base_optimizer.state
    for p in model.parameters():
        state[p]["momentum_buffer"] = torch.zeros_like(p)
    fresh = {id(p): state[p]["momentum_buffer"] for p in model.parameters()}
    _continue(model, opt)
    assert all(state[p]["momentum_buffer"] is fresh[id(p)] for p in model.parameters())
    assert all(fresh[id(p)].any() for p in model.parameters()), "the new buffers must carry the update"

    spare = torch.nn.Parameter(torch.zeros(3))
    opt.add_param_group({"params": [spare], "lr": 0.1})
    _continue(model, opt, steps=1)
    kept = opt._fused_plan
    assert kept is not None and any(p is spare for p in kept.others), "re-planned with the spare outside the plan"
    planned = [p for entry in kept.plan for p in entry[0]]
    for p in planned:
        p.grad = torch.ones_like(p)
    assert kept.refresh(opt) is not None
    first, planned[0].grad = planned[0].grad, None
    assert kept.refresh(opt) is None, "a planned parameter without a gradient"
    planned[0].grad, spare.grad = first, torch.ones(3)
    assert kept.refresh(opt) is None, "a gradient outside the plan"
    spare.grad = None
    assert kept.refresh(opt) is not None
    state[planned[0]] = {"momentum_buffer": torch.zeros_like(planned[0])}
    assert kept.refresh(opt) is None, "a parameter's state dict replaced"
    del state[planned[0]]
    assert kept.refresh(opt) is None, "a parameter's state removed"


def _continue(model, opt, steps=2):
    from models import image_batches

    torch.manual_seed(5)
    for x, y in image_batches(steps):
        y[0] = 8

        def closure(index=None, x=x, y=y):
            xs, ys = (x, y) if index is None else (x[index], y[index])
            return torch.nn.functional.cross_entropy(model(xs), ys, reduction="none")

        opt.step(closure, y)


@pytestmark_ext
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=NEEDS_CUDA_EXT)])
def test_the_ops_refuse_lists_they_cannot_walk(device):
    """The CPU and CUDA kernels share one set of argument checks: a wrong list is an error, never a stray read.
    What the torch ops could take instead (non-contiguous tensors, mixed devices or dtypes, also across the
    lists) is a NotImplementedError, raised before anything is written; a malformed call a RuntimeError."""
    w = [torch.zeros(5, device=device), torch.zeros(3, device=device)]
    b = [t.clone() for t in w]
    g = [t.clone() for t in w]
    buf = [t.clone() for t in w]
    with pytest.raises(RuntimeError, match="lists of different lengths"):
        ops.restore_(w, b[:1])
    with pytest.raises(RuntimeError, match="tensor 1 differs in size"):
        ops.perturb_(w, [g[0], torch.zeros(4, device=device)], b, torch.ones((), device=device), 0.05, 1e-12)
    with pytest.raises(RuntimeError, match="restore_sgd_: tensor 0 differs in size"):
        ops.restore_sgd_(w, b, g, [torch.zeros(6, device=device), buf[1]], 0.1, 0.9, 0.0, 0.0, False, False)
    for call in (lambda: ops.restore_(w, b[:1]), lambda: ops.perturb_(w, g, b[:1], torch.ones(()), 0.05, 1e-12)):
        with pytest.raises(RuntimeError) as bad_call:
            call()
        assert not isinstance(bad_call.value, NotImplementedError)
    with pytest.raises(NotImplementedError, match="must be contiguous"):
        ops.sq_norm([torch.zeros(4, 4, device=device).t()])
    with pytest.raises(NotImplementedError, match="one device and dtype"):
        ops.restore_(w, [b[0], b[1].double()])
    ones = [torch.ones_like(t) for t in w]
    for call in (lambda: ops.restore_(w, [t.double() for t in ones]),
                 lambda: ops.perturb_(w, [t.double() for t in ones], ones, torch.ones((), device=device), 0.05,
                                      1e-12),
                 lambda: ops.restore_sgd_(w, ones, ones, [t.double() for t in ones], 0.1, 0.9, 0.0, 0.0, False,
                                          False)):
        with pytest.raises(NotImplementedError, match="must share one device and dtype"):
            call()
    assert not any(t.any() for t in w), "a refused call wrote"


@pytestmark_ext
def test_the_fused_step_checks_every_groups_gradient_for_nan():
    """The fused path takes the update's norm from the plan's gradient lists; a NaN that only the last
    group's perturbed gradient holds must still skip the step."""
    from models import image_batches

    tail = torch.tensor([False] * 7 + [True] * 3)
    torch.manual_seed(0)
    model = small_cnn(10)
    params = list(model.parameters())
    opt = ImbSAM([{"params": params[:-1]}, {"params": params[-1:], "lr": 0.05}], torch.optim.SGD, lr=0.1,
                 momentum=0.9, tail_mask=tail, model=model, backend="ext", nonfinite="skip")
    backwards = [0]
    poisoned = [False]

    def poison(g):
        backwards[0] += 1
        return g * float("nan") if poisoned[0] and backwards[0] % 3 == 0 else g

    params[-1].register_hook(poison)
    torch.manual_seed(1)
    for i, (x, y) in enumerate(image_batches(3)):
        y[0] = 8

        def closure(index=None, x=x, y=y):
            xs, ys = (x, y) if index is None else (x[index], y[index])
            return torch.nn.functional.cross_entropy(model(xs), ys, reduction="none")

        poisoned[0], backwards[0] = i == 2, 0
        before = [p.detach().clone() for p in params]
        with pytest.warns(RuntimeWarning, match="non-finite") if i == 2 else contextlib.nullcontext():
            opt.step(closure, y)
        if i == 1:
            assert opt._fused_plan is not None and len(opt._fused_plan.plan) == 2, "the step ran fused"
    assert opt.last_step_skipped
    assert all(torch.equal(p, b) for p, b in zip(params, before))


@pytestmark_ext
@pytest.mark.parametrize("book", [True, False], ids=["book", "python-phases"])
def test_the_kept_fused_plan_keeps_no_gradient_of_an_earlier_step_alive(book):
    """The kept plan is reused with each step's gradients; holding the planning step's would keep a whole
    set of gradient tensors alive for as long as the plan holds."""
    import gc
    import weakref

    from models import image_batches

    tail = torch.tensor([False] * 7 + [True] * 3)
    torch.manual_seed(0)
    model = small_cnn(10)
    opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, tail_mask=tail, model=model,
                 backend="ext")
    if not book:
        opt._book = None
    refs = []
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: refs.append(weakref.ref(p.grad)))
    torch.manual_seed(1)
    for i, (x, y) in enumerate(image_batches(4)):
        y[i] = 8

        def closure(index=None, x=x, y=y):
            xs, ys = (x, y) if index is None else (x[index], y[index])
            return torch.nn.functional.cross_entropy(model(xs), ys, reduction="none")

        opt.step(closure, y)
    assert opt._fused_plan is not None, "the steps ran fused"
    gc.collect()
    assert refs and all(r() is None for r in refs), "a gradient of an earlier step outlived it"
