"""pytest-benchmark suite of one training step per method (ResNet-32, batch 64, CIFAR-100-LT labels).

    pytest benchmarks/test_bench_step.py --benchmark-only [--benchmark-group-by=param:eta]

Not part of the test suite (``testpaths = tests``); ``benchmarks/step_time.py``
prints the same comparison as ratios to SGD from one interleaved run.
"""

import itertools

import pytest
import torch

from imbsam_fast.apps.bench.step_time import METHODS, cifar100_lt_batches, make_steppers

pytest.importorskip("pytest_benchmark")


@pytest.mark.parametrize("eta", [20, 100])
@pytest.mark.parametrize("method", METHODS)
def test_step(benchmark, method, eta):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batches, mask = cifar100_lt_batches(8, 64, eta, device)
    step, _ = make_steppers(device, mask)
    cycle = itertools.cycle(batches)

    def one():
        x, y = next(cycle)
        step(method, x, y)
        if device.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(one, rounds=6, warmup_rounds=2)
