"""A whole ImbSAM training step captured in one CUDA graph, and replayed batch after batch.

    step = CapturedStep(opt, loss_fn, example_inputs, example_targets)
    for x, y in loader:
        losses = step(x, y)          # copies x, y into static buffers, replays the graph

``loss_fn(inputs, targets)`` runs the forward on a batch (or on the subset the
optimizer picks: fast mode's tail passes) and returns per-sample losses; the
graph holds every forward, every backward and every optimizer phase of
``opt.step``. Replay costs one launch on the host, whatever the model: this is
what a launch-bound step (a small model, a small batch) gains.

What capture needs, and what this checks:

* ``opt`` built with ``capturable=True`` (so no phase reads a value back; fast
  mode then needs ``tail_capacity=K``), in one process (no DDP or FSDP), with
  no ``scaler`` (bf16 autocast inside ``loss_fn`` is fine);
* static shapes: every batch has the example's shape and dtype (a short last
  batch must be dropped or padded with ``ignore_index`` labels);
* ``loss_fn`` does only tensor work on the device: no ``.item()``, no printing
  of values, no Python branching on tensor values, no new CPU tensors;
* Python-side settings are constants of the graph: a float learning rate,
  ``rho``, the class weights. After changing one, or after ``load_state_dict``
  (which replaces state tensors), build a new ``CapturedStep``.

On accelerators the parameter phases run as torch foreach ops (the Triton and
extension kernels copy pointer tables from the host each step, which a graph
cannot replay safely); in a graph their launches cost nothing on the host.

Building the step runs ``warmup`` eager steps on a side stream (allocating the
optimizer state and the kernels' workspaces), then captures one. Neither
trains: the weights, buffers and optimizer state are put back afterwards
(state first made in the warm-up is zeroed, which is how SGD with momentum and
Adam start). On the CPU, where there is no graph, the same object runs the step
eagerly through the same static buffers (``graphed`` is ``False``).

The ``torch.compile`` route, ``torch.compile(train_step, mode="reduce-overhead")``,
also records CUDA graphs; it needs the same ``capturable=True``, and a step
compiled whole must also trace the optimizer, which costs a long compile: see the
README for what was measured.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .masked_step import state_restore_pairs
from .optimizer import ImbSAM, StepLosses
from .param_buckets import all_params

__all__ = ["CapturedStep"]


class CapturedStep:
    """``step(inputs, targets) -> StepLosses``: one ImbSAM step, replayed from a CUDA graph.

    Args:
        optimizer: an :class:`ImbSAM` with ``capturable=True``.
        loss_fn: ``loss_fn(inputs, targets) -> per-sample losses`` (shape ``(B,)``, ``reduction="none"``).
        inputs, targets: an example batch; its shapes, dtypes and device are the graph's.
        model: the module ``loss_fn`` runs, whose buffers the warm-up must not change (default: the
            BatchNorm layers of the ``model`` given to the optimizer).
        micro_batches: passed to :meth:`ImbSAM.step`.
        warmup: eager steps before the capture (at least 1).
        graph: capture on CUDA (default: when the inputs are on CUDA); ``False`` runs eagerly.

    The returned losses live in the graph's memory and are overwritten by the next call: clone them to keep.
    """

    def __init__(self, optimizer: ImbSAM, loss_fn: Callable[[Tensor, Tensor], Tensor], inputs: Tensor,
                 targets: Tensor, *, model: Optional[nn.Module] = None, micro_batches: int = 1, warmup: int = 3,
                 graph: Optional[bool] = None) -> None:
        if not isinstance(optimizer, ImbSAM):
            raise TypeError(f"optimizer must be an ImbSAM, got {type(optimizer).__name__}")
        if not optimizer.capturable:
            raise ValueError("CapturedStep needs ImbSAM(..., capturable=True): no phase of a captured step may "
                             "read a value back")
        if optimizer._sync.kind != "none":
            raise ValueError("CapturedStep runs in one process; DDP and FSDP steps are not captured")
        if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
            raise TypeError("inputs and targets must be tensors (one example batch)")
        if inputs.shape[0] != targets.shape[0] or targets.dim() != 1:
            raise ValueError(f"targets must be 1-D with one label per input: inputs {tuple(inputs.shape)}, "
                             f"targets {tuple(targets.shape)}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1, got {warmup!r}")
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.micro_batches = micro_batches
        self.graphed = inputs.is_cuda if graph is None else bool(graph)
        if self.graphed and not inputs.is_cuda:
            raise ValueError("graph=True needs CUDA inputs; on the CPU the step runs eagerly (graph=False)")
        self.inputs = inputs.detach().clone()
        self.targets = targets.detach().clone()
        self.losses: Optional[StepLosses] = None
        self._graph: Optional[torch.cuda.CUDAGraph] = None
        saved = _TrainingState(optimizer, model)
        if self.graphed:
            self._capture(warmup)
        else:
            self._eager()
        saved.restore()

    def _closure(self, index: Optional[Tensor] = None) -> Tensor:
        if index is None:
            return self.loss_fn(self.inputs, self.targets)
        return self.loss_fn(self.inputs[index], self.targets[index])

    def _eager(self) -> StepLosses:
        losses = self.optimizer.step(self._closure, self.targets, micro_batches=self.micro_batches)
        assert losses is not None
        return losses

    def _capture(self, warmup: int) -> None:
        side = torch.cuda.Stream(device=self.inputs.device)
        side.wait_stream(torch.cuda.current_stream(self.inputs.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._eager()
        torch.cuda.current_stream(self.inputs.device).wait_stream(side)
        # Gradients must be allocated inside the graph's pool (the step leaves none behind).
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.losses = self._eager()
        self._graph = graph

    def __call__(self, inputs: Tensor, targets: Tensor) -> StepLosses:
        """One step on this batch: copied into the static buffers, then the graph replayed (or the step run)."""
        for name, given, static in (("inputs", inputs, self.inputs), ("targets", targets, self.targets)):
            if given.shape != static.shape or given.dtype != static.dtype:
                raise ValueError(
                    f"{name} of shape {tuple(given.shape)} ({given.dtype}) given to a step captured for "
                    f"{tuple(static.shape)} ({static.dtype}): a graph has static shapes (drop or pad the last batch)"
                )
        self.inputs.copy_(inputs, non_blocking=True)
        self.targets.copy_(targets, non_blocking=True)
        if self._graph is None:
            self.losses = self._eager()
            return self.losses
        self._graph.replay()
        self.optimizer.steps += 1
        assert self.losses is not None
        return self.losses


class _TrainingState:
    """The weights, buffers and optimizer state before the warm-up, put back in place afterwards (the tensors
    keep their storage: the graph refers to it)."""

    def __init__(self, opt: ImbSAM, model: Optional[nn.Module]) -> None:
        self.opt = opt
        params = all_params(opt.param_groups)
        self.params = [(p, p.detach().clone()) for p in params]
        if model is not None:
            buffers = list(model.buffers())
        else:
            buffers = opt._bn.buffers() if opt._bn is not None else []
        self.buffers = [(b, b.detach().clone()) for b in buffers]
        state = opt.base_optimizer.state
        self.state = {id(p): {k: v.clone() if isinstance(v, Tensor) else v for k, v in state[p].items()}
                      for p in params if p in state}
        self.steps, self.skipped = opt.steps, opt._skipped

    @torch.no_grad()
    def restore(self) -> None:
        for t, saved in self.params + self.buffers:
            t.copy_(saved)
        opt = self.opt
        state = opt.base_optimizer.state
        params = [p for p in all_params(opt.param_groups) if p in state]
        befores = [self.state.get(id(p), {}) for p in params]
        for t, saved in zip(*state_restore_pairs(state, params, befores)):
            t.copy_(saved)
        for p, before in zip(params, befores):
            for key, value in state[p].items():
                if not isinstance(value, Tensor) and key in before:
                    state[p][key] = before[key]
        opt.steps = self.steps
        opt.skipped_steps = self.skipped
        opt.last_step_skipped = False
        opt.zero_grad(set_to_none=True)
