"""A plain transcription of the public ImbSAM reference step.

Per-parameter Python loops, two full forwards and three backwards per step,
the head gradient stashed by cloning, and the perturbation undone by
subtraction (``w + e - e``), exactly as the public code does. It is the oracle
the library's exact mode is tested against; it is deliberately not optimized.
"""

from __future__ import annotations

from collections import defaultdict

import torch


class ReferenceImbSAM:
    """The public code's wrapper: an optimizer instance plus the model."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, rho: float = 0.05) -> None:
        self.optimizer = optimizer
        self.model = model
        self.rho = rho
        self.state: dict = defaultdict(dict)

    @torch.no_grad()
    def first_step(self) -> None:
        for _, p in self.model.named_parameters():
            if p.grad is None:
                continue
            self.state[p]["grad"] = p.grad.detach().clone()
            p.grad.zero_()

    @torch.no_grad()
    def second_step(self) -> None:
        grads = []
        for _, p in self.model.named_parameters():
            if p.grad is None:
                continue
            grads.append(torch.norm(p.grad, p=2))
        grad_norm = torch.norm(torch.stack(grads), p=2) + 1.0e-16
        for _, p in self.model.named_parameters():
            if p.grad is None:
                continue
            eps = self.state[p].get("eps")
            if eps is None:
                eps = torch.clone(p).detach()
                self.state[p]["eps"] = eps
            eps[...] = p.grad[...]
            eps.mul_(self.rho / grad_norm)
            p.add_(eps)
        self.optimizer.zero_grad()

    @torch.no_grad()
    def third_step(self) -> None:
        for _, p in self.model.named_parameters():
            if p.grad is None:
                continue
            p.sub_(self.state[p]["eps"])
            p.grad.add_(self.state[p]["grad"])
        self.optimizer.step()
        self.optimizer.zero_grad()


def reference_train_step(
    model: torch.nn.Module,
    opt: ReferenceImbSAM,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    tail_mask: torch.Tensor,
    tail_weight: float = 2.0,
) -> None:
    """The public training loop's body for one batch."""
    criterion = torch.nn.CrossEntropyLoss(reduction="none")
    batch = targets.shape[0]
    is_tail = tail_mask[targets]
    loss = criterion(model(inputs), targets)
    head_loss = loss[~is_tail].sum() / batch
    tail_loss = loss[is_tail].sum() / batch * tail_weight
    opt.optimizer.zero_grad()
    head_loss.backward(retain_graph=True)
    opt.first_step()
    tail_loss.backward()
    opt.second_step()
    loss = criterion(model(inputs), targets)
    tail_loss = loss[is_tail].sum() / batch * tail_weight
    tail_loss.backward()
    opt.third_step()
