"""Fused answer scoring: log p(target | hidden) under softmax(hidden @ weight.T + bias), summed per sequence.

Math. For a row n (one answer position) with hidden h_n [d], target t_n and logits z_nv = h_n . w_v + b_v,

    tok_n = z_{n t_n} - lse_n,      lse_n = log sum_v exp(z_nv)        (tok_n = 0 where t_n == ignore_index)
    seq_s = sum_{n : seg(n) = s} tok_n                                  (0 for an empty segment)

Gradient. With g_n = dL/dtok_n (+ dL/dseq_{seg(n)}; 0 at ignored rows) and p_nv = exp(z_nv - lse_n),
dtok_n/dz_nv = [v == t_n] - p_nv, so dz_nv = g_n ([v == t_n] - p_nv); then grad_hidden = dz @ W,
grad_weight = dz^T @ H, grad_bias = column sums of dz.

The N x V logits are never materialised: every backend walks the vocabulary in blocks, keeps an online
logsumexp per row, gathers the target logit in the block that holds it, and recomputes the blocks in the
backward pass. Memory O(N d + V d + one block). Reduced to a loss (``reduction="sum" | "mean"``), dz is known
in the forward pass (g_n is 1 or 1/count), so the gradients are formed there from row chunks that span the
vocabulary (Liger-Kernel's scheme): 3 GEMMs in all instead of 4, and the backward pass only scales them.

Backends. "cpu" and "cuda" are one blocked driver (radit_fast/ops/_answer_logprobs_blocked.py): a GEMM (radit's
own AVX-512 or AVX2 kernel on CPUs that have them, else torch.mm; cuBLAS on GPUs) writes each logit block into a reused
buffer and a fused epilogue per device (C++/OpenMP, CUDA; math shared in csrc/common/radit_math.h) does the
rest. "triton" is the fully fused kernel (logits never leave SRAM). "torch" is the chunked reference below. On GPUs no call synchronises with the host:
out-of-range targets give NaN and set a device flag, raised as ValueError only under RADIT_DEBUG_CHECKS=1.

Precision with bfloat16 inputs (accumulation is float32 everywhere). The triton backend keeps each logit tile
in float32 registers, the cuda backend writes float32 blocks (torch.mm out_dtype), impl="torch" multiplies
float32 upcasts, and impl="cpu" writes float32 blocks on CPUs with AVX512-BF16 or AVX2 + FMA through its own bf16 x bf16 ->
f32 kernels (csrc/answer_logprobs/gemm_cpu.cpp, gemm_avx2_cpu.cpp; torch.mm on CPU writes bf16 products in bfloat16 only:
aten::mm.dtype has no CPU kernel in torch 2.13): all four are float32-accurate
(benchmarks/bench_answer_logprobs.py at N=2048, d=576, V=49152: impl="cpu" 2.2e-6 max tok error against
float64, 7.8e-3 with bfloat16 blocks). On CPUs with neither (no AVX2), impl="cpu" stores each logit block in
bfloat16 before its float32 epilogue, so every logit carries a relative rounding error of up to 2^-9, i.e. an
absolute error of up to |z| 2^-9 in tok and lse (the naive bfloat16 expression, which also rounds the
log-softmax, is 2-6x worse); for float32-accurate results there use impl="torch" or float32 inputs.

Layers (STYLE section 2): launchers ``_fwd_launch``/``_bwd_launch``/``_loss_launch`` (no autograd) -> custom
ops ``torch.ops.radit.answer_logprobs_fwd``/``_bwd``/``_loss`` (so torch.compile sees opaque nodes with fake
implementations) -> ``AnswerLogprobsFunction``/``AnswerLogprobsLossFunction`` (autograd) -> ``answer_logprobs``
and ``answer_logprobs_per_sequence``.
"""
from __future__ import annotations

import contextlib
import logging
import math

import torch

from radit_fast.ops import _answer_logprobs_blocked as blocked
from radit_fast.ops._common import compute_dtype
from radit_fast.ops._dispatch import common_device, debug_checks, raise_if_flagged, resolve_impl

log = logging.getLogger(__name__)

__all__ = [
    "AnswerLogprobsFunction",
    "answer_logprobs",
    "answer_logprobs_per_sequence",
    "naive_answer_logprobs",
    "answer_logprobs_torch",
]

OP = "answer_logprobs"
REDUCTIONS = ("none", "sum", "mean")
# Vocabulary entries per block of the torch reference.
TORCH_BLOCK_COLS = 4096
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # dtypes of the cpu, triton and cuda backends


# ----------------------------------------------------------------------------------------------------------
# Argument checks (shapes and dtypes here, values in the launchers)
# ----------------------------------------------------------------------------------------------------------
def _check_inputs(op: str, hidden, weight, targets, bias) -> torch.device:
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets), ("bias", bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    device = common_device(op, hidden=hidden, weight=weight, targets=targets, bias=bias)
    if hidden.dim() != 2:
        raise ValueError(f"{op}: hidden must be 2-D [N, d], got shape {tuple(hidden.shape)}")
    n, d = hidden.shape
    if weight.dim() != 2 or weight.shape[1] != d:
        raise ValueError(f"{op}: weight must be [V, d] = [V, {d}] (d from hidden), got shape {tuple(weight.shape)}")
    v = weight.shape[0]
    if v < 1:
        raise ValueError(f"{op}: weight must have at least one vocabulary row, got shape {tuple(weight.shape)}")
    if targets.dim() != 1 or targets.shape[0] != n:
        raise ValueError(f"{op}: targets must be 1-D [N] = [{n}] (N from hidden), got shape {tuple(targets.shape)}")
    if not hidden.is_floating_point():
        raise ValueError(f"{op}: hidden must be a floating-point tensor, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"{op}: weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"{op}: targets must be an integer tensor (int64 or int32), got {targets.dtype}")
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != v:
            raise ValueError(f"{op}: bias must be 1-D [V] = [{v}] (V from weight), got shape {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise ValueError(f"{op}: bias dtype {bias.dtype} must match hidden dtype {hidden.dtype}")
    return device


def _check_target_values(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    bad = ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)
    if targets.numel() and bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{OP}: targets[{i}] = {int(targets[i])} is outside [0, {vocab}) "
                         f"and is not ignore_index = {ignore_index}")


def _check_segment_values(segment_ids: torch.Tensor, num_segments: int) -> None:
    bad = (segment_ids < 0) | (segment_ids >= num_segments)
    if segment_ids.numel() and bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{OP}: segment_ids[{i}] = {int(segment_ids[i])} is outside [0, {num_segments})")


def _segments(op: str, n: int, device: torch.device, segment_ids, cu_seqlens, num_segments):
    """int64 segment id per row and the number of segments, from segment_ids or cu_seqlens."""
    if (segment_ids is None) == (cu_seqlens is None):
        raise ValueError(f"{op}: pass exactly one of segment_ids [N] or cu_seqlens [S+1]")
    if num_segments is not None and (not isinstance(num_segments, int) or num_segments < 0):
        raise ValueError(f"{op}: num_segments must be a non-negative int, got {num_segments!r}")
    name, t = ("segment_ids", segment_ids) if segment_ids is not None else ("cu_seqlens", cu_seqlens)
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32) or t.dim() != 1:
        raise ValueError(f"{op}: {name} must be a 1-D int64/int32 tensor, got "
                         f"{getattr(t, 'dtype', type(t).__name__)} of shape {tuple(getattr(t, 'shape', ()))}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but hidden is on {device}")
    if segment_ids is not None:
        if segment_ids.shape[0] != n:
            raise ValueError(f"{op}: segment_ids must be [N] = [{n}], got shape {tuple(segment_ids.shape)}")
        if num_segments is None:  # data-dependent: pass num_segments under torch.compile
            num_segments = int(segment_ids.max()) + 1 if n else 0
        return segment_ids.to(torch.int64).contiguous(), num_segments
    s = cu_seqlens.shape[0] - 1
    if s < 0:
        raise ValueError(f"{op}: cu_seqlens must be [S+1] with S >= 0, got shape {tuple(cu_seqlens.shape)}")
    if num_segments is not None and num_segments != s:
        raise ValueError(f"{op}: num_segments = {num_segments} but cu_seqlens has S+1 = {s + 1} entries")
    cu = cu_seqlens.to(torch.int64)
    if not torch.compiler.is_compiling() and debug_checks(device):
        if int(cu[0]) != 0 or int(cu[-1]) != n or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"{op}: cu_seqlens must be non-decreasing from 0 to N = {n}, got {cu.tolist()[:8]}...")
    # Row i belongs to the number of segment ends cu[1:] that are <= i (empty segments are skipped).
    rows = torch.arange(n, device=device)
    return torch.searchsorted(cu[1:].contiguous(), rows, right=True), s


def _choose_impl(op: str, impl: str, device: torch.device, dtype: torch.dtype) -> str:
    chosen = resolve_impl(op, impl, device, dtype=dtype)
    if chosen != "torch" and dtype not in _KERNEL_DTYPES:
        if impl != "auto":
            raise ValueError(f"{op}: impl={impl!r} supports float32 and bfloat16 inputs, got {dtype}; use impl='torch'")
        log.debug("%s: %s inputs run on the torch reference instead of %s", op, dtype, chosen)
        chosen = "torch"
    return chosen


# ----------------------------------------------------------------------------------------------------------
# torch reference: chunked over the vocabulary, float32 (float64 for float64 inputs) accumulation
# ----------------------------------------------------------------------------------------------------------
def _torch_fwd(hidden, weight, bias, targets, ignore_index, block_cols=TORCH_BLOCK_COLS):
    """(tok_logprob [N], lse [N]) in the accumulation dtype; the reference and the fallback backend."""
    acc = compute_dtype(hidden)
    n, v = hidden.shape[0], weight.shape[0]
    h = hidden.to(acc)
    valid = targets != ignore_index
    t = torch.where(valid, targets, 0)
    m = torch.full((n,), -math.inf, dtype=acc, device=h.device)
    s = torch.zeros(n, dtype=acc, device=h.device)
    tgt = torch.zeros(n, dtype=acc, device=h.device)
    for v0 in range(0, v, block_cols):
        z = h @ weight[v0:v0 + block_cols].to(acc).T
        if bias is not None:
            z = z + bias[v0:v0 + block_cols].to(acc)
        new_m = torch.maximum(m, z.amax(1))
        ref = torch.where(new_m == -math.inf, 0.0, new_m)  # exp(-inf - -inf) would be NaN
        s = s * torch.exp(m - ref) + torch.exp(z - ref[:, None]).sum(1)
        m = new_m
        inside = (t >= v0) & (t < v0 + z.shape[1])
        col = (t - v0).clamp(0, z.shape[1] - 1)
        tgt = torch.where(inside, z.gather(1, col[:, None]).squeeze(1), tgt)
    lse = torch.where(valid, m + torch.log(s), 0.0)
    return torch.where(valid, tgt - lse, 0.0), lse


def _torch_bwd(hidden, weight, bias, targets, lse, grad_tok, ignore_index, need_hidden, need_weight, need_bias,
               block_cols=TORCH_BLOCK_COLS):
    """(grad_hidden, grad_weight, grad_bias) in the accumulation dtype (None where not needed)."""
    acc = compute_dtype(hidden)
    n, v = hidden.shape[0], weight.shape[0]
    h = hidden.to(acc)
    g = torch.where(targets != ignore_index, grad_tok.to(acc), 0.0)
    t = torch.where(targets != ignore_index, targets, 0)
    gh = torch.zeros_like(h) if need_hidden else None
    gw = torch.empty(weight.shape, dtype=acc, device=h.device) if need_weight else None
    gb = torch.empty(v, dtype=acc, device=h.device) if need_bias else None
    rows = torch.arange(n, device=h.device)
    for v0 in range(0, v, block_cols):
        w = weight[v0:v0 + block_cols].to(acc)
        z = h @ w.T
        if bias is not None:
            z = z + bias[v0:v0 + block_cols].to(acc)
        dz = torch.exp(z - lse.to(acc)[:, None]) * -g[:, None]
        inside = (t >= v0) & (t < v0 + z.shape[1])
        dz[rows[inside], t[inside] - v0] += g[inside]
        if gh is not None:
            gh += dz @ w
        if gw is not None:
            gw[v0:v0 + block_cols] = dz.T @ h
        if gb is not None:
            gb[v0:v0 + block_cols] = dz.sum(0)
    return gh, gw, gb


# ----------------------------------------------------------------------------------------------------------
# Launchers (no autograd). "cpu" and "cuda": the blocked driver (vendor GEMM + fused epilogue); "triton": the
# fully fused kernel; "torch": the chunked reference.
# ----------------------------------------------------------------------------------------------------------
def _device_guard(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _kernel_fwd(impl, hidden, weight, bias, targets, ignore_index):
    if impl == "triton":  # imported on first use: triton is a heavy package and optional
        from radit_fast.triton.answer_logprobs import triton_fwd
        return triton_fwd(hidden, weight, bias, targets, ignore_index)
    return _torch_fwd(hidden, weight, bias, targets, ignore_index)


def _kernel_bwd(impl, *args):
    if impl == "triton":
        from radit_fast.triton.answer_logprobs import triton_bwd
        return triton_bwd(*args)
    return _torch_bwd(*args)


def _fwd_launch(impl, hidden, weight, bias, targets, segment_ids, num_segments, ignore_index):
    """(tok_logprob [N], lse [N], seg_logprob [S] or [0]) in the accumulation dtype, on hidden's device."""
    targets = targets.to(torch.int64).contiguous()
    if debug_checks(hidden.device):
        _check_target_values(targets, weight.shape[0], ignore_index)
        if segment_ids is not None:
            _check_segment_values(segment_ids, num_segments)
    with _device_guard(hidden.device):
        if impl in ("cpu", "cuda"):
            out = blocked.fwd(hidden, weight, bias, targets, ignore_index, segment_ids, num_segments)
        else:
            tok, lse = _kernel_fwd(impl, hidden, weight, bias, targets, ignore_index)
            seg = tok.new_zeros(num_segments if segment_ids is not None else 0)
            if segment_ids is not None:
                seg.index_add_(0, segment_ids, tok)
            out = tok, lse, seg
    _raise_flagged(hidden.device)
    return out


def _bwd_launch(impl, hidden, weight, bias, targets, lse, grad_tok, ignore_index, need_hidden, need_weight,
                need_bias):
    """(grad_hidden, grad_weight, grad_bias) in the input dtypes; None where not needed."""
    if not (need_hidden or need_weight or need_bias):
        return None, None, None
    targets = targets.to(torch.int64).contiguous()
    args = (hidden, weight, bias, targets, lse, grad_tok, ignore_index, need_hidden, need_weight, need_bias)
    with _device_guard(hidden.device):
        grads = blocked.bwd(*args) if impl in ("cpu", "cuda") else _kernel_bwd(impl, *args)
    like = (hidden, weight, bias)
    return tuple(None if gr is None else gr.to(x.dtype) for gr, x in zip(grads, like))


def _loss_grad_tok(targets: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    """d(reduced)/d tok: 1 (sum) or 1 / count (mean) at the rows that count, 0 at ignored rows. No host sync."""
    valid = (targets != ignore_index).to(torch.float32)
    if reduction == "mean":
        return valid / valid.sum().clamp_min(1.0)
    return valid


def _loss_launch(impl, hidden, weight, bias, targets, ignore_index, reduction, need_hidden, need_weight, need_bias):
    """(reduced log-prob [], grad_hidden, grad_weight, grad_bias): the gradients of the reduced value, formed in
    the forward pass (blocked driver: 3 GEMMs; other backends: their forward then backward)."""
    targets = targets.to(torch.int64).contiguous()
    if debug_checks(hidden.device):
        _check_target_values(targets, weight.shape[0], ignore_index)
    g = _loss_grad_tok(targets, ignore_index, reduction)
    with _device_guard(hidden.device):
        if impl in ("cpu", "cuda"):
            tok, gh, gw, gb = blocked.loss_and_grads(hidden, weight, bias, targets, ignore_index, g, need_hidden,
                                                     need_weight, need_bias)
        else:
            tok, lse = _kernel_fwd(impl, hidden, weight, bias, targets, ignore_index)
            gh = gw = gb = None
            if need_hidden or need_weight or need_bias:
                gh, gw, gb = _kernel_bwd(impl, hidden, weight, bias, targets, lse, g.to(lse.dtype), ignore_index,
                                         need_hidden, need_weight, need_bias)
    _raise_flagged(hidden.device)
    value = (tok * g.to(tok.dtype)).sum()  # g is 1 or 1/count at the counted rows and tok is 0 elsewhere
    like = (hidden, weight, bias)
    return (value,) + tuple(None if gr is None else gr.to(x.dtype) for gr, x in zip((gh, gw, gb), like))


def _raise_flagged(device: torch.device) -> None:
    if device.type == "cuda" and debug_checks(device):  # reading the flag synchronises: only when asked
        raise_if_flagged(device)


# ----------------------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile, with fake implementations)
# ----------------------------------------------------------------------------------------------------------
@torch.library.custom_op("radit::answer_logprobs_fwd", mutates_args=())
def _fwd_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
            segment_ids: torch.Tensor | None, num_segments: int, ignore_index: int,
            impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fwd_launch(impl, hidden, weight, bias, targets, segment_ids, num_segments, ignore_index)


@_fwd_op.register_fake
def _(hidden, weight, bias, targets, segment_ids, num_segments, ignore_index, impl):
    acc = compute_dtype(hidden)
    n = hidden.shape[0]
    seg = hidden.new_empty(num_segments if segment_ids is not None else 0, dtype=acc)
    return hidden.new_empty(n, dtype=acc), hidden.new_empty(n, dtype=acc), seg


def _grads_or_empty(hidden, grads):
    return tuple(hidden.new_empty(0) if gr is None else gr for gr in grads)  # custom ops return no None


def _fake_grads(hidden, weight, bias, need_hidden, need_weight, need_bias):
    empty = hidden.new_empty(0)
    return (torch.empty_like(hidden) if need_hidden else empty, torch.empty_like(weight) if need_weight else empty,
            torch.empty_like(bias) if need_bias and bias is not None else empty)


@torch.library.custom_op("radit::answer_logprobs_bwd", mutates_args=())
def _bwd_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
            lse: torch.Tensor, grad_tok: torch.Tensor, ignore_index: int, need_hidden: bool, need_weight: bool,
            need_bias: bool, impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _grads_or_empty(hidden, _bwd_launch(impl, hidden, weight, bias, targets, lse, grad_tok, ignore_index,
                                               need_hidden, need_weight, need_bias))


@_bwd_op.register_fake
def _(hidden, weight, bias, targets, lse, grad_tok, ignore_index, need_hidden, need_weight, need_bias, impl):
    return _fake_grads(hidden, weight, bias, need_hidden, need_weight, need_bias)


@torch.library.custom_op("radit::answer_logprobs_loss", mutates_args=())
def _loss_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
             ignore_index: int, reduction: str, need_hidden: bool, need_weight: bool, need_bias: bool,
             impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    value, *grads = _loss_launch(impl, hidden, weight, bias, targets, ignore_index, reduction, need_hidden,
                                 need_weight, need_bias)
    return (value,) + _grads_or_empty(hidden, grads)


@_loss_op.register_fake
def _(hidden, weight, bias, targets, ignore_index, reduction, need_hidden, need_weight, need_bias, impl):
    value = hidden.new_empty((), dtype=compute_dtype(hidden))
    return (value,) + _fake_grads(hidden, weight, bias, need_hidden, need_weight, need_bias)


# ----------------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------------
class AnswerLogprobsFunction(torch.autograd.Function):
    """(tok_logprob [N], seg_logprob [S] or [0]) = f(hidden, weight, bias, targets, segment_ids, ...)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, segment_ids, num_segments, ignore_index, impl):
        tok, lse, seg = torch.ops.radit.answer_logprobs_fwd(hidden, weight, bias, targets, segment_ids, num_segments,
                                                            ignore_index, impl)
        ctx.save_for_backward(hidden, weight, bias, targets, segment_ids, lse)
        ctx.ignore_index, ctx.impl = ignore_index, impl
        return tok, seg

    @staticmethod
    def backward(ctx, grad_tok, grad_seg):
        hidden, weight, bias, targets, segment_ids, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        g = grad_tok
        if segment_ids is not None:
            g = g + grad_seg[segment_ids]
        g = torch.where(targets != ctx.ignore_index, g, 0.0).to(lse.dtype).contiguous()
        gh, gw, gb = torch.ops.radit.answer_logprobs_bwd(hidden, weight, bias, targets, lse, g, ctx.ignore_index,
                                                         need_h, need_w, need_b and bias is not None, ctx.impl)
        return (gh if need_h else None, gw if need_w else None, gb if need_b and bias is not None else None,
                None, None, None, None, None)


class AnswerLogprobsLossFunction(torch.autograd.Function):
    """sum or mean of the token log-probs; the gradients are formed in the forward pass and only scaled here."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, reduction, impl):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        value, gh, gw, gb = torch.ops.radit.answer_logprobs_loss(hidden, weight, bias, targets, ignore_index,
                                                                 reduction, need_h, need_w, need_b, impl)
        ctx.save_for_backward(gh if need_h else None, gw if need_w else None, gb if need_b else None)
        return value

    @staticmethod
    def backward(ctx, grad_value):
        grads = tuple(None if gr is None else gr * grad_value.to(gr.dtype) for gr in ctx.saved_tensors)
        return grads + (None, None, None, None)


# ----------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------
def answer_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                    bias: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "none",
                    impl: str = "auto") -> torch.Tensor:
    """Log-probability of each target token under softmax(hidden @ weight.T + bias), without N x V logits.

    Args:
        hidden: [N, d] float32 or bfloat16 (float16/float64 run on impl="torch"), any strides.
        weight: [V, d], same dtype as hidden (the LM head; tied embeddings are fine).
        targets: [N] int64 or int32, each in [0, V) or equal to ``ignore_index``.
        bias: optional [V], same dtype as hidden.
        ignore_index: targets with this value give 0 and no gradient.
        reduction: "none" (default): the [N] token log-probs. "sum": their sum, a scalar. "mean": their mean over
            the rows whose target is not ``ignore_index`` (0 when there is none). With "sum" and "mean" the
            gradients are formed in the forward pass (3 GEMMs in all instead of 4: the backward pass only
            scales them), so use them for a loss, e.g. ``loss = -answer_logprobs(h, W, y, reduction="mean")``
            (the cross-entropy of the targets). Their memory is the gradients' (N x d + V x d) while the
            graph holds them; double backward is not supported.
        impl: "auto" | "cpu" | "cuda" | "triton" | "torch" (see radit_fast.ops._dispatch.resolve_impl).

    Returns:
        [N] float32 (float64 for float64 inputs): log p(targets[n] | hidden[n]), 0 at ignored rows; a scalar of
        that dtype for reduction="sum" | "mean".
        Differentiable w.r.t. hidden, weight and bias (gradients in their dtypes). With bfloat16 inputs,
        impl="cpu" rounds the logits to bfloat16 (absolute error up to |logit| * 2^-9, see the module doc);
        the other backends are float32-accurate.

    Example:
        >>> import torch
        >>> from radit_fast.ops import answer_logprobs
        >>> hidden = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
        >>> weight = torch.eye(2)
        >>> answer_logprobs(hidden, weight, torch.tensor([0, 1, -100]))
        tensor([-0.3133, -0.1269,  0.0000])
        >>> answer_logprobs(hidden, weight, torch.tensor([0, 1, -100]), reduction="mean")
        tensor(-0.2201)
    """
    device = _check_inputs(OP, hidden, weight, targets, bias)
    if reduction not in REDUCTIONS:
        raise ValueError(f"{OP}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    chosen = _choose_impl(OP, impl, device, hidden.dtype)
    if reduction != "none":
        leaves = (hidden, weight, bias)
        if not torch.is_grad_enabled():  # needs_input_grad follows requires_grad even under no_grad
            leaves = tuple(None if x is None else x.detach() for x in leaves)
        return AnswerLogprobsLossFunction.apply(*leaves, targets, int(ignore_index), reduction, chosen)
    tok, _ = AnswerLogprobsFunction.apply(hidden, weight, bias, targets, None, 0, int(ignore_index), chosen)
    return tok


def answer_logprobs_per_sequence(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                                 segment_ids: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                                 num_segments: int | None = None, bias: torch.Tensor | None = None,
                                 ignore_index: int = -100, impl: str = "auto") -> torch.Tensor:
    """Sum of the answer tokens' log-probabilities per sequence, fused with the token scoring.

    Args:
        hidden, weight, targets, bias, ignore_index, impl: as in :func:`answer_logprobs`.
        segment_ids: [N] int64/int32, the sequence of each row, in [0, S). Rows need not be sorted.
        cu_seqlens: [S+1] int64/int32 cumulative row counts (0 = cu[0] <= ... <= cu[S] = N); rows
            cu[s]:cu[s+1] form sequence s. Pass exactly one of segment_ids and cu_seqlens.
        num_segments: S. Optional: defaults to max(segment_ids) + 1 (pass it under torch.compile) or
            len(cu_seqlens) - 1.

    Returns:
        [S] float32 (float64 for float64 inputs): sum over the rows of each sequence of log p(target | hidden),
        ignored rows contributing 0; an empty sequence gives 0. Differentiable w.r.t. hidden, weight, bias.

    Example:
        >>> import torch
        >>> from radit_fast.ops import answer_logprobs_per_sequence
        >>> hidden = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
        >>> answer_logprobs_per_sequence(hidden, torch.eye(2), torch.tensor([0, 1, 0]),
        ...                              cu_seqlens=torch.tensor([0, 2, 2, 3]))
        tensor([-0.4402,  0.0000, -0.6931])
    """
    device = _check_inputs(OP, hidden, weight, targets, bias)
    seg_ids, s = _segments(OP, hidden.shape[0], device, segment_ids, cu_seqlens, num_segments)
    chosen = _choose_impl(OP, impl, device, hidden.dtype)
    _, seg = AnswerLogprobsFunction.apply(hidden, weight, bias, targets, seg_ids, s, int(ignore_index), chosen)
    return seg


def answer_logprobs_torch(hidden, weight, targets, *, bias=None, ignore_index=-100):
    """The chunked torch reference (impl="torch"), without autograd: [N] in the accumulation dtype."""
    _check_inputs(OP, hidden, weight, targets, bias)
    return _torch_fwd(hidden, weight, bias, targets.to(torch.int64), int(ignore_index))[0]


def naive_answer_logprobs(hidden, weight, targets, *, bias=None, ignore_index=-100):
    """The plain PyTorch expression with N x V logits, in the input dtype: the baseline of tests and benchmarks.

    ``log_softmax(hidden @ weight.T + bias, -1).gather(targets)``, 0 at ignored rows, returned as float32
    (float64 for float64 inputs). Differentiable through torch autograd.
    """
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    valid = targets != ignore_index
    t = torch.where(valid, targets, 0).to(torch.int64)
    tok = torch.log_softmax(logits, -1).gather(1, t[:, None]).squeeze(1)
    return torch.where(valid, tok, 0.0).to(compute_dtype(hidden))
