"""LM-Supervised Retrieval (LSR) distillation loss and the helpers that turn answer log-likelihoods into
LSR scores.

    p_R   = softmax(retriever_scores / retriever_temperature)      (trained: gradient flows to the scores)
    p_LSR = softmax(lm_scores / lm_temperature)                      (targets: constants, no gradient)

Directions (derived in csrc/ensemble/ensemble.h), with z = s / t_R:

* ``"lsr_to_retriever"`` (default; Atlas "PDist" and the REPLUG code): ``KL(p_LSR || p_R)``,
  ``dKL/ds_j = (p_R,j - p_LSR,j) / t_R``.
* ``"retriever_to_lsr"`` (the RA-DIT paper's notation): ``KL(p_R || p_LSR)``,
  ``dKL/ds_j = p_R,j (log p_R,j - log p_LSR,j - KL) / t_R``.

Both softmaxes run over the present chunks only (``mask``). A row whose KL is +inf (one distribution puts
mass where the other is exactly 0, e.g. an lm_score of -inf) has zero gradient, never NaN.

Layers (STYLE section 2): launcher ``lsr_launch`` (no autograd; backends "cpu", "triton", "cuda") -> custom op
``torch.ops.radit.lsr_loss_fwd`` (opaque to torch.compile, with a fake implementation; eager mode skips the
dispatcher, see ``_fwd``) -> ``LsrLoss`` (autograd) -> ``lsr_loss``.
"""
from __future__ import annotations

import torch

from radit_fast import _native
from radit_fast.ops._common import (NEG_INF, check_bk, check_mask, check_temperature, compute_dtype,
                                    masked_log_softmax, pick_impl, tensor_arg)
from radit_fast.ops._dispatch import common_device

DIRECTIONS = ("lsr_to_retriever", "retriever_to_lsr")
REDUCTIONS = ("mean", "sum", "none")
SCORE_KINDS = ("mean", "sum", "prob")


# ---- LSR scores ----
def lsr_scores(logprobs: torch.Tensor, lengths: torch.Tensor, *, kind: str = "mean") -> torch.Tensor:
    """LSR scores ``score_LM(y | c o x)`` from answer log-likelihoods.

    Args:
        logprobs: either sequence totals [B, k] (``sum_t log p(y_t | ...)`` per chunk) or token
            log-probs [B, k, T] padded on the right (entries at positions >= length are ignored).
        lengths: int [B, k], number of answer tokens per chunk; 0 marks a missing chunk.
        kind: ``"mean"`` (default: the length-normalised log-likelihood sum/len, as Atlas and the REPLUG
            code do), ``"sum"`` (the total log-likelihood) or ``"prob"`` (``exp(sum)``, the paper's formula;
            it underflows to 0 for long answers, which makes the LSR targets uniform).

    Returns:
        float [B, k] (float32, or float64 for float64 input); -inf for missing chunks (length 0), which
        gives them zero LSR probability. Pass ``mask=lengths > 0`` to :func:`lsr_loss` as well so that the
        retriever's softmax ignores them too. Differentiable (plain torch).

    Example:
        >>> lsr_scores(torch.tensor([[-4.0, -3.0]]), torch.tensor([[2, 3]]))
        tensor([[-2., -1.]])
        >>> lsr_scores(torch.tensor([[[-1.0, -2.0, 9.0]]]), torch.tensor([[2]]), kind="sum")
        tensor([[-3.]])
    """
    op = "lsr_scores"
    if kind not in SCORE_KINDS:
        raise ValueError(f"{op}: kind must be one of {SCORE_KINDS}, got {kind!r}")
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 2 or lengths.is_floating_point():
        raise ValueError(f"{op}: lengths must be an integer tensor of shape [B, k]")
    if not isinstance(logprobs, torch.Tensor) or not logprobs.is_floating_point():
        raise ValueError(f"{op}: logprobs must be a floating tensor of shape [B, k] or [B, k, T]")
    if logprobs.dim() == 3:
        if tuple(logprobs.shape[:2]) != tuple(lengths.shape):
            raise ValueError(f"{op}: token logprobs must have shape [B, k, T] with [B, k] = "
                             f"{list(lengths.shape)}, got {list(logprobs.shape)}")
        pos = torch.arange(logprobs.shape[2], device=logprobs.device)
        keep = pos < lengths.unsqueeze(-1)
        totals = torch.where(keep, logprobs, torch.zeros_like(logprobs)).sum(-1)
    elif logprobs.dim() == 2:
        if tuple(logprobs.shape) != tuple(lengths.shape):
            raise ValueError(f"{op}: logprobs must have shape [B, k] = {list(lengths.shape)}, "
                             f"got {list(logprobs.shape)}")
        totals = logprobs
    else:
        raise ValueError(f"{op}: logprobs must have shape [B, k] or [B, k, T], got {list(logprobs.shape)}")
    common_device(op, logprobs=logprobs, lengths=lengths)
    totals = totals.to(compute_dtype(logprobs))
    missing = lengths <= 0
    if kind == "mean":
        score = totals / lengths.clamp(min=1).to(totals.dtype)
    elif kind == "sum":
        score = totals
    else:
        score = totals.exp()
    return torch.where(missing, torch.full_like(score, NEG_INF), score)


# ---- torch reference ----
def lsr_loss_rows_torch(retriever_scores, lm_scores, retriever_temperature, lm_temperature, mask, direction):
    """Per-row KL [B] as a differentiable torch composition (the reference)."""
    dt = compute_dtype(retriever_scores, lm_scores)
    log_p = masked_log_softmax(retriever_scores.to(dt) / retriever_temperature, mask)
    log_q = masked_log_softmax(lm_scores.detach().to(dt) / lm_temperature, mask)
    if direction == "lsr_to_retriever":  # KL(q || p)
        log_a, log_b = log_q, log_p
    else:  # KL(p || q)
        log_a, log_b = log_p, log_q
    live = log_a != NEG_INF  # terms with mass; 0 log 0 = 0 elsewhere
    infinite = (live & (log_b == NEG_INF)).any(dim=-1)  # mass where the other distribution has none
    zero = torch.zeros_like(log_a)
    safe_a = torch.where(live, log_a, zero)
    safe_b = torch.where(live & (log_b != NEG_INF), log_b, zero)
    terms = torch.where(live, safe_a.exp() * (safe_a - safe_b), zero)
    kl = terms.sum(-1)
    # Rows with infinite KL: value +inf, gradient 0 (the finite surrogate above carries no gradient there).
    return torch.where(infinite, torch.full_like(kl, float("inf")), kl)


def naive_lsr_loss(retriever_scores, lm_scores, *, retriever_temperature=1.0, lm_temperature=0.01, mask=None,
                   direction="lsr_to_retriever", reduction="mean"):
    """The plain PyTorch expression (baseline of benchmarks): masked entries filled with the dtype's minimum,
    ``F.kl_div`` with log targets, autograd through temporaries."""
    z = retriever_scores / retriever_temperature
    u = lm_scores.detach() / lm_temperature
    if mask is not None:
        z = z.masked_fill(~mask, torch.finfo(z.dtype).min)
        u = u.masked_fill(~mask, torch.finfo(u.dtype).min)
    log_p, log_q = torch.log_softmax(z, -1), torch.log_softmax(u, -1)
    if direction == "lsr_to_retriever":  # kl_div(input, target) = KL(target || input)
        rows = torch.nn.functional.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    else:
        rows = torch.nn.functional.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    return _reduce(rows, reduction)


def _reduce(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows


# ---- launcher (no autograd) ----
def lsr_launch(retriever_scores, lm_scores, retriever_temperature, lm_temperature, mask, direction, impl,
               with_grad):
    """Runs the fused kernel: (loss [B] f32, grad_scores [B, k] f32 | None) with grad = dloss_b/ds_b."""
    B, k = retriever_scores.shape
    dev = retriever_scores.device
    loss = torch.empty(B, dtype=torch.float32, device=dev)
    grad = torch.empty(B, k, dtype=torch.float32, device=dev) if with_grad else None
    code = DIRECTIONS.index(direction)
    if B == 0:
        return loss, grad
    if impl == "triton":
        from radit_fast.triton.ensemble import lsr_triton

        mask_u8 = mask.view(torch.uint8) if mask is not None else None
        lsr_triton(retriever_scores, lm_scores, mask_u8, retriever_temperature, lm_temperature, code, loss, grad)
        return loss, grad
    args = (tensor_arg(retriever_scores, "retriever_scores"), tensor_arg(lm_scores, "lm_scores"),
            tensor_arg(mask, "mask"), retriever_temperature, lm_temperature, code, tensor_arg(loss), tensor_arg(grad))
    if impl == "cuda":
        _native._C.lsr_forward_cuda(*args, _native.cuda_stream(loss))
    else:
        _native._C.lsr_forward_cpu(*args)
    return loss, grad


# ---- custom op (opaque to torch.compile, with a fake implementation) ----
@torch.library.custom_op("radit::lsr_loss_fwd", mutates_args=())
def _fwd_op(retriever_scores: torch.Tensor, lm_scores: torch.Tensor, retriever_temperature: float,
            lm_temperature: float, mask: torch.Tensor | None, direction: str, impl: str,
            with_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``lsr_launch`` with a [0] tensor for the gradient when not with_grad."""
    loss, grad = lsr_launch(retriever_scores, lm_scores, retriever_temperature, lm_temperature, mask, direction,
                            impl, with_grad)
    return loss, loss.new_empty(0) if grad is None else grad  # custom ops return no None


@_fwd_op.register_fake
def _(retriever_scores, lm_scores, retriever_temperature, lm_temperature, mask, direction, impl, with_grad):
    B, k = retriever_scores.shape
    return (retriever_scores.new_empty(B, dtype=torch.float32),
            retriever_scores.new_empty((B, k) if with_grad else (0,), dtype=torch.float32))


def _fwd(*args):
    """The custom op while torch.compile traces; in eager mode the launcher itself (see replug._fwd)."""
    return torch.ops.radit.lsr_loss_fwd(*args) if torch.compiler.is_compiling() else lsr_launch(*args)


# ---- autograd ----
class LsrLoss(torch.autograd.Function):
    """Fused per-row LSR KL; the gradient w.r.t. the retriever scores comes from the forward kernel."""

    @staticmethod
    def forward(ctx, retriever_scores, lm_scores, retriever_temperature, lm_temperature, mask, direction, impl,
                with_grad):
        loss, grad = _fwd(retriever_scores, lm_scores, retriever_temperature, lm_temperature, mask, direction, impl,
                          with_grad)
        ctx.save_for_backward(grad)
        ctx.dtype = retriever_scores.dtype
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rows):
        (grad,) = ctx.saved_tensors
        d_s = (grad * grad_rows.to(torch.float32).unsqueeze(1)).to(ctx.dtype) if ctx.needs_input_grad[0] else None
        return d_s, None, None, None, None, None, None, None


# ---- public function ----
def lsr_loss(retriever_scores: torch.Tensor, lm_scores: torch.Tensor, *, retriever_temperature: float = 1.0,
             lm_temperature: float = 0.01, mask: torch.Tensor | None = None,
             direction: str = "lsr_to_retriever", reduction: str = "mean", impl: str = "auto") -> torch.Tensor:
    """LSR distillation loss between the retriever's and the LM's distributions over k chunks.

    Args:
        retriever_scores: [B, k] float, ``s(x, c_i)`` from the query encoder (receives the gradient).
        lm_scores: [B, k] float LSR scores (see :func:`lsr_scores`); constants: never differentiated
            (-inf = zero LSR probability).
        retriever_temperature: ``tau_R`` > 0 of ``p_R = softmax(s / tau_R)``.
        lm_temperature: ``tau_LSR`` > 0 of ``p_LSR = softmax(lm_scores / tau_LSR)`` (paper: 0.01).
        mask: optional bool [B, k], True = chunk present; both softmaxes run over present chunks only.
        direction: ``"lsr_to_retriever"`` = KL(p_LSR || p_R) (default, public implementations) or
            ``"retriever_to_lsr"`` = KL(p_R || p_LSR) (the paper's notation).
        reduction: ``"mean"`` over the B queries (default), ``"sum"``, or ``"none"`` ([B]).
        impl: "auto" | "cpu" | "cuda" | "triton" | "torch".

    Returns:
        a float32 scalar (or [B] for reduction="none"; float64 on the torch path for float64 inputs),
        differentiable w.r.t. ``retriever_scores`` only.

    Example:
        >>> s = torch.tensor([[1.0, 0.0, -1.0]])
        >>> float(lsr_loss(s, s, lm_temperature=1.0, impl="torch"))  # equal distributions
        0.0
        >>> q = torch.softmax(torch.tensor([0.0, 1.0, 0.0]), 0)
        >>> ref = (q * (q.log() - torch.log_softmax(s[0], 0))).sum()
        >>> bool(torch.isclose(lsr_loss(s, torch.tensor([[0.0, 1.0, 0.0]]), lm_temperature=1.0), ref))
        True
    """
    op = "lsr_loss"
    B, k = check_bk(op, "retriever_scores", retriever_scores)
    check_bk(op, "lm_scores", lm_scores, (B, k))
    retriever_temperature = check_temperature(op, "retriever_temperature", retriever_temperature)
    lm_temperature = check_temperature(op, "lm_temperature", lm_temperature)
    if direction not in DIRECTIONS:
        raise ValueError(f"{op}: direction must be one of {DIRECTIONS}, got {direction!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    device = common_device(op, retriever_scores=retriever_scores, lm_scores=lm_scores, mask=mask)
    impl = pick_impl(op, impl, device, retriever_scores, lm_scores, cuda_kernel="lsr_forward_cuda")
    mask = check_mask(op, mask, (B, k), rows=impl != "cpu")
    if impl == "torch":
        rows = lsr_loss_rows_torch(retriever_scores, lm_scores, retriever_temperature, lm_temperature, mask,
                                   direction)
    else:
        lm_scores = lm_scores.detach()
        with_grad = torch.is_grad_enabled() and retriever_scores.requires_grad
        rows = LsrLoss.apply(retriever_scores, lm_scores, retriever_temperature, lm_temperature, mask, direction,
                             impl, with_grad)
    return _reduce(rows, reduction)
