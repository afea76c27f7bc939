"""The fused epilogues of answer_logprobs (radit_fast/ops/_answer_logprobs_epilogue.py) against float64 torch math.

Each test drives the three functions the way the blocked driver does (a logits block per vocabulary range, in
a buffer whose row stride exceeds the block width) and compares with the same formulas evaluated in float64 on
the very inputs the epilogue saw (bf16 blocks and biases upcast exactly). The CPU entry points run here; the
CUDA twins run the same checks on a GPU (marked ``cuda``, skipped without one), plus the device-only behaviour:
the error flag, bitwise determinism of grad_bias, a side stream and a second device.
"""
from __future__ import annotations

import pytest
import torch

from radit_fast._native import HAS_NATIVE, HAS_NATIVE_CUDA
from radit_fast.ops import _answer_logprobs_epilogue as epi

IGNORE = -100
pytestmark = pytest.mark.skipif(not HAS_NATIVE, reason="radit_fast._C is not built")
_gpu = [pytest.mark.cuda, pytest.mark.skipif(not (torch.cuda.is_available() and HAS_NATIVE_CUDA),
                                             reason="needs an NVIDIA GPU and radit_fast._C built with CUDA")]
DEVICES = ["cpu", pytest.param("cuda", marks=_gpu)]


def _case(n, v, dtype, bias_dtype, seed, ignored_every=4):
    gen = torch.Generator().manual_seed(seed)
    z = (3.0 * torch.randn(n, v, generator=gen)).to(dtype)
    b = None if bias_dtype is None else torch.randn(v, generator=gen).to(bias_dtype)
    t = torch.randint(0, v, (n,), generator=gen)
    if ignored_every:
        t[1::ignored_every] = IGNORE
    g = torch.randn(n, generator=gen)
    g[2] = 0.0  # a row with zero upstream gradient (dz must be exactly 0)
    return z, b, t, g


def _ref(z, b, t):
    """float64 x = z + b, lse and tok (0 at ignored rows)."""
    x = z.double() + (0.0 if b is None else b.double())
    lse = torch.logsumexp(x, 1)
    keep = t != IGNORE
    tok = x.gather(1, torch.where(keep, t, 0)[:, None])[:, 0] - lse
    return x, torch.where(keep, lse, 0.0), torch.where(keep, tok, 0.0)


def _blocks(v, widths):
    out, c0 = [], 0
    for w in widths:
        if c0 >= v:
            break
        out.append((c0, min(w, v - c0)))
        c0 += w
    if c0 < v:
        out.append((c0, v - c0))
    return out


def _block_buffer(z, c0, c, pad, device):
    """z[:, c0:c0+c] copied into a [n, c + pad] buffer (row stride c + pad), as the driver's GEMM output."""
    buf = torch.full((z.shape[0], c + pad), float("nan"), dtype=z.dtype, device=device)
    blk = buf[:, :c]
    blk.copy_(z[:, c0:c0 + c])
    return blk


def _run_fwd(z, b, t, widths, pad, device, segment_ids=None, num_segments=0):
    n, v = z.shape
    dev = torch.device(device)
    zd, td = z.to(dev), t.to(dev)
    bd = None if b is None else b.to(dev)
    m = torch.full((n,), float("-inf"), device=dev)
    s = torch.zeros(n, device=dev)
    tl = torch.full((n,), float("nan"), device=dev)
    for c0, c in _blocks(v, widths):
        epi.fwd_block(_block_buffer(zd, c0, c, pad, dev), c0, v, bd, td, IGNORE, m, s, tl)
    lse = torch.full((n,), float("nan"), device=dev)
    tok = torch.full((n,), float("nan"), device=dev)
    seg = None
    if segment_ids is not None:
        seg = torch.full((num_segments,), float("nan"), device=dev)
        segment_ids = segment_ids.to(dev)
    epi.fwd_finalize(td, v, IGNORE, m, s, tl, lse, tok, segment_ids, seg)
    return lse.cpu(), tok.cpu(), None if seg is None else seg.cpu()


def _close(name, got, ref, rtol, atol):
    got, ref = got.double(), ref.double()
    err = (got - ref).abs()
    bound = atol + rtol * ref.abs()
    bad = ~torch.isfinite(got) | (err > bound)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        rows = [f"{tuple(i)}: got {got[tuple(i)].item():.7g} ref {ref[tuple(i)].item():.7g}" for i in idx]
        raise AssertionError(f"{name}: {int(bad.sum())} mismatches, max error {err.max().item():.3g}; first: {rows}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16])
def test_forward_blocks_and_finalize(device, dtype, bias_dtype):
    # Ragged blocks (64, 37, 8, the rest) of a 301-entry vocabulary, row strides with and without padding.
    z, b, t, _ = _case(45, 301, dtype, bias_dtype, seed=1)
    _, lse_ref, tok_ref = _ref(z, b, t)
    for pad in (0, 3):
        lse, tok, _ = _run_fwd(z, b, t, [64, 37, 8], pad, device)
        _close(f"lse pad={pad}", lse, lse_ref, 1e-6, 1e-5)
        _close(f"tok pad={pad}", tok, tok_ref, 1e-6, 1e-5)
        ignored = t == IGNORE
        assert (tok[ignored] == 0).all() and (lse[ignored] == 0).all()
    # One block covering the whole vocabulary gives the same values.
    lse1, tok1, _ = _run_fwd(z, b, t, [301], 0, device)
    _close("lse one block", lse1, lse_ref, 1e-6, 1e-5)
    _close("tok one block", tok1, tok_ref, 1e-6, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_forward_many_rows_and_wide_rows(device):
    # Many short rows (more than every resident warp of an H100/H200: a warp per row on a GPU) and a few very
    # wide ones (a block per row).
    for n, v, widths in ((20000, 24, [16]), (3, 20000, [8192])):
        z, b, t, _ = _case(n, v, torch.bfloat16, torch.float32, seed=n)
        _, lse_ref, tok_ref = _ref(z, b, t)
        lse, tok, _ = _run_fwd(z, b, t, widths, 0, device)
        _close(f"lse n={n}", lse, lse_ref, 1e-6, 2e-5)
        _close(f"tok n={n}", tok, tok_ref, 1e-6, 2e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_segments(device):
    z, b, t, _ = _case(30, 90, torch.float32, torch.float32, seed=2)
    seg_ids = torch.tensor([0] * 7 + [2] * 10 + [3] * 6 + [0] * 7)  # segment 1 empty, 0 split in two runs
    _, _, tok_ref = _ref(z, b, t)
    seg_ref = torch.zeros(5, dtype=torch.float64).index_add_(0, seg_ids, tok_ref)
    _, tok, seg = _run_fwd(z, b, t, [32], 1, device, seg_ids, 5)
    _close("tok", tok, tok_ref, 1e-6, 1e-5)
    _close("seg", seg, seg_ref, 1e-6, 1e-4)
    assert seg[1] == 0 and seg[4] == 0


def test_out_of_range_target_raises_on_cpu():
    z, b, t, _ = _case(6, 50, torch.float32, None, seed=3)
    t[4] = 50
    with pytest.raises(ValueError, match=r"answer_logprobs: targets\[4\] = 50 is outside \[0, 50\) and is not "
                                         r"ignore_index = -100"):
        _run_fwd(z, b, t, [16], 0, "cpu")
    t[4] = -3
    with pytest.raises(ValueError, match=r"targets\[4\] = -3 is outside"):
        _run_fwd(z, b, t, [16], 0, "cpu")


def _run_bwd(z, b, t, g, lse, widths, pad, device, out_dtype=None, grad_bias0=None):
    """dz per block (float64 [n, V] assembled on the CPU) and grad_bias."""
    n, v = z.shape
    dev = torch.device(device)
    zd, td, gd, ld = z.to(dev), t.to(dev), g.to(dev), lse.to(dev)
    bd = None if b is None else b.to(dev)
    gb = None if grad_bias0 is None else grad_bias0.clone().to(dev)
    dz = torch.empty(n, v, dtype=torch.float64)
    for c0, c in _blocks(v, widths):
        blk = _block_buffer(zd, c0, c, pad, dev)
        before = blk.clone()
        if out_dtype is None:
            epi.bwd_block(blk, c0, v, bd, td, IGNORE, ld, gd, gb)
            dz[:, c0:c0 + c] = blk.cpu().double()
        else:
            out = torch.full((n, c + pad), float("nan"), dtype=out_dtype, device=dev)[:, :c]
            epi.bwd_block(blk, c0, v, bd, td, IGNORE, ld, gd, gb, out=out)
            assert torch.equal(blk, before), "z must be left alone when out is given"
            dz[:, c0:c0 + c] = out.cpu().double()
    return dz, None if gb is None else gb.cpu()


def _dz_ref(z, b, t, g, lse):
    x = z.double() + (0.0 if b is None else b.double())
    p = torch.exp(x - lse.double()[:, None])
    onehot = torch.zeros_like(p)
    keep = t != IGNORE
    onehot[keep.nonzero()[:, 0], t[keep]] = 1.0
    dz = g.double()[:, None] * (onehot - p)
    dz[~keep] = 0.0
    return dz


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,out_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                             (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                             (torch.float32, torch.float32)])
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16])
def test_backward_blocks(device, dtype, out_dtype, bias_dtype):
    z, b, t, g = _case(40, 517, dtype, bias_dtype, seed=4)
    _, lse_ref, _ = _ref(z, b, t)
    lse = lse_ref.float()
    ref = _dz_ref(z, b, t, g, lse)
    gb0 = torch.randn(517)  # grad_bias accumulates onto what is there
    for pad in (0, 5):
        dz, gb = _run_bwd(z, b, t, g, lse, [256, 100], pad, device, out_dtype, gb0 if b is not None else None)
        low = (out_dtype or dtype) == torch.bfloat16
        _close(f"dz pad={pad}", dz, ref, 2 ** -8 if low else 1e-5, 1e-6)
        zero_rows = (t == IGNORE) | (g == 0)
        assert (dz[zero_rows] == 0).all(), "ignored rows and rows with grad_tok == 0 must be exactly 0"
        if b is not None:
            _close(f"grad_bias pad={pad}", gb, gb0.double() + ref.sum(0), 1e-5, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_grad_bias_deterministic(device):
    z, b, t, g = _case(700, 1100, torch.float32, torch.float32, seed=5, ignored_every=0)
    lse = _ref(z, b, t)[1].float()
    runs = [_run_bwd(z, b, t, g, lse, [512], 0, device, None, torch.zeros(1100))[1] for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:]), "grad_bias must have the same bits on every run"
    _close("grad_bias", runs[0], _dz_ref(z, b, t, g, lse).sum(0), 1e-5, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_neg_inf_bias_columns(device):
    # A whole block of -inf bias and a target inside it: tok = -inf exactly, no NaN anywhere, dz finite.
    z, b, t, g = _case(10, 200, torch.float32, torch.float32, seed=6, ignored_every=0)
    b[64:128] = float("-inf")
    t[3] = 70
    _, lse_ref, tok_ref = _ref(z, b, t)
    lse, tok, _ = _run_fwd(z, b, t, [64], 0, device)
    masked = torch.isinf(tok_ref)
    assert masked[3] and masked.sum() < 10, "the setup must mask row 3's target and leave some rows finite"
    assert (tok[masked] == float("-inf")).all()
    _close("tok", tok[~masked], tok_ref[~masked], 1e-6, 1e-5)
    _close("lse", lse, lse_ref, 1e-6, 1e-5)
    dz, gb = _run_bwd(z, b, t, g, lse, [64], 0, device, None, torch.zeros(200))
    ref = _dz_ref(z, b, t, g, lse)
    _close("dz", dz, ref, 1e-5, 1e-6)
    _close("grad_bias", gb, ref.sum(0), 1e-5, 1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments(device):
    dev = torch.device(device)
    z = torch.randn(4, 8, device=dev)
    t = torch.zeros(4, dtype=torch.int64, device=dev)
    m, s, tl = (torch.zeros(4, device=dev) for _ in range(3))
    with pytest.raises(ValueError, match=r"z must be float32 \| bfloat16, got float16"):
        epi.fwd_block(z.half(), 0, 8, None, t, IGNORE, m, s, tl)
    with pytest.raises(ValueError, match=r"z must have stride\(1\) == 1"):
        epi.fwd_block(torch.randn(8, 4, device=dev).t(), 0, 8, None, t, IGNORE, m, s, tl)
    with pytest.raises(ValueError, match=r"block columns \[4, 12\) must lie inside the vocabulary \[0, 8\)"):
        epi.fwd_block(z, 4, 8, None, t, IGNORE, m, s, tl)
    with pytest.raises(ValueError, match="bias dimension 0 must be 8"):
        epi.fwd_block(z, 0, 8, torch.zeros(7, device=dev), t, IGNORE, m, s, tl)
    with pytest.raises(ValueError, match="targets must be int64, got int32"):
        epi.fwd_block(z, 0, 8, None, t.int(), IGNORE, m, s, tl)
    with pytest.raises(ValueError, match="row_sum dimension 0 must be 4"):
        epi.fwd_block(z, 0, 8, None, t, IGNORE, m, s[:3], tl)
    with pytest.raises(ValueError, match="out dimension 1 must be 8"):
        epi.bwd_block(z, 0, 8, None, t, IGNORE, m, s, None, out=torch.zeros(4, 7, device=dev))
    with pytest.raises(ValueError, match="unsupported dtype torch.float64"):
        epi.fwd_block(z.double(), 0, 8, None, t, IGNORE, m, s, tl)
    with pytest.raises(ValueError, match="give segment_ids and seg together"):
        epi.fwd_finalize(t, 8, IGNORE, m, s, tl, m.clone(), s.clone(), segment_ids=t)


def test_cpu_entry_points_reject_cuda_pointers_by_device():
    # A tensor that claims another device is refused by the CPU entry point (the device travels in TensorArg).
    from radit_fast._native import _C, tensor_arg

    z = torch.zeros(2, 4)
    arg = (z.data_ptr(), int(_C.DType.float32), (2, 4), (4, 1), 0)
    t, v = tensor_arg(torch.zeros(2, dtype=torch.int64)), tensor_arg(torch.zeros(2))
    with pytest.raises(ValueError, match="z is on cuda:0 but the op runs on cpu"):
        _C.answer_logprobs_fwd_block_cpu(arg, 0, 4, None, t, IGNORE, v, v, v, 1)
    with pytest.raises(ValueError, match="TensorArg: sizes and strides must be tuples of one length"):
        _C.answer_logprobs_fwd_block_cpu((z.data_ptr(), 0, (2, 4), (4,), -1), 0, 4, None, t, IGNORE, v, v, v, 1)
    with pytest.raises(ValueError, match="TensorArg: unknown dtype code 99"):
        _C.answer_logprobs_fwd_block_cpu((z.data_ptr(), 99, (2, 4), (4, 1), -1), 0, 4, None, t, IGNORE, v, v, v, 1)


# ---- CUDA only ----

@pytest.mark.parametrize("_", [pytest.param(0, marks=_gpu)])
def test_cuda_out_of_range_target_sets_flag_without_sync(_):
    z, b, t, _g = _case(9, 60, torch.float32, None, seed=7)
    t[5] = 60
    dev = torch.device("cuda")
    zd, td = z.to(dev), t.to(dev)
    m = torch.full((9,), float("-inf"), device=dev)
    s, tl, lse, tok = (torch.zeros(9, device=dev) for _ in range(4))
    flag = torch.zeros(1, dtype=torch.int32, device=dev)
    epi.fwd_block(zd, 0, 60, None, td, IGNORE, m, s, tl)
    seg = torch.zeros(2, device=dev)
    epi.fwd_finalize(td, 60, IGNORE, m, s, tl, lse, tok, torch.zeros(9, dtype=torch.int64, device=dev), seg, flag)
    assert int(flag.item()) == 1
    tok = tok.cpu()
    assert torch.isnan(tok[5]) and torch.isfinite(tok[torch.arange(9) != 5]).all()
    # A valid call leaves the flag at 0; a bad segment id raises it.
    t[5] = 1
    flag.zero_()
    epi.fwd_finalize(t.to(dev), 60, IGNORE, m, s, tl, lse, tok.to(dev), torch.zeros(9, dtype=torch.int64, device=dev),
                     seg, flag)
    assert int(flag.item()) == 0
    epi.fwd_finalize(t.to(dev), 60, IGNORE, m, s, tl, lse, tok.to(dev), torch.full((9,), 2, device=dev), seg, flag)
    assert int(flag.item()) == 1


@pytest.mark.parametrize("_", [pytest.param(0, marks=_gpu)])
def test_cuda_side_stream_matches_cpu(_):
    z, b, t, g = _case(64, 700, torch.bfloat16, torch.bfloat16, seed=8)
    lse_cpu, tok_cpu, _ = _run_fwd(z, b, t, [256], 0, "cpu")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        lse, tok, _ = _run_fwd(z, b, t, [256], 0, "cuda")
        dz, gb = _run_bwd(z, b, t, g, lse_cpu, [256], 0, "cuda", None, torch.zeros(700))
    _close("lse", lse, lse_cpu.double(), 1e-6, 1e-5)
    _close("tok", tok, tok_cpu.double(), 1e-6, 1e-5)
    ref = _dz_ref(z, b, t, g, lse_cpu)
    _close("dz", dz, ref, 2 ** -8, 1e-6)
    _close("grad_bias", gb, ref.sum(0), 1e-4, 1e-5)


@pytest.mark.parametrize("_", [pytest.param(0, marks=_gpu)])
def test_cuda_second_device_guard(_):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    z, b, t, g = _case(20, 300, torch.float32, torch.float32, seed=9)
    _, lse_ref, tok_ref = _ref(z, b, t)
    with torch.cuda.device(0):  # tensors on cuda:1 while cuda:0 is current
        lse, tok, _ = _run_fwd(z, b, t, [128], 0, "cuda:1")
    _close("lse", lse, lse_ref, 1e-6, 1e-5)
    _close("tok", tok, tok_ref, 1e-6, 1e-5)
