"""The native bfloat16 x bfloat16 -> float32 GEMM of the CPU driver (csrc/answer_logprobs/mm_bf16_cpu.cpp)
against float64 products of the same bfloat16 values, and its use by the blocked driver.

The kernel runs only on CPUs with AVX512-BF16; elsewhere it must refuse with one line, and the driver must keep
bfloat16 blocks (torch.mm). bfloat16 products are exact in float32, so the only error is float32 summation:
bounded by K * 2^-24 * sum_k |a_k b_k| per entry.
"""
from __future__ import annotations

import pytest
import torch

from radit_fast import _native
from radit_fast._native import HAS_NATIVE, tensor_arg
from radit_fast.ops import _answer_logprobs_blocked as blocked
from radit_fast.ops import answer_logprobs

pytestmark = pytest.mark.skipif(not HAS_NATIVE, reason="radit_fast._C is not built")


def _supported() -> bool:
    return bool(_native._C.answer_logprobs_mm_bf16_f32_supported())


needs_bf16 = pytest.mark.skipif(not (HAS_NATIVE and _supported()), reason="this CPU has no AVX512-BF16")


def _mm(a: torch.Tensor, b: torch.Tensor, threads: int, out: torch.Tensor | None = None) -> torch.Tensor:
    c = torch.full((a.shape[0], b.shape[0]), float("nan")) if out is None else out
    _native._C.answer_logprobs_mm_bf16_f32_cpu(tensor_arg(a, "a"), tensor_arg(b, "b"), tensor_arg(c, "c"), threads)
    return c


@needs_bf16
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (7, 5, 17), (6, 64, 64), (13, 576, 300), (64, 577, 1000),
                                   (100, 2, 257), (5, 3, 513), (0, 4, 3), (3, 4, 0)])
def test_matches_float64_and_thread_count(m, k, n):
    gen = torch.Generator().manual_seed(m * 1000 + k * 10 + n)
    a = torch.randn(m, k, generator=gen).bfloat16()
    b = torch.randn(n, k, generator=gen).bfloat16()
    ref = a.double() @ b.double().T
    bound = k * 2.0 ** -24 * (a.double().abs() @ b.double().abs().T) + 1e-30
    c1 = _mm(a, b, 1)
    assert c1.dtype == torch.float32
    assert bool(((c1.double() - ref).abs() <= bound).all())
    assert torch.equal(c1, _mm(a, b, 2)), "the result depends on the thread count"


@needs_bf16
def test_strided_rows_and_output_columns_untouched():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(9, 40, generator=gen).bfloat16()[:, :33]  # row stride 40 > K
    b = torch.randn(70, 48, generator=gen).bfloat16()[:, :33]
    out = torch.full((9, 80), -7.0)
    _mm(a, b, 1, out=out[:, 5:75])
    ref = a.double() @ b.double().T
    assert float((out[:, 5:75].double() - ref).abs().max()) < 1e-4
    assert bool((out[:, :5] == -7.0).all()) and bool((out[:, 75:] == -7.0).all())


@needs_bf16
def test_refuses_wrong_dtypes_and_shapes():
    a, b = torch.ones(2, 3).bfloat16(), torch.ones(4, 3).bfloat16()
    with pytest.raises(ValueError, match="a"):
        _mm(a.float(), b, 1)
    with pytest.raises(ValueError, match="b"):
        _mm(a, torch.ones(4, 2).bfloat16(), 1)
    with pytest.raises(ValueError, match="c"):
        _mm(a, b, 1, out=torch.empty(2, 4).bfloat16())


@pytest.mark.skipif(not HAS_NATIVE or _supported(), reason="this CPU has AVX512-BF16")
def test_without_avx512_bf16_refuses_and_driver_keeps_bf16_blocks():
    with pytest.raises(ValueError, match="AVX512-BF16"):
        _mm(torch.ones(2, 3).bfloat16(), torch.ones(4, 3).bfloat16(), 1)
    assert blocked.block_dtype(torch.bfloat16, torch.device("cpu")) == torch.bfloat16


@needs_bf16
def test_driver_uses_float32_blocks_for_bfloat16():
    assert blocked.block_dtype(torch.bfloat16, torch.device("cpu")) == torch.float32
    assert blocked.block_dtype(torch.float32, torch.device("cpu")) == torch.float32


@needs_bf16
@pytest.mark.parametrize("transposed", ["hidden", "weight", "both"])
def test_driver_with_transposed_storage_matches_float64(transposed):
    """The driver copies non-row-major operands for the kernel (and keeps the copies alive during the call)."""
    gen = torch.Generator().manual_seed(7)
    n, d, v = 300, 64, 5000
    h = (0.5 * torch.randn(d, n, generator=gen)).bfloat16().T if transposed != "weight" else \
        (0.5 * torch.randn(n, d, generator=gen)).bfloat16()
    w = (0.3 * torch.randn(d, v, generator=gen)).bfloat16().T if transposed != "hidden" else \
        (0.3 * torch.randn(v, d, generator=gen)).bfloat16()
    t = torch.randint(0, v, (n,), generator=gen)
    ref = torch.log_softmax(h.double() @ w.double().T, -1).gather(1, t[:, None])[:, 0]
    for _ in range(3):  # freed temporaries would be reused by later allocations
        out = answer_logprobs(h, w, t, impl="cpu")
        assert float((out.double() - ref).abs().max()) < 1e-4
