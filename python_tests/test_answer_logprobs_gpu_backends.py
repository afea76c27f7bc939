"""The Triton and CUDA backends of answer_logprobs against a float64 reference.

Triton runs everywhere (under TRITON_INTERPRET=1 on CPU, set by conftest.py; tiny shapes, the interpreter
is slow). CUDA tests need a GPU and skip cleanly without one. Errors are bounded relative to PyTorch's own
error in the same dtype (STYLE.md 7).
"""
from __future__ import annotations

import pytest
import torch

from radit_fast._native import HAS_NATIVE_CUDA
from radit_fast.ops import answer_logprobs
from radit_fast.triton import answer_logprobs as tri

IGNORE = -100
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def _launchers(impl: str):
    """The Triton launchers; None for "cuda" (the vendor-GEMM driver with the CUDA epilogues has no launcher of
    its own: it is checked through the public op here and through its epilogues in
    test_answer_logprobs_epilogue.py)."""
    if impl == "triton":
        return tri.triton_fwd, tri.triton_bwd
    if not HAS_NATIVE_CUDA:
        pytest.skip("radit_fast._C was built without CUDA")
    return None


def _make(n, d, v, dtype, device, bias=True, ignored_every=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=gen).to(dtype)
    w = (torch.randn(v, d, generator=gen) / d**0.25).to(dtype)
    b = torch.randn(v, generator=gen).to(dtype) if bias else None
    t = torch.randint(0, v, (n,), generator=gen)
    if ignored_every:
        t[::ignored_every] = IGNORE
    g = torch.randn(n, generator=gen)
    g[t == IGNORE] = 0.0
    move = (lambda x: None if x is None else x.to(device))
    return move(h), move(w), move(b), move(t), move(g)


def _tok_logprobs(h, w, b, t, *, compute_dtype):
    """Reference math: tok = log_softmax(h w^T + b)[target] (0 at ignored rows)."""
    z = h @ w.t()
    if b is not None:
        z = z + b.to(z.dtype)
    lp = z.to(compute_dtype).log_softmax(-1)
    keep = t != IGNORE
    tok = lp.gather(1, torch.where(keep, t, 0)[:, None])[:, 0]
    return torch.where(keep, tok, torch.zeros_like(tok)), z.to(compute_dtype).logsumexp(-1)


def _autograd(h, w, b, t, g, dtype, compute_dtype):
    """Values and gradients (hidden, weight, bias) of sum g * tok, computed in ``dtype``."""
    hh = h.detach().to(dtype).requires_grad_()
    ww = w.detach().to(dtype).requires_grad_()
    bb = None if b is None else b.detach().to(dtype).requires_grad_()
    tok, lse = _tok_logprobs(hh, ww, bb, t, compute_dtype=compute_dtype)
    (tok * g.to(tok.dtype)).sum().backward()
    return tok.detach(), lse.detach(), hh.grad, ww.grad, None if bb is None else bb.grad


def _assert_close(name, got, ref, lowp, factor=4.0, rtol_floor=1e-5):
    """|got - ref| <= factor * |torch's error in the same dtype| + a small floor; prints the first mismatches."""
    got, ref, lowp = got.double().cpu(), ref.double().cpu(), lowp.double().cpu()
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    bound = factor * (lowp - ref).abs().max().item() + rtol_floor * (1.0 + ref.abs().max().item())
    err = (got - ref).abs()
    if not torch.isfinite(got).all() or err.max().item() > bound:
        bad = (~torch.isfinite(got) | (err > bound)).nonzero()[:5].tolist()
        rows = [f"{tuple(i)}: got {got[tuple(i)].item():.6g} ref {ref[tuple(i)].item():.6g}" for i in bad]
        raise AssertionError(f"{name}: max error {err.max().item():.3g} > bound {bound:.3g}; first: {rows}")


def _check_backend(impl, n, d, v, dtype, device, bias=True, ignored_every=5, seed=0):
    """The public op (autograd) with ``impl`` and the launchers' lse, against float64 and torch in ``dtype``."""
    launchers = _launchers(impl)
    h, w, b, t, g = _make(n, d, v, dtype, device, bias, ignored_every, seed)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    bb = None if b is None else b.clone().requires_grad_()
    tok = answer_logprobs(hh, ww, t, bias=bb, ignore_index=IGNORE, impl=impl)
    (tok * g).sum().backward()
    lse = None if launchers is None else launchers[0](h, w, b, t, IGNORE)[1]
    ref = _autograd(h, w, b, t, g, torch.float64, torch.float64)
    # PyTorch's own result in the input dtype (logits in that dtype, log-softmax in fp32).
    low = _autograd(h, w, b, t, g, dtype, torch.float32)
    got = (tok, lse, hh.grad, ww.grad, None if bb is None else bb.grad)
    for name, x, r, lo in zip(("tok", "lse", "grad_hidden", "grad_weight", "grad_bias"), got, ref, low):
        if name == "lse" and x is None:
            continue
        if r is None:
            assert x is None, f"{name}: expected None without bias"
            continue
        _assert_close(f"{impl} {dtype} {name}", x, r, lo)
    assert tok.dtype == torch.float32 and lse.dtype == torch.float32
    assert (tok[t == IGNORE] == 0).all()


# ---- Triton (interpreter on CPU) ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_triton_ragged_matches_float64(dtype, bias):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _check_backend("triton", 37, 19, 131, dtype, device, bias=bias)


def test_triton_multi_block_multi_chunk(monkeypatch):
    # 70 rows x 300 vocabulary entries x d 40: several blocks of every tile dimension, and 3 dz chunks.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = tri._config(torch.float32, torch.device(device))
    monkeypatch.setattr(tri, "DZ_CHUNK_ELEMENTS", 70 * 4 * cfg.block_v)
    assert -(-300 // tri.dz_chunk_width(70, 300, cfg.block_v)) >= 2
    _check_backend("triton", 70, 40, 300, torch.float32, device, ignored_every=3, seed=1)


def test_triton_tiny_and_partial_grads():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _check_backend("triton", 1, 1, 17, torch.float32, device, ignored_every=0, seed=2)
    h, w, b, t, g = _make(5, 8, 40, torch.float32, device)
    _, lse = tri.triton_fwd(h, w, b, t, IGNORE)
    gh, gw, gb = tri.triton_bwd(h, w, b, t, lse, g, IGNORE, True, False, False)
    assert gw is None and gb is None and gh.shape == (5, 8)
    gh, gw, gb = tri.triton_bwd(h, w, None, t, lse, g, IGNORE, False, True, True)
    assert gh is None and gb is None and gw.shape == (40, 8)


def test_triton_all_ignored_and_empty():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    h, w, b, t, g = _make(9, 12, 50, torch.bfloat16, device)
    t[:] = IGNORE
    g[:] = 0.0
    tok, lse = tri.triton_fwd(h, w, b, t, IGNORE)
    assert (tok == 0).all()
    _assert_close("all-ignored lse", lse, _autograd(h, w, b, t, g, torch.float64, torch.float64)[1],
                  _autograd(h, w, b, t, g, torch.bfloat16, torch.float32)[1])
    grads = tri.triton_bwd(h, w, b, t, lse, g, IGNORE, True, True, True)
    assert all((x == 0).all() for x in grads)
    tok, lse = tri.triton_fwd(h[:0], w, b, t[:0], IGNORE)
    assert tok.shape == (0,) and lse.shape == (0,)
    gh, gw, gb = tri.triton_bwd(h[:0], w, b, t[:0], lse, g[:0], IGNORE, True, True, True)
    assert gh.shape == (0, 12) and (gw == 0).all() and (gb == 0).all()


def test_triton_strided_inputs():
    # Column-major hidden and weight (strides (1, n)): the launcher's result against the float64 reference.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    h, w, b, t, g = _make(20, 16, 70, torch.float32, device)
    hs, ws = h.t().contiguous().t(), w.t().contiguous().t()
    assert not hs.is_contiguous() and not ws.is_contiguous()
    tok, lse = tri.triton_fwd(hs, ws, b, t, IGNORE)
    ref = _autograd(h, w, b, t, g, torch.float64, torch.float64)
    low = _autograd(h, w, b, t, g, torch.float32, torch.float32)
    _assert_close("strided tok", tok, ref[0], low[0])
    _assert_close("strided lse", lse, ref[1], low[1])


def _check_neg_inf_bias(impl, dtype, device):
    """bias = -inf over a whole vocabulary tile (and part of another): no NaN, values and grads as float64.

    Tiles are 32 columns under the interpreter (16 x 32 x 16) and 64 or more on a GPU: columns [32, 64) fill
    one interpreter tile, columns [70, 80) part of the next. Row 1's target (66) lies in that partly -inf
    tile, row 2's target (40) is itself masked (tok = -inf exactly), row 3's target (75) too."""
    h, w, b, t, g = _make(12, 8, 300, dtype, device, seed=3)
    b[32:64] = float("-inf")
    b[70:80] = float("-inf")
    t[1], t[2], t[3] = 66, 40, 75
    g[1], g[2], g[3] = 0.7, -1.3, 0.4
    hh, ww, bb = h.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    tok = answer_logprobs(hh, ww, t, bias=bb, ignore_index=IGNORE, impl=impl)
    (tok * g).sum().backward()  # -inf, but the gradient is finite: d tok_n / d z_nv = [v == t_n] - p_nv
    launchers = _launchers(impl)
    ref = _autograd(h, w, b, t, g, torch.float64, torch.float64)
    low = _autograd(h, w, b, t, g, dtype, torch.float32)
    masked = torch.isinf(ref[0])
    assert masked.cpu().tolist() == [i in (2, 3) for i in range(12)], "the setup must mask rows 2 and 3 only"
    assert torch.equal(tok[masked].cpu(), ref[0][masked].float().cpu()), f"{impl}: masked targets must give -inf"
    _assert_close(f"{impl} -inf bias tok", tok[~masked], ref[0][~masked], low[0][~masked])
    if launchers is not None:
        _assert_close(f"{impl} -inf bias lse", launchers[0](h, w, b, t, IGNORE)[1], ref[1], low[1])
    for name, x, r, lo in zip(("grad_hidden", "grad_weight", "grad_bias"), (hh.grad, ww.grad, bb.grad), ref[2:],
                              low[2:]):
        _assert_close(f"{impl} -inf bias {name}", x, r, lo)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_neg_inf_bias_tile(dtype):
    # Regression: an all -inf vocabulary tile made the forward's tile max -inf and exp(z - max) NaN.
    _check_neg_inf_bias("triton", dtype, "cuda" if torch.cuda.is_available() else "cpu")


def test_triton_rejects_bad_shapes():
    h, w, b, t, _ = _make(4, 8, 10, torch.float32, "cpu")
    with pytest.raises(ValueError, match="weight"):
        tri.triton_fwd(h, w[:, :7], b, t, IGNORE)
    with pytest.raises(ValueError, match="targets"):
        tri.triton_fwd(h, w, b, t[:3], IGNORE)
    with pytest.raises(ValueError, match="bias"):
        tri.triton_fwd(h, w, b[:9], t, IGNORE)


# ---- GPU: CUDA and Triton compiled for the device ----

@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("impl", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 19, 131), (300, 200, 1000), (1, 64, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_gpu_backend_matches_float64(impl, dtype, shape, bias):
    _check_backend(impl, *shape, dtype, "cuda", bias=bias)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_cuda_neg_inf_bias_tile(dtype):
    _check_neg_inf_bias("cuda", dtype, "cuda")
