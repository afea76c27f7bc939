"""mixture_logprobs against a float64 formula on every backend runnable here, closed-form gradient,
hypothesis properties, gradcheck and error cases."""
from __future__ import annotations

import doctest

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import radit_fast.ops.mixture as mixture_mod
from radit_fast._native import HAS_NATIVE
from radit_fast.ops.mixture import mixture_logprobs

from _ops_checks import GPU, IMPLS, compiled_matches_eager, dev

INF = float("inf")
EPS32 = torch.finfo(torch.float32).eps
HYP = settings(max_examples=10, deadline=None, derandomize=True)


def ref_mixture(x, w, g, dtype=torch.float64):
    """log(sum_i exp(w_i) softmax(x_i)) in ``dtype`` (chunks with w = -inf left out) and its gradients."""
    x = x.detach().cpu().to(dtype).requires_grad_()
    w = w.detach().cpu().to(dtype).requires_grad_()
    rows = []
    for b in range(x.shape[0]):
        keep = (w[b] != -INF).nonzero()[:, 0]
        rows.append(torch.logsumexp(w[b, keep, None] + torch.log_softmax(x[b, keep], -1), 0))
    out = torch.stack(rows)
    (out * g.cpu().to(dtype)).sum().backward()
    gx = torch.zeros_like(x) if x.grad is None else x.grad
    return out.detach(), gx, w.grad


def assert_close(name, got, ref64, ref32, floor=0.0, rel=1e-5):
    got, ref64, ref32 = got.detach().cpu().double(), ref64.double(), ref32.detach().cpu().double()
    assert not torch.isnan(got).any(), f"{name}: NaN at {torch.isnan(got).nonzero()[:5].tolist()}"
    err = (got - ref64).abs()
    bound = 3 * (ref32 - ref64).abs() + floor + rel * ref64.abs().clamp(min=1.0)
    bad = (err > bound).nonzero()
    assert bad.shape[0] == 0, (f"{name}: {bad.shape[0]} mismatches at {bad[:5].tolist()}: got "
                               f"{got[tuple(bad[:5].t())].tolist()} ref {ref64[tuple(bad[:5].t())].tolist()}")


def make_case(B, k, V, seed, dtype=torch.float32, drop=False):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, k, V, generator=gen) * 4).to(dtype)
    w = torch.log_softmax(torch.randn(B, k, generator=gen) * 2, -1).to(dtype)
    if drop:
        w[0, 0] = -INF
    return x, w


def run(impl, x, w, g):
    d = dev(impl)
    x = x.detach().to(d).clone().requires_grad_()
    w = w.detach().to(d).clone().requires_grad_()
    out = mixture_logprobs(x, w, impl=impl)
    (out * g.to(d, out.dtype)).sum().backward()
    return out, x.grad, w.grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B,k,V", [(3, 10, 37), (2, 3, 1500), (1, 1, 5)])
def test_matches_float64(impl, B, k, V):
    x, w = make_case(B, k, V, seed=B * V, drop=k > 1)
    g = torch.randn(B, V, generator=torch.Generator().manual_seed(1))
    out, gx, gw = run(impl, x, w, g)
    assert out.shape == (B, V) and out.dtype == torch.float32
    r64, r32 = ref_mixture(x, w, g), ref_mixture(x, w, g, torch.float32)
    mag = 8 * EPS32 * (1 + x.abs().max().item() + w[w != -INF].abs().max().item())
    assert_close(f"{impl} out", out, r64[0], r32[0], mag)
    assert_close(f"{impl} grad_logits", gx, r64[1], r32[1], mag)
    assert_close(f"{impl} grad_log_weights", gw, r64[2], r32[2], mag * V ** 0.5)
    if k > 1:
        assert (gx[0, 0] == 0).all() and gw[0, 0] == 0  # a dropped chunk gets no gradient


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits(impl, dtype):
    x, w = make_case(2, 4, 300, seed=5, dtype=dtype)
    g = torch.ones(2, 300)
    out, gx, _ = run(impl, x, w, g)
    assert out.dtype == torch.float32 and gx.dtype == dtype
    r64, r32 = ref_mixture(x, w, g), ref_mixture(x, w, g, torch.float32)
    assert_close(f"{impl} out", out, r64[0], r32[0], 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_infinite_entries(impl):
    """-inf logits (banned tokens), a row with every chunk dropped: -inf values, no NaN anywhere."""
    x, w = make_case(2, 3, 8, seed=2)
    x[:, :, 0] = -INF  # token 0 banned in every chunk
    x[0, 1, 3] = -INF  # token 3 banned in chunk 1 only
    w[1] = -INF
    out, gx, gw = run(impl, x, w, torch.ones(2, 8))
    out, gx, gw = out.detach().cpu(), gx.cpu(), gw.cpu()
    for t in (out, gx, gw):
        assert not torch.isnan(t).any()
    assert (out[:, 0] == -INF).all() and (out[1] == -INF).all() and (gx[1] == 0).all() and (gw[1] == 0).all()
    r64 = ref_mixture(x[:1, :, 1:], w[:1], torch.ones(1, 7))
    torch.testing.assert_close(out[:1, 1:].double(), r64[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@HYP
@given(B=st.integers(1, 3), k=st.integers(1, 6), V=st.integers(1, 70), seed=st.integers(0, 10_000))
def test_properties(impl, B, k, V, seed):
    x, w = make_case(B, k, V, seed)
    out, _, gw = run(impl, x, w, torch.ones(B, V))
    out = out.detach().cpu()
    # Normalised weights give a normalised distribution; d sum_v p_v / d w_i = weight_i.
    torch.testing.assert_close(out.double().exp().sum(-1), torch.ones(B, dtype=torch.float64), atol=1e-5, rtol=0)
    # Invariance under a permutation of the k chunks.
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    out2, _, gw2 = run(impl, x[:, perm], w[:, perm], torch.ones(B, V))
    torch.testing.assert_close(out2.detach().cpu(), out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw2.cpu(), gw.cpu()[:, perm], atol=1e-4, rtol=1e-4)
    # A -inf weight drops a chunk exactly as removing it.
    if k > 1:
        w3 = w.clone()
        w3[:, -1] = -INF
        out3, gx3, _ = run(impl, x, w3, torch.ones(B, V))
        out4, _, _ = run(impl, x[:, :-1], w3[:, :-1], torch.ones(B, V))
        torch.testing.assert_close(out3.detach().cpu(), out4.detach().cpu(), atol=1e-5, rtol=1e-5)
        assert (gx3.cpu()[:, -1] == 0).all()


def test_gradcheck_torch_float64():
    x, w = make_case(2, 3, 6, seed=4, dtype=torch.float64)
    x.requires_grad_()
    w.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: mixture_logprobs(a, b, impl="torch"), (x, w))


@pytest.mark.skipif(not HAS_NATIVE, reason="native module not built")
def test_closed_form_backward_gradcheck():
    """The closed-form backward of the kernel path, checked numerically in float32 at loose tolerance."""
    x, w = make_case(1, 3, 5, seed=9)
    x.requires_grad_()
    w.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: mixture_logprobs(a, b, impl="cpu"), (x, w), eps=1e-2,
                                    atol=2e-2, rtol=2e-2, fast_mode=True)


@pytest.mark.parametrize("impl", ["torch", pytest.param("cpu", marks=pytest.mark.skipif(not HAS_NATIVE,
                                                                                        reason="no native"))])
def test_errors(impl):
    x, w = make_case(2, 3, 4, seed=0)
    with pytest.raises(ValueError, match=r"logits must be a floating tensor of shape \[B, k, V\]"):
        mixture_logprobs(x[0], w, impl=impl)
    with pytest.raises(ValueError, match=r"log_weights must have shape \[B, k\] = \[2, 3\]"):
        mixture_logprobs(x, w[:, :2], impl=impl)
    with pytest.raises(ValueError, match="is on meta"):
        mixture_logprobs(x, w.to("meta"), impl=impl)
    with pytest.raises(ValueError, match="k >= 1 and V >= 1"):
        mixture_logprobs(x[:, :, :0], w, impl=impl)


# ---- torch.library / torch.compile ----
@pytest.mark.skipif(not HAS_NATIVE, reason="native module not built")
def test_opcheck_custom_op():
    x, w = make_case(3, 4, 37, seed=7, drop=True)
    torch.library.opcheck(torch.ops.radit.mixture_logprobs_fwd.default, (x, w, "cpu"))


@pytest.mark.skipif(not HAS_NATIVE, reason="native module not built")
def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    lm_head, prior = torch.nn.Linear(6, 4 * 30), torch.nn.Linear(6, 4)
    x = torch.randn(3, 6)
    target = torch.randint(0, 30, (3,))

    def loss_fn(x):
        logits = lm_head(x).view(3, 4, 30)
        out = mixture_logprobs(logits, torch.log_softmax(prior(x), -1), impl="cpu")
        return -out.gather(1, target[:, None]).sum()

    compiled_matches_eager(loss_fn, x, list(lm_head.parameters()) + list(prior.parameters()))


def test_docstring_examples():
    result = doctest.testmod(mixture_mod, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0, result  # 0 attempted: the examples were not found


@pytest.mark.parametrize("shape", [pytest.param((1, 10, 50000), marks=GPU), pytest.param((7000, 10, 16), marks=GPU)])
def test_cuda_decode_sizes_and_many_rows(shape):
    # Decode size (one query: the vocabulary is split over many blocks, then merged) and more than 65535 [b, i]
    # rows (several launches of the split pass), on a strided view of the logits, against the float64 formula.
    B, k, V = shape
    x, w = make_case(B, 2 * k, V, seed=V, drop=True)
    x, w = x[:, ::2], w[:, ::2]  # stride(1) = 2 V: not contiguous
    out = mixture_logprobs(x.cuda(), w.cuda(), impl="cuda").cpu()
    ref = torch.logsumexp(w.double()[..., None] + torch.log_softmax(x.double(), -1), 1)
    err = (out.double() - ref).abs()
    assert torch.isfinite(out).all() and err.max().item() < 1e-4 * (1 + ref.abs().max().item())
    again = mixture_logprobs(x.cuda(), w.cuda(), impl="cuda").cpu()
    assert torch.equal(out, again), "the split merge runs in a fixed order: same bits on every run"


@pytest.mark.parametrize("_", [pytest.param(0, marks=GPU)])
def test_cuda_device_guard(_):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    x, w = make_case(2, 3, 700, seed=3)
    with torch.cuda.device(0):
        out = mixture_logprobs(x.to("cuda:1"), w.to("cuda:1"), impl="cuda")
    assert out.device == torch.device("cuda:1")
    torch.testing.assert_close(out.cpu(), mixture_logprobs(x, w, impl="torch").float(), rtol=1e-5, atol=1e-5)
