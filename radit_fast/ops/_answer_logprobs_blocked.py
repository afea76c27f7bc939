"""The blocked driver of ``answer_logprobs`` for every device: a GEMM per logit block + fused epilogue.

Scheme. The vocabulary (and, when needed, the rows) is cut into blocks. For each block a GEMM computes
z = H_r @ W_c^T into one reused buffer, and one fused epilogue pass over the block
(radit_fast/ops/_answer_logprobs_epilogue.py: C++/OpenMP on CPU, CUDA on GPU, math shared in
csrc/common/radit_math.h) does the rest:

* forward (``fwd``): merge the block into each row's online-logsumexp state (m, s) and gather the target logit;
  a finalize pass gives lse = m + log s, tok = z_t - lse and the per-segment sums. 1 GEMM.
* backward (``bwd``): recompute the block, turn it into dz = g (onehot(t) - exp(z - lse)) in place, then
  grad_hidden += dz @ W_c and grad_weight[c] = dz^T @ H (+ column sums for grad_bias). 3 GEMMs.
* loss with gradients formed in the forward pass (``loss_and_grads``, for ``reduction="sum" | "mean"``): the
  rows are cut into chunks that span the whole vocabulary, so lse is known before the block leaves the
  buffer; the same epilogues then write dz in place and grad_hidden[r] = dz @ W, grad_weight += dz^T @ H_r.
  3 GEMMs in all (instead of 4: no recomputation in the backward pass), nothing kept but the gradients.

GEMMs. On CPUs with AVX-512 (AVX512-BF16 for bfloat16) all three products run in radit's own kernel
``_C.answer_logprobs_gemm_cpu`` (csrc/answer_logprobs/gemm_cpu.cpp, float32 accumulation and output): torch.mm
calls MKL's sgemm, which runs at an AVX2 rate on non-Intel CPUs (~90 GFLOP/s per core on the AMD EPYC measured
here against ~220 for the kernel), and writes bf16 x bf16 products in bfloat16. On CPUs with AVX2 + FMA only,
bfloat16 products run in the kernel's AVX2 twin (gemm_avx2_cpu.cpp; torch.mm's bfloat16 fallback there runs at
0.5-2 GFLOP/s against its ~85) and float32 stays with MKL. Elsewhere torch.mm (cuBLAS on GPU).

Block dtype. bfloat16 inputs write float32 logit blocks wherever the device can: on CUDA through
``torch.mm(..., out_dtype=torch.float32)`` (cuBLAS accumulates in fp32 anyway) when the running torch offers it,
on CPUs with AVX512-BF16 or AVX2 + FMA through the native kernels. Elsewhere the block is in the input dtype (see the
"Precision" section of radit_fast/ops/answer_logprobs.py). With float32 blocks the backward epilogue writes dz
into a separate bfloat16 buffer for the two gradient GEMMs.

Memory: one block buffer of at most ``BLOCK_BYTES[device]`` (+ a bfloat16 dz buffer with float32 blocks), the
per-row state, the gradients, and for bfloat16 a float32 accumulator of grad_weight when several row chunks add
into it (with the native kernel and one row chunk, a float32 [d, 4096] scratch).
No host synchronisation on CUDA: the epilogues flag out-of-range targets on the device (the shared
``radit_fast.ops._dispatch.error_flag``).
"""
from __future__ import annotations

import functools
import math

import torch

from radit_fast import _native
from radit_fast._native import tensor_arg
from radit_fast.ops import _answer_logprobs_epilogue as epilogue
from radit_fast.ops._dispatch import error_flag

# Upper bounds on a block [rows, cols]: vocabulary entries per block (fwd/bwd), and the bytes of the buffer.
CPU_BLOCK_COLS = 4096
CPU_BLOCK_BYTES = 64 << 20  # one [4096, 4096] float32 block (measured best on CPU here)
CPU_LOSS_BLOCK_BYTES = 64 << 20  # row chunk x whole vocabulary of loss_and_grads on CPU
CUDA_BLOCK_COLS = 8192
CUDA_BLOCK_BYTES = 256 << 20  # [8192, 8192] float32: 1/16 of the naive bf16 logits at N=8192, V=128256
CUDA_LOSS_BLOCK_BYTES = 512 << 20


def _budget(device: torch.device, loss: bool) -> tuple[int, int]:
    if device.type == "cuda":
        return CUDA_BLOCK_COLS, CUDA_LOSS_BLOCK_BYTES if loss else CUDA_BLOCK_BYTES
    return CPU_BLOCK_COLS, CPU_LOSS_BLOCK_BYTES if loss else CPU_BLOCK_BYTES


def blocks(n: int, v: int, elt: int, device: torch.device) -> tuple[int, int]:
    """(rows, cols) of the fwd/bwd blocks: at most the device's column width and byte budget."""
    max_cols, budget = _budget(device, loss=False)
    cols = min(v, max_cols)
    return max(1, min(n, budget // (cols * elt))), cols


def loss_rows(n: int, v: int, elt: int, device: torch.device) -> int:
    """Rows per chunk of loss_and_grads (each chunk spans the whole vocabulary)."""
    return max(1, min(n, _budget(device, loss=True)[1] // (v * elt)))


@functools.lru_cache(maxsize=None)
def native_gemm(device_type: str, dtype: torch.dtype) -> bool:
    """True when the driver's GEMMs run in radit's own CPU kernel (``_C.answer_logprobs_gemm_cpu``) for this
    dtype: float32 on CPUs with AVX-512 (csrc/answer_logprobs/gemm_cpu.cpp), bfloat16 on CPUs with AVX512-BF16 or
    with AVX2 + FMA (gemm_avx2_cpu.cpp: torch.mm's bfloat16 fallback there runs at 0.5-2 GFLOP/s). Float32 on AVX2
    CPUs stays with torch.mm: MKL's AVX2 sgemm is as fast as the kernel there."""
    if device_type != "cpu" or dtype not in (torch.float32, torch.bfloat16) or _native._C is None:
        return False
    isa = _native._C.answer_logprobs_gemm_cpu_isa(dtype == torch.bfloat16)
    return isa == "avx512" or (isa == "avx2" and dtype == torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _fp32_out_ok(device_type: str) -> bool:
    """True when bf16 x bf16 products can be written into float32 blocks on this device type: the native kernel
    on CPU (torch.mm on CPU has no bf16 -> f32 product), torch.mm's out_dtype= on CUDA."""
    if device_type == "cpu":
        return native_gemm("cpu", torch.bfloat16)
    if device_type != "cuda":
        return False
    try:
        a = torch.ones(2, 2, dtype=torch.bfloat16, device="cuda")
        out = torch.empty(2, 2, dtype=torch.float32, device="cuda")
        torch.mm(a, a, out_dtype=torch.float32, out=out)
        return True
    except (TypeError, RuntimeError):
        return False


def block_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    if dtype == torch.bfloat16 and _fp32_out_ok(device.type):
        return torch.float32
    return dtype


def _gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool = False) -> None:
    """out (+)= a @ b in the native CPU kernel: a, b float32 or bfloat16 (any strides), out float32."""
    _native._C.answer_logprobs_gemm_cpu(tensor_arg(a, "a"), tensor_arg(b, "b"), tensor_arg(out, "out"),
                                        bool(accumulate), torch.get_num_threads())


def _mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out = a @ b, out in a's dtype or (bfloat16 a, b) in float32 (block_dtype)."""
    if native_gemm(out.device.type, a.dtype):
        _gemm(a, b, out)
    elif out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    else:
        torch.mm(a, b, out_dtype=out.dtype, out=out)


def _flag(device: torch.device) -> torch.Tensor | None:
    """The device's error flag for the CUDA epilogues (None on CPU, where the epilogues raise)."""
    return error_flag(device) if device.type == "cuda" else None


def _state(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.full((n,), -math.inf, device=device), torch.zeros(n, device=device),
            torch.zeros(n, device=device))


def fwd(hidden, weight, bias, targets, ignore_index, segment_ids, num_segments):
    """(tok [N], lse [N], seg [S] or [0]) float32. targets int64 contiguous; segment_ids int64 [N] or None."""
    n, v = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    b = None if bias is None else bias.contiguous()
    bdt = block_dtype(hidden.dtype, dev)
    rows, cols = blocks(n, v, bdt.itemsize, dev)
    buf = torch.empty(rows * cols, dtype=bdt, device=dev)
    m, s, tl = _state(n, dev)
    for v0 in range(0, v, cols):  # vocabulary outer: the weight block stays in cache across row tiles
        c = min(cols, v - v0)
        wt = weight[v0:v0 + c].T
        for r0 in range(0, n, rows):
            rr = min(rows, n - r0)
            z = buf[:rr * c].view(rr, c)
            _mm(hidden[r0:r0 + rr], wt, z)
            epilogue.fwd_block(z, v0, v, b, targets[r0:r0 + rr], ignore_index, m[r0:r0 + rr], s[r0:r0 + rr],
                               tl[r0:r0 + rr])
    lse, tok = torch.empty(n, device=dev), torch.empty(n, device=dev)
    seg = torch.empty(num_segments if segment_ids is not None else 0, device=dev)
    epilogue.fwd_finalize(targets, v, ignore_index, m, s, tl, lse, tok, segment_ids,
                          seg if segment_ids is not None else None, _flag(dev))
    return tok, lse, seg


class _WeightGrad:
    """grad_weight rows of one vocabulary block [v0, v0 + c), written once (one row chunk) or summed over chunks.

    With the native CPU GEMM the products are summed in float32: float32 weights straight into the result;
    bfloat16 weights as grad_weight^T = H^T @ dZ into a float32 [d, width] accumulator (this orientation runs
    ~1.5x faster than dZ^T @ H, which must pack dZ^T into pairs), which ``flush`` stores once, transposed, in
    the weight's dtype. With one row chunk there is nothing to sum across chunks: each ``SLICE`` columns are
    formed in a float32 [d, SLICE] scratch and stored at once (the loss path over V columns then needs 9 MB of
    scratch at SmolLM2's d instead of a 113 MB accumulator). Otherwise (torch.mm) float32 sums in place with addmm_; other dtypes sum each chunk's
    product in a float32 accumulator, never in bfloat16, formed ``SLICE`` rows at a time into small scratch
    buffers and widened there before the float32 add (torch's mixed bf16 -> f32 ``add_`` runs ~5x slower than a
    widening copy plus a float32 add).
    """

    SLICE = 4096

    def __init__(self, weight: torch.Tensor, chunks: int, width: int):
        # row-major, as the GEMMs write it
        self.out = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        self.native = native_gemm(weight.device.type, weight.dtype)
        f32 = weight.dtype == torch.float32
        rows, d, dev = min(width, self.SLICE), weight.shape[1], weight.device
        self.sliced = self.native and not f32 and chunks == 1  # each slice stored as soon as it is formed
        self.acc_t = torch.empty(d, rows if self.sliced else width, device=dev) if self.native and not f32 else None
        multi = not f32 and chunks > 1 and not self.native
        self.acc = torch.empty(width, d, device=dev) if multi else None
        self.tmp = torch.empty(rows, d, dtype=weight.dtype, device=dev) if multi else None
        self.tmp32 = torch.empty(rows, d, device=dev) if multi else None

    def add(self, dz: torch.Tensor, h: torch.Tensor, v0: int, first: bool) -> None:
        c = dz.shape[1]
        if self.native:
            if self.acc_t is None:
                _gemm(dz.T, h, self.out[v0:v0 + c], accumulate=not first)
            elif self.sliced:
                for j in range(0, c, self.SLICE):
                    k = min(self.SLICE, c - j)
                    _gemm(h.T, dz[:, j:j + k], self.acc_t[:, :k])
                    self._store(self.acc_t[:, :k], v0 + j)
            else:
                _gemm(h.T, dz, self.acc_t[:, :c], accumulate=not first)
            return
        if self.acc is None:
            if first:
                torch.mm(dz.T, h, out=self.out[v0:v0 + c])
            else:
                self.out[v0:v0 + c].addmm_(dz.T, h)
            return
        for j in range(0, c, self.SLICE):
            k = min(self.SLICE, c - j)
            torch.mm(dz[:, j:j + k].T, h, out=self.tmp[:k])
            if first:
                self.acc[j:j + k].copy_(self.tmp[:k])
            else:
                self.tmp32[:k].copy_(self.tmp[:k])
                self.acc[j:j + k] += self.tmp32[:k]

    def _store(self, acc_t: torch.Tensor, v0: int) -> None:
        """out[v0:v0 + cols] = acc_t^T, natively in tiles (torch's transposing copy into bfloat16: ~5x slower)."""
        _native._C.answer_logprobs_transpose_cpu(tensor_arg(acc_t, "src"),
                                                 tensor_arg(self.out[v0:v0 + acc_t.shape[1]], "dst"),
                                                 torch.get_num_threads())

    def flush(self, v0: int, c: int) -> None:
        if self.sliced:
            return
        if self.acc_t is not None:
            self._store(self.acc_t[:, :c], v0)
        elif self.acc is not None:
            self.out[v0:v0 + c].copy_(self.acc[:c])


def bwd(hidden, weight, bias, targets, lse, grad_tok, ignore_index, need_hidden, need_weight, need_bias):
    """(grad_hidden float32 [N, d], grad_weight [V, d] in weight's dtype, grad_bias float32 [V]); None if unused.

    grad_tok: float32 [N], 0 at ignored rows. Recomputes each logit block (4 GEMMs with the forward's).
    """
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    b = None if bias is None else bias.contiguous()
    lse, g = lse.contiguous(), grad_tok.to(torch.float32).contiguous()
    bdt = block_dtype(hidden.dtype, dev)
    rows, cols = blocks(n, v, bdt.itemsize, dev)
    chunks = -(-n // rows)
    buf = torch.empty(rows * cols, dtype=bdt, device=dev)
    dzbuf = None if bdt == hidden.dtype else torch.empty(rows * cols, dtype=hidden.dtype, device=dev)
    f32, native = hidden.dtype == torch.float32, native_gemm(dev.type, hidden.dtype)
    gh = torch.zeros(n, d, device=dev) if need_hidden else None
    gh_tmp = torch.empty(rows, d, dtype=hidden.dtype, device=dev) if need_hidden and not (f32 or native) else None
    gw = _WeightGrad(weight, chunks, cols) if need_weight else None
    gb = torch.zeros(v, device=dev) if need_bias else None
    for v0 in range(0, v, cols):
        c = min(cols, v - v0)
        wb = weight[v0:v0 + c]
        for r0 in range(0, n, rows):
            rr = min(rows, n - r0)
            hr = hidden[r0:r0 + rr]
            z = buf[:rr * c].view(rr, c)
            _mm(hr, wb.T, z)
            dz = z if dzbuf is None else dzbuf[:rr * c].view(rr, c)
            epilogue.bwd_block(z, v0, v, b, targets[r0:r0 + rr], ignore_index, lse[r0:r0 + rr], g[r0:r0 + rr], gb,
                               out=None if dzbuf is None else dz)
            if gh is not None:
                if native:
                    _gemm(dz, wb, gh[r0:r0 + rr], accumulate=True)
                elif f32:
                    gh[r0:r0 + rr].addmm_(dz, wb)
                else:
                    torch.mm(dz, wb, out=gh_tmp[:rr])
                    gh[r0:r0 + rr] += gh_tmp[:rr]
            if gw is not None:
                gw.add(dz, hr, v0, first=r0 == 0)
        if gw is not None:
            gw.flush(v0, c)
    return gh, None if gw is None else gw.out, gb


def loss_and_grads(hidden, weight, bias, targets, ignore_index, grad_tok, need_hidden, need_weight, need_bias):
    """tok [N] float32 and the gradients of sum_n grad_tok[n] * tok[n], formed in one pass (3 GEMMs).

    grad_tok: float32 [N] (0 at ignored rows), known before the pass (1 for a sum, 1 / count for a mean).
    Returns (tok, grad_hidden [N, d] in hidden's dtype, grad_weight [V, d] in weight's dtype, grad_bias float32
    [V]), None where not needed.
    """
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    b = None if bias is None else bias.contiguous()
    g = grad_tok.to(torch.float32).contiguous()
    bdt = block_dtype(hidden.dtype, dev)
    rows = loss_rows(n, v, bdt.itemsize, dev)
    chunks = -(-n // rows)
    buf = torch.empty(rows * v, dtype=bdt, device=dev)
    dzbuf = None if bdt == hidden.dtype else torch.empty(rows * v, dtype=hidden.dtype, device=dev)
    gh = torch.empty(n, d, dtype=hidden.dtype, device=dev) if need_hidden else None
    native = native_gemm(dev.type, hidden.dtype)
    # The native GEMM writes float32: grad_hidden rows of other dtypes pass through a float32 scratch.
    gh_tmp = torch.empty(rows, d, device=dev) if need_hidden and native and hidden.dtype != torch.float32 else None
    gw = _WeightGrad(weight, chunks, v) if need_weight else None
    gb = torch.zeros(v, device=dev) if need_bias else None
    m, s, tl = _state(n, dev)
    lse, tok = torch.empty(n, device=dev), torch.empty(n, device=dev)
    flag = _flag(dev)
    for r0 in range(0, n, rows):
        rr = min(rows, n - r0)
        sl = slice(r0, r0 + rr)
        hr, t = hidden[sl], targets[sl]
        z = buf[:rr * v].view(rr, v)
        _mm(hr, weight.T, z)
        epilogue.fwd_block(z, 0, v, b, t, ignore_index, m[sl], s[sl], tl[sl])
        epilogue.fwd_finalize(t, v, ignore_index, m[sl], s[sl], tl[sl], lse[sl], tok[sl], None, None, flag)
        if not (need_hidden or need_weight or need_bias):
            continue
        dz = z if dzbuf is None else dzbuf[:rr * v].view(rr, v)
        epilogue.bwd_block(z, 0, v, b, t, ignore_index, lse[sl], g[sl], gb, out=None if dzbuf is None else dz)
        if gh is not None:  # every row once
            if gh_tmp is not None:
                _gemm(dz, weight, gh_tmp[:rr])
                gh[sl].copy_(gh_tmp[:rr])
            elif native:
                _gemm(dz, weight, gh[sl])
            else:
                torch.mm(dz, weight, out=gh[sl])
        if gw is not None:
            gw.add(dz, hr, 0, first=r0 == 0)
    if gw is not None:
        gw.flush(0, v)
    return tok, gh, None if gw is None else gw.out, gb
