"""Triton kernels of the ensemble family (REPLUG marginal, LSR KL, token mixture).

Math and gradients (derived in csrc/ensemble/ensemble.h), per row of k chunks, z = s / t over present chunks,
p = softmax(z):

* REPLUG: ``m = logsumexp_i(log p_i + l_i)``; ``w_i = exp(log p_i + l_i - m)``;
  ``dm/dl_i = w_i``, ``dm/ds_i = (w_i - p_i) / t``; 0 when m = -inf.
* LSR: ``q = softmax(lm_score / t_LSR)`` (constant). ``KL(q || p)``: ``dKL/ds_j = (p_j sum(q) - q_j) / t``;
  ``KL(p || q)``: ``dKL/ds_j = p_j (log p_j - log q_j - KL) / t``; rows with KL = +inf get gradient 0.
* mixture: ``out_v = logsumexp_i(c_i + x_iv)``, ``c_i = w_i - logsumexp_v x_iv`` (value only).

One program per [k] row (BLOCK_K = next power of two >= k) for the [B, k] ops; the mixture runs one program
per [b, i] row (online logsumexp over V blocks) and one per (b, V block) looping over the k chunks. Fixed
block sizes, no autotuning, float32 math; every -inf case goes through ``tl.where`` so no NaN (and no
interpreter warning) is ever produced. Launchers take torch tensors and write into preallocated outputs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAX_BLOCK_V = 1024


@triton.jit
def _row_lse(x):
    """logsumexp of a [BLOCK] vector; -inf for an all -inf vector."""
    mx = tl.max(x, 0)
    safe = tl.where(mx == float("-inf"), 0.0, mx)
    s = tl.sum(tl.exp(x - safe), 0)
    return tl.where(mx == float("-inf"), float("-inf"), safe + tl.log(tl.where(s > 0.0, s, 1.0)))


@triton.jit
def _log_softmax(z, lse):
    return tl.where(z == float("-inf"), float("-inf"), z - tl.where(lse == float("-inf"), 0.0, lse))


@triton.jit
def _present(m_ptr, m_s0, m_s1, b, offs, k, HAS_MASK: tl.constexpr):
    inb = offs < k
    if HAS_MASK:
        mv = tl.load(m_ptr + b * m_s0 + offs * m_s1, mask=inb, other=0)
        inb = inb & (mv != 0)
    return inb


@triton.jit
def _replug_fwd_kernel(lm_ptr, lm_s0, lm_s1, s_ptr, s_s0, s_s1, m_ptr, m_s0, m_s1, out_ptr, glm_ptr, gs_ptr,
                       k, temperature, HAS_MASK: tl.constexpr, WITH_GRAD: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    pres = _present(m_ptr, m_s0, m_s1, b, offs, k, HAS_MASK)
    s = tl.load(s_ptr + b * s_s0 + offs * s_s1, mask=pres, other=float("-inf")).to(tl.float32)
    lm = tl.load(lm_ptr + b * lm_s0 + offs * lm_s1, mask=pres, other=float("-inf")).to(tl.float32)
    z = tl.where(pres, s / temperature, float("-inf"))
    log_p = _log_softmax(z, _row_lse(z))
    a = tl.where((log_p == float("-inf")) | (lm == float("-inf")), float("-inf"), log_p + lm)
    m = _row_lse(a)
    tl.store(out_ptr + b, m)
    if WITH_GRAD:
        post = tl.exp(_log_softmax(a, m))
        prior = tl.exp(log_p)
        gs = tl.where(m == float("-inf"), 0.0, (post - prior) / temperature)
        inb = offs < k
        tl.store(glm_ptr + b * k + offs, tl.where(pres, post, 0.0), mask=inb)
        tl.store(gs_ptr + b * k + offs, tl.where(pres, gs, 0.0), mask=inb)


@triton.jit
def _lsr_fwd_kernel(s_ptr, s_s0, s_s1, t_ptr, t_s0, t_s1, m_ptr, m_s0, m_s1, loss_ptr, g_ptr, k, tr, tlsr,
                    DIRECTION: tl.constexpr, HAS_MASK: tl.constexpr, WITH_GRAD: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    pres = _present(m_ptr, m_s0, m_s1, b, offs, k, HAS_MASK)
    s = tl.load(s_ptr + b * s_s0 + offs * s_s1, mask=pres, other=float("-inf")).to(tl.float32)
    t = tl.load(t_ptr + b * t_s0 + offs * t_s1, mask=pres, other=float("-inf")).to(tl.float32)
    z = tl.where(pres, s / tr, float("-inf"))
    u = tl.where(pres, t / tlsr, float("-inf"))
    log_p = _log_softmax(z, _row_lse(z))
    log_q = _log_softmax(u, _row_lse(u))
    if DIRECTION == 0:  # KL(q || p)
        log_a = log_q
        log_b = log_p
    else:  # KL(p || q)
        log_a = log_p
        log_b = log_q
    live = log_a != float("-inf")
    safe_a = tl.where(live, log_a, 0.0)
    safe_b = tl.where(log_b == float("-inf"), 0.0, log_b)
    kl_fin = tl.sum(tl.where(live, tl.exp(safe_a) * (safe_a - safe_b), 0.0), 0)
    infinite = tl.max((live & (log_b == float("-inf"))).to(tl.int32), 0) > 0
    tl.store(loss_ptr + b, tl.where(infinite, float("inf"), kl_fin))
    if WITH_GRAD:
        p = tl.exp(log_p)
        q = tl.exp(log_q)
        if DIRECTION == 0:
            g = p * tl.sum(q, 0) - q
        else:
            g = tl.where(log_p == float("-inf"), 0.0,
                         p * ((tl.where(log_p == float("-inf"), 0.0, log_p) - safe_b) - kl_fin))
        g = tl.where(pres, g / tr, 0.0)
        g = tl.where(infinite, 0.0, g)
        tl.store(g_ptr + b * k + offs, g, mask=offs < k)


@triton.jit
def _mixture_lse_kernel(x_ptr, x_s0, x_s1, w_ptr, w_s0, w_s1, c_ptr, k, V, BLOCK_V: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    b = r // k
    i = r % k
    base = x_ptr + b * x_s0 + i * x_s1
    offs = tl.arange(0, BLOCK_V)
    m = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        x = tl.load(base + v0 + offs, mask=(v0 + offs) < V, other=float("-inf")).to(tl.float32)
        new = tl.maximum(m, x)
        safe = tl.where(new == float("-inf"), 0.0, new)
        s = s * tl.exp(m - safe) + tl.exp(x - safe)
        m = new
    mx = tl.max(m, 0)
    safe_mx = tl.where(mx == float("-inf"), 0.0, mx)
    tot = tl.sum(s * tl.exp(m - safe_mx), 0)
    lse = tl.where(mx == float("-inf"), float("-inf"), safe_mx + tl.log(tl.where(tot > 0.0, tot, 1.0)))
    w = tl.load(w_ptr + b * w_s0 + i * w_s1).to(tl.float32)
    dead = (lse == float("-inf")) | (w == float("-inf"))
    tl.store(c_ptr + r, tl.where(dead, float("-inf"), w - tl.where(dead, 0.0, lse)))


@triton.jit
def _mixture_combine_kernel(x_ptr, x_s0, x_s1, c_ptr, out_ptr, k, V, BLOCK_V: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    inb = v < V
    m = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_V,), tl.float32)
    for i in range(0, k):
        ci = tl.load(c_ptr + b * k + i)
        x = tl.load(x_ptr + b * x_s0 + i * x_s1 + v, mask=inb, other=float("-inf"))
        a = tl.where(x.to(tl.float32) == float("-inf"), float("-inf"), ci + x.to(tl.float32))
        new = tl.maximum(m, a)
        safe = tl.where(new == float("-inf"), 0.0, new)
        s = s * tl.exp(m - safe) + tl.exp(a - safe)
        m = new
    out = tl.where(m == float("-inf"), float("-inf"),
                   tl.where(m == float("-inf"), 0.0, m) + tl.log(tl.where(s > 0.0, s, 1.0)))
    tl.store(out_ptr + b * V + v, out, mask=inb)


def _block_k(k: int) -> int:
    return max(16, triton.next_power_of_2(k))


def replug_triton(lm: torch.Tensor, scores: torch.Tensor, mask_u8: torch.Tensor | None, temperature: float,
                  out: torch.Tensor, grad_lm: torch.Tensor | None, grad_scores: torch.Tensor | None) -> None:
    """REPLUG marginal into ``out`` [B] (and the [B, k] gradients when given)."""
    B, k = lm.shape
    if B == 0:
        return
    m = mask_u8 if mask_u8 is not None else out
    ms = (mask_u8.stride(0), mask_u8.stride(1)) if mask_u8 is not None else (0, 0)
    g1 = grad_lm if grad_lm is not None else out
    g2 = grad_scores if grad_scores is not None else out
    _replug_fwd_kernel[(B,)](lm, lm.stride(0), lm.stride(1), scores, scores.stride(0), scores.stride(1), m, *ms,
                             out, g1, g2, k, float(temperature), HAS_MASK=mask_u8 is not None,
                             WITH_GRAD=grad_lm is not None, BLOCK_K=_block_k(k))


def lsr_triton(scores: torch.Tensor, lm_scores: torch.Tensor, mask_u8: torch.Tensor | None, tr: float,
               tlsr: float, direction: int, loss: torch.Tensor, grad: torch.Tensor | None) -> None:
    """Per-row LSR KL into ``loss`` [B] (and dKL_b/ds into ``grad`` [B, k] when given)."""
    B, k = scores.shape
    if B == 0:
        return
    m = mask_u8 if mask_u8 is not None else loss
    ms = (mask_u8.stride(0), mask_u8.stride(1)) if mask_u8 is not None else (0, 0)
    _lsr_fwd_kernel[(B,)](scores, scores.stride(0), scores.stride(1), lm_scores, lm_scores.stride(0),
                          lm_scores.stride(1), m, *ms, loss, grad if grad is not None else loss, k, float(tr),
                          float(tlsr), DIRECTION=int(direction), HAS_MASK=mask_u8 is not None,
                          WITH_GRAD=grad is not None, BLOCK_K=_block_k(k))


def mixture_triton(logits: torch.Tensor, log_weights: torch.Tensor, c: torch.Tensor, out: torch.Tensor) -> None:
    """Token mixture into ``out`` [B, V] and ``c`` [B, k] (logits' last dimension contiguous)."""
    B, k, V = logits.shape
    if B == 0:
        return
    block = min(_MAX_BLOCK_V, triton.next_power_of_2(V))
    _mixture_lse_kernel[(B * k,)](logits, logits.stride(0), logits.stride(1), log_weights, log_weights.stride(0),
                                  log_weights.stride(1), c, k, V, BLOCK_V=block)
    _mixture_combine_kernel[(B, triton.cdiv(V, block))](logits, logits.stride(0), logits.stride(1), c, out, k, V,
                                                        BLOCK_V=block)
