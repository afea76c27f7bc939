"""The Triton and CUDA backends of answer_logprobs against a float64 reference.

Triton runs everywhere (under TRITON_INTERPRET=1 on CPU, set by conftest.py; tiny shapes, the interpreter
is slow). CUDA tests need a GPU and skip cleanly without one. Errors are bounded relative to PyTorch's own
error in the same dtype (STYLE.md 7).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from radit_fast._native import HAS_NATIVE_CUDA
from radit_fast.ops import answer_logprobs
from radit_fast.triton import answer_logprobs as tri
from radit_fast.triton.answer_logprobs import _partial_offsets, _scaled

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
    # Several blocks of every tile dimension and 3 dz chunks, with the config this device really uses:
    # a chunk buffer of N x 2 block_v elements gives chunks of 2 block_v columns; V = 2.5 chunks + 3.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = tri._config(torch.float32, torch.device(device))
    n, width = 70, 2 * cfg.block_v
    v = 2 * width + width // 2 + 3
    monkeypatch.setattr(tri, "DZ_CHUNK_ELEMENTS", n * width)
    assert list(tri.chunk_starts(n, v, cfg.block_v)) == [0, width, 2 * width]
    _check_backend("triton", n, 40, v, torch.float32, device, ignored_every=3, seed=1)


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


# ---- Triton defects of issue 10 (interpreter here; the same tests run compiled on a GPU) ----

def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _offsets_probe(args_ptr, out_ptr):
    """Stores _partial_offsets(block, row_len, 0..3) for a block and a row length read from int32 memory
    (as pid_v, N and V are int32 in the kernels), then the same with a loop index as the block (the merge)."""
    block = tl.load(args_ptr)
    row_len = tl.load(args_ptr + 1)
    offs = tl.arange(0, 4)
    tl.store(out_ptr + offs, _partial_offsets(block, row_len, offs))
    for j in range(block, block + 1):
        tl.store(out_ptr + 4 + offs, _partial_offsets(j, row_len, offs))


@triton.jit
def _scaled_probe(args_ptr, out_ptr):
    """Stores _scaled(row + 0..3, stride) for a row index and a stride read from int32 memory (as offs_n and
    stride_hn / stride_dz are int32 in the kernels)."""
    offs = tl.load(args_ptr) + tl.arange(0, 4)
    tl.store(out_ptr + tl.arange(0, 4), _scaled(offs, tl.load(args_ptr + 1)))


def test_partial_offsets_are_int64():
    # Regression: pid_v * N, j * N and pid_n * V were int32 products that wrap once N * V > 2^31 (here
    # 60000 * 50000 = 3e9: a vocabulary-block row of the forward partials at N = 50000, V = 7.7M / ...).
    args = torch.tensor([60000, 50000], dtype=torch.int32, device=_device())
    out = torch.full((8,), -1, dtype=torch.int64, device=_device())
    _offsets_probe[(1,)](args, out)
    expect = [60000 * 50000 + i for i in range(4)]
    assert out.cpu().tolist() == expect + expect


def test_row_times_stride_is_int64():
    # Regression: row * stride for the hidden, weight, dz and gradient rows must not wrap once N * d or
    # V * d passes 2^31 (here row 50000 of a [*, 60000] tensor: 3e9).
    args = torch.tensor([50_000, 60_000], dtype=torch.int32, device=_device())
    out = torch.full((4,), -1, dtype=torch.int64, device=_device())
    _scaled_probe[(1,)](args, out)
    assert out.cpu().tolist() == [(50_000 + i) * 60_000 for i in range(4)]


KIB = 1024


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("name, capability, smem", [
    ("H100/H200", (9, 0), 227 * KIB), ("B200", (10, 0), 227 * KIB), ("A100", (8, 0), 163 * KIB),
    ("L40S/L4", (8, 9), 99 * KIB), ("RTX 3090/A10", (8, 6), 99 * KIB), ("T4", (7, 5), 64 * KIB),
    ("48 KiB", (8, 0), 48 * KIB)])
def test_config_fits_the_device(name, capability, smem, dtype):
    cfg = tri.config_for(dtype, capability, smem)
    elt = torch.empty((), dtype=dtype).element_size()
    assert cfg.pipeline_smem(elt) + (tri.EPILOGUE_SMEM if smem > 48 * KIB else 0) <= smem, name
    big = cfg.block_n * cfg.block_v >= 128 * 256 and cfg.block_d == 64 and elt == 2
    assert big == (smem >= 220 * KIB and elt == 2), f"{name}: 128x256x64 only where ~228 KB fit, got {cfg}"
    assert cfg.cast_f32 == (capability < (8, 0) and elt == 2), f"{name}: 16-bit dots need sm_80+"
    for size in (cfg.block_n, cfg.block_v, cfg.block_d):
        assert size >= 16 and size & (size - 1) == 0


def test_config_tiers_leave_epilogue_room():
    for minimum, half, single in tri.SMEM_TIERS:
        if minimum:
            assert half.pipeline_smem(2) + tri.EPILOGUE_SMEM <= minimum
            assert single.pipeline_smem(4) + tri.EPILOGUE_SMEM <= minimum


def test_config_reads_the_device_properties(monkeypatch):
    # _config asks torch for the opt-in shared memory and capability of the tensors' own device.
    seen = []

    def props(index):
        seen.append(index)
        return types.SimpleNamespace(major=9, minor=0, shared_memory_per_block_optin=232448,
                                     shared_memory_per_block=49152)

    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    tri._device_config.cache_clear()
    try:
        cfg = tri._config(torch.bfloat16, torch.device("cuda", 3))
    finally:
        tri._device_config.cache_clear()
    assert seen == [3] and (cfg.block_n, cfg.block_v, cfg.block_d, cfg.num_stages) == (128, 256, 64, 3)
    assert tri._config(torch.bfloat16, torch.device("cpu")) == tri.INTERPRETER_CONFIG


def test_launches_run_under_the_tensors_device_guard(monkeypatch):
    # Triton launches on the current device: every launch must sit inside a guard for the inputs' device.
    guarded = []

    def guard(device):
        guarded.append(device)
        return real(device)

    real = tri._device_guard
    monkeypatch.setattr(tri, "_device_guard", guard)
    h, w, b, t, g = _make(6, 8, 40, torch.float32, _device())
    _, lse = tri.triton_fwd(h, w, b, t, IGNORE)
    tri.triton_bwd(h, w, b, t, lse, g, IGNORE, True, True, True)
    assert guarded == [h.device, h.device]
    cuda1 = real(torch.device("cuda", 1))
    assert isinstance(cuda1, torch.cuda.device) and cuda1.idx == 1


def _bad_targets(dtype, device):
    h, w, b, t, g = _make(11, 8, 40, dtype, device, seed=4)
    t[2], t[5], t[7] = 40, -3, 1000  # V, negative (not ignore_index) and far out
    return h, w, b, t, g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_out_of_range_targets_flag_without_sync(dtype):
    # No host check: the bad rows come out NaN, the rest exact, and the device flag is set; the flag is
    # read (and cleared) only by raise_if_flagged.
    device = _device()
    h, w, b, t, g = _bad_targets(dtype, device)
    tri.error_flag(device).zero_()
    tok, lse = tri.triton_fwd(h, w, b, t, IGNORE)
    bad = torch.zeros(11, dtype=torch.bool)
    bad[[2, 5, 7]] = True
    assert torch.isnan(tok.cpu()[bad]).all() and not torch.isnan(tok.cpu()[~bad]).any()
    tc = torch.where(bad.to(t.device), 0, t)
    ref = _autograd(h, w, b, tc, g, torch.float64, torch.float64)
    low = _autograd(h, w, b, tc, g, dtype, torch.float32)
    _assert_close("in-range tok", tok[~bad.to(tok.device)], ref[0][~bad], low[0][~bad])
    _assert_close("lse", lse, ref[1], low[1])
    assert int(tri.error_flag(device).item()) == tri.FLAG_TARGET_OUT_OF_RANGE
    with pytest.raises(ValueError, match="outside"):
        tri.raise_if_flagged(device)
    tri.raise_if_flagged(device)  # cleared
    own = torch.zeros(1, dtype=torch.int32, device=device)
    tri.triton_fwd(h, w, b, t, IGNORE, flag=own)
    assert int(own.item()) == 1 and int(tri.error_flag(device).item()) == 0
    t_ok = torch.where(bad.to(t.device), IGNORE, t)
    tri.triton_fwd(h, w, b, t_ok, IGNORE, flag=own.zero_())
    assert int(own.item()) == 0


def test_debug_checks_raise_at_the_call(monkeypatch):
    monkeypatch.setenv("RADIT_DEBUG_CHECKS", "1")
    h, w, b, t, _ = _bad_targets(torch.float32, _device())
    with pytest.raises(ValueError, match=r"targets\[2\] = 40 is outside \[0, 40\)"):
        tri.triton_fwd(h, w, b, t, IGNORE)
    assert int(tri.error_flag(_device()).item()) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weight_grad_in_weight_dtype_without_fp32_copy(monkeypatch, dtype):
    # Regression: grad_weight was a full fp32 [V, d] buffer, cast afterwards. Now every tile is reduced in
    # fp32 registers and stored once in the weight's dtype; no fp32 allocation reaches V * d elements.
    n, d, v = 20, 48, 300
    h, w, b, t, g = _make(n, d, v, dtype, _device(), seed=5)
    _, lse = tri.triton_fwd(h, w, b, t, IGNORE)
    allocated = []

    def spy(fn):
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            allocated.append((out.dtype, out.numel()))
            return out
        return wrapper

    for name in ("empty", "zeros", "full", "empty_like", "zeros_like"):
        monkeypatch.setattr(torch, name, spy(getattr(torch, name)))
    gh, gw, gb = tri.triton_bwd(h, w, b, t, lse, g, IGNORE, True, True, True)
    monkeypatch.undo()
    assert gw.dtype == dtype and gw.shape == (v, d)
    big_fp32 = [a for a in allocated if a[0] == torch.float32 and a[1] >= v * d]
    assert not big_fp32, f"fp32 buffers of >= V*d elements: {big_fp32}"
    ref = _autograd(h, w, b, t, g, torch.float64, torch.float64)
    low = _autograd(h, w, b, t, g, dtype, torch.float32)
    for name, x, r, lo in zip(("grad_hidden", "grad_weight", "grad_bias"), (gh, gw, gb), ref[2:], low[2:]):
        _assert_close(f"{dtype} {name}", x, r, lo)


def test_grad_bias_is_the_ordered_sum_of_row_blocks(monkeypatch):
    # grad_bias = sum over row blocks of per-block column sums, no atomics: bitwise equal across runs and
    # equal to the float64 column sums of dz within fp32 rounding.
    device = _device()
    cfg = tri._config(torch.float32, torch.device(device))
    n = 3 * cfg.block_n + 5  # 4 row blocks
    h, w, b, t, g = _make(n, 16, 90, torch.float32, device, seed=6)
    _, lse = tri.triton_fwd(h, w, b, t, IGNORE)
    runs = [tri.triton_bwd(h, w, b, t, lse, g, IGNORE, True, True, True) for _ in range(2)]
    for x, y in zip(*runs):
        assert torch.equal(x, y)
    ref = _autograd(h, w, b, t, g, torch.float64, torch.float64)
    low = _autograd(h, w, b, t, g, torch.float32, torch.float32)
    _assert_close("grad_bias", runs[0][2], ref[4], low[4])


def _aot(*args: str) -> list[dict]:
    """Run python_tests/triton_aot.py (ahead-of-time compilation for a GPU target, no GPU needed)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).resolve().with_name("triton_aot.py")
    done = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_kernels_compile_for_hopper_and_ada_within_shared_memory():
    # The configs the heuristic picks compile for sm_90 (H100/H200: 227 KiB) and sm_89 (L40S/L4/4090:
    # 99 KiB) with the shared memory the compiler allocates inside the device limit and inside the
    # estimate config_for relies on; Hopper gets wgmma, both get cp.async pipelines.
    # (One kernel, two targets, to keep it to two compilations; triton_aot.py does all four kernels.)
    rows = _aot("90:232448", "89:101376", "--dtypes", "bfloat16", "--kernels", "fwd_tile")
    assert [(r["sm"], r["kernel"]) for r in rows] == [(90, "fwd_tile"), (89, "fwd_tile")]
    for r in rows:
        assert r["shared"] <= r["smem_limit"], r
        assert r["shared"] <= r["pipeline_estimate"] + tri.EPILOGUE_SMEM, r
        assert r["cp_async"], r
        assert r["wgmma"] == (r["sm"] == 90) and (r["mma_sync"] or r["wgmma"]), r
    assert rows[0]["config"] == [128, 256, 64, 8, 3]


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


# ---- GPU: the Triton defects of issue 10, compiled for the device ----

@pytest.mark.cuda
@requires_cuda
def test_gpu_triton_config_fits_this_device():
    props = torch.cuda.get_device_properties(0)
    smem = tri._smem_per_block(props)
    for dtype in (torch.bfloat16, torch.float32):
        cfg = tri._config(dtype, torch.device("cuda", 0))
        assert cfg.pipeline_smem(torch.empty((), dtype=dtype).element_size()) <= smem, (props.name, cfg)
    _check_backend("triton", 300, 200, 1000, torch.bfloat16, "cuda")  # the chosen config launches


@pytest.mark.cuda
@requires_cuda
def test_gpu_triton_no_host_sync():
    # set_sync_debug_mode("error") raises on any synchronising call (.item(), bool(), nonzero, copies to
    # the host): the forward and backward launchers make none, so they can run under CUDA graphs.
    h, w, b, t, g = _make(257, 64, 3000, torch.bfloat16, "cuda", ignored_every=3)
    tok, lse = tri.triton_fwd(h, w, b, t, IGNORE)  # compile outside the checked region
    tri.triton_bwd(h, w, b, t, lse, g, IGNORE, True, True, True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tok, lse = tri.triton_fwd(h, w, b, t, IGNORE)
        tri.triton_bwd(h, w, b, t, lse, g, IGNORE, True, True, True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(tok).all()


@pytest.mark.cuda
@requires_cuda
def test_gpu_triton_weight_grad_peak_memory():
    # The backward's peak is its outputs (grad_weight in bf16, grad_hidden fp32), the dz chunk and the bias
    # partials: an fp32 [V, d] buffer (V*d*4 bytes, 256 MB here) does not fit under the bound.
    n, d, v = 512, 1024, 65536
    h, w, b, t, g = _make(n, d, v, torch.bfloat16, "cuda")
    tok, lse = tri.triton_fwd(h, w, b, t, IGNORE)
    tri.triton_bwd(h, w, b, t, lse, g, IGNORE, True, True, True)  # compile first
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    gh, gw, gb = tri.triton_bwd(h, w, b, t, lse, g, IGNORE, True, True, True)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    cfg = tri._config(torch.bfloat16, torch.device("cuda"))
    width = tri.chunk_starts(n, v, cfg.block_v).step
    expected = v * d * 2 + n * d * 4 + 2 * v * 4 + n * width * 2 + triton.cdiv(n, cfg.block_n) * v * 4 + n * 8
    assert gw.dtype == torch.bfloat16
    assert extra <= expected + (8 << 20), f"peak extra {extra / 2**20:.0f} MiB > {expected / 2**20:.0f} MiB + 8"


@pytest.mark.cuda
@requires_cuda
def test_gpu_triton_bitwise_deterministic():
    h, w, b, t, g = _make(1000, 256, 5000, torch.bfloat16, "cuda", ignored_every=7)
    outs = []
    for _ in range(3):
        tok, lse = tri.triton_fwd(h, w, b, t, IGNORE)
        outs.append((tok, lse, *tri.triton_bwd(h, w, b, t, lse, g, IGNORE, True, True, True)))
    for other in outs[1:]:
        for name, x, y in zip(("tok", "lse", "gh", "gw", "gb"), outs[0], other):
            assert torch.equal(x, y), f"{name} differs between runs"


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_triton_second_device():
    # Tensors on cuda:1 while cuda:0 is current: the launchers switch devices for their launches.
    torch.cuda.set_device(0)
    h, w, b, t, g = _make(37, 19, 131, torch.bfloat16, "cuda:1")
    tok, lse = tri.triton_fwd(h, w, b, t, IGNORE)
    grads = tri.triton_bwd(h, w, b, t, lse, g, IGNORE, True, True, True)
    ref = _autograd(h, w, b, t, g, torch.float64, torch.float64)
    low = _autograd(h, w, b, t, g, torch.bfloat16, torch.float32)
    for name, x, r, lo in zip(("tok", "lse", "gh", "gw", "gb"), (tok, lse, *grads), ref, low):
        assert x.device == torch.device("cuda", 1)
        _assert_close(f"cuda:1 {name}", x, r, lo)

