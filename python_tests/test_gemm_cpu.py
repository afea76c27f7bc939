"""The native GEMM of the CPU driver (csrc/answer_logprobs/gemm_cpu.cpp): c (+)= a @ b for float32 and bfloat16
operands in every layout the driver passes (row-major, transposed storage, strided views), against float64
products of the same values, and its use by the blocked driver.

Two kernels: AVX-512 (float32; bfloat16 with AVX512-BF16) and AVX2 + FMA (gemm_avx2_cpu.cpp); the kernel tests run
every one this CPU has (an AVX-512 CPU runs both). The driver uses the native kernel for bfloat16 wherever one runs
and for float32 only with AVX-512 (MKL's AVX2 sgemm is as fast). Without either the kernel must refuse with one line
and the driver must keep torch.mm (bfloat16 blocks). Products of bfloat16 values are exact in float32 and float32 products carry one
rounding, so the error is float32 summation: bounded by (K + 1) * 2^-24 * sum_k |a_k b_k| per entry (+ the
rounding of the added c with accumulate).
"""
from __future__ import annotations

import itertools

import pytest
import torch

from radit_fast import _native
from radit_fast._native import HAS_NATIVE, tensor_arg
from radit_fast.ops import _answer_logprobs_blocked as blocked
from radit_fast.ops import answer_logprobs

pytestmark = pytest.mark.skipif(not HAS_NATIVE, reason="radit_fast._C is not built")
DTYPES = [torch.float32, torch.bfloat16]


def _supported(dtype: torch.dtype) -> bool:
    return HAS_NATIVE and bool(_native._C.answer_logprobs_gemm_cpu_supported(dtype == torch.bfloat16))


def _need(dtype: torch.dtype) -> None:
    if not _supported(dtype):
        pytest.skip(f"this CPU does not run the native {dtype} GEMM")


def _runs(isa: str, dtype: torch.dtype) -> bool:
    """True when this CPU runs the named kernel for dtype (asked of the kernel itself)."""
    try:
        _gemm(torch.ones(1, 1).to(dtype), torch.ones(1, 1).to(dtype), 1, isa=isa)
    except ValueError:
        return False
    return True


ISAS = ["avx2", "avx512"]


def _need_isa(isa: str, dtype: torch.dtype) -> None:
    _need(dtype)
    if not _runs(isa, dtype):
        pytest.skip(f"this CPU does not run the {isa} kernel for {dtype}")


def _gemm(a, b, threads, out=None, accumulate=False, isa=""):
    c = torch.full((a.shape[0], b.shape[1]), float("nan")) if out is None else out
    _native._C.answer_logprobs_gemm_cpu(tensor_arg(a, "a"), tensor_arg(b, "b"), tensor_arg(c, "c"), accumulate,
                                        threads, isa)
    return c


def _operand(rows, cols, dtype, layout, gen):
    """[rows, cols] values in a layout: row-major, transposed storage, or a strided view of a wider tensor."""
    if layout == "rows":
        x = torch.randn(rows, cols, generator=gen)
    elif layout == "transposed":
        x = torch.randn(cols, rows, generator=gen).T
    else:
        x = torch.randn(rows + 3, cols + 5, generator=gen)[2:2 + rows, 1:1 + cols]
    return x.to(dtype)


def _check(c, a, b, c0=None):
    ref = a.double() @ b.double()
    k = a.shape[1]
    bound = (k + 1) * 2.0 ** -24 * (a.double().abs() @ b.double().abs()) + 1e-30
    if c0 is not None:
        ref = ref + c0.double()
        bound = bound + 2.0 ** -23 * (ref.abs() + c0.double().abs())
    assert c.dtype == torch.float32
    err = (c.double() - ref).abs()
    assert bool((err <= bound).all()), f"max error {float(err.max()):.3g} above the float32 bound"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (7, 5, 17), (6, 64, 64), (13, 576, 300), (64, 577, 1000),
                                   (100, 2, 257), (5, 3, 513), (3, 1301, 70), (0, 4, 3), (3, 4, 0), (2, 0, 5)])
def test_matches_float64_and_thread_count(isa, dtype, m, k, n):
    _need_isa(isa, dtype)
    gen = torch.Generator().manual_seed(m * 1000 + k * 10 + n)
    a = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(k, n, generator=gen).to(dtype)
    c1 = _gemm(a, b, 1, isa=isa)
    _check(c1, a, b)
    assert torch.equal(c1, _gemm(a, b, 2, isa=isa)), "the result depends on the thread count"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("la,lb", list(itertools.product(["rows", "transposed", "strided"], repeat=2)))
def test_every_layout_and_accumulate(isa, dtype, la, lb):
    """The driver's products: z = H W^T (b transposed), dZ @ W (b rows), dZ^T @ H (a transposed), any views."""
    _need_isa(isa, dtype)
    gen = torch.Generator().manual_seed(11)
    # K over one block (640 lanes, 768 values in the AVX2 kernel); odd K; columns past one packed block
    for m, k, n in [(37, 1282, 70), (9, 33, 300), (50, 8, 16), (13, 1601, 1100)]:
        a, b = _operand(m, k, dtype, la, gen), _operand(k, n, dtype, lb, gen)
        _check(_gemm(a, b, 2, isa=isa), a, b)
        c0 = torch.randn(m, n, generator=gen)
        _check(_gemm(a, b, 1, out=c0.clone(), accumulate=True, isa=isa), a, b, c0)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_writes_only_its_columns_of_a_wider_output(isa, dtype):
    _need_isa(isa, dtype)
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(9, 40, generator=gen).to(dtype)[:, :33]
    b = torch.randn(33, 80, generator=gen).to(dtype)[:, 5:75]
    out = torch.full((9, 80), -7.0)
    _gemm(a, b, 1, out=out[:, 5:75], isa=isa)
    _check(out[:, 5:75], a, b)
    assert bool((out[:, :5] == -7.0).all()) and bool((out[:, 75:] == -7.0).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_refuses_wrong_dtypes_and_shapes(dtype):
    _need(dtype)
    a, b = torch.ones(2, 3).to(dtype), torch.ones(3, 4).to(dtype)
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    with pytest.raises(ValueError, match="one dtype"):
        _gemm(a, b.to(other), 1)
    with pytest.raises(ValueError, match="b"):
        _gemm(a, torch.ones(2, 4).to(dtype), 1)
    with pytest.raises(ValueError, match="c"):
        _gemm(a, b, 1, out=torch.empty(2, 4).bfloat16())
    with pytest.raises(ValueError, match="a"):
        _gemm(a.double(), b.double(), 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_without_the_instructions_refuses_and_driver_keeps_torch_mm(dtype):
    if _supported(dtype):
        pytest.skip("this CPU runs the native GEMM")
    with pytest.raises(ValueError, match="AVX"):
        _gemm(torch.ones(2, 3).to(dtype), torch.ones(3, 4).to(dtype), 1)
    assert not blocked.native_gemm("cpu", dtype)
    if dtype == torch.bfloat16:
        assert blocked.block_dtype(torch.bfloat16, torch.device("cpu")) == torch.bfloat16


def test_driver_block_dtypes():
    assert blocked.block_dtype(torch.float32, torch.device("cpu")) == torch.float32
    want = torch.float32 if _supported(torch.bfloat16) else torch.bfloat16
    assert blocked.block_dtype(torch.bfloat16, torch.device("cpu")) == want
    isa = _native._C.answer_logprobs_gemm_cpu_isa(False) if HAS_NATIVE else ""
    assert blocked.native_gemm("cpu", torch.float32) == (isa == "avx512")
    assert blocked.native_gemm("cpu", torch.bfloat16) == _supported(torch.bfloat16)
    assert not blocked.native_gemm("cpu", torch.float16)


def test_isa_names_the_kernel_and_unknown_names_are_refused():
    _need(torch.float32)
    for dtype in DTYPES:
        isa = _native._C.answer_logprobs_gemm_cpu_isa(dtype == torch.bfloat16)
        assert isa in ("avx2", "avx512") and _runs(isa, dtype)
        if isa == "avx2":  # the AVX-512 kernel is not run where the CPU lacks its instructions
            with pytest.raises(ValueError, match="cannot run the avx512 kernel"):
                _gemm(torch.ones(2, 3).to(dtype), torch.ones(3, 4).to(dtype), 1, isa="avx512")
    with pytest.raises(ValueError, match="isa must be"):
        _gemm(torch.ones(2, 3), torch.ones(3, 4), 1, isa="sse")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", ["hidden", "weight", "both"])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_driver_with_transposed_storage_matches_float64(dtype, transposed, reduction):
    """Token log-probs and gradients through the driver with operands stored transposed (the kernel reads them
    in place or packs them; nothing is freed under it: three calls, later allocations reuse freed memory)."""
    _need(dtype)
    gen = torch.Generator().manual_seed(7)
    n, d, v = 300, 64, 5000
    h = (0.5 * torch.randn(d, n, generator=gen)).to(dtype).T if transposed != "weight" else \
        (0.5 * torch.randn(n, d, generator=gen)).to(dtype)
    w = (0.3 * torch.randn(d, v, generator=gen)).to(dtype).T if transposed != "hidden" else \
        (0.3 * torch.randn(v, d, generator=gen)).to(dtype)
    t = torch.randint(0, v, (n,), generator=gen)
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    ref = torch.log_softmax(h64 @ w64.T, -1).gather(1, t[:, None])[:, 0]
    ref.sum().backward()
    for _ in range(3):
        hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()
        out = answer_logprobs(hh, ww, t, impl="cpu", reduction=reduction)
        if reduction == "none":
            assert float((out.detach().double() - ref.detach()).abs().max()) < 1e-4
            out.sum().backward()
        else:
            assert abs(float(out.detach()) - float(ref.detach().sum())) < 1e-4 * n
            out.backward()
        # bfloat16 gradients are rounded to bfloat16 once (2^-9 relative)
        tol = 1e-5 if dtype == torch.float32 else 4e-3
        for got, want in [(hh.grad, h64.grad), (ww.grad, w64.grad)]:
            assert float((got.double() - want).abs().max()) <= tol * float(want.abs().max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(1, 5), (5, 1), (16, 16), (37, 70), (64, 129), (200, 1000)])
def test_transpose_is_exact(dtype, rows, cols):
    """dst = src^T (the transposed grad_weight accumulator into the gradient): bit-equal to torch's copy, with
    round-to-nearest-even into bfloat16; contiguous and strided sources; any thread count."""
    _need(dtype)
    gen = torch.Generator().manual_seed(rows * 7 + cols)
    for src in [torch.randn(rows, cols, generator=gen), torch.randn(cols + 3, rows + 2, generator=gen)[1:cols + 1, :rows].T]:
        for threads in (1, 2):
            out = torch.empty(cols, rows, dtype=dtype)
            _native._C.answer_logprobs_transpose_cpu(tensor_arg(src, "src"), tensor_arg(out, "dst"), threads)
            assert torch.equal(out, src.T.to(dtype))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_long_sums_keep_small_terms_after_a_large_one(isa, dtype):
    """c = [1, x, x, ...] . ones with x = 2^-25: each 1 + x rounds back to 1 in float32, so one sequential sum
    over K = 20000 loses every small term (relative error 6e-4). The kernel sums 64 lanes in registers, those
    sums in a tile and K blocks in c (dZ @ W has one large target term per row and K = V small ones)."""
    _need_isa(isa, dtype)
    k = 20000
    a = torch.full((3, k), 2.0 ** -25)
    a[:, 0] = 1.0
    a = a.to(dtype)
    b = torch.ones(k, 70).to(dtype)
    want = 1.0 + (k - 1) * 2.0 ** -25
    got = _gemm(a, b, 1, isa=isa).double()
    lanes_lost = 128  # at most one register block of small terms is rounded away (a bfloat16 lane holds 2)
    assert float((got - want).abs().max()) <= lanes_lost * 2.0 ** -25, float((got - want).abs().max())
