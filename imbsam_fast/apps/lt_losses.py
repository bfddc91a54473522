"""Per-sample losses long-tailed users pair with SAM; ImbSAM splits each into head and tail by class weights.

With class counts ``n_k``, priors ``pi_k = n_k / sum(n)`` and logits ``z``:

* ``ce``: ``l = -log softmax(z)_y``;
* ``ldam`` (Cao et al. 2019): ``l = -log softmax(s * (z - m_y e_y))_y`` with
  margins ``m_k = M / n_k^(1/4)`` scaled so that ``max m = 0.5``, ``s = 30``;
  with deferred re-weighting (DRW) the loss is multiplied by class weights
  ``w_k = (1 - beta) / (1 - beta^n_k)`` (normalized to mean 1) from epoch
  ``drw_epoch`` on;
* ``logit_adjusted`` (Menon et al. 2021): ``l = -log softmax(z + tau log pi)_y``;
* ``balanced_softmax`` (Ren et al. 2020): ``l = -log softmax(z + log n)_y``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["LOSSES", "make_loss"]

LOSSES = ("ce", "ldam", "logit_adjusted", "balanced_softmax")


def make_loss(name: str, class_counts: list[int], *, tau: float = 1.0, ldam_scale: float = 30.0,
              max_margin: float = 0.5, drw_beta: float = 0.9999) -> Callable[..., torch.Tensor]:
    """``loss(logits, y, epoch=0, drw_epoch=None) -> (B,)`` per-sample losses."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    counts = torch.tensor(class_counts, dtype=torch.float64).clamp_min(1)
    log_prior = (counts / counts.sum()).log().float()
    log_counts = counts.log().float()
    margins = counts.pow(-0.25)
    margins = (margins * (max_margin / margins.max())).float()
    eff = (1.0 - drw_beta) / (1.0 - drw_beta ** counts)
    drw_w = (eff / eff.sum() * len(class_counts)).float()

    def loss(logits: torch.Tensor, y: torch.Tensor, epoch: int = 0, drw_epoch: int | None = None) -> torch.Tensor:
        dev = logits.device
        if name == "ce":
            return F.cross_entropy(logits, y, reduction="none")
        if name == "logit_adjusted":
            return F.cross_entropy(logits + tau * log_prior.to(dev), y, reduction="none")
        if name == "balanced_softmax":
            return F.cross_entropy(logits + log_counts.to(dev), y, reduction="none")
        shifted = logits - F.one_hot(y, logits.shape[1]).to(logits.dtype) * margins.to(dev)[y].unsqueeze(1)
        out = F.cross_entropy(ldam_scale * shifted, y, reduction="none")
        if drw_epoch is not None and epoch >= drw_epoch:
            out = out * drw_w.to(dev)[y]
        return out

    return loss
