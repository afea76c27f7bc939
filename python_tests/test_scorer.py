"""The fused parallel-augmentation scorer (hidden states -> chunk log-likelihoods -> ensemble / LSR) against a
float64 reference with explicit N x V logits, on every backend runnable here."""
from __future__ import annotations

import doctest

import pytest
import torch

import radit_fast.ops.scorer as scorer_mod
from radit_fast.ops.scorer import (ScorerOptions, chunk_logprobs, ensemble_from_hidden, lsr_loss_from_hidden,
                                   naive_score_chunks, score_chunks)

from _ops_checks import IMPLS, dev

IGNORE = -100


def make_case(B=3, k=4, d=16, V=50, seed=0, missing=((1, 3), (2, 1))):
    """Answer positions of B*k sequences in shuffled order; chunks in ``missing`` have no position; one
    position per sequence is ignore_index."""
    gen = torch.Generator().manual_seed(seed)
    seg = []
    for s in range(B * k):
        if (s // k, s % k) not in missing:
            seg += [s] * int(torch.randint(2, 6, (1,), generator=gen))
    seg = torch.tensor(seg)[torch.randperm(len(seg), generator=gen)]
    n = seg.shape[0]
    targets = torch.randint(0, V, (n,), generator=gen)
    first = torch.unique(seg, return_inverse=True)[1]
    targets[torch.tensor([int((first == j).nonzero()[0, 0]) for j in range(int(first.max()) + 1)])] = IGNORE
    hidden = torch.randn(n, d, generator=gen)
    weight = torch.randn(V, d, generator=gen) * 0.5
    bias = torch.randn(V, generator=gen) * 0.1
    scores = torch.randn(B, k, generator=gen) * 2
    return hidden, weight, bias, targets, seg, scores


def ref_chunks(hidden, weight, bias, targets, seg, B, k):
    logits = hidden.double() @ weight.double().T + bias.double()
    lp = torch.log_softmax(logits, -1)
    valid = targets != IGNORE
    tok = torch.where(valid, lp.gather(1, targets.clamp(min=0)[:, None])[:, 0], torch.zeros((), dtype=lp.dtype))
    seq = torch.zeros(B * k, dtype=lp.dtype).index_add(0, seg, tok)
    n = torch.zeros(B * k, dtype=torch.int64).index_add(0, seg, valid.long())
    return seq.view(B, k), n.view(B, k)


def ref_ensemble(lp, n, scores, t):
    rows = []
    for b in range(lp.shape[0]):
        idx = (n[b] > 0).nonzero()[:, 0]
        rows.append(torch.logsumexp(torch.log_softmax(scores[b, idx] / t, 0) + lp[b, idx], 0))
    return torch.stack(rows)


def ref_lsr(lp, n, scores, t, tl, kind, direction):
    rows = []
    for b in range(lp.shape[0]):
        idx = (n[b] > 0).nonzero()[:, 0]
        tot = lp[b, idx].detach()
        score = {"mean": tot / n[b, idx], "sum": tot, "prob": tot.exp()}[kind]
        log_p, log_q = torch.log_softmax(scores[b, idx] / t, 0), torch.log_softmax(score / tl, 0)
        a, c = (log_q, log_p) if direction == "lsr_to_retriever" else (log_p, log_q)
        rows.append((a.exp() * (a - c)).sum())
    return torch.stack(rows)


def leaves(*ts, device="cpu", dtype=None):
    return [t.detach().to(device, dtype or t.dtype).clone().requires_grad_() for t in ts]


@pytest.mark.parametrize("impl", IMPLS)
def test_chunk_logprobs_and_ensemble_match_float64(impl):
    hidden, weight, bias, targets, seg, scores = make_case()
    d = dev(impl)
    h, w, b_, s = leaves(hidden, weight, bias, scores, device=d)
    opts = ScorerOptions(temperature=0.5, impl=impl)
    out = ensemble_from_hidden(h, w, targets.to(d), seg.to(d), s, bias=b_, options=opts)
    (out * torch.tensor([1.0, -0.5, 2.0], device=d)).sum().backward()

    h64, w64, b64, s64 = leaves(hidden, weight, bias, scores, dtype=torch.float64)
    lp, n = ref_chunks(h64, w64, b64, targets, seg, 3, 4)
    ref = ref_ensemble(lp, n, s64, 0.5)
    (ref * torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)).sum().backward()

    lp_got, n_got = chunk_logprobs(hidden.to(d), weight.to(d), targets.to(d), seg.to(d), 3, 4, bias=bias.to(d),
                                   impl=impl)
    assert torch.equal(n_got.cpu(), n) and n[1, 3] == 0 and n[2, 1] == 0
    torch.testing.assert_close(lp_got.cpu().double(), lp.detach(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.detach().cpu().double(), ref.detach(), atol=1e-4, rtol=1e-5)
    for name, got, want in (("hidden", h, h64), ("weight", w, w64), ("bias", b_, b64), ("scores", s, s64)):
        torch.testing.assert_close(got.grad.cpu().double(), want.grad, atol=1e-4, rtol=1e-4, msg=name)
    assert (s.grad.cpu()[n == 0] == 0).all()  # missing chunks: no gradient


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("direction", ["lsr_to_retriever", "retriever_to_lsr"])
@pytest.mark.parametrize("kind", ["mean", "sum", "prob"])
def test_lsr_loss_matches_float64(impl, direction, kind):
    hidden, weight, bias, targets, seg, scores = make_case(seed=1)
    d = dev(impl)
    h, s = leaves(hidden, scores, device=d)
    opts = ScorerOptions(temperature=0.8, lm_temperature=0.5, score_kind=kind, direction=direction,
                         reduction="sum", impl=impl)
    loss = lsr_loss_from_hidden(h, weight.to(d), targets.to(d), seg.to(d), s, bias=bias.to(d), options=opts)
    loss.backward()
    assert h.grad is None  # the LM is the frozen teacher of the LSR loss

    (s64,) = leaves(scores, dtype=torch.float64)
    lp, n = ref_chunks(hidden, weight, bias, targets, seg, 3, 4)
    ref = ref_lsr(lp, n, s64, 0.8, 0.5, kind, direction).sum()
    ref.backward()
    torch.testing.assert_close(loss.detach().cpu().double(), ref.detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s.grad.cpu().double(), s64.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_score_chunks_one_pass_and_user_mask(impl):
    hidden, weight, bias, targets, seg, scores = make_case(seed=2)
    d = dev(impl)
    h, s = leaves(hidden, scores, device=d)
    mask = torch.ones(3, 4, dtype=torch.bool, device=d)
    mask[0, 0] = False
    res = score_chunks(h, weight.to(d), targets.to(d), seg.to(d), s, bias=bias.to(d), mask=mask,
                       options=ScorerOptions(impl=impl, reduction="none"))
    assert res.ensemble.shape == (3,) and res.lsr_loss.shape == (3,)
    expected_mask = (res.lengths > 0) & mask
    assert torch.equal(res.mask, expected_mask) and not res.mask[0, 0] and not res.mask[1, 3]
    # The ensemble equals replug over the present chunks only.
    lp, n = ref_chunks(hidden, weight, bias, targets, seg, 3, 4)
    n = torch.where(expected_mask.cpu(), n, torch.zeros_like(n))
    torch.testing.assert_close(res.ensemble.detach().cpu().double(), ref_ensemble(lp, n, scores.double(), 1.0),
                               atol=1e-4, rtol=1e-5)
    # The LSR loss carries no graph through the LM head: only the scores get its gradient.
    res.lsr_loss.sum().backward(retain_graph=True)
    assert h.grad is None and s.grad is not None
    res.ensemble.sum().backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()


@pytest.mark.parametrize("direction", ["lsr_to_retriever", "retriever_to_lsr"])
def test_naive_baseline_matches_float64(direction):
    # The benchmark's baseline must compute the same thing as the fused scorer (missing chunks masked).
    hidden, weight, bias, targets, seg, scores = make_case(seed=5)
    opts = ScorerOptions(reduction="none", direction=direction, lm_temperature=0.5)
    ens, lsr = naive_score_chunks(hidden, weight, targets, seg, scores, bias=bias, options=opts)
    lp, n = ref_chunks(hidden, weight, bias, targets, seg, 3, 4)
    torch.testing.assert_close(ens.double(), ref_ensemble(lp, n, scores.double(), 1.0), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(lsr.double(), ref_lsr(lp, n, scores.double(), 1.0, 0.5, "mean", direction),
                               atol=1e-4, rtol=1e-5)
    fused = score_chunks(hidden, weight, targets, seg, scores, bias=bias, options=opts)
    torch.testing.assert_close(fused.ensemble, ens, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(fused.lsr_loss, lsr, atol=1e-4, rtol=1e-5)


def test_gradcheck_torch_float64():
    hidden, weight, bias, targets, seg, scores = make_case(B=2, k=3, d=4, V=7, seed=3, missing=((1, 2),))
    h, w, s = leaves(hidden, weight, scores, dtype=torch.float64)
    opts = ScorerOptions(temperature=0.7, impl="torch")
    assert torch.autograd.gradcheck(
        lambda a, b, c: ensemble_from_hidden(a, b, targets, seg, c, bias=bias.double(), options=opts), (h, w, s))


def test_errors():
    hidden, weight, bias, targets, seg, scores = make_case(seed=4, missing=((1, 0), (1, 1), (1, 2), (1, 3)))
    with pytest.raises(ValueError, match=r"query 1 has no chunk with scored answer positions \(segment ids 4..7"):
        ensemble_from_hidden(hidden, weight, targets, seg, scores)
    hidden, weight, bias, targets, seg, scores = make_case(seed=4)
    with pytest.raises(ValueError, match=r"retriever_scores must have shape \[B, k\]"):
        ensemble_from_hidden(hidden, weight, targets, seg, scores[0])
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \[B, k\] = \[3, 4\]"):
        score_chunks(hidden, weight, targets, seg, scores, mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"targets must have shape \[N\]"):
        chunk_logprobs(hidden, weight, targets[:-1], seg, 3, 4)
    with pytest.raises(ValueError, match="segment_ids"):
        chunk_logprobs(hidden, weight, targets, seg, 2, 4)  # ids 8..11 are out of range for B*k = 8
    with pytest.raises(ValueError, match="score_kind must be one of"):
        ScorerOptions(score_kind="max")
    with pytest.raises(ValueError, match="lm_temperature must be a finite number > 0"):
        ScorerOptions(lm_temperature=0.0)
    with pytest.raises(ValueError, match="direction must be one of"):
        ScorerOptions(direction="kl")


def test_docstring_examples():
    result = doctest.testmod(scorer_mod, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0, result  # 0 attempted: the examples were not found
