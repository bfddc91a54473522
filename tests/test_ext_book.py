"""The extension's ParamBook (csrc/grad_ops.cpp): the phases' gradient bookkeeping in C++, against the
Python phases, which it must reproduce bit for bit, and its refusals, which must leave everything as it was."""

from __future__ import annotations

import pytest
import torch
from models import image_batches, per_sample_closure, small_cnn

from imbsam_fast import ImbSAM
from imbsam_fast.backends.ext_book import book_available
from imbsam_fast.backends.extension import ext_available

pytestmark = pytest.mark.skipif(not (ext_available() and book_available()), reason="the C++ extension is not built")
ops = torch.ops.imbsam_fast if ext_available() else None
TAIL = torch.tensor([False] * 7 + [True] * 3)


def _params(sizes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(n, generator=g).to(dtype)) for n in sizes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).to(dtype)
    return ps


def test_take_and_give_move_the_gradients_themselves():
    ps = _params([3, 5, 7])
    grads = [p.grad for p in ps]
    book = torch.classes.imbsam_fast.ParamBook(ps)
    assert book.take() == 3
    assert all(p.grad is None for p in ps)
    assert all(a is b for a, b in zip(book.gradients(), grads)), "held, not copied"
    book.give()
    assert all(p.grad is g for p, g in zip(ps, grads))
    with pytest.raises(RuntimeError, match="nothing taken"):
        book.give()
    ps[1].grad = None
    assert book.take() == 2, "a parameter without a gradient is not counted"
    book.give()
    assert ps[1].grad is None and ps[0].grad is grads[0]
    book.clear()
    assert all(p.grad is None for p in ps)


def test_a_sparse_gradient_is_not_counted_as_dense():
    emb = torch.nn.Embedding(4, 2, sparse=True)
    emb(torch.tensor([1])).sum().backward()
    book = torch.classes.imbsam_fast.ParamBook([emb.weight])
    assert book.take() == 0
    book.give()
    assert emb.weight.grad.is_sparse


def _bucketed(book, buckets):
    book.set_buckets([p for ps, _ in buckets for p in ps], [b for _, bs in buckets for b in bs],
                     [len(ps) for ps, _ in buckets], [0.05, 0.2][:len(buckets)])


@torch.no_grad()
def test_ascend_is_the_backends_perturb_bit_for_bit():
    """Two buckets of different dtypes: the global norm is summed in fp64, as the Python backend sums it."""
    from imbsam_fast.backends import Bucket
    from imbsam_fast.backends.ext_ops import ExtParamOps

    mine = _params([1, 33, 40_003]) + _params([7, 1000], torch.float64, seed=1)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in mine]
    mb, tb = [torch.empty_like(p) for p in mine], [torch.empty_like(p) for p in mine]
    book = torch.classes.imbsam_fast.ParamBook(mine)
    _bucketed(book, [(mine[:3], mb[:3]), (mine[3:], mb[3:])])
    norm = book.ascend(1e-16)
    want = ExtParamOps().perturb_([Bucket(theirs[:3], [p.grad for p in mine[:3]], tb[:3], 0.05),
                                   Bucket(theirs[3:], [p.grad for p in mine[3:]], tb[3:], 0.2)])
    assert norm.dtype == torch.float64 and torch.equal(norm, want)
    assert all(torch.equal(a, b) for a, b in zip(mine, theirs))
    assert all(torch.equal(a, b) for a, b in zip(mb, tb))


@torch.no_grad()
def test_restore_sgd_is_the_fused_op_per_group():
    """Group 0 with Nesterov momentum, group 1 plain: each gets its own options and its own buffers."""
    mine = _params([5, 1000, 7, 33])
    theirs = [p.detach().clone() for p in mine]
    backups = [torch.randn_like(p) for p in mine]
    buffers = [torch.randn_like(p) for p in mine[:2]]
    their_buffers = [b.clone() for b in buffers]
    book = torch.classes.imbsam_fast.ParamBook(mine)
    book.set_sgd(mine, backups, buffers, [2, 2], [True, False])
    norm = book.update_norm()
    assert torch.equal(norm, ops.sq_norm([p.grad for p in mine]).sqrt())
    book.restore_sgd([0.1, 0.3], [0.9, 0.0], [0.0, 0.0], [1e-3, 0.0], [True, False], [False, True], None)
    grads = [p.grad for p in mine]
    ops.restore_sgd_(theirs[:2], backups[:2], grads[:2], their_buffers, 0.1, 0.9, 0.0, 1e-3, True, False)
    ops.restore_sgd_(theirs[2:], backups[2:], grads[2:], [], 0.3, 0.0, 0.0, 0.0, False, True)
    assert all(torch.equal(a, b) for a, b in zip(mine, theirs))
    assert all(torch.equal(a, b) for a, b in zip(buffers, their_buffers))
    with pytest.raises(RuntimeError, match="changed between momentum and none"):
        book.restore_sgd([0.1, 0.3], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [False, False], [False, False], None)
    with pytest.raises(RuntimeError, match="one value of each option per group"):
        book.restore_sgd([0.1], [0.9], [0.0], [0.0], [False], [False], None)


@torch.no_grad()
def test_the_book_refuses_before_it_writes():
    """A missing gradient, or a list the kernels do not take, anywhere in any bucket or group, is a
    NotImplementedError before any tensor is written; a malformed layout a RuntimeError."""
    ps = _params([5, 3, 4])
    start = [p.detach().clone() for p in ps]
    backups = [torch.zeros_like(p) for p in ps]
    buffers = [torch.zeros_like(p) for p in ps]
    book = torch.classes.imbsam_fast.ParamBook(ps)
    _bucketed(book, [(ps[:2], backups[:2]), (ps[2:], backups[2:])])
    book.set_sgd(ps, backups, buffers, [1, 2], [True, True])
    sgd = ([0.1, 0.1], [0.9, 0.9], [0.0, 0.0], [0.0, 0.0], [False, False], [False, False], None)
    last, ps[2].grad = ps[2].grad, None
    for call in (lambda: book.ascend(1e-16), book.update_norm, lambda: book.restore_sgd(*sgd)):
        with pytest.raises(NotImplementedError, match="parameter 2 has no gradient"):
            call()
    ps[2].grad = torch.randn(8)[::2]
    for call in (lambda: book.ascend(1e-16), lambda: book.restore_sgd(*sgd)):
        with pytest.raises(NotImplementedError, match="must be contiguous"):
            call()
    ps[2].grad = last
    mixed = torch.classes.imbsam_fast.ParamBook(ps)
    mixed.set_buckets(ps, [*backups[:2], torch.zeros(4, dtype=torch.float64)], [2, 1], [0.05, 0.05])
    with pytest.raises(NotImplementedError, match="one device and dtype"):
        mixed.ascend(1e-16)
    assert all(torch.equal(p, s) for p, s in zip(ps, start)), "a refused call wrote the weights"
    assert not any(t.any() for t in backups + buffers), "a refused call wrote a backup or a buffer"
    with pytest.raises(RuntimeError, match="add up to 2, not to the 3"):
        book.set_buckets(ps, backups, [1, 1], [0.05, 0.05])
    with pytest.raises(RuntimeError, match="2 momentum buffers for 3"):
        book.set_sgd(ps, backups, buffers[:2], [3], [True])


def _run(mode, book, steps=6, groups=True, **options):
    """A BatchNorm CNN trained ``steps`` steps with two param groups (own rho and lr); the ParamBook on or off.
    Returns the model, the optimizer and how many steps the book's ascent and SGD step ran."""
    torch.manual_seed(0)
    model = small_cnn(10)
    ps = list(model.parameters())
    params = [{"params": ps[:-2]}, {"params": ps[-2:], "rho": 0.2, "lr": 0.05}] if groups else ps
    opt = ImbSAM(params, torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-3, tail_mask=TAIL, mode=mode,
                 model=model, backend="ext", **options)
    if not book:
        opt._book = None
    ran = {"ascend": 0, "sgd": 0}
    if book:
        ascend, restore_sgd = opt._book.ascend, opt._book.restore_sgd

        def counted_ascend(*a):
            out = ascend(*a)
            ran["ascend"] += out is not None
            return out

        def counted_sgd(*a):
            restore_sgd(*a)
            ran["sgd"] += 1

        opt._book.ascend, opt._book.restore_sgd = counted_ascend, counted_sgd
    torch.manual_seed(1)
    for i, (x, y) in enumerate(image_batches(steps)):
        y[i % 16] = 8
        opt.step(per_sample_closure(model, x, y), y)
    return model, opt, ran


def _same_state(a, b):
    (ma, oa), (mb, ob) = a, b
    assert all(torch.equal(p, q) for p, q in zip(ma.parameters(), mb.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(ma.buffers(), mb.buffers()))
    for p, q in zip(ma.parameters(), mb.parameters()):
        bp, bq = (o.base_optimizer.state[t].get("momentum_buffer") for o, t in ((oa, p), (ob, q)))
        assert (bp is None and bq is None) or torch.equal(bp, bq)


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_the_book_gives_the_python_phases_trajectory_bit_for_bit(mode):
    model, opt, ran = _run(mode, book=True)
    ref_model, ref_opt, _ = _run(mode, book=False)
    assert ran == {"ascend": 6, "sgd": 4}, "the book ran every ascent, and every fused step after the plan was made"
    _same_state((model, opt), (ref_model, ref_opt))
    assert opt.backend == "ext" and not opt.backend_fallbacks
    assert all(p.grad is None for p in model.parameters())


def test_the_three_step_api_goes_through_the_book():
    def run(book):
        torch.manual_seed(0)
        model = small_cnn(10)
        opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, tail_mask=TAIL, backend="ext")
        if not book:
            opt._book = None
        w = torch.tensor([1.0] * 7 + [0.0] * 3)
        for x, y in image_batches(4):
            losses = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
            (losses * w[y]).mean().backward(retain_graph=True)
            opt.first_step()
            assert book == (opt._book is not None and opt._book.holding)
            (losses * (1 - w[y])).mean().backward()
            opt.second_step()
            (torch.nn.functional.cross_entropy(model(x), y, reduction="none") * (1 - w[y])).mean().backward()
            opt.third_step()
        return model, opt

    _same_state(run(True), run(False))


class _CountingBook:
    """A ParamBook that counts the calls of each method, and records each lookup of one."""

    def __init__(self, inner):
        self.inner, self.calls, self.lookups = inner, {}, []

    def __getattr__(self, name):
        self.lookups.append(name)
        method = getattr(self.inner, name)

        def call(*args):
            self.calls[name] = self.calls.get(name, 0) + 1
            return method(*args)

        return call


@pytest.fixture
def counted_books(monkeypatch):
    from imbsam_fast.backends import ext_book

    books, real = [], ext_book._new_book

    def new(params):
        books.append(_CountingBook(real(params)))
        return books[-1]

    monkeypatch.setattr(ext_book, "_new_book", new)
    return books


def test_parameters_without_a_gradient_take_the_python_phases_until_the_buckets_regroup(counted_books):
    """A frozen layer's weight gets no gradient: the book hands every gradient back and the Python phases run,
    with their trajectory, and the book is not asked again while the buckets keep their layout. Unfrozen, the
    weight regroups the buckets and the book takes over."""

    def run(book):
        torch.manual_seed(0)
        model = small_cnn(10)
        model[0].weight.requires_grad_(False)
        opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1, tail_mask=TAIL, mode="fast", model=model,
                     backend="ext")
        if not book:
            opt._book = None
        for i, (x, y) in enumerate(image_batches(7)):
            if i == 4:
                model[0].weight.requires_grad_(True)
            y[i] = 9
            opt.step(per_sample_closure(model, x, y), y)
        return model, opt

    got = run(True)
    (book,) = counted_books
    # Asked at the first step and once more after the first layout was made; after the unfreezing the Python
    # phases regroup (step 5), and the book takes steps 6 and 7.
    assert book.calls["take"] == 4 and book.calls["ascend"] == 2
    _same_state(got, run(False))
    assert not got[1].backend_fallbacks, "a parameter without a gradient is no kernel refusal"


def test_a_refused_layout_falls_back_and_is_not_asked_again(counted_books):
    """Channels-last weights: the book refuses the first ascent (nothing written), the Python phases take that
    step and the next ones, with the torch backend's trajectory."""

    def run(book):
        torch.manual_seed(0)
        model = small_cnn(10).to(memory_format=torch.channels_last)
        opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, tail_mask=TAIL, mode="fast",
                     model=model, backend="ext")
        if not book:
            opt._book = None
        for i, (x, y) in enumerate(image_batches(4)):
            y[i] = 9
            opt.step(per_sample_closure(model, x, y), y)
        return model, opt

    model, opt = run(True)
    (book,) = counted_books
    assert book.calls == {"take": 1, "set_buckets": 1, "ascend": 1, "gradients": 1, "drop": 1}
    assert "non-contiguous tensors" in opt.backend_fallbacks
    _same_state((model, opt), run(False))


def _run_with_a_spare_layer(book, add, groups=True):
    """:func:`_run` for 3 steps, then ``add(opt, spare)`` puts a spare linear head's parameters in, and 3 more
    steps train both heads. Returns ``((model, opt), spare, ran)``."""
    model, opt, ran = _run("fast", book=book, steps=3, groups=groups)
    spare = torch.nn.Linear(8, 10)
    add(opt, spare)
    torch.manual_seed(3)
    for x, y in image_batches(3, seed=4):
        y[0] = 8

        def closure(index=None, x=x, y=y):
            xs, ys = (x, y) if index is None else (x[index], y[index])
            feats = model[:-1](xs)
            return torch.nn.functional.cross_entropy(model[-1](feats) + spare(feats), ys, reduction="none")

        opt.step(closure, y)
    return (model, opt), spare, ran


def _the_spare_runs_agree(add, groups=True):
    """The book's and the Python phases' runs of :func:`_run_with_a_spare_layer`, compared bit for bit; the
    book's run, with its counts, is returned."""
    (got, spare, ran), (want, ref_spare, _) = (_run_with_a_spare_layer(book, add, groups) for book in (True, False))
    _same_state(got, want)
    assert all(torch.equal(a, b) for a, b in zip(spare.parameters(), ref_spare.parameters()))
    return got, ran


def test_a_new_param_group_rebuilds_the_book():
    got, ran = _the_spare_runs_agree(lambda opt, spare: opt.add_param_group({"params": list(spare.parameters()),
                                                                            "lr": 0.01}))
    assert ran["ascend"] == 6 and len(got[1]._book._params) == len(list(got[0].parameters())) + 2


def test_a_parameter_added_in_place_to_the_one_group_rebuilds_the_book():
    """The book compares a single group's list of parameters as it is, and keeps a copy: a parameter appended
    to that list in place is seen at the next step, and the trajectory is the Python phases'."""
    got, ran = _the_spare_runs_agree(lambda opt, spare: opt.param_groups[0]["params"].extend(spare.parameters()),
                                     groups=False)
    book = got[1]._book
    assert ran["ascend"] == 6 and len(book._params) == len(list(got[0].parameters())) + 2
    assert book._params is not got[1].param_groups[0]["params"]


def test_the_books_methods_are_looked_up_once_not_at_every_step(counted_books):
    """A ParamBook method looked up on the TorchScript object costs a failed attribute lookup and a module
    import: the ExtBook looks each one up when it makes the book, and the steps call what it bound."""
    from imbsam_fast.backends.ext_book import _BOOK_METHODS

    _, opt, ran = _run("fast", book=True, steps=6)
    (book,) = counted_books
    assert ran["ascend"] == 6 and ran["sgd"] >= 3  # the first steps plan the fused SGD step in Python
    assert book.calls["take"] == 6 and sorted(book.lookups) == sorted(_BOOK_METHODS)


def test_a_failed_step_leaves_nothing_in_the_book():
    model, opt, _ = _run("fast", book=True, steps=2)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = image_batches(1, seed=7)[0]
    y[0] = 8
    calls = []

    def closure(index=None):
        calls.append(index)
        if len(calls) == 3:
            raise KeyboardInterrupt("stopped in the perturbed pass")
        return per_sample_closure(model, x, y)(index)

    with pytest.raises(KeyboardInterrupt):
        opt.step(closure, y)
    assert not opt._book.holding and opt._book._book.gradients() == []
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    opt.step(per_sample_closure(model, x, y), y)
    assert not any(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_a_nonfinite_step_through_the_book_is_skipped():
    model, opt, ran = _run("fast", book=True, steps=3)
    before = [p.detach().clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    x, y = image_batches(1, seed=7)[0]
    y[0] = 8

    def closure(index=None):
        return per_sample_closure(model, x, y)(index) * float("nan")

    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(closure, y)
    assert ran["ascend"] == 4 and opt.last_step_skipped and opt.skipped_steps == 1
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(torch.equal(p, b) for p, b in zip(model.buffers(), buffers))
    assert all(p.grad is None for p in model.parameters())


_CUDA_EXT = (torch.cuda.is_available() and ext_available()
             and torch._C._dispatch_has_kernel_for_dispatch_key("imbsam_fast::sq_norm", "CUDA"))


@pytest.mark.skipif(not _CUDA_EXT, reason="needs a CUDA device and the extension built with its CUDA kernels")
@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_on_cuda_the_book_gives_the_python_phases_trajectory(mode):
    """The book calls the CUDA kernels through the dispatcher: the same kernels, so the same bits."""

    def run(book):
        torch.manual_seed(0)
        model = small_cnn(10).cuda()
        opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, tail_mask=TAIL.cuda(), mode=mode,
                     model=model, backend="ext")
        if not book:
            opt._book = None
        for i, (x, y) in enumerate(image_batches(5)):
            x, y = x.cuda(), y.cuda()
            y[i] = 8
            opt.step(per_sample_closure(model, x, y), y)
        return model, opt

    got = run(True)
    assert got[1]._book._generation == got[1]._buckets.generation, "the book ran"
    _same_state(got, run(False))
