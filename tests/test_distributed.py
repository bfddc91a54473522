"""Multi-process training (2 processes, gloo, CPU): DDP equals one process on the global batch.

Every test runs its workers under a timeout (``distributed_workers.run_workers``): a
rank that waits on a collective its peer never joins fails the test instead of hanging it.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed_workers import (
    LR,
    PER_RANK,
    RHO,
    STEPS,
    TAIL,
    ddp_configs,
    fsdp2_configs,
    global_batches,
    mlp,
    per_sample_loss,
    run_workers,
    syncbn_in_sync,
)

from imbsam_fast import ImbSAM
from imbsam_fast.priors import imbsam_weights, sample_weights

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

WORLD = 2
DDP_CONFIGS = {
    "exact": {"mode": "exact"},
    "fast": {"mode": "fast"},
    "exact-bucket-view": {"mode": "exact", "bucket_view": True},
    "exact-local": {"mode": "exact", "options": {"ascent_sync": "local"}},
    "fast-local": {"mode": "fast", "options": {"ascent_sync": "local"}},
    "fast-batchnorm": {"mode": "fast", "batchnorm": True},
    "exact-clip": {"mode": "exact", "options": {"max_grad_norm": 0.05}},
    "fast-micro": {"mode": "fast", "step": {"micro_batches": 3}},
    "exact-micro": {"mode": "exact", "step": {"micro_batches": 3}},
    "exact-scaler": {"mode": "exact", "scaler": True},
    "fast-scaler": {"mode": "fast", "scaler": True},
    "fast-capacity": {"mode": "fast", "options": {"tail_capacity": 4}},
}
FSDP2_CONFIGS = {
    "exact": {"mode": "exact"},
    "fast": {"mode": "fast"},
    "exact-clip": {"mode": "exact", "options": {"max_grad_norm": 0.05}},
    "fast-asam": {"mode": "fast", "options": {"adaptive": True}},
}


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    out = tmp / "results.pt"
    run_workers(ddp_configs, WORLD, tmp, list(DDP_CONFIGS.values()), str(out))
    return dict(zip(DDP_CONFIGS, torch.load(out)))


@pytest.fixture(scope="module")
def fsdp2_results(tmp_path_factory):
    pytest.importorskip("torch.distributed.fsdp", reason="needs FSDP2")
    tmp = tmp_path_factory.mktemp("fsdp2")
    out = tmp / "results.pt"
    run_workers(fsdp2_configs, WORLD, tmp, list(FSDP2_CONFIGS.values()), str(out))
    return dict(zip(FSDP2_CONFIGS, torch.load(out)))


def single_process(mode: str, **options) -> list[torch.Tensor]:
    """ImbSAM in one process on the concatenated global batches."""
    model = mlp(0)
    opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=LR, momentum=0.9, rho=RHO, tail_mask=TAIL, mode=mode,
                 model=model, **options)
    for x, y in global_batches(STEPS, PER_RANK, WORLD):
        opt.step(per_sample_loss(model, x, y), y)
    return [p.detach() for p in model.parameters()]


def per_replica_ascent() -> list[torch.Tensor]:
    """A plain loop of m-sharpness: each replica ascends along its own tail gradient; the update averages
    ``g_h + g_t'`` over replicas."""
    model = mlp(0)
    params = list(model.parameters())
    sgd = torch.optim.SGD(params, lr=LR, momentum=0.9)
    weights = imbsam_weights(TAIL, 2.0)
    for x, y in global_batches(STEPS, PER_RANK, WORLD):
        update = [torch.zeros_like(p) for p in params]
        for r in range(WORLD):
            xs, ys = x[r * PER_RANK:(r + 1) * PER_RANK], y[r * PER_RANK:(r + 1) * PER_RANK]
            a, b = sample_weights(weights, ys, -100)
            losses = F.cross_entropy(model(xs), ys, reduction="none")
            g_h = torch.autograd.grad((a * losses).sum() / PER_RANK, params, retain_graph=True)
            g_t = torch.autograd.grad((b * losses).sum() / PER_RANK, params)
            norm = torch.stack([g.norm() for g in g_t]).norm()
            e = [RHO * g / (norm + 1e-16) for g in g_t]
            with torch.no_grad():
                for p, d in zip(params, e):
                    p.add_(d)
            g_t2 = torch.autograd.grad((b * F.cross_entropy(model(xs), ys, reduction="none")).sum() / PER_RANK,
                                       params)
            with torch.no_grad():
                for p, d in zip(params, e):
                    p.sub_(d)
            for u, h, t in zip(update, g_h, g_t2):
                u.add_((h + t) / WORLD)
        for p, u in zip(params, update):
            p.grad = u
        sgd.step()
    return [p.detach() for p in params]


def assert_close_rel(got: list[torch.Tensor], want: list[torch.Tensor], rel: float = 1e-5) -> None:
    g, w = torch.cat([t.reshape(-1) for t in got]), torch.cat([t.reshape(-1) for t in want])
    err = ((g - w).norm() / w.norm()).item()
    assert err < rel, f"relative distance {err:.2e} to the reference"


def assert_replicas_equal(result: dict) -> None:
    first, *others = result["replicas"]
    for other in others:
        assert torch.equal(first, other), "the replicas drifted apart"


@pytest.mark.parametrize("name", ["exact", "fast", "exact-bucket-view"])
def test_ddp_equals_one_process_on_the_global_batch(ddp_results, name):
    result = ddp_results[name]
    assert_replicas_equal(result)
    assert_close_rel(result["params"], single_process(DDP_CONFIGS[name]["mode"]))
    # The update's gradient is all-reduced once per step, whatever the ranks' tail counts.
    assert result["allreduces"] == [1] * STEPS


@pytest.mark.parametrize("name", ["exact-local", "fast-local"])
def test_ddp_local_ascent_is_per_replica_sharpness(ddp_results, name):
    result = ddp_results[name]
    assert_replicas_equal(result)
    assert result["allreduces"] == [1] * STEPS
    want = per_replica_ascent()
    assert_close_rel(result["params"], want)
    # It is a different algorithm from the global ascent: the check above could tell them apart.
    glob = torch.cat([t.reshape(-1) for t in single_process("exact")])
    assert (glob - torch.cat([t.reshape(-1) for t in want])).norm() / glob.norm() > 1e-4


def test_ddp_batchnorm_model_stays_in_sync(ddp_results):
    # Running statistics are each replica's own between forwards, as in plain DDP (which broadcasts rank 0's
    # at every forward); the parameters must agree bit for bit.
    result = ddp_results["fast-batchnorm"]
    assert_replicas_equal(result)
    assert all(torch.isfinite(b.float()).all() for b in result["buffers"])
    assert result["allreduces"] == [1] * STEPS


@pytest.mark.parametrize("name", ["exact-clip", "fast-micro", "exact-micro", "exact-scaler", "fast-scaler",
                                  "fast-capacity"])
def test_ddp_composes_with_clipping_micro_batches_and_the_scaler(ddp_results, name):
    result = ddp_results[name]
    cfg = DDP_CONFIGS[name]
    assert_replicas_equal(result)
    assert result["allreduces"] == [1] * STEPS
    # The clipping norm is the global gradient's: one process on the global batch clips the same.
    assert_close_rel(result["params"], single_process(cfg["mode"], **cfg.get("options", {})))


@pytest.mark.parametrize("name", list(FSDP2_CONFIGS))
def test_fsdp2_equals_one_process_on_the_global_batch(fsdp2_results, name):
    cfg = FSDP2_CONFIGS[name]
    assert_close_rel(fsdp2_results[name]["params"], single_process(cfg["mode"], **cfg.get("options", {})))



def test_fsdp1_is_rejected_at_construction():
    # FSDP1 cannot be built without an accelerator; an instance that skipped its __init__ is enough for the check.
    from torch import nn
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrapped = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    nn.Module.__init__(wrapped)
    wrapped.inner = mlp(0)
    with pytest.raises(TypeError, match="fully_shard"):
        ImbSAM(wrapped.inner.parameters(), torch.optim.SGD, lr=LR, tail_mask=TAIL, model=wrapped)
    outer = nn.Sequential(wrapped)
    with pytest.raises(TypeError, match="FSDP1"):
        ImbSAM(wrapped.inner.parameters(), torch.optim.SGD, lr=LR, tail_mask=TAIL, model=outer)


@pytest.mark.skipif(torch.cuda.device_count() < 2 or not dist.is_nccl_available(),
                    reason="SyncBatchNorm synchronizes CUDA tensors only: needs 2 GPUs and NCCL")
def test_syncbatchnorm_model_stays_in_sync(tmp_path):
    out = tmp_path / "replicas.pt"
    run_workers(syncbn_in_sync, 2, tmp_path, str(out), backend="nccl")
    first, second = torch.load(out)
    assert torch.isfinite(first).all()
    torch.testing.assert_close(first, second, rtol=0, atol=0)
