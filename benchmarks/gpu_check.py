"""One-call GPU check: the CUDA tests, then kernel benchmarks, a table printed last.

    python benchmarks/gpu_check.py [--out DIR] [--skip-tests] [--skip-ext] [--quick]

0. compiles the C++/CUDA extension (csrc/) in place, unless --skip-ext;
1. runs the test suite on the GPU (kernel tests run the real kernels there, and the
   extension's CUDA ops are checked against its CPU ops);
2. times norm + perturb + restore for ResNet-32's shapes, ~10M and ~100M
   parameters in ~100 tensors: the public per-parameter code, the torch
   foreach backend, the Triton backend and the extension's CUDA ops when built
   (CUDA events, median after warm-up),
   with GB/s as a fraction of a device-to-device copy measured in the same run,
   kernel launches per step and peak extra memory;
3. times the class-masked CE (forward + head backward + tail backward): the Triton op, the
   extension's CUDA op and torch's two masked losses for C in {10, 100, 1000, 8142, 32000},
   B in {64, 512}, GPU time and host enqueue time;
4. measures end-to-end training images/s (``e2e_throughput.py``): SGD, the public code, exact and
   fast mode, eager and graphed (``CapturedStep``), ResNet-32 at batch 64 and 128 and the public
   code's ResNet-34 at batch 64, bf16 and fp32; that table is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # the test suite, run below on the GPU

from imbsam_fast import head_tail_cross_entropy  # noqa: E402
from imbsam_fast.apps.bench.shapes import even_shapes, numel, resnet32_shapes  # noqa: E402
from imbsam_fast.backends.buckets import Bucket  # noqa: E402
from imbsam_fast.backends.torch_ops import TorchParamOps  # noqa: E402
from imbsam_fast.backends.triton_ops import TritonParamOps  # noqa: E402

# bytes per fp32 parameter at the floor: norm reads g (4); perturb reads w, g, writes w, backup (16); restore (8)
FLOOR_BYTES_PER_PARAM = 28


def cuda_time(fn, reps: int, warmup: int = 5) -> float:
    """Median milliseconds of ``fn`` over ``reps`` runs, CUDA events, after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_time(fn, reps: int) -> float:
    """Median milliseconds of replaying ``fn`` captured in a CUDA graph: GPU time without launch gaps."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return cuda_time(graph.replay, reps)


def host_time(fn, reps: int) -> float:
    """Median host milliseconds to enqueue ``fn`` (the device synchronized before each call)."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def try_graph_time(fn, reps: int) -> float:
    try:
        return graph_time(fn, reps)
    except Exception as e:  # a path that cannot be captured is reported, not hidden
        print(f"graph capture failed: {type(e).__name__}: {e}", file=sys.stderr)
        return float("nan")


def count_launches(fn) -> int:
    """CUDA kernels and memcpys issued by one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def copy_bandwidth() -> float:
    """Device-to-device copy, GB/s counting bytes read plus written."""
    n = 256 * 1024 * 1024
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_time(lambda: dst.copy_(src), reps=20)
    return 2 * n * 4 / ms / 1e6


class ReferencePhases:
    """The public code's second step (norm, eps, add) and its restore (``p.sub_(eps)``), per parameter."""

    def __init__(self, params, grads, rho=0.05):
        self.params, self.grads, self.rho, self.eps = params, grads, rho, {}

    @torch.no_grad()
    def __call__(self):
        norms = [torch.norm(g, p=2) for g in self.grads]
        grad_norm = torch.norm(torch.stack(norms), p=2) + 1e-16
        for p, g in zip(self.params, self.grads):
            eps = self.eps.get(p)
            if eps is None:
                eps = self.eps[p] = torch.clone(p).detach()
            eps[...] = g[...]
            eps.mul_(self.rho / grad_norm)
            p.add_(eps)
        for p in self.params:
            p.sub_(self.eps[p])


class BackendPhases:
    def __init__(self, ops, params, grads, rho=0.05):
        self.ops = ops
        self.bucket = Bucket(params, grads, [torch.empty_like(p) for p in params], rho)

    @torch.no_grad()
    def __call__(self):
        self.ops.perturb_([self.bucket])
        self.ops.restore_([self.bucket])


def build_extension() -> int:
    """``setup.py build_ext --inplace`` for this device's architecture; the return code."""
    root = os.path.join(HERE, "..")
    env = dict(os.environ)
    if "CUDA_HOME" not in env and os.path.isdir("/usr/local/cuda"):
        env["CUDA_HOME"] = "/usr/local/cuda"
    major, minor = torch.cuda.get_device_capability()
    env.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    return subprocess.call([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=root, env=env)


def _ext_cuda() -> bool:
    from imbsam_fast.backends.extension import ext_available

    return ext_available() and torch._C._dispatch_has_kernel_for_dispatch_key("imbsam_fast::sq_norm", "CUDA")


def bench_params(name, shapes, reps, copy_gbs):
    rows = []
    n = numel(shapes)
    for impl in ("reference", "torch", "triton", *(("ext",) if _ext_cuda() else ())):
        torch.manual_seed(0)
        params = [torch.randn(s, device="cuda") for s in shapes]
        grads = [torch.randn(s, device="cuda") for s in shapes]
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        if impl == "reference":
            fn = ReferencePhases(params, grads)
        else:
            if impl == "ext":
                from imbsam_fast.backends.ext_ops import ExtParamOps

                ops = ExtParamOps()
            else:
                ops = TorchParamOps() if impl == "torch" else TritonParamOps()
            fn = BackendPhases(ops, params, grads)
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        ms = cuda_time(fn, reps)
        host = host_time(fn, reps)
        graph = try_graph_time(fn, reps)
        launches = count_launches(fn)
        gbs = FLOOR_BYTES_PER_PARAM * n / graph / 1e6
        rows.append(dict(model=name, tensors=len(shapes), params=n, impl=impl, ms=ms, host_ms=host, graph_ms=graph,
                         gbs=gbs, frac_copy=gbs / copy_gbs, launches=launches, extra_mib=peak / 2**20))
        del params, grads, fn
        torch.cuda.empty_cache()
    return rows


def ce_cases(reps):
    """Inputs and the two implementations for every CE configuration, made before any timing or capture."""
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        for batch in (64, 512):
            for classes in (10, 100, 1000, 8142, 32000):
                torch.manual_seed(classes + batch)
                logits = torch.randn(batch, classes, device="cuda", dtype=dtype)
                y = torch.randint(0, classes, (batch,), device="cuda")
                mask = torch.rand(classes, device="cuda") < 0.3
                cases.append(dict(batch=batch, classes=classes, dtype=dtype, logits=logits, y=y, mask=mask))
    return cases


def ce_fns(case):
    logits, y, mask, batch = case["logits"], case["y"], case["mask"], case["batch"]
    head_w = (~mask[y]).float()  # torch's two masked losses, written without boolean indexing (no host sync)
    tail_w = 2.0 * mask[y].float()

    def ours():
        x = logits.detach().requires_grad_()
        head, tail = head_tail_cross_entropy(x, y, mask, tail_weight=2.0, backend="triton")
        head.backward(retain_graph=True)
        tail.backward()

    def torch_masked():
        x = logits.detach().requires_grad_()
        losses = F.cross_entropy(x.float() if x.dtype != torch.float32 else x, y, reduction="none")
        head = (losses * head_w).sum() / batch
        tail = (losses * tail_w).sum() / batch
        head.backward(retain_graph=True)
        tail.backward()

    def ext():
        x = logits.detach().requires_grad_()
        head, tail = head_tail_cross_entropy(x, y, mask, tail_weight=2.0, backend="ext")
        head.backward(retain_graph=True)
        tail.backward()

    return ours, torch_masked, ext


def _ext_ce_cuda() -> bool:
    from imbsam_fast.backends.extension import ext_available

    return ext_available() and torch._C._dispatch_has_kernel_for_dispatch_key("imbsam_fast::masked_ce_forward",
                                                                               "CUDA")


def bench_ce(reps):
    """Eager GPU time (events) and host enqueue time of the Triton op, the extension's op (when built) and
    torch's two masked losses; CUDA-graph replay of the first and the last."""
    cases = ce_cases(reps)
    rows = []
    has_ext = _ext_ce_cuda()
    nan = float("nan")
    for case in cases:
        ours, ref, ext = ce_fns(case)
        t_ours, t_torch = cuda_time(ours, reps), cuda_time(ref, reps)
        rows.append(dict(batch=case["batch"], classes=case["classes"], dtype=str(case["dtype"]).replace("torch.", ""),
                         ours_ms=t_ours, torch_ms=t_torch, speedup=t_torch / t_ours,
                         ext_ms=cuda_time(ext, reps) if has_ext else nan,
                         ours_host_ms=host_time(ours, reps), torch_host_ms=host_time(ref, reps),
                         ext_host_ms=host_time(ext, reps) if has_ext else nan,
                         ours_graph_ms=nan, torch_graph_ms=nan, graph_speedup=nan))
    for case, row in zip(cases, rows):  # captures last: a failed capture can spoil later CUDA work
        ours, ref, _ = ce_fns(case)
        row["ours_graph_ms"] = try_graph_time(ours, reps)
        row["torch_graph_ms"] = try_graph_time(ref, reps)
        row["graph_speedup"] = row["torch_graph_ms"] / row["ours_graph_ms"]
        if row["ours_graph_ms"] != row["ours_graph_ms"] or row["torch_graph_ms"] != row["torch_graph_ms"]:
            break
    return rows


def print_params(info, param_rows):
    print(f"\n# {info['device']}, torch {info['torch']}, triton {info['triton']}, {info['date']}; "
          f"tests rc={info['tests_rc']}; D2D copy {info['copy_gbs']:.0f} GB/s")
    print("\n## norm + perturb + restore (fp32), median ms: eager (events), host enqueue, CUDA-graph replay;")
    print("## GB/s from the graph time at the 28 B/param floor")
    print(f"{'model':<11}{'impl':<11}{'eager':>8}{'host':>8}{'graph':>8}{'GB/s':>7}{'of copy':>8}{'launch':>7}"
          f"{'MiB':>7}{'eager vs ref':>13}{'graph vs ref':>13}")
    for r in param_rows:
        ref = next(x for x in param_rows if x["model"] == r["model"] and x["impl"] == "reference")
        print(f"{r['model']:<11}{r['impl']:<11}{r['ms']:>8.3f}{r['host_ms']:>8.3f}{r['graph_ms']:>8.3f}"
              f"{r['gbs']:>7.0f}{r['frac_copy']:>7.0%}{r['launches']:>7}{r['extra_mib']:>7.1f}"
              f"{ref['ms'] / r['ms']:>12.1f}x{ref['graph_ms'] / r['graph_ms']:>12.1f}x")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--skip-ext", action="store_true", help="do not compile the C++/CUDA extension")
    ap.add_argument("--quick", action="store_true", help="fewer repeats, bf16 only end to end")
    ap.add_argument("--skip-e2e", action="store_true", help="no end-to-end training throughput")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device; nothing to do", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    ext_rc = None if args.skip_ext else build_extension()
    tests_rc = None
    if not args.skip_tests:
        tests_rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                    os.path.join(HERE, "..", "tests")])
    import triton

    info = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=datetime.date.today().isoformat(), tests_rc=tests_rc, ext_build_rc=ext_rc)
    copy_gbs = copy_bandwidth()
    info["copy_gbs"] = copy_gbs
    reps = 10 if args.quick else 30
    param_rows = []
    for name, shapes, r in (
        ("ResNet-32", resnet32_shapes(), reps * 3),
        ("10M/100", even_shapes(10_000_000, 100), reps),
        ("100M/100", even_shapes(100_000_000, 100), max(reps // 3, 5)),
    ):
        param_rows += bench_params(name, shapes, r, copy_gbs)
    print_params(info, param_rows)
    sys.stdout.flush()
    ce_rows = bench_ce(reps)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(dict(info=info, params=param_rows, ce=ce_rows), f, indent=1)

    print("\n## class-masked CE: forward + head backward + tail backward, median ms: eager (events) for Triton,")
    print("## the extension's CUDA op and torch's two masked losses; host enqueue; CUDA-graph replay")
    print(f"{'dtype':<9}{'B':>5}{'C':>7}{'triton':>8}{'ext':>8}{'torch':>8}{'h trit':>8}{'h ext':>8}{'h torch':>8}"
          f"{'trit g':>8}{'torch g':>8}")
    for r in ce_rows:
        print(f"{r['dtype']:<9}{r['batch']:>5}{r['classes']:>7}{r['ours_ms']:>8.3f}{r['ext_ms']:>8.3f}"
              f"{r['torch_ms']:>8.3f}{r['ours_host_ms']:>8.3f}{r['ext_host_ms']:>8.3f}{r['torch_host_ms']:>8.3f}"
              f"{r['ours_graph_ms']:>8.3f}{r['torch_graph_ms']:>8.3f}")
    sys.stdout.flush()
    e2e_rows = []
    if not args.skip_e2e:
        import e2e_throughput

        configs = [("resnet32", 64), ("resnet32", 128), ("resnet34", 64)]
        e2e_rows = e2e_throughput.run(configs, ["bf16", "fp32"] if not args.quick else ["bf16"], 60, 5,
                                      torch.device("cuda"))
        print(f"\n## end-to-end training images/s, {info['device']}: 60 batches per row, CIFAR-100-LT labels "
              "(eta 20), eager and graphed (CapturedStep)")
        print("\n".join(e2e_throughput.report(e2e_rows)))
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(dict(info=info, params=param_rows, ce=ce_rows, e2e=e2e_rows), f, indent=1)
    return 0 if tests_rc in (0, None) else 1


if __name__ == "__main__":
    raise SystemExit(main())
