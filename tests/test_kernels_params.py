"""Multi-tensor kernels (norm, perturb, restore) against the torch ops, through Triton's interpreter on CPU."""

import zlib

import pytest
import torch

from imbsam_fast.backends.buckets import Bucket
from imbsam_fast.backends.kernels import interpreting
from imbsam_fast.backends.torch_ops import TorchParamOps
from imbsam_fast.backends.triton_ops import TritonParamOps

pytestmark = pytest.mark.skipif(
    not (interpreting() or torch.cuda.is_available()), reason="needs TRITON_INTERPRET=1 or a CUDA device"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = {
    "odd": [1, 17, 0, 40_000, 3, 16_385],
    "one": [1],
    "empty": [0, 0],
    "many": [(i * 37) % 300 + 1 for i in range(300)],
}


def _tensors(sizes, dtype, gen, scale=1.0):
    return [(torch.randn(n, generator=gen) * scale).to(dtype).to(DEVICE) for n in sizes]


# Triton's interpreter rounds fp32 -> bf16 by truncation: one more bf16 ulp there.
EXTRA_ULP = {torch.bfloat16: 1.0 if interpreting() else 0.0}


def _ulp(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at each value of ``t`` (subnormals included)."""
    bits = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}[dtype]
    return torch.exp2(torch.floor(torch.log2(t.double().abs().clamp_min(torch.finfo(dtype).tiny))) - bits)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(SIZES))
def test_grad_norm_matches_float64(dtype, case):
    gen = torch.Generator().manual_seed(zlib.crc32(f'{case}{dtype}'.encode()))
    grads = _tensors(SIZES[case], dtype, gen)
    got = TritonParamOps().grad_norm([grads]).double().cpu()
    ref = torch.cat([g.double().flatten().cpu() for g in grads]).norm()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_grad_norm_is_deterministic_and_spans_buckets():
    gen = torch.Generator().manual_seed(1)
    a = _tensors(SIZES["odd"], torch.float32, gen)
    b = _tensors(SIZES["many"], torch.bfloat16, gen)
    ops = TritonParamOps()
    first = ops.grad_norm([a, b])
    assert all(torch.equal(first, ops.grad_norm([a, b])) for _ in range(3))
    ref = torch.cat([g.double().flatten().cpu() for g in a + b]).norm()
    torch.testing.assert_close(first.double().cpu(), ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(SIZES))
def test_perturb_and_restore_match_torch(dtype, case):
    gen = torch.Generator().manual_seed(zlib.crc32(f'{case}{dtype}perturb'.encode()))
    params = _tensors(SIZES[case], dtype, gen)
    grads = _tensors(SIZES[case], dtype, gen, scale=3.0)
    start = [p.clone() for p in params]
    twin = [p.clone() for p in params]
    backups = [torch.full_like(p, float("nan")) for p in params]  # poisoned: every element must be written
    norm = TritonParamOps().perturb_([Bucket(params, [g.clone() for g in grads], backups, 0.37)])
    ref_norm = torch.cat([g.double().flatten().cpu() for g in grads]).norm() if grads else torch.zeros(())
    torch.testing.assert_close(norm.double().cpu(), ref_norm.double(), rtol=1e-5, atol=1e-6)
    TorchParamOps().perturb_([Bucket(twin, [g.clone() for g in grads], [torch.empty_like(p) for p in twin], 0.37)])
    for p, s, b, g in zip(params, start, backups, grads):
        assert torch.equal(b, s)
        e = 0.37 / (ref_norm + 1e-16) * g.double()
        exact = s.double() + e
        # one rounding to the dtype, plus the fp32 norm's relative error on e
        tol = (1 + EXTRA_ULP.get(dtype, 0.0)) * _ulp(exact, dtype) + 2e-6 * e.abs() + 1e-30
        assert ((p.double() - exact).abs() <= tol).all(), "more than one ulp from the exact value"
    for p, q, s in zip(params, twin, start):
        # torch rounds e before adding it: an ulp of the larger operand, not of the result
        e = q.double() - s.double()
        big = torch.maximum(s.double().abs(), e.abs())
        tol = (2 + EXTRA_ULP.get(dtype, 0.0)) * _ulp(big, dtype) + 4e-6 * e.abs() + 1e-30
        assert ((p.double() - q.double()).abs() <= tol).all()
    TritonParamOps().restore_([Bucket(params, grads, backups, 0.37)])
    assert all(torch.equal(p, s) for p, s in zip(params, start))


def test_nan_and_inf_propagate_like_torch():
    gen = torch.Generator().manual_seed(3)
    for bad in (float("nan"), float("inf")):
        grads = _tensors([5, 70], torch.float32, gen)
        grads[1][13] = bad
        t_norm = TritonParamOps().grad_norm([grads])
        r_norm = TorchParamOps().grad_norm([grads])
        assert torch.equal(t_norm.isnan(), r_norm.isnan()) and torch.equal(t_norm.isinf(), r_norm.isinf())
        params = _tensors([5, 70], torch.float32, gen)
        twin = [p.clone() for p in params]
        backups = [torch.empty_like(p) for p in params]
        TritonParamOps().perturb_([Bucket(params, [g.clone() for g in grads], backups, 0.1)])
        TorchParamOps().perturb_([Bucket(twin, [g.clone() for g in grads], [torch.empty_like(p) for p in twin], 0.1)])
        for p, q in zip(params, twin):
            assert torch.equal(p.isnan(), q.isnan()) and torch.equal(p.isinf(), q.isinf())
        TritonParamOps().restore_([Bucket(params, grads, backups, 0.1)])
        assert all(torch.isfinite(p).all() for p in params)


def test_uncovered_tensors_fall_back_to_torch():
    gen = torch.Generator().manual_seed(4)
    ops = TritonParamOps()
    f64 = [torch.randn(9, generator=gen, dtype=torch.float64).to(DEVICE)]
    strided = [torch.randn(6, 4, generator=gen).to(DEVICE).t()]
    assert not ops.covers(f64) and not ops.covers(strided)
    for params in (f64, strided):
        grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(DEVICE) for p in params]
        twin = [p.clone() for p in params]
        start = [p.clone() for p in params]
        backups = [torch.empty_like(p) for p in params]
        ops.perturb_([Bucket(params, [g.clone() for g in grads], backups, 0.2)])
        TorchParamOps().perturb_([Bucket(twin, [g.clone() for g in grads], [torch.empty_like(p) for p in twin], 0.2)])
        torch.testing.assert_close(params, twin)
        assert not torch.equal(params[0], start[0])
        ops.restore_([Bucket(params, grads, backups, 0.2)])
        assert torch.equal(params[0], start[0])


def test_pointer_tables_are_cached_and_rebuilt_when_storage_moves():
    ops = TritonParamOps()
    gen = torch.Generator().manual_seed(5)
    params = _tensors([10, 20], torch.float32, gen)
    backups = [torch.empty_like(p) for p in params]
    grads = _tensors([10, 20], torch.float32, gen)
    ops.perturb_([Bucket(params, grads, backups, 0.1)])
    ops.restore_([Bucket(params, grads, backups, 0.1)])
    cached = len(ops._tables._cache)
    ops.restore_([Bucket(params, grads, backups, 0.1)])
    assert len(ops._tables._cache) == cached  # same storage: reused
    moved = [p.clone() for p in params]
    ops.restore_([Bucket(moved, grads, backups, 0.1)])
    assert len(ops._tables._cache) == cached + 1
    assert all(torch.equal(m, b) for m, b in zip(moved, backups))


def test_misaligned_views_take_the_unaligned_path_correctly():
    gen = torch.Generator().manual_seed(6)
    params = [torch.randn(5000, generator=gen).to(DEVICE)[1:], torch.randn(300, generator=gen).to(DEVICE)[3:]]
    grads = [torch.randn(5001, generator=gen).to(DEVICE)[2:], torch.randn(297, generator=gen).to(DEVICE)]
    assert params[0].data_ptr() % 16 != 0
    twin = [p.clone() for p in params]
    start = [p.clone() for p in params]
    backups = [torch.empty_like(p) for p in params]
    ops = TritonParamOps()
    ops.perturb_([Bucket(params, [g.clone() for g in grads], backups, 0.5)])
    TorchParamOps().perturb_([Bucket(twin, [g.clone() for g in grads], [torch.empty_like(p) for p in twin], 0.5)])
    torch.testing.assert_close(params, twin)
    assert not any(torch.equal(p, s) for p, s in zip(params, start))
    ops.restore_([Bucket(params, grads, backups, 0.5)])
    assert all(torch.equal(p, s) for p, s in zip(params, start))
