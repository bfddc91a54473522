"""How close fast mode's update stays to exact mode's on a BatchNorm ResNet-32.

Along one exact-mode training run (ResNet-32, batch 64, CIFAR-100-LT labels,
random 32x32 inputs, SGD momentum 0.9), at every step with at least one tail
sample the exact and the fast update are computed from the same state, and
their cosine similarity is recorded: for the whole update, and for its tail
part (the update minus the plain head-only update from that state).

    python benchmarks/fidelity.py [--steps 40] [--eta 20 100] [--variants "tail_capacity,default"]

``tail_capacity`` rows run the fixed-size tail passes (``K`` samples chosen on the device; more than
``K`` tail samples are subsampled and reweighted); the table says in how many steps that happened.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
import torch.nn.functional as F

from imbsam_fast import ImbSAM
from imbsam_fast.apps.bench.step_time import cifar100_lt_batches
from imbsam_fast.apps.models import resnet32

KW = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
VARIANTS = {"fast (replay-ghost 8, default)": dict(fast_bn="replay-ghost", ghost_batch=8),
            "fast (ghost 8)": dict(fast_bn="ghost", ghost_batch=8),
            "fast (ghost 16)": dict(fast_bn="ghost", ghost_batch=16),
            "fast (tail_capacity 8)": dict(tail_capacity=8),
            "fast (tail_capacity 4)": dict(tail_capacity=4)}


def _closure(model, x, y):
    return lambda index=None: F.cross_entropy(model(x if index is None else x[index]),
                                              y if index is None else y[index], reduction="none")


def _flat_update(model, start):
    return torch.cat([(p - q).flatten() for p, q in zip(model.parameters(), start.parameters())])


def _one_step(model, opt_state, mask, x, y, **kw):
    m = copy.deepcopy(model)
    opt = ImbSAM(m.parameters(), torch.optim.SGD, tail_mask=mask, model=m, **KW, **kw)
    opt.load_state_dict(copy.deepcopy(opt_state))
    opt.step(_closure(m, x, y), y)
    return m


def _head_only(model, opt_state, mask, x, y):
    m = copy.deepcopy(model)
    sgd = torch.optim.SGD(m.parameters(), **KW)
    state = copy.deepcopy(opt_state)
    state.pop("imbsam", None)
    sgd.load_state_dict(state)
    losses = F.cross_entropy(m(x), y, reduction="none")
    sgd.zero_grad()
    ((losses * (~mask[y]).float()).sum() / len(y)).backward()
    sgd.step()
    return m


def run(eta: float, steps: int, variants: dict = VARIANTS):
    torch.manual_seed(0)
    batches, mask = cifar100_lt_batches(steps, 64, eta, torch.device("cpu"), seed=1)
    model = resnet32()
    opt = ImbSAM(model.parameters(), torch.optim.SGD, tail_mask=mask, **KW)
    cos = {k: ([], []) for k in variants}
    tails = []
    for x, y in batches:
        if mask[y].any():
            state = opt.state_dict()
            head = _flat_update(_head_only(model, state, mask, x, y), model)
            tails.append(int(mask[y].sum()))
            torch.manual_seed(len(tails))
            exact = _flat_update(_one_step(model, state, mask, x, y), model)
            for name, kw in variants.items():
                fast = _flat_update(_one_step(model, state, mask, x, y, mode="fast", **kw), model)
                cos[name][0].append(F.cosine_similarity(exact, fast, dim=0).item())
                cos[name][1].append(F.cosine_similarity(exact - head, fast - head, dim=0).item())
        opt.step(_closure(model, x, y), y)
    return cos, tails


def _summary(v):
    q = statistics.quantiles(v, n=10, method="inclusive") if len(v) > 1 else [v[0]] * 9
    return f"{min(v):.4f} {q[0]:.4f} {statistics.median(v):.4f} {statistics.mean(v):.4f} {max(v):.4f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--eta", type=float, nargs="+", default=[20, 100])
    ap.add_argument("--variants", default="", help="comma-separated substrings of the variant names (default: all)")
    args = ap.parse_args(argv)
    wanted = [w for w in args.variants.split(",") if w]
    variants = {k: v for k, v in VARIANTS.items() if not wanted or any(w in k for w in wanted)}
    print("# cosine similarity of fast-mode vs exact-mode updates, BatchNorm ResNet-32 (min p10 median mean max)")
    for eta in args.eta:
        cos, tails = run(eta, args.steps, variants)
        over = {k: sum(t > k for t in tails) for k in (4, 8)}
        print(f"\neta={eta:g}: {len(tails)} of {args.steps} steps had tail samples (mean {statistics.mean(tails):.1f}; "
              f"more than 4: {over[4]}, more than 8: {over[8]})")
        print(f"{'variant':<24}{'whole update':>40}   {'tail part':>40}")
        for name, (whole, tail) in cos.items():
            print(f"{name:<24}{_summary(whole):>40}   {_summary(tail):>40}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
