"""answer_logprobs and answer_logprobs_per_sequence (cpu and torch backends) against a float64 reference.

The reference is the plain expression log_softmax(hidden @ weight.T + bias).gather(targets) in float64.
Low-precision results are bounded relative to PyTorch's own error in the same dtype (the same expression
evaluated in that dtype). Block sizes are shrunk so that every shape spans several vocabulary blocks and,
for the cpu backend, several row chunks. The triton and cuda parametrisations live in the kernel tests.
"""
from __future__ import annotations

import doctest
import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from radit_fast._native import HAS_NATIVE
from radit_fast.ops import answer_logprobs, answer_logprobs_per_sequence
from radit_fast.ops.answer_logprobs import naive_answer_logprobs

# The module (radit_fast.ops re-exports a function of the same name).
al = importlib.import_module("radit_fast.ops.answer_logprobs")
blocked = importlib.import_module("radit_fast.ops._answer_logprobs_blocked")

IMPLS = ["torch"] + (["cpu"] if HAS_NATIVE else [])
needs_native = pytest.mark.skipif(not HAS_NATIVE, reason="radit_fast._C is not built")


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 96 vocabulary entries and (cpu) at most 40 rows of 96 float32 entries per buffer."""
    monkeypatch.setattr(blocked, "CPU_BLOCK_COLS", 96)
    monkeypatch.setattr(blocked, "CPU_BLOCK_BYTES", 40 * 96 * 4)
    monkeypatch.setattr(blocked, "CPU_LOSS_BLOCK_BYTES", 7 * 200 * 4)
    monkeypatch.setattr(al, "TORCH_BLOCK_COLS", 96)


def make_inputs(n, d, v, dtype=torch.float32, *, bias=True, ignore_every=5, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, d, generator=g) * scale).to(dtype)
    weight = (torch.randn(v, d, generator=g) / d**0.5 * 4).to(dtype)
    b = torch.randn(v, generator=g).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        targets[::ignore_every] = -100
    return hidden, weight, b, targets


def reference(hidden, weight, bias, targets, ignore_index=-100):
    """float64 token log-probs and the float64 leaf tensors (for gradients)."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    b = None if bias is None else bias.detach().double().requires_grad_()
    return naive_answer_logprobs(h, w, targets, bias=b, ignore_index=ignore_index), (h, w, b)


def max_err(actual, expected, name, limit, scale=1.0):
    """Max |actual - expected| / scale; fails with the first mismatches when above limit."""
    diff = (actual.detach().double() - expected.detach().double()).abs() / scale
    err = float(diff.max()) if diff.numel() else 0.0
    if not err <= limit:
        flat = diff.flatten()
        bad = (flat > limit).nonzero().flatten()[:5].tolist()
        rows = [(i, float(actual.flatten()[i]), float(expected.flatten()[i])) for i in bad]
        pytest.fail(f"{name}: max error {err:.3g} > {limit:.3g}; first mismatches (index, got, want): {rows}")
    return err


def run(impl, hidden, weight, bias, targets, grad_out, **kw):
    """Forward + backward of sum(grad_out * answer_logprobs(...)); returns (out, [grads]).
    impl="naive" runs the plain PyTorch expression in the inputs' dtype (PyTorch's own error)."""
    leaves = [x.detach().clone().requires_grad_() for x in (hidden, weight)]
    b = None if bias is None else bias.detach().clone().requires_grad_()
    if impl == "naive":
        out = naive_answer_logprobs(leaves[0], leaves[1], targets, bias=b, **kw)
    else:
        out = answer_logprobs(leaves[0], leaves[1], targets, bias=b, impl=impl, **kw)
    (out.double() * grad_out).sum().backward()
    return out, [leaves[0].grad, leaves[1].grad] + ([] if b is None else [b.grad])


# ---- values and gradients against float64 ----------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(257, 67, 1031), (1, 5, 3), (40, 16, 96), (7, 33, 200)])
def test_float32_matches_float64(impl, bias, shape):
    hidden, weight, b, targets = make_inputs(*shape, bias=bias)
    grad_out = torch.randn(shape[0], dtype=torch.float64)
    out, grads = run(impl, hidden, weight, b, targets, grad_out)
    assert out.dtype == torch.float32 and out.shape == (shape[0],)
    ref, leaves = reference(hidden, weight, b, targets)
    (ref * grad_out).sum().backward()
    torch_err = (naive_answer_logprobs(hidden, weight, targets, bias=b).double() - ref).abs().max().item()
    max_err(out, ref, "tok_logprob", 4 * torch_err + 2e-5)
    assert torch.all(out[targets == -100] == 0)
    for name, g, r in zip(["hidden", "weight", "bias"], grads, leaves):
        assert g.dtype == torch.float32
        max_err(g, r.grad, f"grad_{name}", 1e-5, scale=float(r.grad.abs().max()) + 1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bias", [True, False])
def test_bfloat16_error_bounded_by_torch_error(impl, bias):
    n, d, v = 257, 67, 1031
    hidden, weight, b, targets = make_inputs(n, d, v, torch.bfloat16, bias=bias, scale=2.0)
    grad_out = torch.randn(n, dtype=torch.float64)
    out, grads = run(impl, hidden, weight, b, targets, grad_out)
    assert out.dtype == torch.float32
    ref, leaves = reference(hidden, weight, b, targets)
    (ref * grad_out).sum().backward()
    naive, naive_grads = run("naive", hidden, weight, b, targets, grad_out)  # PyTorch's own bfloat16 error
    # Precision contract (radit_fast/ops/answer_logprobs.py, "Precision"): impl="torch" is float32-accurate, and
    # so is impl="cpu" on CPUs with AVX512-BF16 or AVX2 (float32 logit blocks from a native kernel); elsewhere impl="cpu"
    # rounds each logit block to bfloat16, so its error is up to |logit| * 2^-9, of the order of PyTorch's own
    # bfloat16 logits but never above the naive expression's error (which also rounds the log-softmax): the
    # bound is that error, factor 1. float32-accurate: |logit| <= ~40 here, float32 rounding ~1e-5.
    max_err(out, ref, "tok_logprob", 1.0 * (naive.double() - ref).abs().max().item())
    if impl == "torch" or (impl == "cpu" and blocked.block_dtype(torch.bfloat16, hidden.device) == torch.float32):
        max_err(out, ref, "tok_logprob (float32-accurate)", 1e-4)
    for name, g, r, ng in zip(["hidden", "weight", "bias"], grads, leaves, naive_grads):
        assert g.dtype == torch.bfloat16
        scale = float(r.grad.abs().max())
        torch_gerr = (ng.double() - r.grad).abs().max().item() / scale
        max_err(g, r.grad, f"grad_{name}", 2.0 * torch_gerr, scale=scale)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_ignored_and_empty(impl):
    hidden, weight, b, targets = make_inputs(9, 8, 50)
    targets[:] = -100
    out, grads = run(impl, hidden, weight, b, targets, torch.ones(9, dtype=torch.float64))
    assert torch.equal(out, torch.zeros(9))
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))
    empty = answer_logprobs(hidden[:0], weight, targets[:0], impl=impl)
    assert empty.shape == (0,)


@pytest.mark.parametrize("impl", IMPLS)
def test_custom_ignore_index_and_int32_targets(impl):
    hidden, weight, b, targets = make_inputs(20, 8, 50, ignore_every=0)
    targets[3] = 7
    out = answer_logprobs(hidden, weight, targets.int(), bias=b, ignore_index=7, impl=impl)
    ref, _ = reference(hidden, weight, b, targets, ignore_index=7)
    assert out[3] == 0
    max_err(out, ref, "tok_logprob", 2e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_inputs(impl):
    hidden, weight, b, targets = make_inputs(31, 24, 130)
    h_nc = torch.zeros(24, 31).T  # column-major layout
    h_nc.copy_(hidden)
    w_nc = torch.zeros(130, 48)[:, ::2]
    w_nc.copy_(weight)
    b_nc = torch.zeros(260)[::2]
    b_nc.copy_(b)
    t_nc = torch.zeros(62, dtype=torch.int64)[::2]
    t_nc.copy_(targets)
    assert not (h_nc.is_contiguous() or w_nc.is_contiguous() or b_nc.is_contiguous() or t_nc.is_contiguous())
    grad_out = torch.randn(31, dtype=torch.float64)
    out, grads = run(impl, h_nc, w_nc, b_nc, t_nc, grad_out)
    ref, leaves = reference(hidden, weight, b, targets)
    (ref * grad_out).sum().backward()
    max_err(out, ref, "tok_logprob", 2e-5)
    for name, g, r in zip(["hidden", "weight", "bias"], grads, leaves):
        max_err(g, r.grad, f"grad_{name}", 1e-5, scale=float(r.grad.abs().max()))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_vocabulary_bias(impl, dtype):
    """A bias of -inf removes vocabulary entries (including whole blocks): they get no mass and no gradient."""
    hidden, weight, b, targets = make_inputs(20, 8, 300, dtype)
    b[100:250] = -float("inf")
    targets[targets.ge(100) & targets.lt(250)] = 3
    grad_out = torch.randn(20, dtype=torch.float64)
    out, grads = run(impl, hidden, weight, b, targets, grad_out)
    keep = torch.cat([torch.arange(100), torch.arange(250, 300)])
    t_kept = torch.where(targets == -100, -100, torch.searchsorted(keep, targets))
    ref, leaves = reference(hidden, weight[keep], b[keep], t_kept)
    (ref * grad_out).sum().backward()
    tol = 2e-5 if dtype == torch.float32 else 0.1
    max_err(out, ref, "tok_logprob", tol)
    assert float(grads[1][100:250].abs().max()) == 0 and float(grads[2][100:250].abs().max()) < 1e-30
    max_err(grads[0], leaves[0].grad, "grad_hidden", 1e-5 if dtype == torch.float32 else 2e-2,
            scale=float(leaves[0].grad.abs().max()))


@pytest.mark.parametrize("impl", IMPLS)
def test_partial_requires_grad(impl):
    hidden, weight, b, targets = make_inputs(12, 8, 100)
    w = weight.clone().requires_grad_()
    answer_logprobs(hidden, w, targets, bias=b, impl=impl).sum().backward()
    ref, (_, rw, _) = reference(hidden, weight, b, targets)
    ref.sum().backward()
    max_err(w.grad, rw.grad, "grad_weight", 1e-5, scale=float(rw.grad.abs().max()))


def test_gradcheck_float64_torch_backend():
    hidden, weight, b, targets = make_inputs(6, 5, 200, torch.float64, ignore_every=3)
    fn = lambda h, w, bb: answer_logprobs(h, w, targets, bias=bb, impl="torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, [x.requires_grad_() for x in (hidden, weight, b)])
    seg = torch.tensor([1, 0, 1, 3, 3, 1])
    fn = lambda h, w, bb: answer_logprobs_per_sequence(h, w, targets, bias=bb, segment_ids=seg,  # noqa: E731
                                                       num_segments=5, impl="torch")
    assert torch.autograd.gradcheck(fn, [hidden, weight, b])


def test_auto_uses_torch_for_float64_and_cpu_rejects_it():
    hidden, weight, b, targets = make_inputs(5, 4, 30, torch.float64)
    out = answer_logprobs(hidden, weight, targets, bias=b)
    assert out.dtype == torch.float64
    if HAS_NATIVE:
        with pytest.raises(ValueError, match="float32 and bfloat16"):
            answer_logprobs(hidden, weight, targets, impl="cpu")


@settings(max_examples=30, deadline=None, derandomize=True)
@given(n=st.integers(1, 24), d=st.integers(1, 12), v=st.integers(1, 300), bias=st.booleans(),
       ignore=st.sampled_from(["none", "some", "all"]), seed=st.integers(0, 2**16))
def test_property_matches_float64(n, d, v, bias, ignore, seed):
    hidden, weight, b, targets = make_inputs(n, d, v, bias=bias, ignore_every=0, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    if ignore == "all":
        targets[:] = -100
    elif ignore == "some":
        targets[torch.rand(n, generator=g) < 0.3] = -100
    grad_out = torch.randn(n, dtype=torch.float64, generator=g)
    ref, leaves = reference(hidden, weight, b, targets)
    (ref * grad_out).sum().backward()
    for impl in IMPLS:
        out, grads = run(impl, hidden, weight, b, targets, grad_out)
        max_err(out, ref, f"{impl} tok_logprob", 3e-5)
        # Relative to the gradient's size plus that of the terms it sums (|g| |W| for hidden, |g| |h| for weight,
        # |g| for bias): g (onehot - p) W cancels when W_t is close to the mean row (seen at d = 1).
        terms = [weight.abs().max(), hidden.abs().max(), torch.tensor(1.0)]
        for name, gr, r, t in zip(["hidden", "weight", "bias"], grads, leaves, terms):
            scale = float(r.grad.abs().max()) + float(grad_out.abs().max()) * float(t) * 0.1 + 1e-6
            max_err(gr, r.grad, f"{impl} grad_{name}", 1e-5, scale=scale)


# ---- per-sequence sums ---------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_sequence_segment_ids_and_cu_seqlens(impl, dtype):
    hidden, weight, b, targets = make_inputs(30, 16, 150, dtype, ignore_every=4)
    lengths = torch.tensor([5, 0, 11, 0, 14, 0])  # empty segments in the middle and at the end
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    seg = torch.repeat_interleave(torch.arange(6), lengths)
    grad_out = torch.randn(6, dtype=torch.float64)
    ref, leaves = reference(hidden, weight, b, targets)
    ref_seq = torch.zeros(6, dtype=torch.float64).index_add(0, seg, ref)
    (ref_seq * grad_out).sum().backward()
    tol = 2e-4 if dtype == torch.float32 else 0.5
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(3))  # rows need not be sorted
    for kind, kw, p in [("cu_seqlens", dict(cu_seqlens=cu), torch.arange(30)),
                        ("segment_ids", dict(segment_ids=seg[perm], num_segments=6), perm)]:
        leaves_ours = [x.clone().requires_grad_() for x in (hidden[p], weight, b)]
        out = answer_logprobs_per_sequence(leaves_ours[0], leaves_ours[1], targets[p], bias=leaves_ours[2],
                                           impl=impl, **kw)
        assert out.dtype == torch.float32 and out.shape == (6,)
        assert torch.all(out[lengths == 0] == 0)
        max_err(out, ref_seq, f"{kind} seq_logprob", tol)
        (out.double() * grad_out).sum().backward()
        leaves_ours[0].grad = leaves_ours[0].grad[torch.argsort(p)]
        gtol = 1e-5 if dtype == torch.float32 else 2e-2
        for name, gr, r in zip(["hidden", "weight", "bias"], leaves_ours, leaves):
            max_err(gr.grad, r.grad, f"{kind} grad_{name}", gtol, scale=float(r.grad.abs().max()))


def test_per_sequence_default_num_segments():
    hidden, weight, b, targets = make_inputs(6, 4, 20)
    out = answer_logprobs_per_sequence(hidden, weight, targets, segment_ids=torch.tensor([0, 0, 2, 2, 2, 1]))
    assert out.shape == (3,)
    assert answer_logprobs_per_sequence(hidden, weight, targets, cu_seqlens=torch.tensor([0, 6])).shape == (1,)


# ---- errors --------------------------------------------------------------------------------------------
def _bad_cases():
    h, w, b, t = make_inputs(4, 3, 10)
    return [
        (dict(hidden=h[0]), "hidden must be 2-D"),
        (dict(weight=torch.randn(10, 5)), r"weight must be \[V, d\] = \[V, 3\]"),
        (dict(weight=torch.randn(0, 3)), "at least one vocabulary row"),
        (dict(targets=t[:3]), r"targets must be 1-D \[N\] = \[4\]"),
        (dict(targets=t[None]), r"targets must be 1-D \[N\] = \[4\]"),
        (dict(targets=t.float()), "targets must be an integer tensor"),
        (dict(hidden=h.long(), weight=w.long()), "hidden must be a floating-point tensor"),
        (dict(weight=w.double()), "weight dtype torch.float64 must match hidden dtype torch.float32"),
        (dict(bias=torch.randn(9)), r"bias must be 1-D \[V\] = \[10\]"),
        (dict(bias=b.double()), "bias dtype"),
        (dict(targets=torch.tensor([0, 10, 1, 2])), r"targets\[1\] = 10 is outside \[0, 10\)"),
        (dict(targets=torch.tensor([0, -1, 1, 2])), r"targets\[1\] = -1 is outside"),
        (dict(weight=w.to("meta")), "weight is on meta but hidden is on cpu"),
        (dict(impl="gpu"), "impl must be one of"),
    ]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_inputs_raise_value_error(impl, case):
    h, w, b, t = make_inputs(4, 3, 10)
    args = dict(hidden=h, weight=w, targets=t, bias=b, impl=impl)
    change, match = _bad_cases()[case]
    args.update(change)
    with pytest.raises(ValueError, match=match):
        answer_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("targets"), **args)


@pytest.mark.parametrize("kw, match", [
    (dict(), "exactly one of segment_ids"),
    (dict(segment_ids=torch.tensor([0, 1, 0]), cu_seqlens=torch.tensor([0, 4])), "exactly one of segment_ids"),
    (dict(segment_ids=torch.tensor([0, 1, 0])), r"segment_ids must be \[N\] = \[4\]"),
    (dict(segment_ids=torch.tensor([0, 1, 5, 0]), num_segments=3), r"segment_ids\[2\] = 5 is outside \[0, 3\)"),
    (dict(segment_ids=torch.tensor([0.0, 1, 0, 0])), "segment_ids must be a 1-D int64/int32 tensor"),
    (dict(cu_seqlens=torch.tensor([0, 3])), "cu_seqlens must be non-decreasing from 0 to N = 4"),
    (dict(cu_seqlens=torch.tensor([0, 3, 2, 4])), "cu_seqlens must be non-decreasing"),
    (dict(cu_seqlens=torch.tensor([0, 4]), num_segments=2), "num_segments = 2 but cu_seqlens"),
])
def test_bad_segments_raise_value_error(kw, match):
    h, w, b, t = make_inputs(4, 3, 10)
    with pytest.raises(ValueError, match=match):
        answer_logprobs_per_sequence(h, w, t, **kw)


@needs_native
# ---- reduction="sum" | "mean": gradients formed in the forward pass --------------------------------------
def run_reduced(impl, hidden, weight, bias, targets, reduction, grad_out=1.0, **kw):
    leaves = [x.detach().clone().requires_grad_() for x in (hidden, weight)]
    b = None if bias is None else bias.detach().clone().requires_grad_()
    out = answer_logprobs(leaves[0], leaves[1], targets, bias=b, impl=impl, reduction=reduction, **kw)
    (out.double() * grad_out).backward()
    return out, [leaves[0].grad, leaves[1].grad] + ([] if b is None else [b.grad])


def reduced_reference(hidden, weight, bias, targets, reduction, grad_out=1.0):
    ref, leaves = reference(hidden, weight, bias, targets)
    count = max(int((targets != -100).sum()), 1)
    value = ref.sum() if reduction == "sum" else ref.sum() / count
    (value * grad_out).backward()
    return value, leaves


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(257, 67, 1031), (1, 5, 3), (7, 33, 200), (40, 16, 96)])
def test_reduced_float32_matches_float64(impl, reduction, bias, shape):
    """Several row chunks (the loss block holds 7 rows of 200 float32 entries) and one-chunk shapes."""
    hidden, weight, b, targets = make_inputs(*shape, bias=bias)
    out, grads = run_reduced(impl, hidden, weight, b, targets, reduction, grad_out=-2.5)
    assert out.dtype == torch.float32 and out.shape == ()
    ref, leaves = reduced_reference(hidden, weight, b, targets, reduction, grad_out=-2.5)
    max_err(out, ref, "value", 2e-5, scale=float(ref.detach().abs()) + 1.0)
    for name, g, r in zip(["hidden", "weight", "bias"], grads, leaves):
        assert g.dtype == torch.float32
        max_err(g, r.grad, f"grad_{name}", 1e-5, scale=float(r.grad.abs().max()) + 1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_reduced_bfloat16_error_bounded_by_torch_error(impl, reduction):
    n, d, v = 257, 67, 1031
    hidden, weight, b, targets = make_inputs(n, d, v, torch.bfloat16, scale=2.0)
    out, grads = run_reduced(impl, hidden, weight, b, targets, reduction)
    ref, leaves = reduced_reference(hidden, weight, b, targets, reduction)
    naive = naive_answer_logprobs(hidden, weight, targets, bias=b).double()
    naive_value = naive.sum() if reduction == "sum" else naive.sum() / int((targets != -100).sum())
    max_err(out, ref, "value", max(1.0 * float((naive_value - ref.detach()).abs()), 1e-4))
    unreduced, unreduced_grads = run(impl, hidden, weight, b, targets, torch.ones(n, dtype=torch.float64))
    for name, g, r, ug in zip(["hidden", "weight", "bias"], grads, leaves, unreduced_grads):
        assert g.dtype == torch.bfloat16
        scale = float(r.grad.abs().max())
        # the same precision as the unreduced op's backward (itself bounded by PyTorch's error above)
        ref_err = (ug.double() * (1.0 if reduction == "sum" else 1.0 / int((targets != -100).sum())) -
                   r.grad).abs().max().item() / scale
        max_err(g, r.grad, f"grad_{name}", 2.0 * ref_err + 4e-3, scale=scale)


@pytest.mark.parametrize("impl", IMPLS)
def test_reduced_all_ignored_no_grad_and_partial_grads(impl):
    hidden, weight, b, targets = make_inputs(9, 8, 50)
    targets[:] = -100
    for reduction in ("sum", "mean"):
        out, grads = run_reduced(impl, hidden, weight, b, targets, reduction)
        assert out.item() == 0.0
        for g in grads:
            assert torch.equal(g, torch.zeros_like(g))
    hidden, weight, b, targets = make_inputs(9, 8, 50)
    with torch.no_grad():
        value = answer_logprobs(hidden.requires_grad_(), weight, targets, bias=b, impl=impl, reduction="sum")
    assert not value.requires_grad
    max_err(value, reference(hidden, weight, b, targets)[0].sum(), "no-grad value", 1e-4)
    w = weight.detach().clone().requires_grad_()  # only the weight needs a gradient
    answer_logprobs(hidden.detach(), w, targets, bias=b, impl=impl, reduction="mean").backward()
    _, leaves = reduced_reference(hidden, weight, b, targets, "mean")
    max_err(w.grad, leaves[1].grad, "grad_weight only", 1e-5, scale=float(leaves[1].grad.abs().max()))


def test_reduced_bad_reduction_and_targets():
    hidden, weight, b, targets = make_inputs(4, 8, 10)
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        answer_logprobs(hidden, weight, targets, reduction="max")
    targets[1] = 12
    with pytest.raises(ValueError, match=r"targets\[1\] = 12 is outside \[0, 10\)"):
        answer_logprobs(hidden.requires_grad_(), weight, targets, reduction="sum")


@needs_native
def test_reduced_uses_three_products(monkeypatch):
    """The cpu loss path runs 3 GEMM products (no recomputation), the unreduced path 4 (torch.mm or native)."""
    hidden, weight, b, targets = make_inputs(40, 16, 96)
    calls = []
    real_mm = torch.mm

    def counting_mm(*args, **kwargs):
        calls.append(1)
        return real_mm(*args, **kwargs)

    real_addmm_ = torch.Tensor.addmm_

    def counting_addmm_(self, *args, **kwargs):
        calls.append(1)
        return real_addmm_(self, *args, **kwargs)

    real_gemm = blocked._gemm  # the native CPU GEMM, where this CPU runs it

    def counting_gemm(*args, **kwargs):
        calls.append(1)
        return real_gemm(*args, **kwargs)

    monkeypatch.setattr(blocked.torch, "mm", counting_mm)
    monkeypatch.setattr(torch.Tensor, "addmm_", counting_addmm_)
    monkeypatch.setattr(blocked, "_gemm", counting_gemm)
    monkeypatch.setattr(blocked, "CPU_LOSS_BLOCK_BYTES", 40 * 96 * 4)  # one row chunk
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    answer_logprobs(h, w, targets, impl="cpu", reduction="sum").backward()
    reduced = len(calls)
    calls.clear()
    answer_logprobs(h, w, targets, impl="cpu").sum().backward()
    assert (reduced, len(calls)) == (3, 4)


# ---- torch.library / torch.compile ---------------------------------------------------------------------
def test_opcheck_custom_ops():
    hidden, weight, b, targets = make_inputs(6, 4, 30)
    seg = torch.tensor([0, 0, 1, 1, 1, 2])
    impl = IMPLS[-1]
    torch.library.opcheck(torch.ops.radit.answer_logprobs_fwd.default,
                          (hidden, weight, b, targets, seg, 3, -100, impl))
    _, lse, _ = torch.ops.radit.answer_logprobs_fwd(hidden, weight, b, targets, None, 0, -100, impl)
    g = torch.where(targets != -100, torch.randn(6), 0.0)
    torch.library.opcheck(torch.ops.radit.answer_logprobs_bwd.default,
                          (hidden, weight, b, targets, lse, g, -100, True, True, True, impl))
    for reduction in ("sum", "mean"):
        torch.library.opcheck(torch.ops.radit.answer_logprobs_loss.default,
                              (hidden, weight, b, targets, -100, reduction, True, True, True, impl))


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh())
    head = torch.nn.Linear(16, 50)
    x = torch.randn(20, 8)
    targets = torch.randint(0, 50, (20,))
    targets[::3] = -100
    seg = torch.arange(20) // 5

    def loss_fn(x):
        h = body(x)
        seq = answer_logprobs_per_sequence(h, head.weight, targets, bias=head.bias, segment_ids=seg, num_segments=4)
        tok = answer_logprobs(h, head.weight, targets, bias=head.bias)
        mean = answer_logprobs(h, head.weight, targets, bias=head.bias, reduction="mean")
        return -seq.sum() - 0.5 * tok.mean() - 0.25 * mean

    params = list(body.parameters()) + list(head.parameters())
    eager = loss_fn(x)
    eager_grads = torch.autograd.grad(eager, params)
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    grads = torch.autograd.grad(out, params)
    max_err(out, eager, "compiled loss", 1e-5)
    for i, (g, e) in enumerate(zip(grads, eager_grads)):
        max_err(g, e, f"compiled grad {i}", 1e-5, scale=float(e.abs().max()) + 1e-12)


def test_docstring_examples():
    result = doctest.testmod(al, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 3 and result.failed == 0
