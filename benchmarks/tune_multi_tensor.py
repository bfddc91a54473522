"""Sweep the multi-tensor kernels' launch configuration on a GPU (graph-replay time of norm + perturb + restore).

    python benchmarks/tune_multi_tensor.py
"""

from __future__ import annotations

import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from gpu_check import FLOOR_BYTES_PER_PARAM, BackendPhases, copy_bandwidth, graph_time  # noqa: E402

from imbsam_fast.apps.bench.shapes import even_shapes, numel, resnet32_shapes  # noqa: E402
from imbsam_fast.backends.triton_ops import TritonParamOps  # noqa: E402
from imbsam_fast.kernels import multi_tensor  # noqa: E402


def main() -> int:
    if not torch.cuda.is_available():
        print("tune_multi_tensor: no CUDA device", file=sys.stderr)
        return 2
    copy_gbs = copy_bandwidth()
    cases = [("ResNet-32", resnet32_shapes()), ("10M/100", even_shapes(10_000_000, 100)),
             ("100M/100", even_shapes(100_000_000, 100))]
    data = {}
    for name, shapes in cases:
        torch.manual_seed(0)
        data[name] = ([torch.randn(s, device="cuda") for s in shapes], [torch.randn(s, device="cuda") for s in shapes])
    print(f"# {torch.cuda.get_device_name()}; copy {copy_gbs:.0f} GB/s; graph-replay ms and fraction of copy")
    print(f"{'chunk':>7}{'block':>7}{'warps':>6}" + "".join(f"{n:>20}" for n, _ in cases))
    for chunk, block, warps in itertools.product((4096, 8192, 16384, 32768), (1024, 2048, 4096), (4, 8)):
        if chunk % block:
            continue
        cfg = multi_tensor.LaunchConfig(chunk, block, warps)
        cells = []
        for name, shapes in cases:
            params, grads = data[name]
            ms = graph_time(BackendPhases(TritonParamOps(launch=cfg), params, grads), 20)
            frac = FLOOR_BYTES_PER_PARAM * numel(shapes) / ms / 1e6 / copy_gbs
            cells.append(f"{ms:>11.4f} {frac:>7.0%}")
        print(f"{chunk:>7}{block:>7}{warps:>6}" + "".join(f"{c:>20}" for c in cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
