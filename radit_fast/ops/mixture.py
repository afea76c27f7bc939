"""Token-level mixture of k next-token distributions (ensemble decoding over retrieved chunks).

    out[b, v] = logsumexp_i( log_weights[b, i] + log_softmax(logits[b, i])_v )

computed in two passes over the logits (per-row logsumexp ``lse_i``, then ``logsumexp_i(c_i + x_iv)`` with
``c_i = w_i - lse_i``) without a [B, k, V] intermediate. Gradient (closed form, applied in
:class:`MixtureLogprobs` from the saved ``c`` and ``out``), with ``pi_iv = exp(c_i + x_iv - out_v)`` the
posterior of chunk i given token v and ``p_i = softmax(x_i)``:

    d out_v / d x_iu = pi_iv (delta_uv - p_iu)    ->  grad_x_iu = G_u pi_iu - p_iu sum_v G_v pi_iv
    d out_v / d w_i  = pi_iv                       ->  grad_w_i  = sum_v G_v pi_iv

Layers (STYLE section 2): launcher ``mixture_launch`` (no autograd; backends "cpu", "triton", "cuda") -> custom
op ``torch.ops.radit.mixture_logprobs_fwd`` (opaque to torch.compile, with a fake implementation; eager mode
skips the dispatcher, see ``_fwd``) -> ``MixtureLogprobs`` (autograd; the backward is plain torch) ->
``mixture_logprobs``.
"""
from __future__ import annotations

import torch

from radit_fast import _native
from radit_fast.ops._common import (NEG_INF, check_bk, compute_dtype, masked_log_softmax, pick_impl,
                                    safe_logsumexp, tensor_arg)
from radit_fast.ops._dispatch import common_device


# ---- torch reference ----
def mixture_logprobs_torch(logits: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
    """Differentiable torch composition (the reference; materialises [B, k, V])."""
    dt = compute_dtype(logits, log_weights)
    logp = masked_log_softmax(logits.to(dt), None)
    w = log_weights.to(dt).unsqueeze(-1)
    joint = torch.where((w == NEG_INF) | (logp == NEG_INF), torch.full_like(logp, NEG_INF), w + logp)
    return safe_logsumexp(joint, dim=1)


def naive_mixture_logprobs(logits: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
    """The plain PyTorch expression (baseline of benchmarks): a float32 [B, k, V] log_softmax and its sum."""
    return torch.logsumexp(log_weights.float().unsqueeze(-1) + torch.log_softmax(logits.float(), -1), 1)


# ---- launcher (no autograd) ----
def mixture_launch(logits: torch.Tensor, log_weights: torch.Tensor, impl: str):
    """Runs the fused kernels: (out [B, V] f32, c [B, k] f32) with c_i = w_i - logsumexp_v(logits_i)."""
    B, k, V = logits.shape
    if logits.stride(2) != 1:
        logits = logits.contiguous()
    out = torch.empty(B, V, dtype=torch.float32, device=logits.device)
    c = torch.empty(B, k, dtype=torch.float32, device=logits.device)
    if B == 0:
        return out, c
    if impl == "triton":
        from radit_fast.triton.ensemble import mixture_triton

        mixture_triton(logits, log_weights, c, out)
        return out, c
    args = (tensor_arg(logits, "logits"), tensor_arg(log_weights, "log_weights"), tensor_arg(c), tensor_arg(out))
    if impl == "cuda":
        # Per-split logsumexp states of the vocabulary-split first pass (see csrc/ensemble/ensemble_cuda.cu).
        ws = torch.empty(B * k * _native._C.mixture_max_splits * 2, dtype=torch.float32, device=logits.device)
        _native._C.mixture_forward_cuda(*args, tensor_arg(ws), _native.cuda_stream(out))
    else:
        _native._C.mixture_forward_cpu(*args)
    return out, c


def mixture_backward(grad_out, logits, c, out):
    """Closed-form gradient (grad_logits [B, k, V] f32, grad_log_weights [B, k] f32); see the module doc.

    Two [B, k, V] float32 temporaries (pi, then the softmax), updated in place. pi = exp(c + x - out) is NaN
    only for -inf - -inf (a token no chunk can produce, or a dropped chunk at such a token): those are 0.
    """
    g = grad_out.to(torch.float32).unsqueeze(1)  # [B, 1, V]
    x = logits.to(torch.float32)
    gpi = torch.exp((c.unsqueeze(-1) + x).sub_(out.unsqueeze(1))).nan_to_num_(0.0).mul_(g)
    s = gpi.sum(-1)  # [B, k]
    p = torch.softmax(x, -1).nan_to_num_(0.0)  # an all -inf row has no mass
    return gpi.sub_(p.mul_(s.unsqueeze(-1))), s


# ---- custom op (opaque to torch.compile, with a fake implementation) ----
@torch.library.custom_op("radit::mixture_logprobs_fwd", mutates_args=())
def _fwd_op(logits: torch.Tensor, log_weights: torch.Tensor, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, V], c [B, k]) float32, as :func:`mixture_launch`."""
    return mixture_launch(logits, log_weights, impl)


@_fwd_op.register_fake
def _(logits, log_weights, impl):
    B, k, V = logits.shape
    return logits.new_empty(B, V, dtype=torch.float32), logits.new_empty(B, k, dtype=torch.float32)


def _fwd(*args):
    """The custom op while torch.compile traces; in eager mode the launcher itself (see replug._fwd: decoding
    calls the mixture once per generated token)."""
    return torch.ops.radit.mixture_logprobs_fwd(*args) if torch.compiler.is_compiling() else mixture_launch(*args)


# ---- autograd ----
class MixtureLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, log_weights, impl):
        out, c = _fwd(logits, log_weights, impl)
        ctx.save_for_backward(logits, c, out)
        ctx.dtypes = (logits.dtype, log_weights.dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        logits, c, out = ctx.saved_tensors
        d_x, d_w = mixture_backward(grad_out, logits, c, out)
        return (d_x.to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None,
                d_w.to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None, None)


# ---- public function ----
def mixture_logprobs(logits: torch.Tensor, log_weights: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """Log-probabilities of the token mixture ``sum_i w_i softmax(logits_i)`` of k chunk-conditioned LMs.

    Args:
        logits: [B, k, V] float (float32, bfloat16 or float16 on the kernels), the next-token logits of each
            of the k augmented sequences of each query.
        log_weights: [B, k] float, log mixture weights (typically ``log_softmax(retriever_scores / t)``,
            optionally plus each chunk's running answer log-likelihood, renormalised). Used as given: the
            mixture is normalised when the weights are. ``-inf`` drops a chunk; a row with every chunk
            dropped gives -inf everywhere.

    Returns:
        [B, V] float32 (float64 on the torch path for float64 inputs). Differentiable w.r.t. both inputs
        (closed form, see the module doc).

    Example:
        >>> logits = torch.tensor([[[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]]])
        >>> w = torch.log(torch.tensor([[0.25, 0.75]]))
        >>> out = mixture_logprobs(logits, w, impl="torch")
        >>> ref = (0.25 * logits[0, 0].softmax(0) + 0.75 * logits[0, 1].softmax(0)).log()
        >>> bool(torch.allclose(out[0], ref))
        True
    """
    op = "mixture_logprobs"
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or not logits.is_floating_point():
        raise ValueError(f"{op}: logits must be a floating tensor of shape [B, k, V], got "
                         f"{list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    B, k, V = logits.shape
    if k < 1 or V < 1:
        raise ValueError(f"{op}: logits must have k >= 1 and V >= 1, got shape {list(logits.shape)}")
    check_bk(op, "log_weights", log_weights, (B, k))
    device = common_device(op, logits=logits, log_weights=log_weights)
    impl = pick_impl(op, impl, device, logits, log_weights, cuda_kernel="mixture_forward_cuda")
    if impl == "torch":
        return mixture_logprobs_torch(logits, log_weights)
    return MixtureLogprobs.apply(logits, log_weights, impl)
