"""Python bytecodes that ImbSAM.step runs outside the forwards and backwards: a deterministic count of its Python work.

Sampled times (``python_share.py``) carry the machine's noise (the same step took 34 ms on one day and 66 ms
on another on the same 2-core VM) and about +-10% of sampling error at a hundred samples, which hides changes
of that size. The number of bytecodes executed is the same on every run of the same code and inputs: it
compares two versions of the library exactly (an A/B with ``PYTHONPATH`` pointing at the other checkout).

A trace function (``sys.settrace`` with per-opcode events) counts every opcode executed in frames below
``ImbSAM.step``, except below the closure (the user's forward) and below ``torch.autograd.backward``.
Work done inside C functions (torch operators, the ``map``-style builtins) is not counted: this measures
the interpreter's share, not the step's host time.

Bytecodes are not time. Rewriting the per-step loops over parameters and BatchNorm layers as C-level
``map()`` calls cut a fast step's count 4x (19,360 to 4,629 on ResNet-32's structure) and moved neither
py-spy's Python share nor the timed host cost outside the forwards and backwards beyond the machine's
noise: the cost per element is the work on the objects (a Python wrapper for each new gradient, the
tensors' and modules' attribute reads), the same in C as in bytecode. Use the count to see where the
interpreter's work is, and time or sample any change you make because of it.

    python benchmarks/python_opcodes.py [--mode fast|exact] [--steps 20] [--width 1] [--top 15] [--no-book]
"""

from __future__ import annotations

import argparse
import collections
import sys
from typing import Any

import torch
import torch.nn.functional as F

SKIP = {"user_forward"}
"""Function names whose frames (and everything below them) are the user's forward."""


def count_step_opcodes(step: Any, n_steps: int) -> tuple[int, collections.Counter]:
    """Opcodes executed below ``ImbSAM.step`` over ``n_steps`` calls of ``step(i)``, outside the forward and
    backward; and their count per ``file:function``."""
    import torch.autograd

    backward_code = torch.autograd.backward.__code__
    from imbsam_fast.optimizer import ImbSAM

    step_code = ImbSAM.step.__code__
    per_site: collections.Counter = collections.Counter()
    inside: dict[int, bool] = {}
    total = 0

    def local(frame, event, arg):  # noqa: ANN001 - sys.settrace's signature
        nonlocal total
        if event == "opcode":
            total += 1
            code = frame.f_code
            per_site[f"{code.co_filename.rsplit('site-packages/', 1)[-1]}:{code.co_name}"] += 1
        elif event == "return":
            inside.pop(id(frame), None)
        return local

    def on_call(frame, event, arg):  # noqa: ANN001
        if event != "call":
            return None
        parent = inside.get(id(frame.f_back), False) if frame.f_back is not None else False
        code = frame.f_code
        if code is step_code:
            state = True
        elif not parent or code is backward_code or code.co_name in SKIP:
            state = False
        else:
            state = True
        if not state:
            if parent:
                inside[id(frame)] = False
            return None
        inside[id(frame)] = True
        frame.f_trace_opcodes = True
        return local

    sys.settrace(on_call)
    try:
        for i in range(n_steps):
            step(i)
    finally:
        sys.settrace(None)
    return total, per_site


def main(argv: Any = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", default="fast", choices=["fast", "exact"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--width", type=int, default=1, help="ResNet-32's first-stage channels (16: the model)")
    ap.add_argument("--top", type=int, default=15, help="functions to list")
    ap.add_argument("--no-book", action="store_true", help="the Python phases (the extension's ParamBook off)")
    args = ap.parse_args(argv)
    from imbsam_fast.apps.bench.step_time import cifar100_lt_batches, make_steppers

    torch.set_num_threads(1)
    data, mask = cifar100_lt_batches(args.steps * 2 + 20, 64, 20, torch.device("cpu"), 1)
    data = [(x if args.width >= 16 else x[:, :, :8, :8], y) for x, y in data if int(mask[y].sum()) > 0]
    stepper, opts = make_steppers(torch.device("cpu"), mask, methods=[args.mode], width=args.width)
    opt, model = opts[args.mode], stepper.models[args.mode]
    if args.no_book:
        opt._book = None

    def user_forward(x, y, index):  # noqa: ANN001
        return F.cross_entropy(model(x if index is None else x[index]), y if index is None else y[index],
                               reduction="none")

    def step(i: int) -> None:
        x, y = data[i]
        opt.step(lambda index=None: user_forward(x, y, index), y)

    for i in range(3):  # warm-up: caches and plans built, as in training
        step(i)
    total, per_site = count_step_opcodes(lambda i: step(3 + i), args.steps)
    print(f"# {args.mode} mode, ResNet-32 (width {args.width}), batch 64, {args.steps} steps with tail samples: "
          f"{total / args.steps:.0f} opcodes per step outside the forwards and backwards")
    for site, n in per_site.most_common(args.top):
        print(f"{n / args.steps:8.0f}  {site}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
