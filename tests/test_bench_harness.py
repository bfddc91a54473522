"""The step-time harness: its control method, its page-fault counts, and keeping freed memory."""

import collections
import importlib.util
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest
import torch

from imbsam_fast.apps.bench.step_time import report, run

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark_script(name: str, module_name: str = "") -> ModuleType:
    """``benchmarks/<name>.py`` loaded as a module (the scripts are not a package; they import each other as
    siblings, as they do when run from benchmarks/)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(module_name or name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_control_does_sgds_work_and_every_step_counts_its_faults():
    res = run(20, 2, torch.device("cpu"), warmup=1, methods=["sgd", "sgd-b", "fast"], head_only=True)
    assert res.tails == [0, 0]
    assert {m: len(v) for m, v in res.faults.items()} == {"sgd": 2, "sgd-b": 2, "fast": 2}
    assert all(f >= 0 for v in res.faults.values() for f in v)
    table = report(res)
    assert table[1].split()[-1] == "faults"
    assert [ln.split()[0] for ln in table[2:5]] == ["sgd", "sgd-b", "fast"]


def test_the_control_trains_its_model_as_sgd_does():
    from imbsam_fast.apps.bench.step_time import cifar100_lt_batches, make_steppers

    data, mask = cifar100_lt_batches(2, 8, 20, torch.device("cpu"))
    step, _ = make_steppers(torch.device("cpu"), mask, methods=["sgd", "sgd-b"], width=2)
    before = [p.clone() for p in step.models["sgd-b"].parameters()]
    for x, y in data:
        step("sgd", x, y)
        step("sgd-b", x, y)
    for a, b in zip(step.models["sgd"].parameters(), step.models["sgd-b"].parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(p, p0) for p, p0 in zip(step.models["sgd-b"].parameters(), before))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_kept_memory_is_reused_without_page_faults():
    # In a child process: mallopt lasts for the process, and the test suite's own memory must not be kept.
    code = textwrap.dedent("""
        import sys, torch
        from imbsam_fast.apps.bench.allocator import keep_freed_memory, minor_faults
        if sys.argv[1] == "keep":
            assert keep_freed_memory()
        faults = []
        for _ in range(12):
            f0 = minor_faults()
            t = torch.ones(16 << 20)  # 64 MiB, touched page by page
            del t
            faults.append(minor_faults() - f0)
        # The steady state: with memory kept, glibc still took the 2nd to 5th allocation afresh in 19 of 30
        # runs on the 2-core CI machine (never a later one), so the last three of twelve are the ones compared.
        print(*faults[9:])
    """)
    counts = {}
    for how in ("keep", "default"):
        out = subprocess.run([sys.executable, "-c", code, how], capture_output=True, text=True, check=True)
        counts[how] = [int(n) for n in out.stdout.split()]
    assert min(counts["default"]) > 10_000, counts  # 64 MiB in 4 KiB pages, each time
    assert max(counts["keep"]) < 1_000, counts


def test_python_share_classifies_samples_by_their_innermost_frame(tmp_path):
    share = benchmark_script("python_share")
    step = "<module> (t.py:9);ImbSAM.step (imbsam_fast/optimizer.py:500)"
    raw = tmp_path / "raw.txt"
    raw.write_text("\n".join([
        f"{step};user_forward (t.py:7);conv2d (libtorch_cpu.so) 50",
        f"{step};StepRun.forward (imbsam_fast/schedules/base.py:70);closure (t.py:5) 5",
        f"{step};StepRun.backward (imbsam_fast/schedules/base.py:95);Tensor.backward (torch/_tensor.py:600) 30",
        f"{step};BatchNormStats.record (imbsam_fast/batchnorm.py:133) 4",
        f"{step};ExtParamOps.perturb_ (imbsam_fast/backends/ext_ops.py:70);perturb (_C.so) 10",
        f"{step};ImbSAM._clear (imbsam_fast/optimizer.py:630);free (libc.so.6) 6",
        f"{step};SGD.step (torch/optim/sgd.py:80);_foreach_add (libtorch_cpu.so) 2",
        f"{step};OpOverloadPacket.__call__ (torch/_ops.py:1279);sgd_loop<float> (param_ops.cpp:142);"
        "std::fma (cmath:1399) 7",
        f"{step};ImbSAM.first_step (imbsam_fast/optimizer.py:313);_PyEval_EvalFrameDefault (libpython3.11.so.1.0) 3",
        "<module> (t.py:3);import_torch (torch/__init__.py:1) 99",
        "<module> (t.py:9);warm_up (t.py:4);ImbSAM.step (imbsam_fast/optimizer.py:500);"
        "BatchNormStats.record (imbsam_fast/batchnorm.py:133) 40",
    ]))
    total, counts = share.classify(raw)
    assert total == 117
    assert counts == {"forward and backward": 85, "ImbSAM outside fwd/bwd: python": 7,
                      "ImbSAM outside fwd/bwd: native": 17, "ImbSAM outside fwd/bwd: libc": 6,
                      "base optimizer step: native": 2}
    lines = share.report(total, counts, 0.117)
    python = next(ln for ln in lines if ln.endswith("outside fwd/bwd: python"))
    assert python.split()[:3] == ["7", "5.98%", "7.000"]


def test_python_share_pools_runs_by_their_spread():
    """Each run's share times its own step; the error is the runs' spread, not the pooled samples'."""
    import collections
    share = benchmark_script("python_share")
    kind = share.PYTHON
    runs = [(1000, collections.Counter({kind: 10, "forward and backward": 990}), 0.5),
            (2000, collections.Counter({kind: 40}), 1.0),
            (500, collections.Counter({kind: 0}), 0.6)]
    p = share.pool(runs)
    assert p["per_run_ms"] == pytest.approx([5.0, 20.0, 0.0])
    assert p["samples"] == 50
    assert p["mean_ms"] == pytest.approx(25.0 / 3)
    assert p["stderr_ms"] == pytest.approx(statistics.stdev([5.0, 20.0, 0.0]) / 3 ** 0.5)
    assert p["sampling_stderr_ms"] == pytest.approx(25.0 / 3 / 50 ** 0.5)


def test_python_share_paired_splits_the_samples_by_arm(tmp_path):
    """Each arm counts only the steps under its own function; B - A carries both counts' sampling error."""
    paired = benchmark_script("python_share_paired")
    step = "ImbSAM.step (imbsam_fast/optimizer.py:500)"
    raw = tmp_path / "raw.txt"
    raw.write_text("\n".join([
        f"<module> (t.py:40);arm_a (t.py:30);{step};user_forward (t.py:20);conv2d (libtorch_cpu.so) 90",
        f"<module> (t.py:40);arm_a (t.py:30);{step};BatchNormStats.record (imbsam_fast/batchnorm.py:133) 10",
        f"<module> (t.py:40);arm_b (t.py:33);{step};user_forward (t.py:20);conv2d (libtorch_cpu.so) 80",
        f"<module> (t.py:40);arm_b (t.py:33);{step};BusyAfterBackward.after_backward (p.py:9) 20",
        f"<module> (t.py:45);warm_up (t.py:36);arm_b (t.py:33);{step};StepRun.finish (base.py:105) 50",
    ]))
    total_a, counts_a = paired.share.classify(raw, within="arm_a")
    total_b, counts_b = paired.share.classify(raw, within="arm_b")
    assert (total_a, counts_a[paired.share.PYTHON]) == (100, 10)
    assert (total_b, counts_b[paired.share.PYTHON]) == (100, 20)
    r = paired.compare((total_a, 10, 0.5), (total_b, 20, 0.5))
    assert (r["a_ms"], r["b_ms"], r["diff_ms"]) == pytest.approx((50.0, 100.0, 50.0))
    assert r["diff_err_ms"] == pytest.approx((50.0 ** 2 / 10 + 100.0 ** 2 / 20) ** 0.5)


def test_python_share_perf_classes_the_main_threads_samples_by_window_and_library():
    """A sample counts for its arm's step only on the main thread, inside a step and outside every forward and
    backward window (nested ones merged), classed by the library its instruction pointer lies in."""
    perf = benchmark_script("python_share_perf")
    script = "\n".join([
        "    42 10.000000150:  7f01 (/usr/lib/libpython3.11.so.1.0)",   # before every step: start-up
        "    42 10.000001050:  7f02 (/usr/lib/libpython3.11.so.1.0)",   # arm 0, outside: python
        "    42 10.000001150:  7f03 (/usr/lib/x86_64-linux-gnu/libc.so.6)",
        "    42 10.000001250:  ffff81 ([kernel.kallsyms])",
        "    42 10.000001350:  7f04 (/venv/torch/lib/libtorch_cpu.so)",  # inside the forward
        "    42 10.000001750:  7f05 (/venv/torch/lib/libtorch_cpu.so)",  # inside the backward nested in it
        "    43 10.000001060:  7f06 (/usr/lib/libpython3.11.so.1.0)",   # an OpenMP worker: left out
        "    42 10.000002050:  7f07 (/src/imbsam_fast/_C.cpython-311-x86_64-linux-gnu.so)",  # arm 1
        "    42 10.000002100:  7f08 (/venv/torch/lib/libtorch_python.so)",
        "    42 10.000002200:  7f09 (/usr/lib/libpython3.11.so.1.0)",
        "    42 10.000002300:  7f0a",                                    # no file: unknown
        "    42 10.000003500:  7f0b (/usr/lib/libpython3.11.so.1.0)",   # after the last step
        "perf script: a line that is not a sample",
    ])
    samples = perf.parse_samples(script)
    assert len(samples) == 12
    assert samples[1] == (42, 10_000_001_050, "(/usr/lib/libpython3.11.so.1.0)")
    windows = {"tid": 42, "steps": [[1, 10_000_002_000, 10_000_003_000], [0, 10_000_001_000, 10_000_002_000]],
               "inner": [[10_000_001_600, 10_000_001_800], [10_000_001_300, 10_000_001_900]]}
    assert perf.merged(windows["inner"]) == [(10_000_001_300, 10_000_001_900)]
    counts = perf.classify(samples, windows)
    assert counts[0] == {"python": 1, "libc": 1, "kernel": 1, perf.INSIDE: 2}
    assert counts[1] == {"imbsam_fast extension": 1, "torch's Python bindings": 1, "python": 1, "other native": 1}
    ms = perf.per_step(collections.Counter({"python": 16}), steps=4, period_ns=250_000)
    assert ms["python"] == pytest.approx((1.0, 0.25))
    assert perf.pooled([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0 / 3 ** 0.5))


def test_python_share_perf_gives_each_sample_to_the_innermost_call_it_lies_in():
    """Self time: a sample goes to the latest-starting recorded call that holds it, within its own step;
    samples in a forward or backward window, or in no call, go nowhere or to ``(no region)``."""
    perf = benchmark_script("python_share_perf")
    py, libc = "(/usr/lib/libpython3.11.so.1.0)", "(/usr/lib/libc.so.6)"
    windows = {"tid": 7, "steps": [[0, 100, 200], [0, 300, 400]], "inner": [[150, 160]],
               "regions": [["step", 100, 200], ["record", 110, 140], ["gather", 120, 130], ["solve", 141, 170],
                           ["step", 300, 400]]}
    samples = [(7, t, py) for t in (105, 115, 125, 135, 145, 155, 175, 305)] + [(7, 125, libc), (8, 125, py),
                                                                              (7, 250, py)]
    counts = perf.by_region(samples, windows)
    assert counts == {("step", "python"): 3, ("record", "python"): 2, ("gather", "python"): 1,
                      ("gather", "libc"): 1, ("solve", "python"): 1}
    windows["regions"] = windows["regions"][1:4]
    assert perf.by_region(samples, windows)[("(no region)", "python")] == 3


def _perf_can_sample() -> bool:
    import shutil
    if shutil.which("perf") is None:
        return False
    probe = subprocess.run(["perf", "stat", "-e", "cpu-clock", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _perf_can_sample(), reason="Linux perf is not installed or may not sample here")
def test_python_share_perf_runs_a_paired_target_under_perf(capsys):
    """The target template formats, both arms step, and the steps' samples come back classified."""
    perf = benchmark_script("python_share_perf")
    patch = BENCHMARKS / "patches" / "nothing.py"
    assert perf.main(["--steps", "2", "--warmup", "1", "--width", "1", "--threads", "1", "--period-us", "100",
                      "--patch", str(patch)]) == 0
    out = capsys.readouterr().out
    assert "arm A" in out and "arm B (nothing.py)" in out and "B - A python:" in out
    assert out.count(perf.INSIDE) == 2


def test_python_opcodes_counts_the_step_and_leaves_out_the_forward():
    """The count is the same on every run, and Python work inside the closure's forward (``user_forward``)
    or inside backward does not enter it."""
    import torch.nn.functional as F
    from models import mlp, vector_batches

    from imbsam_fast import ImbSAM

    counter = benchmark_script("python_opcodes")
    tail = torch.tensor([False] * 7 + [True] * 3)

    def count(extra_python: int) -> int:
        torch.manual_seed(0)
        model = mlp()
        opt = ImbSAM(model.parameters(), torch.optim.SGD, lr=0.1, tail_mask=tail, mode="fast", model=model)
        batches = vector_batches(4)
        for i, (_, y) in enumerate(batches):
            y[0] = 7 + i % 3

        def user_forward(x, y, index):
            for _ in range(extra_python):
                pass
            return F.cross_entropy(model(x if index is None else x[index]), y if index is None else y[index],
                                   reduction="none")

        def step(i):
            x, y = batches[i]
            opt.step(lambda index=None: user_forward(x, y, index), y)

        step(0)
        total, per_site = counter.count_step_opcodes(lambda i: step(1 + i), 3)
        assert sum(per_site.values()) == total
        assert any("optimizer.py:step" in site for site in per_site)
        return total

    plain = count(0)
    assert plain > 100
    assert count(0) == plain
    assert count(500) == plain


def test_cold_calls_times_each_repeat_at_the_ascent_hook():
    """Every step reaches the ascent hook, and each of the repeated calls is timed there."""
    cold = benchmark_script("cold_calls")
    torch.manual_seed(0)
    us = cold.measure(width=1, steps=3, repeat=2, warmup=1)
    assert len(us) == 2 and all(t > 0 for t in us)


@pytest.mark.skipif(not __import__("imbsam_fast.backends.ext_book", fromlist=["x"]).book_available(),
                    reason="the C++ extension is not built")
def test_the_book_benchmark_times_both_phases_on_the_same_batches(capsys, monkeypatch):
    """The A/B runs the ParamBook on one optimizer and the Python phases on the other, over the same batches."""
    from imbsam_fast.apps.bench import step_time
    from imbsam_fast.optimizer import ImbSAM

    bench = benchmark_script("ext_book", "ext_book_bench")
    books = []
    real_step = ImbSAM.step

    def step(self, *a, **k):
        books.append(self._book is not None)
        return real_step(self, *a, **k)

    monkeypatch.setattr(ImbSAM, "step", step)
    assert step_time._host_timer.__defaults__ == (True,)
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--batches", "4", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "book / python phases:" in out and "python phases" in out
    assert books.count(True) == books.count(False) == 7


def test_the_backward_windows_end_when_the_backward_returns():
    """What the library does after a backward and before ``after_backward`` (leaving a pass's BatchNorm context,
    the DDP sync of the ascent gradient) is host time outside the backward: neither timer may count it, and
    both must count the whole backward (here a leaf hook that takes 20 ms, then 100 ms of other work)."""
    import time

    from torch.profiler import ProfilerActivity, profile

    from imbsam_fast.apps.bench.step_time import _WallWindows, _Windows

    x = torch.randn(64, requires_grad=True)
    x.register_hook(lambda g: time.sleep(0.02))
    wall = _WallWindows()
    loss = wall.before_backward(None, "head", (x * 2).sum())
    loss.backward()
    time.sleep(0.1)
    wall.after_backward(None, "head")
    assert 0.02 <= wall.seconds < 0.07
    assert torch.equal(x.grad, torch.full((64,), 2.0))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss = _Windows().before_backward(None, "head", (x * 3).sum())
        loss.backward()
        time.sleep(0.1)
    windows = [e for e in prof.events() if e.name == "imbsam_bench::backward"]
    assert len(windows) == 1 and 20e3 <= windows[0].cpu_time_total < 70e3  # microseconds


_BOUND_SKIPS = {
    "bound_no_batchnorm": ["BatchNormStats.snapshot", "BatchNormStats.record", "BatchNormStats.replay",
                           "BatchNormStats.freeze_running_stats"],
    "bound_no_snapshot": ["BatchNormStats.snapshot"],
    "bound_no_record": ["BatchNormStats.record"],
    "bound_no_tail_contexts": ["BatchNormStats.replay", "BatchNormStats.freeze_running_stats"],
    "bound_no_layout_checks": ["ExtBook.take", "_KeptPlan.holds", "BatchNormStats.buffers",
                               "BatchNormStats._layer_plan", "_FlatStats.gather"],
}


@pytest.mark.parametrize("name", sorted(_BOUND_SKIPS))
def test_each_bound_patch_skips_what_it_names_and_its_arm_still_steps(name, monkeypatch):
    """A bound's arm B must leave out the calls its docstring names (after the warm-up it may need) while an
    unpatched arm makes every one of them at every tail step, and both arms must keep stepping."""
    from imbsam_fast import fused_sgd
    from imbsam_fast.apps.bench.step_time import cifar100_lt_batches, make_steppers
    from imbsam_fast.backends import ext_book
    from imbsam_fast.backends.ext_book import book_available
    from imbsam_fast.batchnorm import BatchNormStats, _FlatStats

    if name == "bound_no_layout_checks" and not book_available():
        pytest.skip("the layout-check bound patches the C++ extension's ParamBook, which is not built")
    owners = {"BatchNormStats": BatchNormStats, "_FlatStats": _FlatStats, "ExtBook": ext_book.ExtBook,
              "_KeptPlan": fused_sgd._KeptPlan}
    calls: collections.Counter = collections.Counter()
    for qualname in _BOUND_SKIPS[name]:
        owner, attr = qualname.split(".")
        real = getattr(owners[owner], attr)

        def counted(self, *args, _real=real, _name=qualname, **kwargs):
            calls[_name, id(self)] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(owners[owner], attr, counted)
    data, mask = cifar100_lt_batches(60, 16, 20, torch.device("cpu"), 1)
    tail_batches = [(x[:, :, :8, :8], y) for x, y in data if int(mask[y].sum()) > 0][:6]
    assert len(tail_batches) == 6
    arms = []
    for _ in range(2):
        step, opts = make_steppers(torch.device("cpu"), mask, methods=["fast"], width=1)
        arms.append((opts["fast"], step.models["fast"]))
    (arm_a, _), (arm_b, model_b) = arms
    if name == "bound_no_layout_checks":
        from imbsam_fast import optimizer
        monkeypatch.setattr(optimizer, "kept_plan", optimizer.kept_plan)  # the patch replaces it: undone after
    benchmark_script(f"patches/{name}", f"patch_{name}").patch(arm_b, model_b)

    def closure_of(model, x, y):
        def closure(index=None):
            out = model(x if index is None else x[index])
            return torch.nn.functional.cross_entropy(out, y if index is None else y[index], reduction="none")
        return closure

    for i, (x, y) in enumerate(tail_batches):
        if i == 3:
            calls.clear()
        for opt, model in arms:
            assert torch.isfinite(opt.step(closure_of(model, x, y), y).perturbed_tail)
    owned = {"BatchNormStats": lambda o: o._bn, "_FlatStats": lambda o: o._bn._flat, "ExtBook": lambda o: o._book,
             "_KeptPlan": lambda o: o._fused_plan}
    for qualname in _BOUND_SKIPS[name]:
        of = owned[qualname.split(".")[0]]
        assert of(arm_b) is not None, qualname  # else the count below would be of None's id
        assert calls[qualname, id(of(arm_a))] >= 3, qualname
        assert calls[qualname, id(of(arm_b))] == 0, qualname


def test_the_floor_patch_steps_through_the_book_alone_after_the_library_set_it_up(monkeypatch):
    """``floor_minimal_step``: arm B steps through the library until the book has its buckets and SGD plan,
    then only through its own few calls (the library's step is not entered), and its model keeps training:
    every weight moves and the gradients are cleared."""
    from imbsam_fast.apps.bench.step_time import cifar100_lt_batches, make_steppers
    from imbsam_fast.backends.ext_book import book_available
    from imbsam_fast.optimizer import ImbSAM

    if not book_available():
        pytest.skip("the floor calls the C++ extension's ParamBook, which is not built")
    entered = collections.Counter()
    real_step = ImbSAM._step

    def counted(self, *args, **kwargs):
        entered[id(self)] += 1
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(ImbSAM, "_step", counted)
    data, mask = cifar100_lt_batches(60, 16, 20, torch.device("cpu"), 1)
    tail_batches = [(x[:, :, :8, :8], y) for x, y in data if int(mask[y].sum()) > 0][:6]
    step, opts = make_steppers(torch.device("cpu"), mask, methods=["fast"], width=1)
    opt, model = opts["fast"], step.models["fast"]
    benchmark_script("patches/floor_minimal_step", "patch_floor").patch(opt, model)
    for i, (x, y) in enumerate(tail_batches):
        if i == 3:
            entered.clear()
            before = [p.detach().clone() for p in model.parameters()]

        def closure(index=None, x=x, y=y):
            out = model(x if index is None else x[index])
            return torch.nn.functional.cross_entropy(out, y if index is None else y[index], reduction="none")

        opt.step(closure, y)
    assert entered[id(opt)] == 0
    assert all(p.grad is None for p in model.parameters())
    assert sum(not torch.equal(a, p) for a, p in zip(before, model.parameters())) == len(before)
