"""Shared parts of the ensemble-family ops tests (replug, lsr, mixture, scorer): the backends to run,
their device, and checks."""
from __future__ import annotations

import pytest
import torch

from radit_fast._native import HAS_NATIVE, HAS_NATIVE_CUDA
from radit_fast.ops._dispatch import triton_available

from conftest import requires_cuda

GPU = [requires_cuda, pytest.mark.cuda, pytest.mark.skipif(not HAS_NATIVE_CUDA, reason="built without CUDA")]
IMPLS = [  # every backend runnable here
    "torch",
    pytest.param("cpu", marks=pytest.mark.skipif(not HAS_NATIVE, reason="native module not built")),
    pytest.param("triton", marks=pytest.mark.skipif(not triton_available(), reason="needs triton")),
    pytest.param("cuda", marks=GPU),
]


def dev(impl: str) -> str:
    """The device an ``impl`` runs on here."""
    return "cuda" if impl in ("cuda", "triton") and torch.cuda.is_available() else "cpu"


def assert_close(name, got, ref64, ref32, floor=0.0, rel=1e-5):
    """|got - ref64| <= 3 |ref32 - ref64| + floor + rel max(1, |ref64|): the error of the same formula in
    float32, plus ``floor`` (the float32 rounding of the inputs' magnitude); infinities must match exactly."""
    got, ref64, ref32 = got.detach().cpu().double(), ref64.double(), ref32.detach().cpu().double()
    assert not torch.isnan(got).any(), f"{name}: NaN at {torch.isnan(got).nonzero()[:5].tolist()}"
    inf = torch.isinf(ref64)
    assert torch.equal(got[inf], ref64[inf]), f"{name}: infinities differ"
    fin = ~inf
    err = (got[fin] - ref64[fin]).abs()
    bound = 3 * (ref32[fin] - ref64[fin]).abs().nan_to_num(0.0) + floor + rel * ref64[fin].abs().clamp(min=1.0)
    bad = (err > bound).nonzero()[:, 0]
    assert bad.numel() == 0, (f"{name}: {bad.numel()} mismatches, first: got {got[fin][bad[:5]].tolist()} "
                              f"ref {ref64[fin][bad[:5]].tolist()} bound {bound[bad[:5]].tolist()}")


def compiled_matches_eager(loss_fn, x, params):
    """fullgraph torch.compile (aot_eager: the custom op's fake implementation and the autograd Function are
    traced) gives the eager loss and parameter gradients."""
    eager = loss_fn(x)
    eager_grads = torch.autograd.grad(eager, params)
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    grads = torch.autograd.grad(out, params)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    for i, (g, e) in enumerate(zip(grads, eager_grads)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6, msg=lambda m, i=i: f"compiled grad {i}: {m}")
