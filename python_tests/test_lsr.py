"""lsr_loss (both KL directions, all reductions) and lsr_scores against float64 formulas on every backend
runnable here, plus hypothesis properties, gradcheck and error cases."""
from __future__ import annotations

import doctest

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import radit_fast.ops.lsr as lsr_mod
from radit_fast._native import HAS_NATIVE
from radit_fast.ops.lsr import lsr_loss, lsr_scores

from _ops_checks import IMPLS, assert_close, compiled_matches_eager, dev

INF = float("inf")
EPS32 = torch.finfo(torch.float32).eps
DIRS = ["lsr_to_retriever", "retriever_to_lsr"]
HYP = settings(max_examples=12, deadline=None, derandomize=True)


def ref_lsr(s, t, tr, tl, mask, direction, dtype=torch.float64):
    """Per-row KL in ``dtype`` and its gradient w.r.t. s (upstream weights linspace(0.5, 1.5))."""
    s = s.detach().cpu().to(dtype).requires_grad_()
    t = t.detach().cpu().to(dtype)
    mask = torch.ones(s.shape, dtype=torch.bool) if mask is None else mask.cpu()
    rows = []
    for b in range(s.shape[0]):
        idx = mask[b].nonzero()[:, 0]
        log_p = torch.log_softmax(s[b, idx] / tr, 0)
        log_q = torch.log_softmax(t[b, idx] / tl, 0)
        if direction == "lsr_to_retriever":
            rows.append((log_q.exp() * (log_q - log_p)).sum())
        else:
            rows.append((log_p.exp() * (log_p - log_q)).sum())
    rows = torch.stack(rows)
    (rows * torch.linspace(0.5, 1.5, len(rows), dtype=dtype)).sum().backward()
    return rows.detach(), s.grad


def make_case(B, k, scale_s, seed, masked, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, k, generator=gen) * scale_s).to(dtype)
    t = (-torch.rand(B, k, generator=gen) * 3).to(dtype)  # mean answer log-probs
    mask = None
    if masked:
        mask = torch.rand(B, k, generator=gen) > 0.4
        mask[torch.arange(B), torch.randint(0, k, (B,), generator=gen)] = True
    return s, t, mask


def run(impl, s, t, tr, tl, mask, direction, reduction="none"):
    d = dev(impl)
    s = s.detach().to(d).clone().requires_grad_()
    loss = lsr_loss(s, t.to(d), retriever_temperature=tr, lm_temperature=tl,
                    mask=None if mask is None else mask.to(d), direction=direction, reduction=reduction, impl=impl)
    if reduction == "none":
        (loss * torch.linspace(0.5, 1.5, loss.shape[0], dtype=loss.dtype, device=d)).sum().backward()
    else:
        loss.backward()
    return loss, s.grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("direction", DIRS)
@pytest.mark.parametrize("tr,tl,scale_s", [(1.0, 0.01, 2.0), (0.1, 1.0, 3.0), (1e-3, 0.01, 0.05),
                                           (10.0, 0.1, 300.0)])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_float64(impl, direction, tr, tl, scale_s, masked):
    s, t, mask = make_case(29, 10, scale_s, seed=int(tr * 100) + masked, masked=masked)
    loss, g = run(impl, s, t, tr, tl, mask, direction)
    r64, r32 = ref_lsr(s, t, tr, tl, mask, direction), ref_lsr(s, t, tr, tl, mask, direction, torch.float32)
    mag = 8 * EPS32 * (1 + (s / tr).abs().max().item() + (t / tl).abs().max().item())
    assert_close(f"{impl} loss", loss, r64[0], r32[0], mag)
    assert_close(f"{impl} grad", g, r64[1], r32[1], 2 * mag / tr)
    if mask is not None:
        assert (g.cpu()[~mask] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_reductions(impl):
    s, t, mask = make_case(6, 5, 2.0, seed=7, masked=True)
    rows, g_rows = run(impl, s, t, 0.5, 0.1, mask, "lsr_to_retriever", "none")
    total, g_sum = run(impl, s, t, 0.5, 0.1, mask, "lsr_to_retriever", "sum")
    mean, g_mean = run(impl, s, t, 0.5, 0.1, mask, "lsr_to_retriever", "mean")
    assert rows.shape == (6,) and total.shape == () and mean.shape == ()
    torch.testing.assert_close(total, rows.detach().sum())
    torch.testing.assert_close(mean, rows.detach().mean())
    torch.testing.assert_close(g_mean, g_sum / 6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(impl, dtype):
    s, t, mask = make_case(9, 7, 2.0, seed=3, masked=True, dtype=dtype)
    loss, g = run(impl, s, t, 1.0, 0.1, mask, "retriever_to_lsr")
    assert loss.dtype == torch.float32 and g.dtype == dtype
    r64, r32 = ref_lsr(s, t, 1.0, 0.1, mask, "retriever_to_lsr"), ref_lsr(s, t, 1.0, 0.1, mask,
                                                                           "retriever_to_lsr", torch.float32)
    assert_close(f"{impl} loss", loss, r64[0], r32[0], 1e-5)
    torch.testing.assert_close(g.cpu().double(), r64[1], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("direction", DIRS)
def test_infinite_entries(impl, direction):
    """-inf LSR scores (zero target probability) and -inf retriever scores: +inf or finite KL, never NaN;
    a row with infinite KL gets zero gradient."""
    s = torch.tensor([[3.0, 1.0, 0.0, 2.0], [1.0, 2.0, 3.0, 4.0], [0.5, -INF, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    t = torch.tensor([[-1.0, -INF, -2.0, -1.5], [-INF, -INF, -INF, -INF], [-1.0, -2.0, -3.0, -1.0],
                      [-1e4, -1.0, -3.0, -2.0]])
    loss, g = run(impl, s, t, 1.0, 0.01, None, direction)
    loss, g = loss.detach().cpu(), g.cpu()
    assert not torch.isnan(loss).any() and not torch.isnan(g).any()
    if direction == "lsr_to_retriever":  # KL(q || p): q = 0 terms vanish; q > 0 where p = 0 is infinite
        assert torch.isfinite(loss[[0, 1, 3]]).all() and loss[2] == INF
        assert loss[1] == 0 and (g[1] == 0).all() and (g[2] == 0).all()
        log_p, log_q = torch.log_softmax(s[0].double(), 0), torch.log_softmax(t[0].double() / 0.01, 0)
        keep = [0, 2, 3]
        ref = (log_q[keep].exp() * (log_q[keep] - log_p[keep])).sum()
        torch.testing.assert_close(loss[0].double(), ref)
    else:  # KL(p || q): p > 0 where q = 0 is infinite
        assert loss[0] == INF and loss[1] == INF and torch.isfinite(loss[[2, 3]]).all()
        assert (g[:2] == 0).all()
        log_p, log_q = torch.log_softmax(s[2].double(), 0), torch.log_softmax(t[2].double() / 0.01, 0)
        keep = [0, 2, 3]
        ref = (log_p[keep].exp() * (log_p[keep] - log_q[keep])).sum()
        torch.testing.assert_close(loss[2].double(), ref)
        assert g[2, 1] == 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("direction", DIRS)
@HYP
@given(B=st.integers(1, 4), k=st.integers(1, 12), seed=st.integers(0, 10_000),
       tr=st.sampled_from([1e-3, 0.1, 1.0]), tl=st.sampled_from([0.01, 1.0]))
def test_properties(impl, direction, B, k, seed, tr, tl):
    s, t, mask = make_case(B, k, 3.0 * tr, seed, masked=True)  # z = s / tr spreads over a few units
    loss, g = run(impl, s, t, tr, tl, mask, direction)
    loss, g = loss.detach().cpu(), g.cpu()
    assert (loss >= -1e-5).all(), loss  # KL >= 0 (up to rounding)
    assert (g[~mask] == 0).all()
    # Shift invariance of the softmax: the gradient sums to 0 over each row.
    assert ((g * tr).sum(1).abs() <= 1e-4 * (1 + (g * tr).abs().sum(1))).all()
    # Equal distributions: zero loss and zero gradient.
    eq, g_eq = run(impl, s, s * (tl / tr), tr, tl, mask, direction)
    assert (eq.detach().cpu().abs() <= 1e-5).all() and (g_eq.cpu().abs() * tr <= 1e-5).all()
    # Masked chunks have no influence.
    noise = torch.randn(B, k) * 50
    loss2, _ = run(impl, torch.where(mask, s, noise), torch.where(mask, t, noise), tr, tl, mask, direction)
    assert torch.equal(loss2.detach().cpu(), loss)
    # Invariance under a permutation of the k chunks.
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    loss3, g3 = run(impl, s[:, perm], t[:, perm], tr, tl, mask[:, perm], direction)
    torch.testing.assert_close(loss3.detach().cpu(), loss, atol=1e-4 * (1 + loss.abs().max().item()), rtol=1e-4)
    torch.testing.assert_close(g3.cpu(), g[:, perm], atol=1e-4 * (1 + g.abs().max().item()), rtol=1e-4)


@pytest.mark.parametrize("direction", DIRS)
def test_gradcheck_torch_float64(direction):
    s, t, mask = make_case(4, 6, 2.0, seed=11, masked=True, dtype=torch.float64)
    s.requires_grad_()
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda x: lsr_loss(x, t, retriever_temperature=0.7, lm_temperature=0.5, mask=mask, direction=direction,
                               reduction=reduction, impl="torch"), (s,))


@pytest.mark.parametrize("impl", IMPLS)
def test_lm_scores_get_no_gradient(impl):
    s, t, _ = make_case(3, 4, 1.0, seed=2, masked=False)
    s, t = s.to(dev(impl)).requires_grad_(), t.to(dev(impl)).requires_grad_()
    lsr_loss(s, t, impl=impl).backward()
    assert t.grad is None and s.grad is not None


@pytest.mark.parametrize("impl", ["torch", pytest.param("cpu", marks=pytest.mark.skipif(not HAS_NATIVE,
                                                                                        reason="no native"))])
def test_errors(impl):
    s, t, _ = make_case(2, 3, 1.0, seed=0, masked=False)
    with pytest.raises(ValueError, match="mask row 0 has no present chunk"):
        lsr_loss(s, t, mask=torch.tensor([[False, False, False], [True, True, True]]), impl=impl)
    with pytest.raises(ValueError, match="lm_temperature must be a finite number > 0"):
        lsr_loss(s, t, lm_temperature=0.0, impl=impl)
    with pytest.raises(ValueError, match="retriever_temperature must be a finite number > 0"):
        lsr_loss(s, t, retriever_temperature=-2.0, impl=impl)
    with pytest.raises(ValueError, match="direction must be one of"):
        lsr_loss(s, t, direction="forward", impl=impl)
    with pytest.raises(ValueError, match="reduction must be one of"):
        lsr_loss(s, t, reduction="avg", impl=impl)
    with pytest.raises(ValueError, match=r"lm_scores must have shape \[B, k\] = \[2, 3\]"):
        lsr_loss(s, t[:1], impl=impl)
    with pytest.raises(ValueError, match="is on meta"):
        lsr_loss(s, t.to("meta"), impl=impl)


def test_lsr_scores_kinds_and_missing_chunks():
    totals = torch.tensor([[-6.0, -2.0, 0.0], [-1.0, -30.0, -4.0]])
    lengths = torch.tensor([[3, 1, 0], [1, 10, 2]])
    mean = lsr_scores(totals, lengths)
    torch.testing.assert_close(mean, torch.tensor([[-2.0, -2.0, -INF], [-1.0, -3.0, -2.0]]))
    torch.testing.assert_close(lsr_scores(totals, lengths, kind="sum"),
                               torch.tensor([[-6.0, -2.0, -INF], [-1.0, -30.0, -4.0]]))
    prob = lsr_scores(totals, lengths, kind="prob")
    torch.testing.assert_close(prob, torch.where(lengths > 0, totals.exp(), torch.tensor(-INF)))
    # Token log-probs [B, k, T] padded on the right: positions >= length are ignored, whatever they hold.
    tok = torch.full((2, 3, 10), 123.0)
    for b in range(2):
        for i in range(3):
            n = int(lengths[b, i])
            tok[b, i, :n] = totals[b, i] / max(n, 1)
    torch.testing.assert_close(lsr_scores(tok, lengths, kind="sum"), lsr_scores(totals, lengths, kind="sum"))
    # Missing chunks get zero LSR probability in the loss.
    s = torch.zeros(2, 3, requires_grad=True)
    loss = lsr_loss(s, mean, mask=lengths > 0, reduction="none", impl="torch")
    assert torch.isfinite(loss).all()


def test_lsr_scores_errors():
    with pytest.raises(ValueError, match="kind must be one of"):
        lsr_scores(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.long), kind="max")
    with pytest.raises(ValueError, match="lengths must be an integer tensor"):
        lsr_scores(torch.zeros(1, 2), torch.ones(1, 2))
    with pytest.raises(ValueError, match=r"logprobs must have shape \[B, k\] = \[1, 2\]"):
        lsr_scores(torch.zeros(1, 3), torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token logprobs must have shape \[B, k, T\]"):
        lsr_scores(torch.zeros(2, 2, 4), torch.ones(1, 2, dtype=torch.long))


# ---- torch.library / torch.compile ----
@pytest.mark.skipif(not HAS_NATIVE, reason="native module not built")
@pytest.mark.parametrize("direction", DIRS)
def test_opcheck_custom_op(direction):
    s, t, mask = make_case(5, 4, 2.0, seed=7, masked=True)
    torch.library.opcheck(torch.ops.radit.lsr_loss_fwd.default, (s, t, 0.7, 0.1, mask, direction, "cpu", True))
    torch.library.opcheck(torch.ops.radit.lsr_loss_fwd.default, (s, t, 1.0, 0.5, None, direction, "cpu", False))


@pytest.mark.skipif(not HAS_NATIVE, reason="native module not built")
@pytest.mark.parametrize("direction", DIRS)
def test_torch_compile_matches_eager(direction):
    torch.manual_seed(0)
    encoder = torch.nn.Linear(6, 4)
    x = torch.randn(5, 6)
    lm_scores = -torch.rand(5, 4) * 3
    mask = torch.tensor([[True, True, False, True]] * 3 + [[False, True, True, True]] * 2)

    def loss_fn(x):
        return lsr_loss(encoder(x), lm_scores, retriever_temperature=0.5, lm_temperature=0.1, mask=mask,
                        direction=direction, impl="cpu")

    compiled_matches_eager(loss_fn, x, list(encoder.parameters()))


def test_docstring_examples():
    result = doctest.testmod(lsr_mod, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0, result  # 0 attempted: the examples were not found
