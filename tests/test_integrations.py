"""ImbSAM inside Lightning's manual optimization and with a torch.compile'd model."""

from __future__ import annotations

import shutil

import pytest
import torch
from models import per_sample_closure as closure_of
from models import seeded_mlp as mlp
from models import vector_batches

from imbsam_fast import ImbSAM

TAIL = torch.tensor([False] * 7 + [True] * 3)
STEPS = 4


def data():
    out = vector_batches(STEPS, batch=16, seed=3)
    for i, (_, y) in enumerate(out):
        y.clamp_(max=6)
        if i != 2:
            y[i] = 8
    return out


def plain_loop(mode, model=None, forward=None):
    model = mlp() if model is None else model
    forward = model if forward is None else forward
    opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, tail_mask=TAIL, mode=mode, model=model)
    for x, y in data():
        opt.step(closure_of(forward, x, y), y)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_lightning_manual_optimization(mode, tmp_path):
    pl = pytest.importorskip("lightning.pytorch", reason="the Lightning integration test needs `lightning`")

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.net = mlp()
            self.hook_calls = 0

        def configure_optimizers(self):
            return ImbSAM(self.net.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, tail_mask=TAIL, mode=mode,
                          model=self.net)

        def on_before_optimizer_step(self, optimizer):
            self.hook_calls += 1

        def training_step(self, batch, batch_idx):
            x, y = batch
            losses = self.optimizers().step(closure=closure_of(self.net, x, y), targets=y)
            self.log("tail", losses.tail)

    module = Module()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data(), batch_size=None))
    assert module.hook_calls == STEPS
    want = plain_loop(mode)
    got = torch.cat([p.detach().reshape(-1) for p in module.net.parameters()])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="inductor needs a C++ compiler")
@pytest.mark.parametrize("mode,batchnorm", [("exact", False), ("fast", True)])
def test_compiled_model_trains_like_the_eager_one(mode, batchnorm):
    """Inductor on the CPU; fast mode on a BatchNorm model, whose replayed and ghost passes recompile."""
    from models import image_batches, small_cnn

    def run(compiled):
        torch.manual_seed(0)
        model = small_cnn(10) if batchnorm else mlp()
        forward = torch.compile(model) if compiled else model
        opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, tail_mask=TAIL, mode=mode,
                     model=model)
        torch.manual_seed(1)
        batches = image_batches(STEPS) if batchnorm else data()
        for i, (x, y) in enumerate(batches):
            if i != 2:
                y[i] = 8
            opt.step(closure_of(forward, x, y), y)
        return torch.cat([t.detach().reshape(-1).float() for t in (*model.parameters(), *model.buffers())])

    torch._dynamo.reset()
    torch.testing.assert_close(run(True), run(False), rtol=1e-5, atol=1e-6)
