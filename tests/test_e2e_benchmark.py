"""benchmarks/e2e_throughput.py runs end to end (eager rows on the CPU; the graphed rows run on a GPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "e2e_throughput.py"


def load():
    spec = importlib.util.spec_from_file_location("e2e_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_method_trains_and_reports_a_rate():
    e2e = load()
    rows = e2e.run([("resnet32", 8)], ["fp32", "bf16"], batches=2, warmup=1, device=torch.device("cpu"))
    assert [(r["dtype"], r["method"]) for r in rows] == [
        ("fp32", "sgd"), ("fp32", "public"), ("fp32", "exact"), ("fp32", "fast"),
        ("bf16", "sgd"), ("bf16", "exact"), ("bf16", "fast")]
    assert all(r["images_per_s"] > 0 and r["run"] == "eager" for r in rows)
    lines = e2e.report(rows)
    assert len(lines) == 1 + len(rows) and "1.00x" in lines[2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphed_rows_run_on_a_gpu():
    e2e = load()
    rows = e2e.run([("resnet32", 16)], ["bf16"], batches=3, warmup=1, device=torch.device("cuda"),
                   methods=("sgd", "exact", "fast"))
    assert sorted((r["method"], r["run"]) for r in rows) == sorted(
        (m, run) for m in ("sgd", "exact", "fast") for run in ("eager", "graphed"))
    assert any("graphed fast step / graphed SGD step" in line for line in e2e.report(rows))
