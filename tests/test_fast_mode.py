"""Fast mode: tail-only passes, BatchNorm statistics replay, and the edge cases around them."""

import copy

import pytest
import torch
import torch.nn.functional as F
from models import image_batches, mlp, small_cnn, vector_batches
from models import per_sample_closure as _closure
from torch import nn
from torch.utils.checkpoint import checkpoint

from imbsam_fast import ImbSAM
from imbsam_fast.batchnorm import BatchNormStats

TAIL = torch.tensor([False] * 7 + [True] * 3)
KW = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)


def _pair(model, mask=TAIL, **extra):
    fast_model, exact_model = copy.deepcopy(model), copy.deepcopy(model)
    fast = ImbSAM(fast_model.parameters(), torch.optim.SGD, tail_mask=mask, mode="fast", model=fast_model,
                  **KW, **extra)
    exact = ImbSAM(exact_model.parameters(), torch.optim.SGD, tail_mask=mask, **KW, **extra)
    return fast_model, fast, exact_model, exact


def _max_rel(a, b):
    return max(((p - q).norm() / q.norm().clamp_min(1e-12)).item() for p, q in zip(a.parameters(), b.parameters()))


def _assert_buffers_saw_one_forward(model, probe, x):
    """The model's BatchNorm buffers equal those of ``probe`` after one training-mode forward of ``x``."""
    probe.train()
    with torch.no_grad():
        probe(x)
    for (n, a), (_, b) in zip(model.named_buffers(), probe.named_buffers()):
        assert torch.equal(a, b), n


class LayerNormMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("kind", ["mlp", "layernorm", "groupnorm"])
def test_fast_equals_exact_without_batchnorm(kind):
    torch.manual_seed(0)
    if kind == "groupnorm":
        model, batches = small_cnn(batchnorm=False), image_batches(12, seed=1)
    else:
        model, batches = (mlp() if kind == "mlp" else LayerNormMLP()), vector_batches(12, seed=1)
    fm, fast, em, exact = _pair(model)
    tails = 0
    for x, y in batches:
        tails += int(TAIL[y].sum())
        out_f = fast.step(_closure(fm, x, y), y)
        out_e = exact.step(_closure(em, x, y), y)
        torch.testing.assert_close(out_f.tail, out_e.tail, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out_f.perturbed_tail, out_e.perturbed_tail, rtol=1e-5, atol=1e-6)
    assert tails > 0
    assert _max_rel(fm, em) < 1e-5


def test_fast_passes_only_tail_samples_through_the_closure():
    torch.manual_seed(0)
    model = mlp()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, tail_mask=TAIL, mode="fast", model=model, **KW)
    x, y = vector_batches(1)[0]
    y = torch.tensor([0, 8, 1, 2, 9, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5, 7])
    calls = []
    opt.step(_closure(model, x, y, calls), y)
    assert calls[0] is None
    assert [c.tolist() for c in calls[1:]] == [[1, 4, 15], [1, 4, 15]]


def test_batch_without_tail_is_one_pass_and_a_plain_head_step():
    torch.manual_seed(0)
    model = mlp()
    twin = copy.deepcopy(model)
    opt = ImbSAM(model.parameters(), torch.optim.SGD, tail_mask=TAIL, mode="fast", model=model, **KW)
    sgd = torch.optim.SGD(twin.parameters(), **KW)
    for x, y in vector_batches(3):
        y = y % 7
        calls = []
        out = opt.step(_closure(model, x, y, calls), y)
        assert len(calls) == 1 and out.tail == 0 and out.perturbed_tail == 0
        sgd.zero_grad()
        (F.cross_entropy(twin(x), y, reduction="none").sum() / len(y)).backward()
        sgd.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_every_sample_tail():
    torch.manual_seed(0)
    fm, fast, em, exact = _pair(mlp())
    for x, y in vector_batches(4):
        y = 7 + y % 3
        fast.step(_closure(fm, x, y), y)
        exact.step(_closure(em, x, y), y)
    assert _max_rel(fm, em) < 1e-5


def test_tail_passes_leave_batchnorm_running_stats_alone():
    torch.manual_seed(0)
    model = small_cnn()
    probe = copy.deepcopy(model)
    opt = ImbSAM(model.parameters(), torch.optim.SGD, tail_mask=TAIL, mode="fast", model=model, **KW)
    x, y = image_batches(1)[0]
    y[:3] = torch.tensor([7, 8, 9])
    opt.step(_closure(model, x, y), y)
    _assert_buffers_saw_one_forward(model, probe, x)


def test_a_layer_switched_to_eval_between_steps_is_left_alone():
    """A step reads the layers' modes once (the pinned plan) and lets go of them after: a layer put in eval
    mode between two steps, also after a step that failed, keeps its running statistics and runs in no
    context of the next step."""
    torch.manual_seed(0)
    model = small_cnn()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, tail_mask=TAIL, mode="fast", model=model, **KW)
    (x, y), (x2, y2) = image_batches(2)
    y[:3], y2[:3] = torch.tensor([7, 8, 9]), torch.tensor([7, 8, 9])
    opt.step(_closure(model, x, y), y)

    def broken(index=None):
        raise KeyError("user error")

    with pytest.raises(KeyError):
        opt.step(broken, y)
    layer = model[4]
    layer.eval()
    running = [b.clone() for b in layer.buffers()]
    opt.step(_closure(model, x2, y2), y2)
    assert all(torch.equal(a, b) for a, b in zip(layer.buffers(), running))


def test_a_batch_without_tail_reads_no_batchnorm_layer_plan():
    """The pinned plan is read at the first context that needs it: a tail-free batch needs none."""
    torch.manual_seed(0)
    model = small_cnn()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, tail_mask=TAIL, mode="fast", model=model, **KW)
    x, y = image_batches(1)[0]
    y = y % 7
    opt.step(_closure(model, x, y), y)
    assert opt._bn._plan_key is None


def test_single_tail_sample_with_batchnorm1d():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
    opt = ImbSAM(model.parameters(), torch.optim.SGD, tail_mask=TAIL, mode="fast", model=model, **KW)
    x, y = vector_batches(1)[0]
    y = y % 7
    y[5] = 9
    before = [p.detach().clone() for p in model.parameters()]
    out = opt.step(_closure(model, x, y), y)  # a 1-sample BatchNorm1d pass would raise in training mode
    assert torch.isfinite(out.perturbed_tail) and out.perturbed_tail > 0
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_replayed_statistics_normalize_like_the_full_batch():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    stats = BatchNormStats(bn)
    x = torch.randn(8, 3, 4, 4)
    with stats.record():
        full = bn(x)
    running = bn.running_mean.clone()
    with stats.replay():
        part = bn(x[[2, 5]])
    torch.testing.assert_close(part, full[[2, 5]])
    assert torch.equal(bn.running_mean, running)
    assert "forward" not in bn.__dict__


def test_replay_of_an_unrecorded_layer_patches_no_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(4), nn.BatchNorm1d(4))
    stats = BatchNormStats(model)
    with stats.record():
        model[0](torch.randn(8, 4))  # the second layer never ran: nothing recorded for it
    with pytest.raises(RuntimeError, match="not in the full-batch forward"), stats.replay():
        pass
    assert all("forward" not in m.__dict__ for m in model)


def test_a_layer_the_full_forward_skipped_is_not_replayed_from_an_earlier_record():
    """The solved layers' statistics are kept across records (rewritten in place): one that did not run in this
    record must not keep the last record's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(4), nn.BatchNorm1d(4))
    stats = BatchNormStats(model)
    for _ in range(2):
        with stats.record():
            model(torch.randn(8, 4))
    with stats.replay():
        model(torch.randn(2, 4))
    with stats.record():
        model[0](torch.randn(8, 4))
    with pytest.raises(RuntimeError, match="not in the full-batch forward"), stats.replay():
        pass


def test_recorded_statistics_are_rewritten_in_place_each_record():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4))
    stats = BatchNormStats(model)
    kept = None
    for _ in range(3):
        x = torch.randn(5, 3, 3, 3)
        with stats.record():
            h = model[0](x)
            model[2](model[1](h))
        mean, var = stats._stats[model[1]][0]
        ref_var, ref_mean = torch.var_mean(h.detach(), dim=[0, 2, 3], correction=0)
        torch.testing.assert_close(mean, ref_mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(var, ref_var, rtol=1e-4, atol=1e-5)
        if kept is not None:
            assert mean is kept, "the same view, no tensor allocated per record"
        kept = mean


def test_replay_and_freeze_put_back_what_the_instance_had():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(4)
    calls = []

    def user_forward(x):  # an instance-level patch of the user's (e.g. a wrapper), not BatchNorm's own forward
        calls.append((x.shape[0], bn.track_running_stats))
        return nn.BatchNorm1d.forward(bn, x)

    bn.forward = user_forward
    plain = nn.BatchNorm1d(4)  # beside it, a layer with no instance attribute: it must get none back
    model = nn.Sequential(bn, plain)
    stats = BatchNormStats(model)
    with stats.record():
        model(torch.randn(8, 4))
    with stats.replay():
        model(torch.randn(2, 4))  # replayed: the user's forward is not called
    buffers = [b.clone() for b in model.buffers()]
    with stats.freeze_running_stats():
        model(torch.randn(5, 4))  # the user's forward, with the layer tracking nothing for the call
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert bn.__dict__["forward"] is user_forward and bn.track_running_stats is True
    assert "forward" not in plain.__dict__ and plain.track_running_stats is True
    bn(torch.randn(3, 4))
    assert calls == [(8, True), (5, False), (3, True)]


def test_closure_returning_wrong_shape_for_index_restores_weights():
    torch.manual_seed(0)
    model = mlp()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, tail_mask=TAIL, mode="fast", model=model, **KW)
    x, y = vector_batches(1)[0]
    y[0] = 9
    before = [p.detach().clone() for p in model.parameters()]

    def closure(index=None):
        return F.cross_entropy(model(x), y, reduction="none")  # ignores index

    with pytest.raises(ValueError, match="shape"):
        opt.step(closure, y)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    opt.step(_closure(model, x, y), y)


def test_eval_mode_model_uses_running_stats_and_matches_exact():
    torch.manual_seed(0)
    model = small_cnn()
    with torch.no_grad():
        model(torch.randn(32, 3, 8, 8))  # give the running statistics something
    model.eval()
    fm, fast, em, exact = _pair(model)
    for x, y in image_batches(5, seed=2):
        fast.step(_closure(fm, x, y), y)
        exact.step(_closure(em, x, y), y)
    assert _max_rel(fm, em) < 1e-5
    for a, b in zip(fm.buffers(), em.buffers()):
        assert torch.equal(a, b)


class Checkpointed(nn.Module):
    def __init__(self, batchnorm: bool):
        super().__init__()
        norm = nn.BatchNorm1d(32) if batchnorm else nn.LayerNorm(32)
        self.block = nn.Sequential(nn.Linear(16, 32), norm, nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(checkpoint(self.block, x, use_reentrant=False))


def test_gradient_checkpointed_models():
    torch.manual_seed(0)
    fm, fast, em, exact = _pair(Checkpointed(batchnorm=False))
    for x, y in vector_batches(5, seed=4):
        fast.step(_closure(fm, x, y), y)
        exact.step(_closure(em, x, y), y)
    assert _max_rel(fm, em) < 1e-5
    bn_model = Checkpointed(batchnorm=True)
    plain = copy.deepcopy(bn_model)
    for p, q in zip(bn_model.block.parameters(), plain.block.parameters()):
        assert torch.equal(p, q)
    x, y = vector_batches(1, seed=5)[0]
    y[0] = 9
    exact, fast, _ = _updates(bn_model, x, y)  # checkpointing recomputes BatchNorm inside the backward
    assert F.cosine_similarity(exact, fast, dim=0) > 0.95
    opt = ImbSAM(bn_model.parameters(), torch.optim.SGD, tail_mask=TAIL, mode="fast", model=bn_model, **KW)
    for x, y in vector_batches(3, seed=5):
        y[0] = 9
        out = opt.step(_closure(bn_model, x, y), y)
        assert torch.isfinite(out.perturbed_tail) and out.perturbed_tail > 0
    assert all(not torch.equal(p, q) for p, q in zip(bn_model.parameters(), plain.parameters()))


def test_fast_mode_needs_the_model_and_bn_stats_is_validated():
    with pytest.raises(ValueError, match="model="):
        ImbSAM(mlp().parameters(), torch.optim.SGD, lr=0.1, mode="fast")
    with pytest.raises(ValueError, match="bn_stats"):
        ImbSAM(mlp().parameters(), torch.optim.SGD, lr=0.1, bn_stats="never")
    with pytest.raises(ValueError, match="model="):
        ImbSAM(mlp().parameters(), torch.optim.SGD, lr=0.1, bn_stats="first")


def test_exact_mode_bn_stats_first_updates_running_stats_once():
    torch.manual_seed(0)
    model = small_cnn()
    probe = copy.deepcopy(model)
    ref = copy.deepcopy(model)
    opt = ImbSAM(model.parameters(), torch.optim.SGD, tail_mask=TAIL, model=model, bn_stats="first", **KW)
    ref_opt = ImbSAM(ref.parameters(), torch.optim.SGD, tail_mask=TAIL, **KW)
    x, y = image_batches(1)[0]
    opt.step(_closure(model, x, y), y)
    ref_opt.step(_closure(ref, x, y), y)
    with torch.no_grad():
        probe(x)
    for (n, a), (_, b), (_, c) in zip(model.named_buffers(), probe.named_buffers(), ref.named_buffers()):
        assert torch.equal(a, b), n
        if n.endswith("num_batches_tracked"):
            assert c == 2 * b  # the reference behaviour counts both forwards
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)  # same update: only the buffers differ


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_index_on_cpu_with_data_on_cuda():
    torch.manual_seed(0)
    model = mlp().cuda()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, tail_mask=TAIL, mode="fast", model=model, **KW)
    x, y = vector_batches(1)[0]
    y[0] = 9
    xc, yc = x.cuda(), y.cuda()

    def closure(index=None):
        if index is None:
            return F.cross_entropy(model(xc), yc, reduction="none")
        assert index.device.type == "cpu"
        return F.cross_entropy(model(xc[index]), yc[index], reduction="none")

    out = opt.step(closure, y)  # targets on the CPU: no device sync for the tail count
    assert torch.isfinite(out.perturbed_tail)


@pytest.mark.parametrize("momentum,track", [(0.1, True), (None, True), (1.0, True), (0.1, False)])
def test_recorded_statistics_match_the_batch(momentum, track):
    """Solved from the running-statistics update where possible, computed from the input otherwise."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4, momentum=momentum, track_running_stats=track)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1) if track else None
        bn.running_var.uniform_(0.5, 2) if track else None
    if track:
        bn.num_batches_tracked += 3
    stats = BatchNormStats(bn)
    x = torch.randn(6, 4, 5, 5) * 2 + 0.5
    with stats.record():
        bn(x)
    mean, var = stats._stats[bn][0]
    ref_var, ref_mean = torch.var_mean(x, dim=[0, 2, 3], correction=0)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(var, ref_var, rtol=1e-4, atol=1e-5)


def test_ghost_batch_joins_the_tail_passes_of_batchnorm_models():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
    opt = ImbSAM(model.parameters(), torch.optim.SGD, tail_mask=TAIL, mode="fast", model=model, fast_bn="ghost",
                 ghost_batch=5, **KW)
    x, y = vector_batches(1)[0]
    y = y % 7
    y[[2, 11]] = 9
    calls = []
    opt.step(_closure(model, x, y, calls), y)
    for idx in calls[1:]:
        assert idx.numel() == 7 and {2, 11} <= set(idx.tolist())
        assert torch.equal(idx, idx.sort().values)


def _updates(model, x, y, **fast):
    """Flat updates of one step from ``model``'s state: exact mode, fast mode (``fast``), and the head-only SGD step."""
    out = []
    for kw in ({}, dict(mode="fast", **fast)):
        m = copy.deepcopy(model)
        opt = ImbSAM(m.parameters(), torch.optim.SGD, tail_mask=TAIL, model=m, **KW, **kw)
        opt.step(_closure(m, x, y), y)
        out.append(torch.cat([(p - q).flatten() for p, q in zip(m.parameters(), model.parameters())]))
    m = copy.deepcopy(model)
    sgd = torch.optim.SGD(m.parameters(), **KW)
    ((F.cross_entropy(m(x), y, reduction="none") * (~TAIL[y]).float()).sum() / len(y)).backward()
    sgd.step()
    out.append(torch.cat([(p - q).flatten() for p, q in zip(m.parameters(), model.parameters())]))
    return out


@pytest.mark.parametrize("fast_bn", ["ghost", "replay-ghost"])
def test_both_batchnorm_treatments_keep_running_stats_and_train(fast_bn):
    torch.manual_seed(0)
    model = small_cnn()
    probe = copy.deepcopy(model)
    x, y = image_batches(1)[0]
    y[:3] = torch.tensor([7, 8, 9])
    exact, fast, head = _updates(model, x, y, fast_bn=fast_bn)
    opt = ImbSAM(model.parameters(), torch.optim.SGD, tail_mask=TAIL, mode="fast", model=model, fast_bn=fast_bn, **KW)
    out = opt.step(_closure(model, x, y), y)
    assert torch.isfinite(out.perturbed_tail) and out.perturbed_tail > 0
    _assert_buffers_saw_one_forward(model, probe, x)
    assert fast.norm() > 0 and F.cosine_similarity(fast - head, exact - head, dim=0) > 0.9


def test_default_fast_path_tracks_exact_mode_on_a_batchnorm_model():
    """replay-ghost on a BatchNorm CNN, 15 steps along an exact-mode run: the update and its tail part (the update
    minus the head-only step) stay close to exact mode's. Measured (batch 16, 2 tail samples): cosine min 0.968,
    median 0.988 for the update; min 0.966, median 0.986 for the tail part."""
    torch.manual_seed(0)
    model = small_cnn()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, tail_mask=TAIL, **KW)
    whole, tail = [], []
    for x, y in image_batches(15, seed=7):
        y[:2] = torch.tensor([8, 9])
        torch.manual_seed(1)
        exact, fast, head = _updates(model, x, y)
        whole.append(F.cosine_similarity(exact, fast, dim=0).item())
        tail.append(F.cosine_similarity(exact - head, fast - head, dim=0).item())
        opt.step(_closure(model, x, y), y)
    assert min(whole) > 0.95 and sorted(whole)[7] > 0.975, whole
    assert min(tail) > 0.95 and sorted(tail)[7] > 0.975, tail


@pytest.mark.parametrize("fast_bn", ["ghost", "replay-ghost"])
def test_batchnorm3d_goes_through_the_same_mechanism(fast_bn):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.AdaptiveAvgPool3d(1),
                          nn.Flatten(), nn.Linear(4, 10))
    probe = copy.deepcopy(model)
    opt = ImbSAM(model.parameters(), torch.optim.SGD, tail_mask=TAIL, mode="fast", model=model, fast_bn=fast_bn, **KW)
    x = torch.randn(12, 1, 4, 4, 4)
    y = torch.tensor([0, 1, 2, 9, 3, 4, 5, 6, 0, 1, 2, 3])
    before = [p.detach().clone() for p in model.parameters()]
    out = opt.step(_closure(model, x, y), y)
    assert torch.isfinite(out.perturbed_tail) and out.perturbed_tail > 0
    _assert_buffers_saw_one_forward(model, probe, x)
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_replay_ghost_replays_at_w_and_adds_ghosts_at_the_perturbed_point():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
    opt = ImbSAM(model.parameters(), torch.optim.SGD, tail_mask=TAIL, mode="fast", model=model,
                 fast_bn="replay-ghost", ghost_batch=4, **KW)
    x, y = vector_batches(1)[0]
    y = y % 7
    y[3] = 8
    calls = []
    opt.step(_closure(model, x, y, calls), y)
    assert calls[1].tolist() == [3]
    assert calls[2].numel() == 5 and 3 in calls[2].tolist()


class _MixedBN(nn.Module):
    """BatchNorm layers of several sizes and momenta; ``shared`` runs twice per forward."""

    def __init__(self):
        super().__init__()
        self.a = nn.BatchNorm2d(3, momentum=0.1)
        self.b = nn.BatchNorm2d(5, momentum=0.3)
        self.conv = nn.Conv2d(3, 5, 1)
        self.shared = nn.BatchNorm2d(5, momentum=0.2)
        self.cumulative = nn.BatchNorm2d(5, momentum=None)
        self.c = nn.BatchNorm1d(7, momentum=0.1)

    def forward(self, x, v):
        h = self.conv(self.a(x))
        h = self.shared(self.b(h))
        h = self.cumulative(self.shared(h * 2 + 1))
        return h, self.c(v)


def test_recorded_statistics_of_many_layers_solved_together():
    """The flat solve (mixed momenta: a per-element 1 / m), a layer called twice (its first call solved
    alone, the second computed) and a cumulative-average layer all give the batch statistics of their input,
    over forwards that reuse the cached layout and one after the layers changed."""
    torch.manual_seed(0)
    model = _MixedBN()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    stats = BatchNormStats(model)
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.setdefault(mod, []).append(args[0].detach()))
             for m in stats.layers]
    for step in range(3):
        if step == 2:  # a layer switched to cumulative averaging and one to eval mode: the record plan follows
            model.a.momentum = None
            model.b.eval()
        seen.clear()
        with stats.record():
            model(torch.randn(4, 3, 6, 6) * 3 + 1, torch.randn(9, 7))
        assert set(stats._stats) == {m for m in seen if m.training}
        for layer, inputs in seen.items():
            if not layer.training:
                continue
            assert len(stats._stats[layer]) == len(inputs)
            for (mean, var), x in zip(stats._stats[layer], inputs):
                ref_var, ref_mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=0)
                torch.testing.assert_close(mean, ref_mean, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(var, ref_var, rtol=1e-4, atol=1e-5)
    for h in hooks:
        h.remove()


def test_the_variance_factors_kept_per_input_shape_stay_few():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    stats = BatchNormStats(model)
    for size in range(2, 14):
        x = torch.randn(3, 3, size, size)
        with stats.record():
            h = model[0](x)
            model[1](h)
        ref_var, _ = torch.var_mean(h.detach(), dim=[0, 2, 3], correction=0)
        torch.testing.assert_close(stats._stats[model[1]][0][1], ref_var, rtol=1e-4, atol=1e-5)
        assert len(stats._flat._factors) <= 8


@pytest.mark.parametrize("backend", ["torch", "ext"])
def test_a_plain_run_takes_the_same_steps_as_the_general_passes(backend, monkeypatch):
    """With one micro-batch, no hooks and no sync, each pass is forward, dot, backward (StepRun.plain). A
    do-nothing step hook sends the same steps through the general passes (chunks, contexts, hooks): both
    trajectories must agree bit for bit on a BatchNorm model, with batches with and without tail samples, and
    the plain run must not call the general passes' parts."""
    from imbsam_fast.backends.extension import ext_available
    from imbsam_fast.hooks import StepHooks
    from imbsam_fast.schedules.base import StepRun

    if backend == "ext" and not ext_available():
        pytest.skip("the C++ extension is not built")

    def run(general):
        torch.manual_seed(0)
        model = small_cnn(10)
        opt = ImbSAM(model.parameters(), torch.optim.SGD, tail_mask=TAIL, mode="fast", model=model,
                     backend=backend, **KW)
        if general:
            opt.register_step_hooks(StepHooks())
        for i, (x, y) in enumerate(image_batches(6)):
            if i % 3:
                y[i] = 9
            else:
                y = y % 7
            opt.step(_closure(model, x, y), y)
        return model

    general = run(True)
    monkeypatch.setattr(StepRun, "chunks", lambda *a: pytest.fail("a plain run cut its pass into chunks"))
    monkeypatch.setattr(StepRun, "finish", lambda *a: pytest.fail("a plain run ran the after-backward hooks"))
    plain = run(False)
    for a, b in zip(plain.state_dict().values(), general.state_dict().values()):
        assert torch.equal(a, b)


def test_the_kept_batchnorm_contexts_refuse_to_be_nested_and_are_left_clean():
    """record() and replay() hand out one kept context each (no object made a step): entering one again before
    it is left is an error that changes nothing, and after leaving, it works again. (Within a freeze the layers
    track no running statistics, so a second freeze_running_stats() has nothing to freeze.)"""
    torch.manual_seed(0)
    model = small_cnn(10)
    stats = BatchNormStats(model)
    x = image_batches(1)[0][0]
    with stats.record():
        model(x)
        with pytest.raises(RuntimeError, match="nested"):
            stats.record().__enter__()
    with stats.replay():
        with pytest.raises(RuntimeError, match="nested"):
            stats.replay().__enter__()
        model(x[:2])
    with stats.freeze_running_stats(), stats.freeze_running_stats():
        model(x)
    layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert layers and all(m.track_running_stats and "forward" not in m.__dict__ for m in layers)
    assert all(not m._forward_pre_hooks for m in layers)
    with stats.record():
        model(x)
    assert len(stats._stats) == len(layers)


def _reference_replay_ghost_step(model, sgd, x, y, tail_index, ghost_index, rho=0.05):
    """One replay-ghost fast step written out with torch alone: the full forward records each BatchNorm layer's
    batch statistics (a pre-hook's ``var_mean``); the pass at w on the tail samples normalizes with them (the
    layer's forward replaced by ``F.batch_norm`` on them); the pass at w + e on tail and ghost samples uses its
    own batch statistics with ``track_running_stats`` off; then w is restored and SGD steps on g_h + g_t'."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    params = [p for p in model.parameters()]
    head_w = (~TAIL[y]).float() / len(y)
    tail_w = TAIL[y].float() * 2.0 / len(y)  # the default tail_weight
    seen = {}

    def record(module, args):
        var, mean = torch.var_mean(args[0].detach(), dim=[0, 2, 3], correction=0)
        seen[module] = (mean, var)

    handles = [m.register_forward_pre_hook(record) for m in layers]
    torch.dot(head_w, F.cross_entropy(model(x), y, reduction="none")).backward()
    for h in handles:
        h.remove()
    head = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    for m in layers:
        mean, var = seen[m]
        m.forward = lambda z, m=m, mean=mean, var=var: F.batch_norm(z, mean, var, m.weight, m.bias, False, 0.0,
                                                                   m.eps)
    torch.dot(tail_w[tail_index], F.cross_entropy(model(x[tail_index]), y[tail_index], reduction="none")).backward()
    for m in layers:
        del m.forward
    with torch.no_grad():
        norm = torch.cat([p.grad.flatten() for p in params]).norm()
        saved = [p.detach().clone() for p in params]
        for p in params:
            p.add_(p.grad, alpha=rho / (norm.item() + 1e-16))
    model.zero_grad(set_to_none=True)
    for m in layers:
        m.track_running_stats = False
    torch.dot(tail_w[ghost_index],
              F.cross_entropy(model(x[ghost_index]), y[ghost_index], reduction="none")).backward()
    for m in layers:
        m.track_running_stats = True
    with torch.no_grad():
        for p, w, g in zip(params, saved, head):
            p.copy_(w)
            p.grad += g
    sgd.step()
    sgd.zero_grad(set_to_none=True)


@pytest.mark.parametrize("backend", ["torch", "ext"])
def test_the_default_fast_step_on_batchnorm_is_the_written_out_replay_ghost_step(backend):
    """Eight replay-ghost steps on a BatchNorm CNN (batches with and without tail samples, one with a tail sample
    only) against :func:`_reference_replay_ghost_step` on a copy, with the library's own ghost samples: weights
    and BatchNorm buffers agree to float32 rounding."""
    from imbsam_fast.backends.extension import ext_available

    if backend == "ext" and not ext_available():
        pytest.skip("the C++ extension is not built")
    torch.manual_seed(0)
    model = small_cnn(10)
    ref = copy.deepcopy(model)
    opt = ImbSAM(model.parameters(), torch.optim.SGD, tail_mask=TAIL, mode="fast", model=model, backend=backend,
                 ghost_batch=3, **KW)
    sgd = torch.optim.SGD(ref.parameters(), **KW)
    for i, (x, y) in enumerate(image_batches(8, seed=3)):
        y = y % 7
        if i % 4 != 3:
            y[[i, i + 5][: 1 + i % 2]] = 8 + i % 2
        calls = []
        opt.step(_closure(model, x, y, calls), y)
        if len(calls) == 1:  # no tail sample: the head step alone
            ((F.cross_entropy(ref(x), y, reduction="none")).sum() / len(y)).backward()
            sgd.step()
            sgd.zero_grad(set_to_none=True)
        else:
            assert calls[0] is None and len(calls) == 3 and calls[2].numel() == calls[1].numel() + 3
            _reference_replay_ghost_step(ref, sgd, x, y, calls[1], calls[2])
        for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
            where = f"step {i}, {name}"
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, where=where: f"{where}: {m}")


def test_a_fast_step_installs_the_switching_forwards_once_and_leaves_none(monkeypatch):
    """A replay-ghost step writes its BatchNorm layers' switching forwards once (before the full forward) and
    removes them once (after the step), its three contexts only changing their mode; a step whose closure
    raises in the perturbed pass leaves no forward behind either."""
    from imbsam_fast.batchnorm import _Switch

    torch.manual_seed(0)
    model = small_cnn(10)
    layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    opt = ImbSAM(model.parameters(), torch.optim.SGD, tail_mask=TAIL, mode="fast", model=model, **KW)
    counts = {"install": 0, "remove": 0}
    for name in counts:
        def counted(self, *args, _name=name, _original=getattr(_Switch, name)):
            counts[_name] += 1
            return _original(self, *args)
        monkeypatch.setattr(_Switch, name, counted)
    batches = image_batches(4)
    for i, (x, y) in enumerate(batches[:3]):
        y = y % 7
        if i != 1:
            y[i] = 8
        opt.step(_closure(model, x, y), y)
        assert all("forward" not in m.__dict__ and m.track_running_stats for m in layers)
    assert counts == {"install": 2, "remove": 2}  # the batch with no tail sample needs no context

    x, y = batches[3]
    y[0] = 9
    calls = []
    plain = _closure(model, x, y, calls)

    def failing(index=None):
        if len(calls) == 2:
            raise RuntimeError("boom")
        return plain(index)

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(failing, y)
    assert all("forward" not in m.__dict__ and m.track_running_stats for m in layers)
    assert counts == {"install": 3, "remove": 3}
