"""replug_logprob against a float64 per-row formula on every backend runnable here (torch, cpu, Triton
interpreter; cuda when a GPU exists), plus hypothesis properties, gradcheck and error cases."""
from __future__ import annotations

import doctest
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import radit_fast.ops.replug as replug_mod
from radit_fast._native import HAS_NATIVE
from radit_fast.ops.replug import replug_logprob

from _ops_checks import GPU, IMPLS, assert_close, compiled_matches_eager, dev

INF = float("inf")
HYP = settings(max_examples=12, deadline=None, derandomize=True)


def ref_replug(lm, s, t, mask, dtype=torch.float64):
    """Per-row formula in ``dtype``: (out [B], d/dlm [B, k], d/ds [B, k]) by autograd; masked grads 0."""
    lm = lm.detach().cpu().to(dtype).requires_grad_()
    s = s.detach().cpu().to(dtype).requires_grad_()
    mask = torch.ones(lm.shape, dtype=torch.bool) if mask is None else mask.cpu()
    outs = []
    for b in range(lm.shape[0]):
        idx = mask[b].nonzero()[:, 0]
        outs.append(torch.logsumexp(torch.log_softmax(s[b, idx] / t, 0) + lm[b, idx], 0))
    out = torch.stack(outs)
    g = torch.linspace(0.5, 1.5, len(outs), dtype=dtype)
    (out * g).sum().backward()
    return out.detach(), lm.grad, s.grad


EPS32 = torch.finfo(torch.float32).eps


def make_case(B, k, scale_s, scale_lm, seed, masked, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, k, generator=gen) * scale_s).to(dtype)
    lm = (-torch.rand(B, k, generator=gen) * scale_lm).to(dtype)
    mask = None
    if masked:
        mask = torch.rand(B, k, generator=gen) > 0.4
        mask[torch.arange(B), torch.randint(0, k, (B,), generator=gen)] = True
    return lm, s, mask


def run(impl, lm, s, t, mask):
    d = dev(impl)
    lm = lm.detach().to(d).clone().requires_grad_()
    s = s.detach().to(d).clone().requires_grad_()
    out = replug_logprob(lm, s, temperature=t, mask=None if mask is None else mask.to(d), impl=impl)
    g = torch.linspace(0.5, 1.5, out.shape[0], dtype=out.dtype, device=d)
    (out * g).sum().backward()
    return out, lm.grad, s.grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("t,scale_s,scale_lm", [(1.0, 2.0, 20.0), (0.1, 5.0, 50.0), (1e-3, 300.0, 1e4),
                                                (10.0, 100.0, 5.0)])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_float64(impl, t, scale_s, scale_lm, masked):
    lm, s, mask = make_case(37, 10, scale_s, scale_lm, seed=int(t * 1000) + masked, masked=masked)
    out, g_lm, g_s = run(impl, lm, s, t, mask)
    r64, r32 = ref_replug(lm, s, t, mask), ref_replug(lm, s, t, mask, torch.float32)
    mag = 8 * EPS32 * (1 + (s / t).abs().max().item() + lm.abs().max().item())
    for name, got, a, b, floor in zip(("out", "grad_lm", "grad_scores"), (out, g_lm, g_s), r64, r32,
                                      (mag, 2 * mag, 2 * mag / t)):
        assert_close(f"{impl} {name}", got, a, b, floor)
    if mask is not None:
        assert (g_lm.cpu()[~mask] == 0).all() and (g_s.cpu()[~mask] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(impl, dtype):
    lm, s, mask = make_case(9, 7, 3.0, 10.0, seed=3, masked=True, dtype=dtype)
    out, g_lm, g_s = run(impl, lm, s, 0.5, mask)
    assert out.dtype == (torch.float32) and g_lm.dtype == dtype and g_s.dtype == dtype
    r64, r32 = ref_replug(lm, s, 0.5, mask), ref_replug(lm, s, 0.5, mask, torch.float32)
    assert_close(f"{impl} out", out, r64[0], r32[0])
    torch.testing.assert_close(g_s.cpu().double(), r64[2], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("impl", IMPLS)
def test_extreme_and_infinite_entries(impl):
    """-inf log-likelihoods and scores, a row without any finite joint term: no NaN, exact -inf."""
    lm = torch.tensor([[-1e4, -INF, -2.0, -3.0], [-INF, -INF, -INF, -INF], [-5.0, -1.0, -INF, -7.0]])
    s = torch.tensor([[300.0, 200.0, -INF, 299.0], [1.0, 2.0, 3.0, 4.0], [-INF, -INF, 0.0, -INF]])
    mask = torch.tensor([[True, True, True, True], [True, False, True, True], [True, True, True, False]])
    out, g_lm, g_s = run(impl, lm, s, 1e-3, mask)
    out, g_lm, g_s = out.cpu(), g_lm.cpu(), g_s.cpu()
    for x in (out, g_lm, g_s):
        assert not torch.isnan(x).any()
    assert out[1] == -INF and out[2] == -INF  # no chunk with both prior mass and a finite likelihood
    assert (g_lm[1:] == 0).all() and (g_s[1:] == 0).all()
    r64 = ref_replug(lm[:1], s[:1], 1e-3, mask[:1])
    torch.testing.assert_close(out[:1].double(), r64[0])
    torch.testing.assert_close(g_lm[:1].double(), r64[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_inputs_and_empty_batch(impl):
    lm, s, _ = make_case(6, 20, 2.0, 10.0, seed=5, masked=False)
    lm_v, s_v = lm[:, ::2], s.t().contiguous().t()[:, 1::2]  # non-contiguous views
    out, _, g_s = run(impl, lm_v, s_v, 0.7, None)
    r64, r32 = ref_replug(lm_v, s_v, 0.7, None), ref_replug(lm_v, s_v, 0.7, None, torch.float32)
    assert_close("strided out", out, r64[0], r32[0])
    assert_close("strided grad", g_s, r64[2], r32[2])
    empty = replug_logprob(torch.zeros(0, 4, device=dev(impl)), torch.zeros(0, 4, device=dev(impl)), impl=impl)
    assert empty.shape == (0,)


@pytest.mark.parametrize("impl", IMPLS)
@HYP
@given(B=st.integers(1, 5), k=st.integers(1, 12), seed=st.integers(0, 10_000),
       t=st.sampled_from([1e-3, 0.05, 1.0, 7.0]))
def test_properties(impl, B, k, seed, t):
    lm, s, mask = make_case(B, k, 4.0, 30.0, seed, masked=True)
    out, g_lm, g_s = run(impl, lm, s, t, mask)
    out, g_lm, g_s = out.detach().cpu(), g_lm.cpu(), g_s.cpu()
    w = torch.linspace(0.5, 1.5, B).unsqueeze(1)
    # The posterior (d out / d lm) sums to 1 over present chunks; d out / d s sums to 0 (shift invariance).
    torch.testing.assert_close((g_lm / w).sum(1), torch.ones(B), atol=1e-4, rtol=0)
    assert ((g_s * t).sum(1).abs() <= 1e-4 * w[:, 0] * (1 + (g_s * t).abs().sum(1))).all()
    assert (g_lm[~mask] == 0).all() and (g_s[~mask] == 0).all()
    # A weighted average in probability space lies between the smallest and the largest likelihood.
    lo = torch.where(mask, lm, torch.full_like(lm, INF)).min(1).values
    hi = torch.where(mask, lm, torch.full_like(lm, -INF)).max(1).values
    assert (out >= lo - 1e-3 * (1 + lo.abs())).all() and (out <= hi + 1e-3 * (1 + hi.abs())).all()
    # Masked chunks have no influence.
    noise = torch.randn(B, k) * 100
    out2, _, _ = run(impl, torch.where(mask, lm, noise - 50), torch.where(mask, s, noise), t, mask)
    assert torch.equal(out, out2.detach().cpu())
    # Invariance under a permutation of the k chunks.
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    out3, _, g_s3 = run(impl, lm[:, perm], s[:, perm], t, mask[:, perm])
    torch.testing.assert_close(out3.detach().cpu(), out, atol=1e-5 * (1 + out.abs().max().item()), rtol=1e-5)
    torch.testing.assert_close(g_s3.cpu(), g_s[:, perm], atol=1e-4 * (1 + g_s.abs().max().item()), rtol=1e-4)


def test_gradcheck_torch_float64():
    lm, s, mask = make_case(4, 6, 2.0, 5.0, seed=11, masked=True, dtype=torch.float64)
    lm.requires_grad_()
    s.requires_grad_()
    for t in (0.3, 1.0):
        assert torch.autograd.gradcheck(lambda a, b: replug_logprob(a, b, temperature=t, mask=mask, impl="torch"),
                                        (lm, s))


def test_native_paths_reject_float64_and_auto_routes_it_to_torch():
    lm, s, _ = make_case(3, 4, 1.0, 1.0, seed=1, masked=False, dtype=torch.float64)
    assert replug_logprob(lm, s).dtype == torch.float64
    if HAS_NATIVE:
        with pytest.raises(ValueError, match="float64"):
            replug_logprob(lm, s, impl="cpu")


@pytest.mark.parametrize("impl", ["torch", pytest.param("cpu", marks=pytest.mark.skipif(not HAS_NATIVE,
                                                                                        reason="no native"))])
def test_errors(impl):
    lm, s, _ = make_case(2, 3, 1.0, 1.0, seed=0, masked=False)
    with pytest.raises(ValueError, match="mask row 1 has no present chunk"):
        replug_logprob(lm, s, mask=torch.tensor([[True, False, False], [False, False, False]]), impl=impl)
    for t in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            replug_logprob(lm, s, temperature=t, impl=impl)
    with pytest.raises(ValueError, match=r"retriever_scores must have shape \[B, k\] = \[2, 3\]"):
        replug_logprob(lm, s[:, :2], impl=impl)
    with pytest.raises(ValueError, match=r"lm_logprobs must have shape \[B, k\]"):
        replug_logprob(lm[0], s, impl=impl)
    with pytest.raises(ValueError, match="mask must have shape"):
        replug_logprob(lm, s, mask=torch.ones(2, 4, dtype=torch.bool), impl=impl)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        replug_logprob(lm, s, mask=torch.ones(2, 3), impl=impl)
    with pytest.raises(ValueError, match="is on meta"):
        replug_logprob(lm, s.to("meta"), impl=impl)
    with pytest.raises(ValueError, match="impl must be one of"):
        replug_logprob(lm, s, impl="fast")


@pytest.mark.skipif(not HAS_NATIVE, reason="native module not built")
def test_native_entry_point_checks():
    from radit_fast._native import _C, tensor_arg

    lm = torch.zeros(2, 3)
    out = torch.empty(2)
    arg, none = tensor_arg(lm), None
    with pytest.raises(ValueError, match="temperature must be a finite positive number"):
        _C.replug_forward_cpu(arg, arg, none, 0.0, tensor_arg(out), none, none)
    with pytest.raises(ValueError, match="k \\(chunks per query\\) must be >= 1"):
        _C.replug_forward_cpu(tensor_arg(lm[:, :0]), arg, none, 1.0, tensor_arg(out), none, none)
    with pytest.raises(ValueError, match=r"lm_logprobs must be float32 \| bfloat16 \| float16, got int64"):
        _C.replug_forward_cpu(tensor_arg(lm.long()), arg, none, 1.0, tensor_arg(out), none, none)
    with pytest.raises(ValueError, match=r"retriever_scores dimension 1 must be 3, got float32 \[2, 4\]"):
        _C.replug_forward_cpu(arg, tensor_arg(torch.zeros(2, 4)), none, 1.0, tensor_arg(out), none, none)
    with pytest.raises(ValueError, match="out dimension 0 must be 2"):
        _C.replug_forward_cpu(arg, arg, none, 1.0, tensor_arg(out[:1]), none, none)
    with pytest.raises(ValueError, match="grad_lm and grad_scores: give both"):
        _C.replug_forward_cpu(arg, arg, none, 1.0, tensor_arg(out), tensor_arg(torch.empty(2, 3)), none)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    with pytest.raises(ValueError, match="mask row 1 has no present chunk"):
        _C.replug_forward_cpu(arg, arg, tensor_arg(mask), 1.0, tensor_arg(out), none, none)


# ---- torch.library / torch.compile ----
@pytest.mark.skipif(not HAS_NATIVE, reason="native module not built")
def test_opcheck_custom_op():
    lm, s, mask = make_case(5, 4, 2.0, 3.0, seed=7, masked=True)
    torch.library.opcheck(torch.ops.radit.replug_logprob_fwd.default, (lm, s, 0.7, mask, "cpu", True))
    torch.library.opcheck(torch.ops.radit.replug_logprob_fwd.default, (lm, s, 1.0, None, "cpu", False))


@pytest.mark.skipif(not HAS_NATIVE, reason="native module not built")
def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    encoder, lm_head = torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)
    x = torch.randn(5, 6)
    mask = torch.tensor([[True, True, False, True]] * 3 + [[False, True, True, True]] * 2)

    def loss_fn(x):
        lm = -torch.nn.functional.softplus(lm_head(x))  # answer log-likelihoods <= 0
        return -replug_logprob(lm, encoder(x), temperature=0.5, mask=mask, impl="cpu").sum()

    compiled_matches_eager(loss_fn, x, list(encoder.parameters()) + list(lm_head.parameters()))


def test_docstring_examples():
    result = doctest.testmod(replug_mod, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0, result  # 0 attempted: the examples were not found


@pytest.mark.parametrize("_", [pytest.param(0, marks=GPU)])
def test_cuda_many_rows_and_empty_mask_row(_, monkeypatch):
    # More than 65535 queries (grid in x, no 65535 limit) against the CPU kernel; an all-False mask row gives
    # -inf with zero gradient without a host sync, and the ValueError under RADIT_DEBUG_CHECKS=1.
    lm, s, mask = make_case(70000, 5, 1.0, 3.0, seed=4, masked=True)
    want = replug_logprob(lm, s, mask=mask, impl="cpu")
    got = replug_logprob(lm.cuda(), s.cuda(), mask=mask.cuda(), impl="cuda").cpu()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    mask[1] = False
    lm_c = lm[:4].cuda().requires_grad_()
    out = replug_logprob(lm_c, s[:4].cuda(), mask=mask[:4].cuda(), impl="cuda")
    out.sum().backward()
    assert out[1].item() == -INF and (lm_c.grad[1] == 0).all()
    monkeypatch.setenv("RADIT_DEBUG_CHECKS", "1")
    with pytest.raises(ValueError, match="mask row 1 has no present chunk"):
        replug_logprob(lm[:4].cuda(), s[:4].cuda(), mask=mask[:4].cuda(), impl="cuda")
