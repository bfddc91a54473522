"""Semi-supervised anomaly detection in the Deep SAD style (Ruff et al. 2020), with ImbSAM on the anomaly term.

A network ``phi`` maps inputs to an embedding; ``c`` is the mean embedding of
the training data at initialization. Per sample, with ``d = ||phi(x) - c||^2``:

    unlabeled / normal sample (head):  l = d
    labeled anomaly (tail):            l = eta / (d + eps)

The few labeled anomalies play ImbSAM's tail (class 1), everything else its
head (class 0): SAM is applied to the anomaly term only. The anomaly score of
a test sample is ``d``; quality is the AUROC of normal vs anomalous.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..optimizer import ImbSAM
from ..priors import ClassWeights, imbsam_weights, plain_weights, sam_weights

__all__ = ["ANOMALY_OPTIMIZERS", "AnomalySplit", "digits_anomaly_split", "deep_sad_mlp", "train_deep_sad"]

ANOMALY_OPTIMIZERS = ("sgd", "sam", "imbsam")


@dataclass
class AnomalySplit:
    """Training inputs with ``labeled`` = 1 for labeled anomalies; test inputs with ``is_anomaly``."""

    x_train: torch.Tensor
    labeled: torch.Tensor
    x_test: torch.Tensor
    is_anomaly: torch.Tensor


def digits_anomaly_split(normal_class: int = 8, labeled_ratio: float = 0.05, pollution: float = 0.0,
                         seed: int = 0) -> AnomalySplit:
    """Digits: ``normal_class`` is normal, the other nine are anomalies.

    Training: the normal images of the training half, plus labeled anomalies
    numbering ``labeled_ratio`` of them (drawn from the other classes), plus
    ``pollution`` times as many unlabeled anomalies. Test: the other half, all classes.
    """
    from sklearn.datasets import load_digits

    if not 0 <= normal_class <= 9:
        raise ValueError(f"normal_class must lie in 0..9, got {normal_class}")
    if not 0 < labeled_ratio <= 1:
        raise ValueError(f"labeled_ratio must lie in (0, 1], got {labeled_ratio}")
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    train, test = perm[: len(y) // 2], perm[len(y) // 2 :]
    normal = train[y[train] == normal_class]
    others = rng.permutation(train[y[train] != normal_class])
    n_lab = max(1, int(round(labeled_ratio * len(normal))))
    n_pol = int(round(pollution * len(normal)))
    labeled, polluted = others[:n_lab], others[n_lab : n_lab + n_pol]
    idx = np.concatenate([normal, polluted, labeled])
    lab = np.concatenate([np.zeros(len(normal) + len(polluted)), np.ones(len(labeled))]).astype(np.int64)
    return AnomalySplit(torch.from_numpy(x[idx]), torch.from_numpy(lab), torch.from_numpy(x[test]),
                        torch.from_numpy((y[test] != normal_class).astype(np.int64)))


def deep_sad_mlp(in_dim: int = 64, hidden: int = 64, rep: int = 16) -> nn.Module:
    """Deep SAD's bias-free MLP (no bias terms, so the trivial constant map is not available)."""
    return nn.Sequential(nn.Linear(in_dim, hidden, bias=False), nn.LeakyReLU(0.1), nn.Linear(hidden, rep, bias=False))


def _weights(name: str, tail_weight: float) -> ClassWeights:
    if name == "sgd":
        return plain_weights(2)
    if name == "sam":
        return sam_weights(2)
    if name == "imbsam":
        return imbsam_weights(torch.tensor([False, True]), tail_weight)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(ANOMALY_OPTIMIZERS)}")


def train_deep_sad(optimizer: str, split: AnomalySplit, *, epochs: int = 30, batch_size: int = 64, lr: float = 0.01,
                   weight_decay: float = 1e-4, rho: float = 0.05, eta: float = 1.0, eps: float = 1e-6,
                   seed: int = 0, device: str = "cpu") -> float:
    """Train ``phi`` with ``optimizer`` in {sgd, sam, imbsam}; return the test AUROC."""
    from sklearn.metrics import roc_auc_score

    weights = _weights(optimizer, 1.0)
    torch.manual_seed(seed)
    phi = deep_sad_mlp(split.x_train.shape[1]).to(device)
    x, lab = split.x_train.to(device), split.labeled.to(device)
    with torch.no_grad():
        c = phi(x).mean(0)
        c[(c.abs() < 0.1) & (c < 0)] = -0.1  # Deep SAD keeps the centre away from 0 in every coordinate
        c[(c.abs() < 0.1) & (c >= 0)] = 0.1
    opt = ImbSAM(phi.parameters(), torch.optim.Adam, rho=rho, class_weights=weights, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(lab), generator=gen).to(device)
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            xb, lb = x[idx], lab[idx]

            def closure(index=None, xb=xb, lb=lb):
                xs, ls = (xb, lb) if index is None else (xb[index], lb[index])
                dist = ((phi(xs) - c) ** 2).sum(1)
                return torch.where(ls == 1, eta / (dist + eps), dist)

            opt.step(closure, lb)
    with torch.no_grad():
        scores = ((phi(split.x_test.to(device)) - c) ** 2).sum(1).cpu().numpy()
    return float(roc_auc_score(split.is_anomaly.numpy(), scores))
