"""REPLUG ensemble over k retrieved chunks: ``log p(y|x) = logsumexp_i(log_softmax(s/t)_i + l_i)``.

Math and gradient (derived in csrc/ensemble/ensemble.h): with the prior ``p = softmax(s / t)`` over the
present chunks and the posterior ``w_i = exp(log p_i + l_i - m)``,

    dm/dl_i = w_i,        dm/ds_i = (w_i - p_i) / t.

The native and Triton kernels compute value and both gradients in one pass over each [k] row; the autograd
Function only scales the saved gradients by the upstream gradient. The torch path is a plain differentiable
composition (the reference) that also runs without the native module.

Layers (STYLE section 2): launcher ``replug_launch`` (no autograd; backends "cpu", "triton", "cuda") -> custom
op ``torch.ops.radit.replug_logprob_fwd`` (opaque to torch.compile, with a fake implementation; eager mode
skips the dispatcher, see ``_fwd``) -> ``ReplugLogprob`` (autograd) -> ``replug_logprob``.
"""
from __future__ import annotations

import torch

from radit_fast import _native
from radit_fast.ops._common import (NEG_INF, check_bk, check_mask, check_temperature, compute_dtype,
                                    masked_log_softmax, pick_impl, safe_logsumexp, tensor_arg)
from radit_fast.ops._dispatch import common_device

# ---- torch reference ----
def replug_logprob_torch(lm_logprobs: torch.Tensor, retriever_scores: torch.Tensor, temperature: float,
                         mask: torch.Tensor | None) -> torch.Tensor:
    """Differentiable torch composition (the reference); computes in float32 (float64 for float64 inputs)."""
    dt = compute_dtype(lm_logprobs, retriever_scores)
    log_prior = masked_log_softmax(retriever_scores.to(dt) / temperature, mask)
    joint = log_prior + lm_logprobs.to(dt)
    joint = torch.where(log_prior == NEG_INF, torch.full_like(joint, NEG_INF), joint)
    return safe_logsumexp(joint, dim=-1)


def naive_replug_logprob(lm_logprobs: torch.Tensor, retriever_scores: torch.Tensor, *, temperature: float = 1.0,
                         mask: torch.Tensor | None = None) -> torch.Tensor:
    """The plain PyTorch expression (baseline of benchmarks): no -inf guards, autograd through temporaries."""
    z = retriever_scores / temperature
    if mask is not None:
        z = z.masked_fill(~mask, NEG_INF)
    return torch.logsumexp(torch.log_softmax(z, -1) + lm_logprobs, -1)


# ---- launcher (no autograd) ----
def replug_launch(lm_logprobs: torch.Tensor, retriever_scores: torch.Tensor, temperature: float,
                  mask: torch.Tensor | None, impl: str, with_grad: bool):
    """Runs the fused kernel: (out [B] f32, grad_lm [B, k] f32 | None, grad_scores [B, k] f32 | None)."""
    B, k = lm_logprobs.shape
    dev = lm_logprobs.device
    out = torch.empty(B, dtype=torch.float32, device=dev)
    g_lm = torch.empty(B, k, dtype=torch.float32, device=dev) if with_grad else None
    g_s = torch.empty(B, k, dtype=torch.float32, device=dev) if with_grad else None
    if B == 0:
        return out, g_lm, g_s
    mask_u8 = mask.view(torch.uint8) if mask is not None else None
    if impl == "triton":
        from radit_fast.triton.ensemble import replug_triton

        replug_triton(lm_logprobs, retriever_scores, mask_u8, temperature, out, g_lm, g_s)
        return out, g_lm, g_s
    args = (tensor_arg(lm_logprobs, "lm_logprobs"), tensor_arg(retriever_scores, "retriever_scores"),
            tensor_arg(mask, "mask"), temperature, tensor_arg(out), tensor_arg(g_lm), tensor_arg(g_s))
    if impl == "cuda":
        _native._C.replug_forward_cuda(*args, _native.cuda_stream(out))
    else:
        _native._C.replug_forward_cpu(*args)
    return out, g_lm, g_s


# ---- custom op (opaque to torch.compile, with a fake implementation) ----
@torch.library.custom_op("radit::replug_logprob_fwd", mutates_args=())
def _fwd_op(lm_logprobs: torch.Tensor, retriever_scores: torch.Tensor, temperature: float,
            mask: torch.Tensor | None, impl: str, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``replug_launch`` with [0] tensors for the gradients when not with_grad."""
    out, g_lm, g_s = replug_launch(lm_logprobs, retriever_scores, temperature, mask, impl, with_grad)
    # Custom ops return no None, and no two outputs may alias: a fresh empty tensor for each missing gradient.
    return out, out.new_empty(0) if g_lm is None else g_lm, out.new_empty(0) if g_s is None else g_s


@_fwd_op.register_fake
def _(lm_logprobs, retriever_scores, temperature, mask, impl, with_grad):
    B, k = lm_logprobs.shape
    grad_shape = (B, k) if with_grad else (0,)
    return (lm_logprobs.new_empty(B, dtype=torch.float32), lm_logprobs.new_empty(grad_shape, dtype=torch.float32),
            lm_logprobs.new_empty(grad_shape, dtype=torch.float32))


def _fwd(*args):
    """The custom op while torch.compile traces (an opaque node); in eager mode the launcher itself: the
    dispatcher round trip (~30 us on the 2-core CI machine) would double the time of a small [B, k] call."""
    return torch.ops.radit.replug_logprob_fwd(*args) if torch.compiler.is_compiling() else replug_launch(*args)


# ---- autograd ----
class ReplugLogprob(torch.autograd.Function):
    """Fused REPLUG marginal; the gradients come from the forward kernel (closed form)."""

    @staticmethod
    def forward(ctx, lm_logprobs, retriever_scores, temperature, mask, impl, with_grad):
        out, g_lm, g_s = _fwd(lm_logprobs, retriever_scores, temperature, mask, impl, with_grad)
        ctx.save_for_backward(g_lm, g_s)
        ctx.dtypes = (lm_logprobs.dtype, retriever_scores.dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        g_lm, g_s = ctx.saved_tensors
        g = grad_out.to(torch.float32).unsqueeze(1)
        d_lm = (g_lm * g).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        d_s = (g_s * g).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return d_lm, d_s, None, None, None, None


# ---- public function ----
def replug_logprob(lm_logprobs: torch.Tensor, retriever_scores: torch.Tensor, *, temperature: float = 1.0,
                   mask: torch.Tensor | None = None, impl: str = "auto") -> torch.Tensor:
    """REPLUG ensemble log-likelihood of each query's answer over its k retrieved chunks.

    ``out[b] = logsumexp_i(log_softmax(retriever_scores[b] / temperature)_i + lm_logprobs[b, i])`` over the
    chunks with ``mask[b, i]`` True (all when ``mask`` is None); masked chunks have no influence and get zero
    gradient.

    Args:
        lm_logprobs: [B, k] float, ``log p_LM(y | c_i o x)`` (sum of the answer tokens' log-probs; may be -inf).
        retriever_scores: [B, k] float, dual-encoder scores ``s(x, c_i)`` (-inf = zero prior weight).
        temperature: retriever temperature ``tau_R`` > 0.
        mask: optional bool [B, k], True = chunk present; every row needs at least one True.
        impl: "auto" | "cpu" | "cuda" | "triton" | "torch".

    Returns:
        [B] float32 (float64 on the torch path for float64 inputs). Differentiable w.r.t. both inputs:
        ``d/dlm_i`` = posterior_i, ``d/ds_i`` = (posterior_i - prior_i) / temperature. A row whose value is
        -inf (no chunk with mass) has zero gradient.

    Example:
        >>> lm = torch.tensor([[-1.0, -3.0, -2.0]])
        >>> s = torch.tensor([[2.0, 1.0, 0.0]])
        >>> out = replug_logprob(lm, s, impl="torch")
        >>> bool(torch.allclose(out, torch.logsumexp(torch.log_softmax(s, -1) + lm, -1)))
        True
        >>> replug_logprob(lm, s, mask=torch.tensor([[True, False, False]]), impl="torch")
        tensor([-1.])
    """
    op = "replug_logprob"
    B, k = check_bk(op, "lm_logprobs", lm_logprobs)
    check_bk(op, "retriever_scores", retriever_scores, (B, k))
    temperature = check_temperature(op, "temperature", temperature)
    device = common_device(op, lm_logprobs=lm_logprobs, retriever_scores=retriever_scores, mask=mask)
    impl = pick_impl(op, impl, device, lm_logprobs, retriever_scores, cuda_kernel="replug_forward_cuda")
    mask = check_mask(op, mask, (B, k), rows=impl != "cpu")
    if impl == "torch":
        return replug_logprob_torch(lm_logprobs, retriever_scores, temperature, mask)
    with_grad = torch.is_grad_enabled() and (lm_logprobs.requires_grad or retriever_scores.requires_grad)
    return ReplugLogprob.apply(lm_logprobs, retriever_scores, temperature, mask, impl, with_grad)
