"""Fused parallel-augmentation scorer: decoder hidden states of the B*k augmented sequences -> per-chunk answer
log-likelihoods [B, k] -> REPLUG ensemble log-likelihood [B] and/or the LSR loss.

Pipeline (no N x V logits and no per-token intermediate leaves the LM-head kernel):

    hidden [N, d] (answer positions only), weight [V, d], targets [N], segment_ids [N] (= b * k + i)
      --answer_logprobs_per_sequence-->  l[b, i] = sum_{n in segment b*k+i} log p(targets[n] | hidden[n])
      --replug_logprob-->                log p(y_b | x_b) = logsumexp_i(log_softmax(s_b / tau_R)_i + l[b, i])
      --lsr_scores + lsr_loss-->         KL between softmax(score(l) / tau_LSR) and softmax(s / tau_R)

Chunks without any answer position (a query with fewer than k retrieved chunks) are masked automatically.
Gradients: the ensemble is differentiable w.r.t. hidden, weight, bias (through the fused LM-head op) and the
retriever scores; the LSR loss only w.r.t. the retriever scores (the LM is the frozen teacher).
"""
from __future__ import annotations

import dataclasses

import torch

from radit_fast.ops._common import check_bk, check_temperature, debug_checks
from radit_fast.ops.answer_logprobs import answer_logprobs_per_sequence, naive_answer_logprobs
from radit_fast.ops.lsr import DIRECTIONS, REDUCTIONS, SCORE_KINDS, lsr_loss, lsr_scores, naive_lsr_loss
from radit_fast.ops.replug import naive_replug_logprob, replug_logprob


@dataclasses.dataclass(frozen=True)
class ScorerOptions:
    """Options of the scorer (validated on construction).

    Attributes:
        temperature: retriever temperature ``tau_R`` (ensemble prior and ``p_R`` of the LSR loss).
        lm_temperature: ``tau_LSR`` of ``p_LSR = softmax(score / tau_LSR)`` (paper: 0.01).
        score_kind: LSR score from the answer log-likelihood: "mean" (default, length-normalised, as Atlas and
            the REPLUG code), "sum" or "prob" (see :func:`radit_fast.ops.lsr.lsr_scores`).
        direction: "lsr_to_retriever" = KL(p_LSR || p_R) (default) or "retriever_to_lsr" = KL(p_R || p_LSR).
        reduction: LSR loss reduction over queries: "mean" | "sum" | "none".
        ignore_index: target value of positions that are not scored.
        impl: backend of every op: "auto" | "cpu" | "cuda" | "triton" | "torch".
    """

    temperature: float = 1.0
    lm_temperature: float = 0.01
    score_kind: str = "mean"
    direction: str = "lsr_to_retriever"
    reduction: str = "mean"
    ignore_index: int = -100
    impl: str = "auto"

    def __post_init__(self):
        check_temperature("ScorerOptions", "temperature", self.temperature)
        check_temperature("ScorerOptions", "lm_temperature", self.lm_temperature)
        for name, value, allowed in (("score_kind", self.score_kind, SCORE_KINDS),
                                     ("direction", self.direction, DIRECTIONS),
                                     ("reduction", self.reduction, REDUCTIONS)):
            if value not in allowed:
                raise ValueError(f"ScorerOptions: {name} must be one of {allowed}, got {value!r}")


@dataclasses.dataclass
class ScorerOutput:
    """What :func:`score_chunks` returns.

    Attributes:
        chunk_logprobs: [B, k] float32, answer log-likelihood per chunk (0 for a missing chunk).
        lengths: [B, k] int64, scored answer positions per chunk.
        mask: [B, k] bool, chunks that take part (given mask and lengths > 0).
        ensemble: [B] float32 REPLUG log-likelihood, or None when not requested.
        lsr_loss: the LSR loss (scalar, or [B] for reduction="none"), or None when not requested.
    """

    chunk_logprobs: torch.Tensor
    lengths: torch.Tensor
    mask: torch.Tensor
    ensemble: torch.Tensor | None = None
    lsr_loss: torch.Tensor | None = None


def chunk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, segment_ids: torch.Tensor,
                   num_queries: int, k: int, *, bias: torch.Tensor | None = None, ignore_index: int = -100,
                   impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-chunk answer log-likelihoods from hidden states, through the fused LM-head op.

    Args:
        hidden: [N, d] decoder hidden states at the answer positions of all B*k augmented sequences.
        weight: [V, d] LM-head weight (bias: optional [V]).
        targets: [N] int, the answer token predicted at each position (``ignore_index`` = not scored).
        segment_ids: [N] int64, ``b * k + i`` for a position of query b's sequence with chunk i.
        num_queries: B. k: chunks per query.

    Returns:
        (logprobs [B, k] float32 (float64 for float64 inputs), lengths [B, k] int64). Chunks without scored
        positions get logprob 0 and length 0. Differentiable w.r.t. hidden, weight and bias.

    Example:
        >>> hidden = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
        >>> lp, n = chunk_logprobs(hidden, torch.eye(2), torch.tensor([0, 1, 0]), torch.tensor([0, 0, 3]), 2, 2)
        >>> lp
        tensor([[-0.4402,  0.0000],
                [ 0.0000, -0.6931]])
        >>> n
        tensor([[2, 0],
                [0, 1]])
    """
    op = "chunk_logprobs"
    num_queries, k = int(num_queries), int(k)
    if num_queries < 0 or k < 1:
        raise ValueError(f"{op}: need num_queries >= 0 and k >= 1, got {num_queries} and {k}")
    if not isinstance(segment_ids, torch.Tensor) or segment_ids.dim() != 1 or segment_ids.is_floating_point():
        raise ValueError(f"{op}: segment_ids must be an integer tensor of shape [N]")
    if not isinstance(targets, torch.Tensor) or tuple(targets.shape) != tuple(segment_ids.shape):
        raise ValueError(f"{op}: targets must have shape [N] = {list(segment_ids.shape)}")
    S = num_queries * k
    seq = answer_logprobs_per_sequence(hidden, weight, targets, segment_ids=segment_ids, num_segments=S, bias=bias,
                                       ignore_index=ignore_index, impl=impl)
    valid = (targets != ignore_index).to(torch.int64)
    lengths = torch.zeros(S, dtype=torch.int64, device=targets.device).scatter_add_(0, segment_ids.long(), valid)
    return seq.view(num_queries, k), lengths.view(num_queries, k)


def score_chunks(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, segment_ids: torch.Tensor,
                 retriever_scores: torch.Tensor, *, bias: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None, options: ScorerOptions | None = None, ensemble: bool = True,
                 lsr: bool = True) -> ScorerOutput:
    """One LM-head pass to the ensemble log-likelihood and/or the LSR loss (see the module doc).

    Args:
        hidden, weight, targets, segment_ids, bias: as in :func:`chunk_logprobs`.
        retriever_scores: [B, k] dual-encoder scores (B and k are taken from its shape).
        mask: optional bool [B, k] of retrieved chunks; chunks without answer positions are masked in any case.
        options: :class:`ScorerOptions` (defaults when None).
        ensemble, lsr: which outputs to compute.

    Returns:
        :class:`ScorerOutput`. Every query needs at least one present chunk (ValueError otherwise).
    """
    op = "score_chunks"
    opts = options or ScorerOptions()
    B, k = check_bk(op, "retriever_scores", retriever_scores)
    track = ensemble and torch.is_grad_enabled()
    with torch.set_grad_enabled(track):  # the LSR targets alone need no graph through the LM head
        logprobs, lengths = chunk_logprobs(hidden, weight, targets, segment_ids, B, k, bias=bias,
                                           ignore_index=opts.ignore_index, impl=opts.impl)
    present = lengths > 0
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (B, k):
            raise ValueError(f"{op}: mask must be a bool tensor of shape [B, k] = {[B, k]}")
        present = present & mask.to(present.device)
    # On a GPU this check waits for the device: it runs there only under RADIT_DEBUG_CHECKS=1 (an empty query
    # then gets the kernels' empty-row results: REPLUG -inf, LSR loss 0, zero gradients).
    if B and debug_checks(present.device) and not bool(present.any(dim=1).all()):
        row = int((~present.any(dim=1)).nonzero()[0, 0])
        raise ValueError(f"{op}: query {row} has no chunk with scored answer positions (segment ids "
                         f"{row * k}..{row * k + k - 1} are empty, ignored or masked)")
    out = ScorerOutput(chunk_logprobs=logprobs, lengths=lengths, mask=present)
    if ensemble:
        out.ensemble = replug_logprob(logprobs, retriever_scores, temperature=opts.temperature, mask=present,
                                      impl=opts.impl)
    if lsr:
        targets_lsr = lsr_scores(logprobs.detach(), lengths, kind=opts.score_kind)
        out.lsr_loss = lsr_loss(retriever_scores, targets_lsr, retriever_temperature=opts.temperature,
                                lm_temperature=opts.lm_temperature, mask=present, direction=opts.direction,
                                reduction=opts.reduction, impl=opts.impl)
    return out


def ensemble_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         segment_ids: torch.Tensor, retriever_scores: torch.Tensor, *,
                         bias: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                         options: ScorerOptions | None = None) -> torch.Tensor:
    """REPLUG ensemble log-likelihood [B] of each query's answer over its k chunks, from hidden states.

    Differentiable w.r.t. hidden, weight, bias and retriever_scores. See :func:`score_chunks`.

    Example:
        >>> hidden = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
        >>> s = torch.tensor([[0.0, 5.0]])
        >>> ensemble_from_hidden(hidden, torch.eye(2), torch.tensor([0, 1, 0]), torch.tensor([0, 0, 1]), s)
        tensor([-0.6912])
    """
    return score_chunks(hidden, weight, targets, segment_ids, retriever_scores, bias=bias, mask=mask,
                        options=options, ensemble=True, lsr=False).ensemble


def lsr_loss_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         segment_ids: torch.Tensor, retriever_scores: torch.Tensor, *,
                         bias: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                         options: ScorerOptions | None = None) -> torch.Tensor:
    """LSR loss from the frozen LM's hidden states (no graph through the LM head); differentiable w.r.t.
    retriever_scores only. Reduction and direction from ``options``. See :func:`score_chunks`."""
    return score_chunks(hidden, weight, targets, segment_ids, retriever_scores, bias=bias, mask=mask,
                        options=options, ensemble=False, lsr=True).lsr_loss


def naive_score_chunks(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       segment_ids: torch.Tensor, retriever_scores: torch.Tensor, *,
                       bias: torch.Tensor | None = None, options: ScorerOptions | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain PyTorch composition of :func:`score_chunks` (the baseline of benchmarks and tests).

    N x V logits in the input dtype (``naive_answer_logprobs``), per-chunk sums by ``index_add``, then
    ``naive_replug_logprob`` and ``naive_lsr_loss`` of the op modules; autograd through every temporary.
    Chunks without scored positions are masked, as in :func:`score_chunks` (no user mask, no row checks).

    Returns:
        (ensemble [B], lsr_loss) as :func:`score_chunks` would put in ``ensemble`` and ``lsr_loss``.
    """
    opts = options or ScorerOptions()
    B, k = retriever_scores.shape
    tok = naive_answer_logprobs(hidden, weight, targets, bias=bias, ignore_index=opts.ignore_index)
    seg = segment_ids.long()
    logprobs = tok.new_zeros(B * k).index_add(0, seg, tok).view(B, k)
    valid = (targets != opts.ignore_index).long()
    lengths = torch.zeros(B * k, dtype=torch.int64, device=targets.device).index_add(0, seg, valid).view(B, k)
    present = lengths > 0
    ensemble = naive_replug_logprob(logprobs, retriever_scores, temperature=opts.temperature, mask=present)
    targets_lsr = lsr_scores(logprobs.detach(), lengths, kind=opts.score_kind)
    loss = naive_lsr_loss(retriever_scores, targets_lsr, retriever_temperature=opts.temperature,
                          lm_temperature=opts.lm_temperature, mask=present, direction=opts.direction,
                          reduction=opts.reduction)
    return ensemble, loss
