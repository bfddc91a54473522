"""Optimizer-side time of one ImbSAM step: everything but forward and backward.

Compares imbsam_fast (exact mode) with a transcription of the public
per-parameter code, on the same base optimizer (SGD, momentum 0.9, wd 1e-3),
over ResNet-32's parameter shapes and a ~42M-parameter transformer's. The
backward passes are simulated by handing each phase fresh gradient tensors,
outside the timed region. Ours moves one addition (g_h + g_t') into the
perturbed backward, where autograd accumulates onto g_h; "ours + accumulate"
times that addition too, so the comparison is like for like.

    python benchmarks/optimizer_overhead.py [--device cuda] [--reps 30]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from ...optimizer import ImbSAM
from ...reference import ReferenceImbSAM
from .shapes import numel, resnet32_shapes, transformer_shapes

__all__ = ["bench", "main"]

SGD_KW = dict(lr=0.01, momentum=0.9, weight_decay=1e-3)


class _Params(torch.nn.Module):
    def __init__(self, shapes, device):
        super().__init__()
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes])


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _grads(params):
    return [torch.randn_like(p) for p in params]


def _after_backward(params, phase, device) -> float:
    """Hand every parameter a fresh gradient (a simulated backward, untimed), then time ``phase``."""
    for p, g in zip(params, _grads(params)):
        p.grad = g
    return _timed(phase, device)


def step_ours(opt, params, device, accumulate: bool) -> float:
    t = _after_backward(params, opt.first_step, device) + _after_backward(params, opt.second_step, device)
    fresh = _grads(params)

    def accumulate_onto_head():
        for p, g in zip(params, fresh):
            p.grad.add_(g)

    if accumulate:
        t += _timed(accumulate_onto_head, device)
    else:
        accumulate_onto_head()
    return t + _timed(opt.third_step, device)


def step_reference(ref, params, device) -> float:
    return sum(_after_backward(params, phase, device) for phase in (ref.first_step, ref.second_step, ref.third_step))


def bench(name, shapes, device, reps, warmup=3):
    torch.manual_seed(0)
    m_ours, m_ref = _Params(shapes, device), _Params(shapes, device)
    ours = ImbSAM(m_ours.parameters(), torch.optim.SGD, nonfinite="none", **SGD_KW)
    checked = ImbSAM(m_ours.parameters(), torch.optim.SGD, nonfinite="skip", **SGD_KW)
    ref = ReferenceImbSAM(torch.optim.SGD(m_ref.parameters(), **SGD_KW), m_ref)
    po, pr = list(m_ours.parameters()), list(m_ref.parameters())
    times = {"reference": [], "ours": [], "ours + accumulate": [], "ours + accumulate + finite check": []}
    for i in range(warmup + reps):
        r = step_reference(ref, pr, device)
        a = step_ours(ours, po, device, accumulate=False)
        b = step_ours(ours, po, device, accumulate=True)
        c = step_ours(checked, po, device, accumulate=True)
        if i >= warmup:
            for k, v in zip(times, (r, a, b, c)):
                times[k].append(v)
    med = {k: statistics.median(v) for k, v in times.items()}
    return name, len(shapes), numel(shapes), med


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=0, help="repeats (default: 30 for ResNet-32, 5 for 42M)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    rows = [
        bench("ResNet-32", resnet32_shapes(), device, args.reps or 30),
        bench("transformer 6x768", transformer_shapes(), device, args.reps or 5, warmup=1),
    ]
    cpu = platform.processor() or platform.machine()
    print(f"# optimizer-side time per ImbSAM step, median ms ({device.type}; {cpu}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__})")
    print(f"{'model':<20}{'tensors':>8}{'params':>12}{'reference':>11}{'ours':>9}{'ratio':>7}"
          f"{'ours+acc':>10}{'ratio':>7}{'+check':>9}{'ratio':>7}")
    for name, nt, n, med in rows:
        r = med["reference"]
        o, oa, oc = med["ours"], med["ours + accumulate"], med["ours + accumulate + finite check"]
        print(f"{name:<20}{nt:>8}{n:>12,}{r * 1e3:>11.2f}{o * 1e3:>9.2f}{r / o:>6.2f}x"
              f"{oa * 1e3:>10.2f}{r / oa:>6.2f}x{oc * 1e3:>9.2f}{r / oc:>6.2f}x")
    print("ratio = reference time / our time (higher is better)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
